//! Backing chains on NFS: an overlay made by qemu-img on the export of a real NFS server
//! (nfs-ganesha in a network namespace of its own, crate `nfs`, module `ganesha`), the test
//! guest on `-drive file=nfs://SERVER/export/DIR/vm.qcow2`, its backing file opened on the same
//! server as QEMU resolves it (relative to the overlay's URL), read-only. Reads fall through to
//! the base's data, the base is left as it was, and godwit-img / qemu-img agree on the chain.
//! A live migration between two hosts on the same overlay keeps the disk ledger. Missing
//! backing files and loops are clear errors.
//!
//! Needs root, /dev/kvm, and the Debian packages nfs-ganesha nfs-ganesha-vfs rpcbind libnfs13
//! (libnfs-dev) qemu-utils qemu-block-extra.

mod common;
use common::*;
use nfs::ganesha::Ganesha;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);
const MIB: usize = 1 << 20;

/// A test NFS server; it removes its own directory when dropped.
fn server(_name: &str) -> Ganesha {
    Ganesha::start(&std::env::temp_dir()).unwrap_or_else(|e| panic!("cannot start the test NFS server: {e}"))
}

fn godwit_img() -> PathBuf {
    let p = godwit_bin().parent().unwrap().join("godwit-img");
    assert!(p.exists(), "{} is missing: cargo build --release -p godwit-img", p.display());
    p
}

/// Runs a tool, returning (success, stdout + stderr).
fn tool(cmd: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{}: {e}", cmd.display()));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn nfs_overlay_boots_over_its_base_on_the_same_server() {
    require_kvm();
    let g = server("chain");
    let dir = g.export().join("chain");
    std::fs::create_dir_all(&dir).unwrap();
    // The base: data past the guest's disk region (4 MiB), one part of it not cluster-aligned.
    let base = dir.join("base.qcow2");
    create_image(&base, "qcow2", "64M");
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0xa5 8M 1M", "-c", "write -P 0x5c 4097k 3k", p(&base)]);
    let base_before = std::fs::read(&base).unwrap();
    // The overlay names it relatively, as `qemu-img create -b` on the export writes it.
    let vm = dir.join("vm.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&vm)]);
    let url = g.url("chain/vm.qcow2", "");
    let drive = format!("file={url},format=qcow2,if=none,id=disk0");
    let tmp = tmpdir("nfs-chain");
    let sock = tmp.join("m.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut guest = Vm::guest(
        &["-m", "512", "-smp", "2", "-drive", &drive, "-device", "virtio-blk-device,drive=disk0", "-monitor", &mon],
        "mode=dirty mib=64 rate=20 disk=on disk_mib=4 hb_ms=100 cpus=2",
    );
    guest.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock);
    for _ in 0..10 {
        guest.wait_for("HEARTBEAT", T);
    }
    guest.send(b"v");
    guest.wait_for("LEDGER OK", T);
    let ok = guest.wait_for("DISK OK", T);
    assert!(field(&ok, "gen").unwrap_or(0) >= 1, "the guest wrote its disk (the overlay) over NFS: {ok}");
    let info = hmp.cmd("info block");
    assert!(info.contains("vm.qcow2"), "{info}");
    hmp.quit();
    assert_eq!(guest.wait_exit(T), Some(0));

    // The base was opened read-only: not a byte changed.
    assert!(std::fs::read(&base).unwrap() == base_before, "the base image changed");
    // What Godwit's NFS chain reads (godwit-img over nfs://) is what qemu-img reads from the
    // same files on the server's side (QEMU 7.2's own NFS driver cannot open a relative backing
    // file: it looks for nfs://.../vm.qcow2/base.qcow2).
    let (ours, theirs) = (tmp.join("ours.raw"), tmp.join("theirs.raw"));
    let (okg, out) = tool(&godwit_img(), &["convert", "-O", "raw", &url, p(&ours)]);
    assert!(okg, "godwit-img convert over nfs://: {out}");
    sh("qemu-img", &["convert", "-O", "raw", p(&vm), p(&theirs)]);
    let (a, b) = (std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());
    assert_eq!(a.len(), 64 * MIB);
    assert!(a == b, "godwit-img over NFS and qemu-img on the server read different data from the chain");
    // The guest's region holds the ledger (in the overlay), the rest is the base's data.
    let (written, gen) = check_dump(&a[..4 * MIB], 4 * MIB / 512);
    assert!(written > 0 && gen >= 1, "ledger sectors in the overlay: {written} (gen {gen})");
    assert!(a[8 * MIB..9 * MIB].iter().all(|&x| x == 0xa5), "base data at 8M reads through");
    assert!(a[4097 * 1024..4100 * 1024].iter().all(|&x| x == 0x5c), "base data at 4097k reads through");
    assert!(a[4 * MIB..4097 * 1024].iter().all(|&x| x == 0), "zeros around the base's data");
    // The top layer holds only what the guest wrote: the base's extents are not in it.
    let map = json(&sh("qemu-img", &["map", "--output=json", "-f", "qcow2", p(&vm)]));
    for e in map.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if e["depth"] == 0 && e["data"] == true {
            assert!(start + len <= 4 * MIB as u64, "the overlay holds data outside the guest's region: {e}");
        }
    }
    let (okc, check) = tool(Path::new("qemu-img"), &["check", p(&vm)]);
    assert!(okc, "qemu-img check of the overlay: {check}");

    // godwit-img info --backing-chain over nfs:// says what qemu-img says of the files, with
    // the backing file's URL on the same server.
    let (okg, gi) = tool(&godwit_img(), &["info", "--backing-chain", "--output=json", &url]);
    assert!(okg, "{gi}");
    let qi = sh("qemu-img", &["info", "--backing-chain", "--output=json", p(&vm)]);
    let (gi, qi) = (json(&gi), json(&qi));
    assert_eq!(gi.as_array().map(Vec::len), Some(2), "{gi}");
    for (ours, theirs) in gi.as_array().unwrap().iter().zip(qi.as_array().unwrap()) {
        for k in ["format", "virtual-size", "cluster-size", "backing-filename", "backing-filename-format"] {
            assert_eq!(ours[k], theirs[k], "{k}: godwit-img {ours} / qemu-img {theirs}");
        }
    }
    let base_url = g.url("chain/base.qcow2", "");
    assert_eq!(gi[0]["filename"], Value::from(url.clone()));
    assert_eq!(gi[0]["full-backing-filename"], Value::from(base_url.clone()));
    assert_eq!(gi[1]["filename"], Value::from(base_url.clone()));

    // A local overlay whose backing file is an nfs:// URL (taken as is) reads the same base.
    let local = tmp.join("local.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", &base_url, "-F", "qcow2", p(&local), "64M"]);
    let (lraw, braw) = (tmp.join("local.raw"), tmp.join("base.raw"));
    let (okl, out) = tool(&godwit_img(), &["convert", "-O", "raw", p(&local), p(&lraw)]);
    assert!(okl, "godwit-img convert of a local overlay over nfs://: {out}");
    sh("qemu-img", &["convert", "-O", "raw", p(&base), p(&braw)]);
    assert!(std::fs::read(&lraw).unwrap() == std::fs::read(&braw).unwrap(), "the local overlay reads the NFS base");
}

#[test]
fn nfs_overlay_with_a_missing_or_looping_backing_file_is_refused_clearly() {
    require_kvm();
    let g = server("chainbad");
    let dir = g.export().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let lost = dir.join("lost.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", p(&lost), "64M"]);
    let url = g.url("bad/lost.qcow2", "");
    let gone = g.url("bad/gone.qcow2", "");
    let guest = guest_bin();
    let drive = format!("file={url},format=qcow2,if=none,id=disk0");
    let (code, err) = run_to_end(&[
        "-m", "256", "-kernel", p(&guest), "-drive", &drive, "-device", "virtio-blk-device,drive=disk0", "-serial", "none",
    ]);
    assert_ne!(code, 0, "godwit must refuse the drive: {err}");
    assert!(
        err.contains(&format!("Could not open backing file 'gone.qcow2' ({gone})")),
        "the error names the backing file and where it was looked for: {err}"
    );
    let img = godwit_img();
    let (ok, out) = tool(&img, &["info", "--backing-chain", &url]);
    assert!(!ok && out.contains(&format!("Could not open backing file 'gone.qcow2' ({gone})")), "{out}");
    // Like qemu-img, plain `info` does not need the backing file.
    let (ok, out) = tool(&img, &["info", "--output=json", &url]);
    assert!(ok, "{out}");
    assert_eq!(json(&out)["full-backing-filename"], Value::from(gone.clone()), "{out}");
    // a.qcow2 -> b.qcow2 -> a.qcow2.
    let (a, b) = (dir.join("a.qcow2"), dir.join("b.qcow2"));
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "b.qcow2", "-F", "qcow2", p(&a), "64M"]);
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", p(&b), "64M"]);
    let (ok, out) = tool(&img, &["info", "--backing-chain", &g.url("bad/a.qcow2", "")]);
    assert!(!ok && out.contains("backing chain loop"), "{out}");
    assert!(out.contains(&g.url("bad/a.qcow2", "")), "the loop names the image met twice: {out}");
}


/// Spawns godwit with the test guest inside a host namespace.
fn in_ns(ns: &str, args: &[&str], append: &str) -> Vm {
    let (g, godwit) = (guest_bin(), godwit_bin());
    let mut full = vec!["netns", "exec", ns, p(&godwit), "-kernel", p(&g), "-append", append];
    full.extend_from_slice(args);
    Vm::spawn_cmd("ip", &full)
}

/// Live migration of a VM on an NFS overlay between two hosts: both open the base read-only
/// on the server, the destination takes the overlay over and the disk ledger holds.
#[test]
fn nfs_overlay_live_migration_between_two_hosts() {
    require_kvm();
    let mut g = server("chainlive");
    let dir = g.export().join("live");
    std::fs::create_dir_all(&dir).unwrap();
    let base = dir.join("base.qcow2");
    create_image(&base, "qcow2", "64M");
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0xa5 8M 1M", p(&base)]);
    let base_before = std::fs::read(&base).unwrap();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&dir.join("vm.qcow2"))]);
    let url = g.url("live/vm.qcow2", "");
    let (a, b) = (g.add_host("a").unwrap(), g.add_host("b").unwrap());
    let (ans, bns) = (a.ns.clone().unwrap(), b.ns.clone().unwrap());
    let append = "mode=dirty mib=64 rate=20 disk=on disk_mib=4 hb_ms=100 cpus=2";
    let drive = format!("file={url},format=qcow2");
    let incoming = format!("tcp:{}:6666", b.addr);
    let mut dst = in_ns(&bns, &["-m", "512", "-smp", "2", "-drive", &drive, "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let tmp = tmpdir("nfs-chain-live");
    let sock = tmp.join("src.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut src = in_ns(&ans, &["-m", "512", "-smp", "2", "-drive", &drive, "-monitor", &mon], append);
    src.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock);
    for _ in 0..8 {
        src.wait_for("HEARTBEAT", T);
    }
    let out = hmp.cmd(&format!("migrate {incoming}"));
    assert!(out.contains("completed"), "{out}");
    src.collect_for(Duration::from_millis(300));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    let ok = dst.wait_for("DISK OK", T);
    assert!(field(&ok, "gen").unwrap_or(0) >= 1, "{ok}");
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
    hmp.quit();
    src.wait_exit(T);
    assert!(std::fs::read(&base).unwrap() == base_before, "the base image changed");
    let (okc, check) = tool(Path::new("qemu-img"), &["check", p(&dir.join("vm.qcow2"))]);
    assert!(okc, "qemu-img check of the overlay: {check}");
    let (ours, theirs) = (tmp.join("ours.raw"), tmp.join("theirs.raw"));
    let (okg, out) = tool(&godwit_img(), &["convert", "-O", "raw", &url, p(&ours)]);
    assert!(okg, "{out}");
    sh("qemu-img", &["convert", "-O", "raw", p(&dir.join("vm.qcow2")), p(&theirs)]);
    let data = std::fs::read(&ours).unwrap();
    assert!(data == std::fs::read(&theirs).unwrap(), "godwit-img and qemu-img read the chain alike");
    check_dump(&data[..4 * MIB], 4 * MIB / 512);
    assert!(data[8 * MIB..9 * MIB].iter().all(|&x| x == 0xa5), "base data reads through");
}
