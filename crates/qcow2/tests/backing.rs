//! Backing chains against QEMU's tools: chains of depth 1–3 made by qemu-img/qemu-io (qcow2 and
//! raw bases, data written at every level including partial clusters) read byte-for-byte like
//! `qemu-img convert`; overlays written here (copy-on-write of partial clusters, zero writes,
//! snapshots) pass `qemu-img check` and read back equal in qemu-img; relative names, loops,
//! missing files, absurd depths and the shared locks on bases behave as in QEMU.

mod common;
use common::*;
use qcow2::{BlockBackend, CreateOptions, Error, ImageFormat, NewSnapshot, OpenOptions, Qcow2};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
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

/// Build a chain base <- l1 <- ... of `depth` overlays with qemu-img, data at every level.
fn qemu_chain(dir: &Scratch, base_fmt: &str, depth: usize, cluster: u64) -> std::path::PathBuf {
    let base = dir.path(&format!("base.{base_fmt}"));
    let cs = format!("cluster_size={cluster}");
    if base_fmt == "raw" {
        ok("qemu-img", &["create", "-f", "raw", p(&base), "8M"]);
    } else {
        ok("qemu-img", &["create", "-f", "qcow2", "-o", &cs, p(&base), "8M"]);
    }
    qemu_io(
        &base,
        base_fmt,
        &[
            "write -P 0x11 0 3M",
            "write -P 0x12 5M 1M",
            "write -P 0x13 7340000 12345",
        ],
    );
    let mut below = base.clone();
    let mut below_fmt = base_fmt.to_string();
    for lvl in 1..=depth {
        let top = dir.path(&format!("l{lvl}.qcow2"));
        // Relative backing names, as libvirt pools and cloud images use them.
        let name = below.file_name().unwrap().to_str().unwrap().to_string();
        ok(
            "qemu-img",
            &["create", "-f", "qcow2", "-o", &cs, "-b", &name, "-F", &below_fmt, p(&top)],
        );
        let pat = 0x20 + lvl as u8 * 0x10;
        let w1 = format!("write -P {pat:#x} {} 1000", 1000 * lvl as u64); // partial cluster
        let w2 = format!("write -P {:#x} {} 300K", pat + 1, lvl as u64 * MIB + 777);
        let w3 = format!("write -z {} 64K", 2 * MIB + lvl as u64 * 131072); // zero over data
        let w4 = format!("write -P {:#x} 7340500 100", pat + 2); // past a partial base write
        qemu_io(&top, "qcow2", &[&w1, &w2, &w3, &w4]);
        below = top;
        below_fmt = "qcow2".into();
    }
    below
}

fn assert_reads_like_qemu(top: &Path, dir: &Scratch) {
    let mut q = Qcow2::open(top, &ro()).expect("open qemu-made chain");
    let ours = our_raw(&mut q);
    let theirs = qemu_raw(top, None, dir);
    assert_eq!(first_diff(&ours, &theirs), None, "{} differs from qemu-img convert", top.display());
    // Unaligned reads straddling layers and clusters agree too.
    let mut buf = vec![0u8; 200_000];
    let size = q.size();
    for off in [999u64, 65_000, MIB - 3, 7_340_000].into_iter().filter(|&o| o < size) {
        let n = buf.len().min((q.size() - off) as usize);
        q.read_at(off, &mut buf[..n]).expect("read");
        assert_eq!(&buf[..n], &theirs[off as usize..off as usize + n], "read at {off}");
    }
}

#[test]
fn qemu_made_chains_of_depth_1_to_3_read_identically() {
    for (base_fmt, cluster) in [("qcow2", 65536u64), ("raw", 65536), ("qcow2", 4096)] {
        for depth in 1..=3 {
            let dir = Scratch::new("chain");
            let top = qemu_chain(&dir, base_fmt, depth, cluster);
            assert_reads_like_qemu(&top, &dir);
        }
    }
}

#[test]
fn backing_smaller_than_overlay_reads_zeros_past_its_end() {
    let dir = Scratch::new("short-base");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&base), "1M"]);
    qemu_io(&base, "qcow2", &["write -P 0x5a 0 1M"]);
    ok("qemu-img", &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&top), "3M"]);
    qemu_io(&top, "qcow2", &["write -P 0x6b 1000000 100000"]);
    assert_reads_like_qemu(&top, &dir);
}

#[test]
fn our_writes_into_an_overlay_pass_qemu_check_and_read_back_in_qemu() {
    for cluster in [65536u64, 512] {
        let dir = Scratch::new("our-overlay");
        let top = qemu_chain(&dir, "qcow2", 2, cluster);
        let mut model = qemu_raw(&top, None, &dir);
        {
            let mut q = Qcow2::open(&top, &OpenOptions::default()).expect("open rw");
            // Partial-cluster writes over base data (copy-on-write), over unallocated-everywhere
            // ranges, across cluster and L2 boundaries, zero writes and discards.
            let writes: &[(u64, usize)] = &[(10, 100), (65_530, 20), (3 * MIB - 7, 70_000), (6 * MIB + 1, 5)];
            for (i, &(off, len)) in writes.iter().enumerate() {
                let d = pattern(i as u64 + 7, len);
                q.write_at(off, &d).expect("write");
                model[off as usize..off as usize + len].copy_from_slice(&d);
            }
            q.write_zeroes(MIB / 2, 3 * cluster + 11).expect("write_zeroes");
            model[(MIB / 2) as usize..(MIB / 2 + 3 * cluster + 11) as usize].fill(0);
            q.discard(5 * MIB, 2 * MIB).expect("discard");
            model[5 * MIB as usize..7 * MIB as usize].fill(0);
            assert_eq!(first_diff(&our_raw(&mut q), &model), None, "our view after writes");
            // An internal snapshot lives in the top image, over the chain.
            let mut s = NewSnapshot::new("snap1");
            s.vm_state_size = 0;
            q.create_snapshot(&s).expect("snapshot");
            q.write_at(0, &[0xee; 4096]).expect("write after snapshot");
            let mut before = vec![0u8; q.size() as usize];
            q.read_snapshot("snap1", 0, &mut before).expect("read snapshot");
            assert_eq!(first_diff(&before, &model), None, "snapshot view");
            q.goto_snapshot("snap1").expect("goto");
            assert_eq!(first_diff(&our_raw(&mut q), &model), None, "after goto");
            q.close().expect("close");
        }
        assert_qemu_clean(&top);
        let theirs = qemu_raw(&top, None, &dir);
        assert_eq!(first_diff(&theirs, &model), None, "qemu-img reads our overlay differently");
        let snap = qemu_raw(&top, Some("snap1"), &dir);
        assert_eq!(first_diff(&snap, &model), None, "qemu-img reads our snapshot differently");
        // The base layers were not touched.
        assert_qemu_clean(&dir.path("base.qcow2"));
    }
}

#[test]
fn v2_overlay_zero_writes_do_not_expose_the_backing_file() {
    let dir = Scratch::new("v2-zero");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&base), "2M"]);
    qemu_io(&base, "qcow2", &["write -P 0x77 0 2M"]);
    ok("qemu-img", &["create", "-f", "qcow2", "-o", "compat=0.10", "-b", "base.qcow2", "-F", "qcow2", p(&top)]);
    {
        let mut q = Qcow2::open(&top, &OpenOptions::default()).unwrap();
        q.write_zeroes(65536, 3 * 65536).unwrap();
        q.discard(MIB, 65536).unwrap();
    }
    assert_qemu_clean(&top);
    let v = qemu_raw(&top, None, &dir);
    assert!(v[65536..4 * 65536].iter().all(|&b| b == 0));
    assert!(v[MIB as usize..MIB as usize + 65536].iter().all(|&b| b == 0));
    assert!(v[..65536].iter().all(|&b| b == 0x77));
}

#[test]
fn our_created_overlay_is_read_by_qemu_with_relative_and_absolute_names() {
    let dir = Scratch::new("create-b");
    let base = dir.path("base.raw");
    ok("qemu-img", &["create", "-f", "raw", p(&base), "4M"]);
    qemu_io(&base, "raw", &["write -P 0x42 65536 100000"]);
    for (name, fmt) in [("base.raw", Some(ImageFormat::Raw)), (p(&base), None)] {
        let top = dir.path("top.qcow2");
        let c = CreateOptions {
            size: 4 * MIB,
            backing_file: Some(name.to_string()),
            backing_format: fmt,
            ..Default::default()
        };
        let mut q = Qcow2::create(&top, &c).expect("create overlay");
        assert_eq!(q.backing_file(), Some(name));
        q.write_at(100_000, &[9u8; 1000]).unwrap();
        drop(q);
        assert_qemu_clean(&top);
        let info = ok("qemu-img", &["info", "--output=json", p(&top)]);
        assert!(info.contains(&format!("\"backing-filename\": \"{name}\"")), "{info}");
        let mut expect = vec![0u8; 4 * MIB as usize];
        expect[65536..165_536].fill(0x42);
        expect[100_000..101_000].fill(9);
        assert_eq!(first_diff(&qemu_raw(&top, None, &dir), &expect), None);
    }
}

#[test]
fn relative_names_resolve_against_the_overlay_directory_not_the_cwd() {
    let dir = Scratch::new("relative");
    std::fs::create_dir_all(dir.path("sub")).unwrap();
    let base = dir.path("sub/base.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&base), "1M"]);
    qemu_io(&base, "qcow2", &["write -P 0x31 0 4096"]);
    let top = dir.path("sub/top.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&top)]);
    // The test's cwd is the crate directory, where no base.qcow2 exists.
    assert!(!Path::new("base.qcow2").exists());
    let mut q = Qcow2::open(&top, &ro()).expect("open");
    let mut b = [0u8; 4096];
    q.read_at(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x31));
    assert_eq!(q.backing_path(), Some(dir.path("sub/base.qcow2").as_path()));
}

#[test]
fn missing_backing_file_loops_and_absurd_depth_are_clear_errors() {
    let dir = Scratch::new("bad-chains");
    // Missing.
    let top = dir.path("top.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", p(&top), "1M"]);
    match Qcow2::open(&top, &ro()) {
        Err(e @ Error::BackingOpen { .. }) => {
            let m = e.to_string();
            assert!(m.contains("gone.qcow2") && m.contains("No such file"), "{m}");
        }
        other => panic!("missing backing file: {other:?}"),
    }
    // Without the chain it still opens (what `rebase -u` needs).
    let q = Qcow2::open(&top, &OpenOptions { read_only: true, no_backing: true, ..Default::default() });
    assert!(q.is_ok());
    // A loop a -> b -> a.
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", p(&a), "1M"]);
    ok("qemu-img", &["create", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&b), "1M"]);
    let e = Qcow2::open(&a, &ro()).expect_err("loop must be refused");
    assert!(matches!(e, Error::BackingLoop(_)), "{e}");
    // An image that is its own backing file.
    let s = dir.path("self.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", "-u", "-b", "self.qcow2", "-F", "qcow2", p(&s), "1M"]);
    assert!(matches!(Qcow2::open(&s, &ro()), Err(Error::BackingLoop(_))));
    // 70 layers: refused with the depth limit, not a stack overflow or a hang.
    let mut prev = dir.path("d0.qcow2");
    Qcow2::create(&prev, &CreateOptions { size: MIB, ..Default::default() }).unwrap();
    for i in 1..70 {
        let cur = dir.path(&format!("d{i}.qcow2"));
        let c = CreateOptions {
            size: MIB,
            backing_file: Some(format!("d{}.qcow2", i - 1)),
            backing_format: Some(ImageFormat::Qcow2),
            ..Default::default()
        };
        Qcow2::create_with(&cur, &c, &OpenOptions { no_backing: true, ..Default::default() }).unwrap();
        prev = cur;
    }
    let e = Qcow2::open(&prev, &ro()).expect_err("too deep");
    assert!(matches!(e, Error::BackingTooDeep(qcow2::backing::MAX_CHAIN_DEPTH)), "{e}");
    // 60 layers are fine.
    assert!(Qcow2::open(dir.path("d59.qcow2"), &ro()).is_ok());
}

#[test]
fn bases_are_locked_shared_like_qemu() {
    let dir = Scratch::new("locks");
    let base = dir.path("base.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&base), "1M"]);
    let t1 = dir.path("t1.qcow2");
    let t2 = dir.path("t2.qcow2");
    for t in [&t1, &t2] {
        ok("qemu-img", &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(t)]);
    }
    let _vm1 = Qcow2::open(&t1, &OpenOptions::default()).expect("first overlay");
    // A second VM over the same base is fine.
    let _vm2 = Qcow2::open(&t2, &OpenOptions::default()).expect("second overlay on the same base");
    assert!(qcow2::backing::in_use_as_backing(&base).unwrap());
    // A writer of the base is refused (QEMU's own lock protocol).
    let o = run("qemu-io", &["-f", "qcow2", "-c", "write 0 512", p(&base)]);
    assert!(!o.status.success(), "qemu-io wrote a base in use");
    assert!(String::from_utf8_lossy(&o.stderr).contains("lock"), "{}", String::from_utf8_lossy(&o.stderr));
    drop(_vm1);
    drop(_vm2);
    // An OFD lock goes with the last descriptor of its open file. A child that another test
    // thread is spawning right now holds copies of this process's descriptors until its exec
    // closes them (close-on-exec), so the release can trail the drop by a moment.
    let released = (0..250).any(|_| {
        let busy = qcow2::backing::in_use_as_backing(&base).unwrap();
        if busy {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        !busy
    });
    assert!(released, "the base is still locked 5 s after both overlays closed");
    ok("qemu-io", &["-f", "qcow2", "-c", "write 0 512", p(&base)]);
}

#[test]
fn a_base_being_written_is_refused_as_backing() {
    let dir = Scratch::new("lock-writer");
    let base = dir.path("base.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&base), "1M"]);
    let top = dir.path("top.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&top)]);
    // qemu-io holds the write lock on the base while it sleeps.
    let mut child = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "sleep 3000", p(&base)])
        .spawn()
        .expect("spawn qemu-io");
    // Wait until its lock is visible (it takes the locks when opening, before the command).
    let mut seen = false;
    for _ in 0..300 {
        if Qcow2::open(&top, &ro()).is_err() {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let r = Qcow2::open(&top, &ro());
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "an overlay opened over a base held by a writer");
    let e = r.expect_err("still held");
    assert!(e.to_string().contains("lock"), "{e}");
}

#[test]
fn top_allocation_reports_only_what_the_top_layer_holds() {
    let dir = Scratch::new("top-alloc");
    let top = qemu_chain(&dir, "qcow2", 1, 65536);
    let mut q = Qcow2::open(&top, &ro()).unwrap();
    let runs = q.top_allocation(0, q.size()).unwrap();
    // Compare with qemu-img map's depth-0 extents.
    let map = ok("qemu-img", &["map", "--output=json", p(&top)]);
    let mut expect: Vec<(u64, u64, bool)> = Vec::new();
    for line in map.lines().filter(|l| l.contains("\"start\"")) {
        let num = |k: &str| -> u64 {
            let i = line.find(&format!("\"{k}\": ")).unwrap() + k.len() + 4;
            line[i..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
        };
        let top_layer = num("depth") == 0;
        let (s, l) = (num("start"), num("length"));
        match expect.last_mut() {
            Some(x) if x.2 == top_layer && x.0 + x.1 == s => x.1 += l,
            _ => expect.push((s, l, top_layer)),
        }
    }
    assert_eq!(runs, expect);
    assert!(q.is_allocated_top(0, 1000).unwrap());
    assert!(!q.is_allocated_top(4 * MIB, 65536).unwrap());
}

#[test]
fn commit_into_a_base_another_overlay_uses_is_refused() {
    let dir = Scratch::new("commit-lock");
    let base = dir.path("base.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&base), "1M"]);
    let t1 = dir.path("t1.qcow2");
    let t2 = dir.path("t2.qcow2");
    for t in [&t1, &t2] {
        ok("qemu-img", &["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(t)]);
    }
    let _other = Qcow2::open(&t2, &ro()).unwrap();
    let mut q = Qcow2::open(&t1, &OpenOptions::default()).unwrap();
    q.write_at(0, &[1u8; 512]).unwrap();
    let e = q.commit_to_backing(false).expect_err("base in use by another overlay");
    assert!(matches!(e, Error::Locked(..)), "{e}");
    // Still usable, chain reopened.
    let mut b = [0u8; 512];
    q.read_at(0, &mut b).unwrap();
    assert_eq!(b, [1u8; 512]);
    drop(_other);
    // Another test thread that forks qemu-img at this moment holds a copy of every open
    // descriptor, `_other`'s included (and with it its lock), until its exec closes them:
    // on a loaded 2-core CI host that window reached the commit below. Allow it to pass;
    // a lock that stays would still fail the test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match q.commit_to_backing(false) {
            Err(Error::Locked(..)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => break r.expect("commit once the base is free"),
        }
    }
    drop(q);
    let v = qemu_raw(&base, None, &dir);
    assert!(v[..512].iter().all(|&x| x == 1));
}
