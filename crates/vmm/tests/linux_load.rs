//! Linux boot loading without running anything (no KVM needed): what `linux::load_kernel`
//! leaves in guest memory for a bzImage and for a PVH ELF, read back field by field, and the
//! one-line errors for bad kernels and initrds.

#[path = "linux_common/mod.rs"]
mod linux_common;

use linux_common::{bzimage, Fake};
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};
use vmm::linux::{self, acpi::parse};
use vmm::memory::GuestRam;
use vmm::VmConfig;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("godwit-linux-load-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(
    kernel: &Path,
    initrd: Option<&Path>,
    mem_mib: u64,
    vcpus: usize,
    cmdline: &str,
) -> VmConfig {
    VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        kernel: kernel.to_path_buf(),
        cmdline: cmdline.into(),
        initrd: initrd.map(Path::to_path_buf),
    }
}

fn read(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ram.memory().read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}
fn r32(ram: &GuestRam, addr: u64) -> u32 {
    ram.memory().read_obj(GuestAddress(addr)).unwrap()
}
fn r64(ram: &GuestRam, addr: u64) -> u64 {
    ram.memory().read_obj(GuestAddress(addr)).unwrap()
}

/// Reads the ACPI tables back from guest memory starting at the RSDP.
fn check_acpi(ram: &GuestRam, rsdp: u64, vcpus: usize, virtio: &[(u64, u32)]) {
    let r = parse::rsdp(&read(ram, rsdp, 36)).unwrap();
    let xsdt_len = r32(ram, r.xsdt + 4) as usize;
    let (_, entries) = parse::xsdt(&read(ram, r.xsdt, xsdt_len)).unwrap();
    assert_eq!(entries.len(), 2);
    let table = |a: u64| read(ram, a, r32(ram, a + 4) as usize);
    let fadt = parse::fadt(&table(entries[0])).unwrap();
    let madt = parse::madt(&table(entries[1])).unwrap();
    let lapics = madt
        .entries
        .iter()
        .filter(|e| matches!(e, parse::MadtEntry::LocalApic { .. }))
        .count();
    assert_eq!(lapics, vcpus);
    let (_, ns) = parse::dsdt(&table(fadt.x_dsdt)).unwrap();
    // COM1, the virtio devices, the power button's GED and the button.
    assert_eq!(ns.devices.len(), 1 + virtio.len() + 2);
    assert!(ns.devices.iter().any(|d| d == "\\_SB_.PWRB"), "{:?}", ns.devices);
    for (i, (base, gsi)) in virtio.iter().enumerate() {
        let Some(parse::AmlValue::Buffer(b)) = ns.get(&format!("\\_SB_.VR{i:02}._CRS")) else {
            panic!("no _CRS")
        };
        let res = parse::resources(b).unwrap();
        assert_eq!(
            res[0],
            parse::Resource::Memory32Fixed {
                writable: true,
                base: *base as u32,
                len: 0x200
            }
        );
        assert_eq!(
            res[1],
            parse::Resource::Interrupt {
                flags: 3,
                gsis: vec![*gsi]
            }
        );
    }
}

#[test]
fn bzimage_zero_page_initrd_page_tables_and_acpi() {
    let d = tmpdir("bz");
    let k = d.join("bzImage");
    std::fs::write(&k, bzimage(Fake::default())).unwrap();
    let rd = d.join("initrd");
    let rd_bytes: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    std::fs::write(&rd, &rd_bytes).unwrap();
    let ram = GuestRam::new(64 << 20).unwrap();
    let virtio = [(0xfeb0_0000, 16), (0xfeb0_0200, 17)];
    let b = linux::load_kernel(
        &ram,
        &config(&k, Some(&rd), 64, 3, "console=ttyS0 x=1"),
        &virtio,
    )
    .unwrap();
    assert!(b.long_mode);
    assert_eq!(b.entry, linux::KERNEL_LOAD_ADDR + 0x200);
    assert_eq!(b.start_info, linux::ZERO_PAGE_ADDR);
    // The protected-mode code is at the load address, the 64-bit entry 0x200 later.
    assert_eq!(read(&ram, b.entry, 8), linux_common::ENTRY64[..8].to_vec());

    let zp = linux::ZERO_PAGE_ADDR;
    assert_eq!(r32(&ram, zp + 0x202), 0x5372_6448, "HdrS");
    assert_eq!(read(&ram, zp + 0x210, 1)[0], 0xff, "type_of_loader");
    let cmd = r32(&ram, zp + 0x228) as u64;
    assert_eq!(read(&ram, cmd, 18), b"console=ttyS0 x=1\0");
    // acpi_rsdp_addr points at our tables.
    let rsdp = r64(&ram, zp + 0x70);
    assert_eq!(rsdp, linux::acpi::DEFAULT_BASE);
    check_acpi(&ram, rsdp, 3, &virtio);
    // e820 equals boot::memory_map.
    let n = read(&ram, zp + 0x1e8, 1)[0] as usize;
    let map = vmm::boot::memory_map(&ram);
    assert_eq!(n, map.len());
    for (i, (addr, size, ty)) in map.iter().enumerate() {
        let e = zp + 0x2d0 + 20 * i as u64;
        assert_eq!(
            (r64(&ram, e), r64(&ram, e + 8), r32(&ram, e + 16)),
            (*addr, *size, *ty)
        );
    }
    // The initrd: page-aligned, at the top of RAM, above what the kernel needs.
    let (rd_addr, rd_size) = (r32(&ram, zp + 0x218) as u64, r32(&ram, zp + 0x21c) as u64);
    assert_eq!(rd_size, rd_bytes.len() as u64);
    assert_eq!(rd_addr % 4096, 0);
    assert!(rd_addr + rd_size <= 64 << 20 && rd_addr + rd_size + 4096 > 64 << 20);
    assert!(
        rd_addr >= 0x100_0000 + 0x20_0000,
        "initrd overlaps the kernel's run area"
    );
    assert_eq!(read(&ram, rd_addr, rd_bytes.len()), rd_bytes);
    // Identity map: PML4 -> PDPT -> 4 page directories of 2 MiB pages.
    let pdpt = r64(&ram, linux::PML4_ADDR) & !0xfff;
    for g in 0..4u64 {
        let pd = r64(&ram, pdpt + 8 * g) & !0xfff;
        for j in [0u64, 1, 511] {
            assert_eq!(r64(&ram, pd + 8 * j), ((g << 30) + (j << 21)) | 0x83);
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// A minimal PVH ELF: one PT_LOAD at 2 MiB and the Xen PHYS32_ENTRY note.
fn pvh_elf(entry: u32) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&(entry as u64).to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes());
    let ph = |f: &mut Vec<u8>, i: usize, ty: u32, off: u64, addr: u64, size: u64| {
        let p = 64 + 56 * i;
        f[p..p + 4].copy_from_slice(&ty.to_le_bytes());
        f[p + 8..p + 16].copy_from_slice(&off.to_le_bytes());
        f[p + 16..p + 24].copy_from_slice(&addr.to_le_bytes());
        f[p + 24..p + 32].copy_from_slice(&addr.to_le_bytes());
        f[p + 32..p + 40].copy_from_slice(&size.to_le_bytes());
        f[p + 40..p + 48].copy_from_slice(&size.to_le_bytes());
        f[p + 48..p + 56].copy_from_slice(&4u64.to_le_bytes());
    };
    ph(&mut f, 0, 1, 0x1000, 0x20_0000, 0x1000);
    ph(&mut f, 1, 4, 0x400, 0, 20);
    // Note: namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
    let note: Vec<u8> = [4u32, 4, 18]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .chain(*b"Xen\0")
        .chain(entry.to_le_bytes())
        .collect();
    f[0x400..0x400 + note.len()].copy_from_slice(&note);
    f.extend(std::iter::repeat_n(0xf4u8, 0x1000));
    f
}

#[test]
fn pvh_start_info_gets_rsdp_and_initrd_module() {
    let d = tmpdir("pvh");
    let k = d.join("vmlinux");
    std::fs::write(&k, pvh_elf(0x20_0000)).unwrap();
    let rd = d.join("initrd");
    std::fs::write(&rd, b"PVH-INITRD-CONTENT").unwrap();
    let ram = GuestRam::new(32 << 20).unwrap();
    let b = linux::load_kernel(&ram, &config(&k, Some(&rd), 32, 2, "quiet"), &[]).unwrap();
    assert!(!b.long_mode);
    assert_eq!(b.entry, 0x20_0000);
    let si = b.start_info;
    assert_eq!(r32(&ram, si), 0x336e_c578, "PVH magic");
    let rsdp = r64(&ram, si + 32);
    assert_eq!(rsdp, linux::acpi::DEFAULT_BASE);
    check_acpi(&ram, rsdp, 2, &[]);
    assert_eq!(r32(&ram, si + 12), 1, "nr_modules");
    let modlist = r64(&ram, si + 16);
    let (paddr, size) = (r64(&ram, modlist), r64(&ram, modlist + 8));
    assert_eq!(size, 18);
    assert_eq!(paddr % 4096, 0);
    assert!(paddr >= 0x20_1000);
    assert_eq!(read(&ram, paddr, 18), b"PVH-INITRD-CONTENT");

    // Without an initrd: no module.
    let ram = GuestRam::new(32 << 20).unwrap();
    let b = linux::load_kernel(&ram, &config(&k, None, 32, 1, ""), &[]).unwrap();
    assert_eq!(r32(&ram, b.start_info + 12), 0);
    let _ = std::fs::remove_dir_all(&d);
}

fn load_err(image: &[u8], initrd: Option<&[u8]>, mem_mib: u64, cmdline: &str) -> String {
    let d = tmpdir("err");
    let k = d.join("kernel");
    std::fs::write(&k, image).unwrap();
    let rd = d.join("initrd");
    if let Some(b) = initrd {
        std::fs::write(&rd, b).unwrap();
    }
    let ram = GuestRam::new(mem_mib << 20).unwrap();
    let e = linux::load_kernel(
        &ram,
        &config(&k, initrd.map(|_| rd.as_path()), mem_mib, 1, cmdline),
        &[],
    )
    .expect_err("load must fail")
    .to_string();
    let _ = std::fs::remove_dir_all(&d);
    assert!(!e.contains('\n'), "{e}");
    e
}

#[test]
fn bad_kernels_and_initrds_are_refused_in_one_line() {
    let e = load_err(
        &bzimage(Fake {
            truncate: 100,
            ..Fake::default()
        }),
        None,
        64,
        "",
    );
    assert!(
        e.contains("truncated bzImage") && e.contains("header says"),
        "{e}"
    );
    let e = load_err(
        &bzimage(Fake {
            xloadflags: 0,
            ..Fake::default()
        }),
        None,
        64,
        "",
    );
    assert!(e.contains("no 64-bit entry point"), "{e}");
    let e = load_err(
        &bzimage(Fake {
            protocol: 0x0206,
            ..Fake::default()
        }),
        None,
        64,
        "",
    );
    assert!(e.contains("boot protocol 2.06 is too old"), "{e}");
    // init_size 256 MiB: decompression needs 16 + 256 MiB.
    let e = load_err(
        &bzimage(Fake {
            init_size: 256 << 20,
            ..Fake::default()
        }),
        None,
        128,
        "",
    );
    assert!(
        e.contains("needs 272 MiB") && e.contains("has 128 MiB") && e.contains("-m"),
        "{e}"
    );
    let e = load_err(
        &bzimage(Fake {
            cmdline_size: 15,
            ..Fake::default()
        }),
        None,
        64,
        "0123456789abcdef",
    );
    assert!(
        e.contains("command line is 16 bytes, this kernel takes at most 15"),
        "{e}"
    );
    // Not a bzImage and not an ELF: the PVH loader's refusal.
    let e = load_err(&[0x5au8; 8192], None, 64, "");
    assert!(e.contains("not a loadable PVH ELF kernel"), "{e}");
    // Initrd too large for the room above the kernel, empty, missing.
    let e = load_err(
        &bzimage(Fake::default()),
        Some(&vec![0u8; 50 << 20]),
        64,
        "",
    );
    assert!(
        e.starts_with("initrd '") && e.contains("do not fit") && e.contains("raise -m"),
        "{e}"
    );
    let e = load_err(&bzimage(Fake::default()), Some(b""), 64, "");
    assert!(e.contains("initrd '") && e.contains("empty"), "{e}");
    let d = tmpdir("missing");
    let k = d.join("kernel");
    std::fs::write(&k, bzimage(Fake::default())).unwrap();
    let ram = GuestRam::new(64 << 20).unwrap();
    let e = linux::load_kernel(&ram, &config(&k, Some(&d.join("nope")), 64, 1, ""), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("initrd '") && e.contains("cannot open"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
