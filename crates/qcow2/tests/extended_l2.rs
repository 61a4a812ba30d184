//! Extended L2 entries (subclusters) both ways against qemu-img/qemu-io: images with partial
//! subcluster writes, zero subclusters and backing files made by QEMU read byte-for-byte like
//! `qemu-img convert`; images and overlays we write (sub-subcluster writes, zeroing, discards,
//! snapshots) pass `qemu-img check` and read back equal in qemu-img.

mod common;
use common::*;
use qcow2::{BlockBackend, CreateOptions, NewSnapshot, OpenOptions, Qcow2};
use std::path::Path;

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

fn ro() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..Default::default()
    }
}

#[test]
fn qemu_made_extended_l2_images_read_identically() {
    for cluster in ["16k", "64k", "2M"] {
        let dir = Scratch::new("extl2-read");
        let base = dir.path("base.qcow2");
        let top = dir.path("top.qcow2");
        ok("qemu-img", &["create", "-f", "qcow2", p(&base), "8M"]);
        qemu_io(&base, &["write -P 0x11 0 8M"]);
        let o = format!("extended_l2=on,cluster_size={cluster}");
        for (img, backing) in [(dir.path("alone.qcow2"), false), (top.clone(), true)] {
            if backing {
                ok("qemu-img", &["create", "-f", "qcow2", "-o", &o, "-b", "base.qcow2", "-F", "qcow2", p(&img)]);
            } else {
                ok("qemu-img", &["create", "-f", "qcow2", "-o", &o, p(&img), "8M"]);
            }
            qemu_io(
                &img,
                &[
                    "write -P 0x21 700 100",        // inside one subcluster
                    "write -P 0x22 30000 70000",     // across subclusters and clusters
                    "write -z 200000 9000",          // zero subclusters (partial edges)
                    "write -z 1M 1M",                // whole zero clusters
                    "write -P 0x23 3M 1",
                    "discard 5M 512K",
                ],
            );
            let mut q = Qcow2::open(&img, &ro()).expect("open");
            assert!(q.extended_l2());
            let ours = our_raw(&mut q);
            let theirs = qemu_raw(&img, None, &dir);
            assert_eq!(first_diff(&ours, &theirs), None, "{} ({cluster})", img.display());
            let r = q.check().unwrap();
            assert!(r.is_clean(), "{:?}", r.messages);
        }
    }
}

#[test]
fn our_extended_l2_writes_pass_qemu_check_and_read_back_in_qemu() {
    for (cluster, backing) in [(65536u64, false), (65536, true), (16384, true), (2 * MIB, false)] {
        let dir = Scratch::new("extl2-write");
        let base = dir.path("base.qcow2");
        let img = dir.path("img.qcow2");
        ok("qemu-img", &["create", "-f", "qcow2", p(&base), "8M"]);
        qemu_io(&base, &["write -P 0x11 0 8M"]);
        let c = CreateOptions {
            size: 8 * MIB,
            cluster_size: cluster,
            extended_l2: true,
            backing_file: backing.then(|| "base.qcow2".to_string()),
            backing_format: backing.then_some(qcow2::ImageFormat::Qcow2),
            ..Default::default()
        };
        let mut model = if backing { vec![0x11u8; 8 * MIB as usize] } else { vec![0u8; 8 * MIB as usize] };
        {
            let mut q = Qcow2::create(&img, &c).expect("create");
            let writes: &[(u64, usize)] = &[(700, 100), (30_000, 70_000), (3 * MIB - 5, 10), (6 * MIB, 300_000), (1000, 2000)];
            for (i, &(off, len)) in writes.iter().enumerate() {
                let d = pattern(i as u64 + 1, len);
                q.write_at(off, &d).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&d);
            }
            q.write_zeroes(200_000, 9000).unwrap();
            model[200_000..209_000].fill(0);
            q.write_zeroes(4 * MIB, 2 * cluster).unwrap();
            model[4 * MIB as usize..(4 * MIB + 2 * cluster) as usize].fill(0);
            assert_eq!(first_diff(&our_raw(&mut q), &model), None, "our view");
            // A snapshot shares the clusters; writes after it copy them (with their bitmaps).
            q.create_snapshot(&NewSnapshot::new("s")).unwrap();
            let snap = model.clone();
            q.write_at(30_100, &[0xab; 50]).unwrap();
            model[30_100..30_150].fill(0xab);
            q.write_at(6 * MIB + 10, &[0xcd; 5]).unwrap();
            model[6 * MIB as usize + 10..6 * MIB as usize + 15].fill(0xcd);
            let mut v = vec![0u8; model.len()];
            q.read_snapshot("s", 0, &mut v).unwrap();
            assert_eq!(first_diff(&v, &snap), None, "snapshot view");
            let r = q.check().unwrap();
            assert!(r.is_clean(), "{:?}", r.messages);
            q.close().unwrap();
        }
        assert_qemu_clean(&img);
        assert_eq!(first_diff(&qemu_raw(&img, None, &dir), &model), None, "qemu-img reads ours ({cluster}, backing {backing})");
        // And qemu-io's own writes on top of ours.
        qemu_io(&img, &["write -P 0x44 31000 3000"]);
        model[31_000..34_000].fill(0x44);
        let mut q = Qcow2::open(&img, &ro()).unwrap();
        assert_eq!(first_diff(&our_raw(&mut q), &model), None);
    }
}

#[test]
fn extended_l2_needs_v3_and_16k_clusters() {
    let dir = Scratch::new("extl2-bad");
    for (version, cs) in [(2u32, 65536u64), (3, 8192)] {
        let c = CreateOptions { size: MIB, cluster_size: cs, version, extended_l2: true, ..Default::default() };
        assert!(Qcow2::create(dir.path("x.qcow2"), &c).is_err());
    }
}
