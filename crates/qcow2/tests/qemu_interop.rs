//! Differential tests against QEMU's own tools: images qemu-img/qemu-io made read back
//! byte-identical through this crate, and images this crate wrote pass `qemu-img check`, list
//! the same snapshots (with the right VM-state sizes) and convert to the same bytes.

mod common;
use common::*;
use qcow2::{BlockBackend, CreateOptions, NewSnapshot, OpenOptions, Qcow2};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

const MIB: u64 = 1 << 20;

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p(img));
    ok("qemu-io", &args);
}

/// Our library agrees with QEMU on contents (active and each snapshot) and refcounts.
fn compare_with_qemu(img: &Path, dir: &Scratch) {
    let mut q = Qcow2::open(
        img,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .expect("open qemu-made image");
    let ours = our_raw(&mut q);
    let theirs = qemu_raw(img, None, dir);
    assert_eq!(
        first_diff(&ours, &theirs),
        None,
        "active layer differs from qemu-img convert"
    );
    for s in q.snapshots() {
        let mut v = vec![0u8; s.disk_size as usize];
        q.read_snapshot(&s.id, 0, &mut v).expect("read snapshot");
        let theirs = qemu_raw(img, Some(&s.name), dir);
        assert_eq!(first_diff(&v, &theirs), None, "snapshot {} differs", s.name);
    }
    let r = q.check().expect("check");
    assert!(
        r.is_clean(),
        "our check disagrees with a clean QEMU image: {:?}",
        r.messages
    );
}

#[test]
fn qemu_made_images_read_identically() {
    let dir = Scratch::new("qemu-made");
    // (compat, cluster size, refcount bits, with snapshots)
    let matrix: &[(&str, u64, u32, bool)] = &[
        ("0.10", 65536, 16, true),
        ("1.1", 512, 16, true),
        ("1.1", 4096, 2, false),
        ("1.1", 4096, 4, true),
        ("1.1", 4096, 1, false),
        ("1.1", 65536, 8, true),
        ("1.1", 65536, 64, true),
        ("1.1", 2 << 20, 32, true),
    ];
    for &(compat, cs, rb, snaps) in matrix {
        let img = dir.path(&format!("q-{compat}-{cs}-{rb}.qcow2"));
        let o = format!("compat={compat},cluster_size={cs},refcount_bits={rb}");
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &o, p(&img), "8M"],
        );
        qemu_io(
            &img,
            &[
                "write -P 0xaa 0 100k",
                "write -P 0xbb 3146240 5000",
                "write -z 64k 128k",
            ],
        );
        if snaps {
            ok("qemu-img", &["snapshot", "-c", "s1", p(&img)]);
            qemu_io(
                &img,
                &[
                    "write -P 0xcc 32k 64k",
                    "discard 1M 256k",
                    "write -P 0x11 7M 1M",
                ],
            );
            ok("qemu-img", &["snapshot", "-c", "s2", p(&img)]);
            ok("qemu-img", &["snapshot", "-c", "s3", p(&img)]);
            qemu_io(&img, &["write -P 0xdd 6M 300k"]);
            ok("qemu-img", &["snapshot", "-a", "s1", p(&img)]);
            qemu_io(&img, &["write -P 0xee 5M 10k"]);
            ok("qemu-img", &["snapshot", "-d", "s3", p(&img)]);
        } else {
            qemu_io(&img, &["write -P 0xcc 32k 64k", "write -P 0x11 7M 1M"]);
        }
        compare_with_qemu(&img, &dir);
    }
}

#[test]
fn compressed_clusters_read_and_overwrite() {
    let dir = Scratch::new("compressed");
    for cs in [4096u64, 65536] {
        let raw = dir.path("src.raw");
        let mut data = Vec::new();
        for i in 0..(4 * MIB as usize / 64) {
            data.extend_from_slice(
                format!("line {i:08} of compressible text, cluster size {cs}\n").as_bytes(),
            );
        }
        data.resize(4 * MIB as usize, 0);
        data[MIB as usize..MIB as usize + 70000].copy_from_slice(&pattern(7, 70000));
        std::fs::write(&raw, &data).unwrap();
        let img = dir.path(&format!("c{cs}.qcow2"));
        let o = format!("cluster_size={cs}");
        ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &o,
                p(&raw),
                p(&img),
            ],
        );
        compare_with_qemu(&img, &dir);
        // Overwrite parts of compressed clusters: they turn into normal clusters.
        let mut q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
        let patch = pattern(9, 3000);
        q.write_at(cs / 2, &patch).unwrap();
        data[(cs / 2) as usize..(cs / 2) as usize + 3000].copy_from_slice(&patch);
        q.write_at(2 * MIB + 100, &patch).unwrap();
        data[(2 * MIB + 100) as usize..(2 * MIB + 100) as usize + 3000].copy_from_slice(&patch);
        assert_eq!(first_diff(&our_raw(&mut q), &data), None);
        q.close().unwrap();
        drop(q);
        assert_qemu_clean(&img);
        assert_eq!(first_diff(&qemu_raw(&img, None, &dir), &data), None);
    }
}

/// Everything qemu-img can tell about our snapshots must match what we wrote.
fn compare_listing(img: &Path, q: &Qcow2) {
    let json = ok("qemu-img", &["info", "--output=json", p(img)]);
    let ours = q.snapshots();
    for s in &ours {
        let needle = format!("\"name\": \"{}\"", s.name);
        let at = json
            .find(&needle)
            .unwrap_or_else(|| panic!("{} missing from qemu-img info:\n{json}", s.name));
        // The object around the name (qemu prints keys of one snapshot together).
        let start = json[..at].rfind('{').unwrap();
        let end = at + json[at..].find('}').unwrap();
        let obj = &json[start..end];
        for (k, v) in [
            ("vm-state-size", s.vm_state_size.to_string()),
            ("date-sec", s.date_sec.to_string()),
            ("date-nsec", s.date_nsec.to_string()),
            ("vm-clock-sec", (s.vm_clock_ns / 1_000_000_000).to_string()),
            ("vm-clock-nsec", (s.vm_clock_ns % 1_000_000_000).to_string()),
            ("id", format!("\"{}\"", s.id)),
        ] {
            assert!(
                obj.contains(&format!("\"{k}\": {v}")),
                "{k} != {v} for {} in {obj}",
                s.name
            );
        }
        match s.icount {
            Some(i) => assert!(obj.contains(&format!("\"icount\": {i}")), "icount in {obj}"),
            None => assert!(!obj.contains("icount"), "icount should be absent in {obj}"),
        }
    }
    let n = json.matches("\"vm-state-size\"").count();
    assert_eq!(n, ours.len(), "snapshot count differs:\n{json}");
}

struct Model {
    disk: Vec<u8>,
    snaps: Vec<(String, Vec<u8>, Vec<u8>)>, // name, disk, vmstate
}

fn verify(img: &Path, q: &mut Qcow2, m: &Model, dir: &Scratch) {
    q.flush().unwrap();
    assert_eq!(
        first_diff(&our_raw(q), &m.disk),
        None,
        "our read of the active layer"
    );
    assert_qemu_clean(img);
    assert_eq!(
        first_diff(&qemu_raw(img, None, dir), &m.disk),
        None,
        "qemu-img convert"
    );
    let list = q.snapshots();
    assert_eq!(list.len(), m.snaps.len());
    for ((name, disk, vm), s) in m.snaps.iter().zip(&list) {
        assert_eq!(&s.name, name);
        assert_eq!(s.vm_state_size, vm.len() as u64);
        assert_eq!(
            first_diff(&qemu_raw(img, Some(name), dir), disk),
            None,
            "snapshot {name}"
        );
        if !vm.is_empty() {
            let mut r = q.vmstate_reader(name).unwrap();
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut got).unwrap();
            assert_eq!(first_diff(&got, vm), None, "vmstate of {name}");
        }
    }
    compare_listing(img, q);
    let r = q.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.messages);
}

fn w(q: &mut Qcow2, m: &mut Model, off: u64, data: &[u8]) {
    q.write_at(off, data).unwrap();
    m.disk[off as usize..off as usize + data.len()].copy_from_slice(data);
}

#[test]
fn our_images_pass_qemu_img() {
    let dir = Scratch::new("ours");
    let matrix: &[(u32, u64, u32)] = &[
        (2, 65536, 16),
        (3, 512, 16),
        (3, 4096, 4),
        (3, 65536, 64),
        (3, 65536, 16),
    ];
    for &(version, cs, rb) in matrix {
        let img = dir.path(&format!("o-{version}-{cs}-{rb}.qcow2"));
        let size = 16 * MIB + 512 * 3;
        let mut q = Qcow2::create(
            &img,
            &CreateOptions {
                size,
                cluster_size: cs,
                version,
                refcount_bits: rb,
                ..Default::default()
            },
        )
        .unwrap();
        let mut m = Model {
            disk: vec![0; size as usize],
            snaps: Vec::new(),
        };
        w(&mut q, &mut m, 0, &pattern(1, 100_000));
        w(&mut q, &mut m, 3 * MIB + 17, &pattern(2, 2 * MIB as usize));
        w(&mut q, &mut m, size - 1000, &pattern(3, 1000));
        q.write_zeroes(3 * MIB, MIB).unwrap();
        m.disk[3 * MIB as usize..4 * MIB as usize].fill(0);
        verify(&img, &mut q, &m, &dir);

        // savevm-style snapshot with VM state written in odd-sized pieces.
        let vm1 = pattern(10, 3 * MIB as usize + 123);
        let mut wr = q.vmstate_writer().unwrap();
        for c in vm1.chunks(777_777) {
            wr.write_all_bytes(c).unwrap();
        }
        let n = wr.finish().unwrap();
        assert_eq!(n, vm1.len() as u64);
        let mut s = NewSnapshot::new("vm1");
        s.vm_state_size = n;
        s.vm_clock_ns = 2_233_444_555;
        s.date = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_000);
        q.create_snapshot(&s).unwrap();
        m.snaps.push(("vm1".into(), m.disk.clone(), vm1.clone()));
        verify(&img, &mut q, &m, &dir);

        // COW over the snapshot, then a disk-only snapshot (qemu-img style).
        w(&mut q, &mut m, 50_000, &pattern(4, 200_000));
        w(&mut q, &mut m, 10 * MIB, &pattern(5, 5000));
        q.discard(0, 32768).unwrap();
        let dz = (32768 / cs * cs) as usize;
        m.disk[..dz].fill(0);
        let mut d = NewSnapshot::new("disk only");
        d.icount = Some(0);
        d.replace = false;
        q.create_snapshot(&d).unwrap();
        m.snaps
            .push(("disk only".into(), m.disk.clone(), Vec::new()));
        verify(&img, &mut q, &m, &dir);

        // savevm again under the same name: replaces vm1 atomically; bigger state.
        w(&mut q, &mut m, 7 * MIB, &pattern(6, 100));
        let vm2 = pattern(11, 5 * MIB as usize);
        q.save_vmstate(0, &vm2).unwrap();
        let mut s = NewSnapshot::new("vm1");
        s.vm_state_size = vm2.len() as u64;
        s.vm_clock_ns = 9_000_000_001;
        q.create_snapshot(&s).unwrap();
        m.snaps.remove(0);
        m.snaps.push(("vm1".into(), m.disk.clone(), vm2.clone()));
        verify(&img, &mut q, &m, &dir);

        // Apply the disk-only snapshot, write, apply vm1, delete the disk-only one.
        q.goto_snapshot("disk only").unwrap();
        m.disk = m.snaps[0].1.clone();
        verify(&img, &mut q, &m, &dir);
        w(&mut q, &mut m, MIB, &pattern(7, 300_000));
        q.goto_snapshot("vm1").unwrap();
        m.disk = m.snaps[1].1.clone();
        w(&mut q, &mut m, 2 * MIB, &pattern(8, 4096));
        q.delete_snapshot("disk only").unwrap();
        m.snaps.remove(0);
        verify(&img, &mut q, &m, &dir);

        // Reopen and check again.
        q.close().unwrap();
        drop(q);
        let mut q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
        verify(&img, &mut q, &m, &dir);
        // The raw header stays the same length and clean.
        drop(q);
        let (code, out) = qemu_check_code(&img);
        assert_eq!(code, 0, "{out}");
    }
}

#[test]
fn qemu_deletes_and_applies_our_snapshots() {
    let dir = Scratch::new("qemu-del");
    let img = dir.path("x.qcow2");
    let mut q = Qcow2::create(
        &img,
        &CreateOptions {
            size: 8 * MIB,
            ..Default::default()
        },
    )
    .unwrap();
    q.write_at(0, &pattern(1, 300_000)).unwrap();
    let a = our_raw(&mut q);
    q.save_vmstate(0, &pattern(2, 1_000_000)).unwrap();
    let mut s = NewSnapshot::new("a");
    s.vm_state_size = 1_000_000;
    q.create_snapshot(&s).unwrap();
    q.write_at(100_000, &pattern(3, 300_000)).unwrap();
    let mut s = NewSnapshot::new("b");
    s.vm_state_size = 0;
    q.create_snapshot(&s).unwrap();
    let b = our_raw(&mut q);
    q.write_at(0, &pattern(4, 64)).unwrap();
    q.close().unwrap();
    drop(q);
    ok("qemu-img", &["snapshot", "-d", "a", p(&img)]);
    assert_qemu_clean(&img);
    ok("qemu-img", &["snapshot", "-a", "b", p(&img)]);
    assert_qemu_clean(&img);
    let mut q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
    assert_eq!(q.snapshots().len(), 1);
    assert_eq!(first_diff(&our_raw(&mut q), &b), None);
    assert!(q.check().unwrap().is_clean());
    // Our goto of a snapshot QEMU modified still works.
    q.write_at(0, &a[..1000]).unwrap();
    q.goto_snapshot("b").unwrap();
    assert_eq!(first_diff(&our_raw(&mut q), &b), None);
    drop(q);
    assert_qemu_clean(&img);
}

/// QEMU's savevm output is readable by us, and a VM state we store is loadable by QEMU.
#[test]
fn vmstate_roundtrip_with_qemu_system() {
    let dir = Scratch::new("savevm");
    let img = dir.path("vm.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "64M"]);
    let monitor = |cmds: &str| -> String {
        use std::io::Write;
        let mut c = std::process::Command::new("qemu-system-x86_64");
        c.args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "stdio",
            "-drive",
        ])
        .arg(format!("file={},if=none,id=d0,format=qcow2", p(&img)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
        let mut ch = c.spawn().expect(
            "qemu-system-x86_64 is not installed (Debian qemu-system-x86): needed for the savevm interop test",
        );
        ch.stdin
            .take()
            .unwrap()
            .write_all(format!("{cmds}\nquit\n").as_bytes())
            .unwrap();
        let o = ch.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    monitor("savevm qemu1");
    assert_qemu_clean(&img);
    let mut q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
    let s = q.find_snapshot("qemu1").expect("QEMU's snapshot");
    assert!(s.vm_state_size > 0);
    assert_eq!(s.icount, None);
    let mut state = Vec::new();
    std::io::Read::read_to_end(&mut q.vmstate_reader("qemu1").unwrap(), &mut state).unwrap();
    assert_eq!(state.len() as u64, s.vm_state_size);
    assert_eq!(
        &state[..8],
        b"QEVM\x00\x00\x00\x03",
        "QEMU migration stream magic"
    );
    // Store the same bytes as our own snapshot; QEMU must be able to load it.
    q.write_at(0, &pattern(5, 70_000)).unwrap();
    let mut w = q.vmstate_writer().unwrap();
    w.write_all_bytes(&state).unwrap();
    let n = w.finish().unwrap();
    let mut ns = NewSnapshot::new("ours");
    ns.vm_state_size = n;
    q.create_snapshot(&ns).unwrap();
    q.close().unwrap();
    drop(q);
    assert_qemu_clean(&img);
    let out = monitor("loadvm ours\ninfo snapshots");
    assert!(
        !out.contains("Error"),
        "QEMU failed to load our snapshot:\n{out}"
    );
    assert!(out.contains("ours"), "{out}");
    assert_qemu_clean(&img);
}

/// A QEMU writer with lazy refcounts that crashed (qemu-io `abort`) leaves the dirty bit and
/// stale refcounts: we read it correctly read-only, and a read-write open rebuilds the
/// refcounts so that qemu-img check is clean.
#[test]
fn lazy_refcounts_dirty_image_is_recovered() {
    let dir = Scratch::new("lazy");
    let img = dir.path("lazy.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            p(&img),
            "16M",
        ],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 64k", p(&img)],
    );
    ok("qemu-img", &["snapshot", "-c", "s", p(&img)]);
    // abort() kills qemu-io after the writes without a clean close.
    let _ = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 32k 256k",
            "-c",
            "write -P 0x33 8M 64k",
            "-c",
            "abort",
            p(&img),
        ],
    );
    let bytes = std::fs::read(&img).unwrap();
    assert_ne!(
        bytes[79] & 1,
        0,
        "test setup: the image should carry the dirty bit"
    );
    let (code, out) = qemu_check_code(&img);
    assert_ne!(code, 0, "test setup: stale refcounts expected:\n{out}");
    let mut expect = vec![0u8; 16 << 20];
    expect[..64 << 10].fill(0x11);
    expect[32 << 10..(32 << 10) + (256 << 10)].fill(0x22);
    expect[8 << 20..(8 << 20) + (64 << 10)].fill(0x33);
    let mut q = Qcow2::open(
        &img,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(first_diff(&our_raw(&mut q), &expect), None);
    drop(q);
    let mut q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
    assert!(q.check().unwrap().is_clean());
    q.write_at(4 << 20, &[7u8; 4096]).unwrap();
    expect[4 << 20..(4 << 20) + 4096].fill(7);
    drop(q);
    assert_qemu_clean(&img);
    assert_eq!(first_diff(&qemu_raw(&img, None, &dir), &expect), None);
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[79] & 1, 0, "dirty bit cleared on clean close");
}

/// One-bit refcounts cannot hold a snapshot: the error is clear and the image stays intact.
#[test]
fn one_bit_refcounts_refuse_snapshots() {
    let dir = Scratch::new("rc1");
    let img = dir.path("rc1.qcow2");
    let mut q = Qcow2::create(
        &img,
        &CreateOptions {
            size: 4 * MIB,
            cluster_size: 4096,
            version: 3,
            refcount_bits: 1,
            ..Default::default()
        },
    )
    .unwrap();
    q.write_at(0, &pattern(1, 100_000)).unwrap();
    let e = q.create_snapshot(&NewSnapshot::new("x")).unwrap_err();
    assert!(matches!(e, qcow2::Error::RefcountOverflow(1)), "{e}");
    assert!(q.snapshots().is_empty());
    q.write_at(200_000, &pattern(2, 5000)).unwrap();
    let data = our_raw(&mut q);
    drop(q);
    assert_qemu_clean(&img);
    assert_eq!(first_diff(&qemu_raw(&img, None, &dir), &data), None);
}
