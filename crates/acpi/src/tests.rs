//! Builds tables and reads them back with [`crate::parse`].

use super::*;
use crate::parse::{self, AmlValue, MadtEntry, Resource};

/// QEMU microvm's virtio-mmio placement: window i at 0xfeb00000 + i * 0x200, GSI 16 + i.
fn microvm(n: usize) -> Vec<VirtioMmio> {
    (0..n)
        .map(|i| VirtioMmio {
            base: 0xfeb0_0000 + i as u64 * 0x200,
            gsi: 16 + i as u32,
        })
        .collect()
}

fn platform(vcpus: usize, devices: usize) -> Platform {
    Platform {
        vcpus,
        virtio: microvm(devices),
    }
}

#[test]
fn rsdp_xsdt_and_layout() {
    let t = build(&platform(2, 3), DEFAULT_BASE).unwrap();
    assert_eq!(t.base, DEFAULT_BASE);
    assert_eq!(t.rsdp_addr(), DEFAULT_BASE);
    let l = t.layout;
    for a in [l.rsdp, l.xsdt, l.fadt, l.madt, l.dsdt] {
        assert_eq!(
            a % 16,
            0,
            "{a:#x} is not 16-byte aligned (Linux scans for the RSDP in 16-byte steps)"
        );
        assert!((DEFAULT_BASE..AREA_END).contains(&a));
    }
    assert!(t.base + t.bytes.len() as u64 <= AREA_END);

    let r = parse::rsdp(t.table_at(l.rsdp).unwrap()).unwrap();
    assert_eq!(r.revision, 2);
    assert_eq!(r.length, 36);
    assert_eq!(r.rsdt, 0);
    assert_eq!(r.xsdt, l.xsdt);
    assert_eq!(r.oem_id, "GODWIT");

    let (h, entries) = parse::xsdt(t.table_at(l.xsdt).unwrap()).unwrap();
    assert_eq!(h.length, 36 + 16);
    assert_eq!(h.revision, 1);
    assert_eq!(entries, vec![l.fadt, l.madt]);

    // Tables do not overlap: each ends before the next starts.
    let mut spans: Vec<(u64, u64)> = [l.rsdp, l.xsdt, l.fadt, l.madt, l.dsdt]
        .iter()
        .map(|&a| (a, a + t.table_at(a).unwrap().len() as u64))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "{:x?} overlaps {:x?}", w[0], w[1]);
    }
    assert_eq!(spans.last().unwrap().1, t.base + t.bytes.len() as u64);
}

#[test]
fn fadt_is_hardware_reduced_with_our_registers() {
    let t = build(&platform(1, 0), DEFAULT_BASE).unwrap();
    let f = parse::fadt(t.table_at(t.layout.fadt).unwrap()).unwrap();
    assert_eq!(f.header.length, 276);
    assert!(f.header.revision >= 5);
    assert_eq!(f.flags, parse::FADT_HW_REDUCED | parse::FADT_RESET_REG_SUP);
    assert_eq!(f.x_dsdt, t.layout.dsdt);
    assert_eq!(f.dsdt as u64, t.layout.dsdt);
    assert_eq!(f.sci_int, 0);
    assert_eq!(f.iapc_boot_arch & (1 << 1), 0, "8042 must read as absent");
    assert_ne!(
        f.iapc_boot_arch & (1 << 5),
        0,
        "CMOS RTC must read as absent"
    );
    let io = |port: u16| parse::Gas {
        space: 1,
        bit_width: 8,
        bit_offset: 0,
        access_size: 1,
        address: port as u64,
    };
    assert_eq!(f.sleep_control, io(pm::SLEEP_CONTROL_PORT));
    assert_eq!(f.sleep_status, io(pm::SLEEP_STATUS_PORT));
    assert_eq!(f.reset_reg, io(pm::RESET_PORT));
    assert_eq!(f.reset_value, pm::RESET_VALUE);
}

#[test]
fn madt_has_one_lapic_per_vcpu_the_ioapic_and_overrides() {
    for vcpus in [1usize, 2, 4, 64, MAX_VCPUS] {
        let t = build(&platform(vcpus, 1), DEFAULT_BASE).unwrap();
        let m = parse::madt(t.table_at(t.layout.madt).unwrap()).unwrap();
        assert_eq!(m.header.length as usize, 44 + 8 * vcpus + 12 + 10 + 6);
        assert_eq!(m.local_apic_address, LAPIC_ADDR);
        assert_eq!(m.flags & 1, 1);
        let lapics: Vec<_> = m
            .entries
            .iter()
            .filter(|e| matches!(e, MadtEntry::LocalApic { .. }))
            .collect();
        assert_eq!(lapics.len(), vcpus);
        for (i, e) in lapics.iter().enumerate() {
            assert_eq!(
                **e,
                MadtEntry::LocalApic {
                    uid: i as u8,
                    apic_id: i as u8,
                    flags: 1
                }
            );
        }
        let rest: Vec<_> = m.entries[vcpus..].to_vec();
        assert_eq!(
            rest,
            vec![
                MadtEntry::IoApic {
                    id: 0,
                    address: IOAPIC_ADDR,
                    gsi_base: 0
                },
                MadtEntry::InterruptOverride {
                    bus: 0,
                    source: 0,
                    gsi: 2,
                    flags: 0
                },
                MadtEntry::LocalApicNmi {
                    uid: 0xff,
                    flags: 0,
                    lint: 1
                },
            ]
        );
    }
}

fn crs(ns: &parse::Namespace, dev: &str) -> Vec<Resource> {
    match ns.get(&format!("{dev}._CRS")) {
        Some(AmlValue::Buffer(b)) => parse::resources(b).unwrap(),
        other => panic!("{dev}._CRS is {other:?}"),
    }
}

#[test]
fn dsdt_describes_com1_every_virtio_device_and_s5() {
    for n in [0usize, 1, 3, 8] {
        let t = build(&platform(2, n), DEFAULT_BASE).unwrap();
        let (h, ns) = parse::dsdt(t.table_at(t.layout.dsdt).unwrap()).unwrap();
        assert_eq!(h.revision, 2);
        assert_eq!(h.oem_table_id, "GODWITVM");
        let mut expect = vec!["\\_SB_.COM1".to_string()];
        expect.extend((0..n).map(|i| format!("\\_SB_.VR{i:02}")));
        expect.extend(["\\_SB_.GED0".to_string(), "\\_SB_.PWRB".to_string()]);
        assert_eq!(ns.devices, expect);
        // The power button: a GED on GSI 9 whose _EVT reads the event port, and PNP0C0C.
        assert_eq!(
            ns.get("\\_SB_.GED0._HID"),
            Some(&AmlValue::String("ACPI0013".into()))
        );
        assert_eq!(
            crs(&ns, "\\_SB_.GED0"),
            vec![Resource::Interrupt {
                flags: 0b0011,
                gsis: vec![pm::GED_GSI]
            }]
        );
        assert_eq!(
            ns.regions,
            vec![parse::Region {
                path: "\\_SB_.GED0.EREG".into(),
                space: 1,
                offset: pm::GED_EVENT_PORT as u64,
                len: 1
            }]
        );
        assert_eq!(ns.methods, vec!["\\_SB_.GED0._EVT".to_string()]);
        match ns.get("\\_SB_.PWRB._HID") {
            Some(AmlValue::Integer(v)) => assert_eq!(parse::eisa_id(*v), "PNP0C0C"),
            other => panic!("PWRB._HID is {other:?}"),
        }

        match ns.get("\\_SB_.COM1._HID") {
            Some(AmlValue::Integer(v)) => assert_eq!(parse::eisa_id(*v), "PNP0501"),
            other => panic!("COM1._HID is {other:?}"),
        }
        assert_eq!(ns.get("\\_SB_.COM1._UID"), Some(&AmlValue::Integer(1)));
        assert_eq!(
            crs(&ns, "\\_SB_.COM1"),
            vec![
                Resource::Io {
                    decode16: true,
                    min: 0x3f8,
                    max: 0x3f8,
                    align: 0,
                    len: 8
                },
                Resource::Irq {
                    mask: 1 << 4,
                    flags: None
                },
            ]
        );
        for (i, d) in microvm(n).iter().enumerate() {
            let dev = format!("\\_SB_.VR{i:02}");
            assert_eq!(
                ns.get(&format!("{dev}._HID")),
                Some(&AmlValue::String("LNRO0005".into()))
            );
            assert_eq!(
                ns.get(&format!("{dev}._UID")),
                Some(&AmlValue::Integer(i as u64))
            );
            assert_eq!(
                crs(&ns, &dev),
                vec![
                    Resource::Memory32Fixed {
                        writable: true,
                        base: d.base as u32,
                        len: 0x200
                    },
                    // consumer (bit 0) | edge (bit 1); active high, exclusive
                    Resource::Interrupt {
                        flags: 0b0011,
                        gsis: vec![d.gsi]
                    },
                ]
            );
        }
        assert_eq!(
            ns.get("\\_S5_"),
            Some(&AmlValue::Package(vec![
                AmlValue::Integer(5),
                AmlValue::Integer(0),
                AmlValue::Integer(0),
                AmlValue::Integer(0)
            ]))
        );
        assert_eq!(ns.names.len(), 3 + 3 * n + 3 + 2 + 1);
    }
}

#[test]
fn tables_at_another_base_and_most_devices() {
    let p = Platform {
        vcpus: 8,
        virtio: (0..8)
            .map(|i| VirtioMmio {
                base: 0xd000_0000 + i * 0x1000,
                gsi: 10 + i as u32,
            })
            .collect(),
    };
    let t = build(&p, 0xF_0000).unwrap();
    assert_eq!(t.rsdp_addr(), 0xF_0000);
    let r = parse::rsdp(t.table_at(t.rsdp_addr()).unwrap()).unwrap();
    let (_, e) = parse::xsdt(t.table_at(r.xsdt).unwrap()).unwrap();
    let f = parse::fadt(t.table_at(e[0]).unwrap()).unwrap();
    let (_, ns) = parse::dsdt(t.table_at(f.x_dsdt).unwrap()).unwrap();
    assert_eq!(ns.devices.len(), 11);
    assert_eq!(
        crs(&ns, "\\_SB_.VR07"),
        vec![
            Resource::Memory32Fixed {
                writable: true,
                base: 0xd000_7000,
                len: 0x200
            },
            Resource::Interrupt {
                flags: 3,
                gsis: vec![17]
            },
        ]
    );
}

#[test]
fn bad_platforms_are_refused() {
    assert_eq!(
        build(&platform(0, 0), DEFAULT_BASE).unwrap_err(),
        AcpiError::VcpuCount(0)
    );
    assert_eq!(
        build(&platform(256, 0), DEFAULT_BASE).unwrap_err(),
        AcpiError::VcpuCount(256)
    );
    let one = |base, gsi| Platform {
        vcpus: 1,
        virtio: vec![VirtioMmio { base, gsi }],
    };
    assert_eq!(
        build(&one(0x1_0000_0000, 16), DEFAULT_BASE).unwrap_err(),
        AcpiError::VirtioAddress {
            index: 0,
            base: 0x1_0000_0000
        }
    );
    assert_eq!(
        build(&one(0xfeb0_0000, 24), DEFAULT_BASE).unwrap_err(),
        AcpiError::VirtioGsi { index: 0, gsi: 24 }
    );
    assert_eq!(
        build(&one(0xfeb0_0000, 4), DEFAULT_BASE).unwrap_err(),
        AcpiError::GsiTaken { index: 0, gsi: 4 }
    );
    assert_eq!(
        build(&one(0xfeb0_0000, pm::GED_GSI), DEFAULT_BASE).unwrap_err(),
        AcpiError::GsiTaken {
            index: 0,
            gsi: pm::GED_GSI
        }
    );
    let dup = Platform {
        vcpus: 1,
        virtio: vec![
            VirtioMmio {
                base: 0xfeb0_0000,
                gsi: 16
            };
            2
        ],
    };
    assert_eq!(
        build(&dup, DEFAULT_BASE).unwrap_err(),
        AcpiError::GsiTaken { index: 1, gsi: 16 }
    );
    assert!(matches!(
        build(&platform(1, 0), 0xF_FF00),
        Err(AcpiError::NoRoom { .. })
    ));
    assert!(matches!(
        build(&platform(1, 0), 0),
        Err(AcpiError::NoRoom { .. })
    ));
    // The messages are one line and name the problem.
    let msg = build(&one(0xfeb0_0000, 30), DEFAULT_BASE)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("GSI 30") && !msg.contains('\n'), "{msg}");
}

#[test]
fn reader_rejects_corruption_without_panicking() {
    let t = build(&platform(2, 2), DEFAULT_BASE).unwrap();
    let l = t.layout;
    let tables: Vec<(u64, &str)> = vec![
        (l.rsdp, "RSDP"),
        (l.xsdt, "XSDT"),
        (l.fadt, "FACP"),
        (l.madt, "APIC"),
        (l.dsdt, "DSDT"),
    ];
    let read = |sig: &str, b: &[u8]| -> bool {
        match sig {
            "RSDP" => parse::rsdp(b).is_ok(),
            "XSDT" => parse::xsdt(b).is_ok(),
            "FACP" => parse::fadt(b).is_ok(),
            "APIC" => parse::madt(b).is_ok(),
            _ => parse::dsdt(b).is_ok(),
        }
    };
    for (a, sig) in tables {
        let good = t.table_at(a).unwrap().to_vec();
        assert!(read(sig, &good), "{sig}");
        // Every truncation fails.
        for n in 0..good.len() {
            assert!(
                !read(sig, &good[..n]),
                "{sig} truncated to {n} bytes was accepted"
            );
        }
        // Every single-byte change is caught by a checksum.
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x01;
            assert!(!read(sig, &b), "{sig} with byte {i} flipped was accepted");
        }
    }
}

#[test]
fn aml_reader_survives_garbage() {
    let body = dsdt::body(&microvm(4)).unwrap();
    assert!(parse::aml(&body).is_ok());
    // Deterministic pseudo-random mutations of the AML body (the checksum is not involved).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut rejected = 0;
    for _ in 0..20_000 {
        let mut b = body.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        if parse::aml(&b).is_err() {
            rejected += 1;
        }
        if let Ok(ns) = parse::aml(&b) {
            for (_, v) in &ns.names {
                if let AmlValue::Buffer(buf) = v {
                    let _ = parse::resources(buf);
                }
            }
        }
    }
    assert!(rejected > 0);
    for n in 0..body.len() {
        let _ = parse::aml(&body[..n]);
    }
}
