//! Disks on a real NFS server: nfs-ganesha started by each test in a network namespace of its
//! own (crate `nfs`, module `ganesha`), the drive given as QEMU gives it,
//! `-drive file=nfs://SERVER/export/FILE`, served through libnfs. Boot with the disk ledger,
//! savevm → quit → `-loadvm` on another host, godwit-img and QEMU's own NFS driver (qemu-img
//! over nfs://) agreeing on the image, and the single writer across hosts.
//!
//! Needs root, /dev/kvm, and the Debian packages nfs-ganesha nfs-ganesha-vfs rpcbind libnfs13
//! (libnfs-dev) qemu-utils qemu-block-extra.

mod common;
use common::*;
use nfs::ganesha::Ganesha;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(90);

fn server(name: &str) -> Ganesha {
    let base = tmpdir(&format!("ganesha-{name}"));
    Ganesha::start(&base).unwrap_or_else(|e| panic!("cannot start the test NFS server: {e}"))
}

fn godwit_img() -> std::path::PathBuf {
    let p = godwit_bin().parent().unwrap().join("godwit-img");
    assert!(p.exists(), "{} is missing: cargo build --release -p godwit-img", p.display());
    p
}

/// Runs a tool, returning (success, stdout + stderr).
fn tool(cmd: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{}: {e}", cmd.display()));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    tool(std::path::Path::new("/usr/bin/qemu-img"), args)
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Spawns godwit with the test guest inside a host namespace.
fn in_ns(ns: &str, args: &[&str], append: &str) -> Vm {
    let g = guest_bin();
    let godwit = godwit_bin();
    let mut full = vec!["netns", "exec", ns, godwit.to_str().unwrap(), "-kernel", g.to_str().unwrap(), "-append", append];
    full.extend_from_slice(args);
    Vm::spawn_cmd("ip", &full)
}

const APPEND: &str = "mode=dirty mib=64 rate=20 disk=on disk_mib=4 hb_ms=100 cpus=2";

#[test]
fn nfs_disk_ledger_savevm_and_loadvm_on_another_host() {
    require_kvm();
    let mut g = server("cold");
    let local = g.export().join("vm.qcow2");
    create_image(&local, "qcow2", "64M");
    let url = g.url("vm.qcow2", "");
    let drive = format!("file={url},format=qcow2,if=none,id=disk0");
    let dir = tmpdir("nfs-cold");
    let sock = dir.join("a.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut vm = Vm::guest(
        &["-m", "512", "-smp", "2", "-drive", &drive, "-device", "virtio-blk-device,drive=disk0", "-monitor", &mon],
        APPEND,
    );
    vm.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock);
    for _ in 0..10 {
        vm.wait_for("HEARTBEAT", T);
    }
    vm.send(b"v");
    vm.wait_for("LEDGER OK", T);
    let ok = vm.wait_for("DISK OK", T);
    assert!(field(&ok, "gen").unwrap_or(0) >= 1, "the guest wrote its disk over NFS: {ok}");
    // While this Godwit holds the image, a writer on another host is refused.
    let b = g.add_host("b").unwrap();
    let bns = b.ns.clone().unwrap();
    let img = godwit_img();
    let (okw, out) = tool(
        std::path::Path::new("ip"),
        &["netns", "exec", &bns, img.to_str().unwrap(), "snapshot", "-c", "intruder", &url],
    );
    assert!(!okw && out.contains("lock"), "a second writer must be refused: {out}");
    assert_eq!(hmp.cmd("savevm tag1").trim(), "", "savevm on the NFS image");
    let at_save = seqs(&vm.seen).into_iter().max().unwrap();
    hmp.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
    // godwit-img and QEMU's NFS driver see the same image, clean, with the snapshot.
    let (okq, q_info) = qemu_img(&["info", "--output=json", &url]);
    assert!(okq, "{q_info}");
    let (okg, g_info) = tool(&img, &["info", "--output=json", &url]);
    assert!(okg, "{g_info}");
    let (q, gi) = (json(&q_info), json(&g_info));
    for k in ["virtual-size", "format", "cluster-size"] {
        assert_eq!(q[k], gi[k], "{k}: qemu-img {q_info} / godwit-img {g_info}");
    }
    let names = |v: &Value| -> Vec<String> {
        v["snapshots"].as_array().map(|a| a.iter().map(|s| s["name"].as_str().unwrap_or("").to_string()).collect()).unwrap_or_default()
    };
    assert_eq!(names(&q), vec!["tag1".to_string()]);
    assert_eq!(names(&q), names(&gi));
    assert_eq!(q["snapshots"][0]["vm-state-size"], gi["snapshots"][0]["vm-state-size"]);
    let (okc, check) = qemu_img(&["check", "--output=json", &url]);
    assert!(okc, "qemu-img check: {check}");
    let c = json(&check);
    assert!(c.get("corruptions").is_none() && c.get("leaks").is_none(), "{check}");
    let (okc, gcheck) = tool(&img, &["check", &url]);
    assert!(okc && gcheck.contains("No errors were found"), "{gcheck}");
    let (_, list) = tool(&img, &["snapshot", "-l", &url]);
    let (_, qlist) = qemu_img(&["snapshot", "-l", &url]);
    assert!(list.contains("tag1") && qlist.contains("tag1"), "{list}\n{qlist}");
    // Cold migration: the other host starts from the snapshot on the same NFS image.
    let sock_b = dir.join("b.sock");
    let mon_b = format!("unix:{},server,nowait", sock_b.display());
    let mut vm2 = in_ns(
        &bns,
        &["-m", "512", "-smp", "2", "-drive", &drive, "-device", "virtio-blk-device,drive=disk0", "-monitor", &mon_b, "-loadvm", "tag1"],
        APPEND,
    );
    let first = vm2.wait_for("HEARTBEAT", T);
    let s = field(&first, "seq").unwrap();
    assert!(s > at_save.saturating_sub(2) && s <= at_save + 2, "continues from {at_save}: {first}");
    for _ in 0..5 {
        vm2.wait_for("HEARTBEAT", T);
    }
    vm2.send(b"v");
    vm2.wait_for("LEDGER OK", T);
    vm2.wait_for("DISK OK", T);
    vm2.send(b"q");
    assert_eq!(vm2.wait_exit(T), Some(0));
    let (okc, check) = qemu_img(&["check", "--output=json", &url]);
    assert!(okc, "qemu-img check after the second host: {check}");
}

/// Live migration between two hosts with the disk on the NFS server (a third host): the guest
/// dirties memory and writes its disk while it moves; the destination verifies both ledgers,
/// holds the writer lock afterwards (the source let go of it), and the image checks clean.
#[test]
fn nfs_live_migration_between_two_hosts() {
    require_kvm();
    let mut g = server("live");
    create_image(&g.export().join("vm.qcow2"), "qcow2", "64M");
    let url = g.url("vm.qcow2", "");
    let a = g.add_host("a").unwrap();
    let b = g.add_host("b").unwrap();
    let (ans, bns) = (a.ns.clone().unwrap(), b.ns.clone().unwrap());
    let drive = format!("file={url},format=qcow2");
    let append = "mode=dirty mib=128 rate=40 disk=on disk_mib=8 hb_ms=100 cpus=2";
    let incoming = format!("tcp:{}:6666", b.addr);
    let dst = in_ns(&bns, &["-m", "512", "-smp", "2", "-drive", &drive, "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let dir = tmpdir("nfs-live");
    let sock = dir.join("src.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut src = in_ns(&ans, &["-m", "512", "-smp", "2", "-drive", &drive, "-monitor", &mon], append);
    src.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock);
    for _ in 0..8 {
        src.wait_for("HEARTBEAT", T);
    }
    let out = hmp.cmd(&format!("migrate {incoming}"));
    assert!(out.contains("completed"), "{out}");
    assert!(hmp.cmd("info status").contains("postmigrate"));
    let mut dst = dst;
    src.collect_for(Duration::from_millis(300));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    let ok = dst.wait_for("DISK OK", T);
    assert!(field(&ok, "gen").unwrap_or(0) >= 1, "{ok}");
    // The destination holds the writer lock now: a writer on the source's host is refused.
    let img = godwit_img();
    let (okw, out) = tool(std::path::Path::new("ip"), &["netns", "exec", &ans, img.to_str().unwrap(), "snapshot", "-c", "x", &url]);
    assert!(!okw && out.contains("lock"), "the destination must hold the lock: {out}");
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
    hmp.quit();
    src.wait_exit(T);
    let (okc, check) = qemu_img(&["check", "--output=json", &url]);
    assert!(okc, "qemu-img check: {check}");
    let c = json(&check);
    assert!(c.get("corruptions").is_none() && c.get("leaks").is_none(), "{check}");
}
