//! savevm / loadvm end to end, and cold migration the seed's way: savevm, quit, copy the image
//! to another "host" directory, start there with the same arguments plus `-loadvm TAG`.
//! qemu-img must list our snapshots with the right VM SIZE and find the image clean.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn snapshot_list(img: &Path) -> String {
    sh("qemu-img", &["snapshot", "-U", "-l", img.to_str().unwrap()])
}

fn assert_clean(img: &Path) {
    let (code, out) = qemu_img_check(img);
    assert_eq!(code, 0, "qemu-img check: {out}");
}

fn start(img: &Path, sock: &Path, smp: &str, extra: &[&str]) -> (Vm, Hmp) {
    let drive = format!("file={}", img.display());
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut args = vec!["-m", "512", "-smp", smp, "-drive", &drive, "-monitor", &mon];
    args.extend_from_slice(extra);
    let append = format!("mode=dirty mib=64 rate=20 disk=on disk_mib=4 hb_ms=100 cpus={smp}");
    let mut vm = Vm::guest(&args, &append);
    if !extra.contains(&"-loadvm") {
        vm.wait_for("GUEST READY", T);
    }
    let hmp = Hmp::connect(sock);
    (vm, hmp)
}

fn savevm_loadvm(smp: &str) {
    let dir = tmpdir(&format!("snap{smp}"));
    let img = dir.join("vm.qcow2");
    create_image(&img, "qcow2", "64M");
    let (mut vm, mut hmp) = start(&img, &dir.join("m.sock"), smp, &[]);
    for _ in 0..5 {
        vm.wait_for("HEARTBEAT", T);
    }
    assert_eq!(hmp.cmd("savevm snap1").trim(), "", "savevm prints nothing on success");
    let at_save = seqs(&vm.seen).into_iter().max().unwrap();
    // The guest continues; let it get well past the snapshot.
    let mut later = 0;
    for _ in 0..10 {
        later = field(&vm.wait_for("HEARTBEAT", T), "seq").unwrap();
    }
    let list = hmp.cmd("info snapshots");
    assert!(list.contains("snap1"), "{list}");
    assert_eq!(hmp.cmd("loadvm snap1").trim(), "");
    let first = vm.wait_for("HEARTBEAT", T);
    let s = field(&first, "seq").unwrap();
    assert!(s <= at_save + 2 && s < later, "heartbeats continue from the saved sequence ({at_save}), got {first}");
    let next = vm.wait_for("HEARTBEAT", T);
    assert_eq!(field(&next, "seq"), Some(s + 1));
    assert!(field(&next, "ticks") > field(&first, "ticks"), "timer ticks advance after loadvm");
    vm.send(b"v");
    vm.wait_for("LEDGER OK", T);
    vm.wait_for("DISK OK", T);
    // QEMU's tools agree.
    let ql = snapshot_list(&img);
    assert!(ql.contains("snap1") && ql.contains("MiB"), "{ql}");
    vm.send(b"q");
    assert_eq!(vm.wait_exit(T), Some(0));
    assert_clean(&img);
}

#[test]
fn savevm_loadvm_one_vcpu() {
    savevm_loadvm("1");
}

#[test]
fn savevm_loadvm_four_vcpus() {
    savevm_loadvm("4");
}

fn cold_migration() {
    let a = tmpdir("cold-a");
    let b = tmpdir("cold-b");
    let img = a.join("vm.qcow2");
    create_image(&img, "qcow2", "64M");
    let (mut vm, mut hmp) = start(&img, &a.join("m.sock"), "2", &[]);
    for _ in 0..5 {
        vm.wait_for("HEARTBEAT", T);
    }
    assert_eq!(hmp.cmd("savevm my_tag").trim(), "");
    let at_save = seqs(&vm.seen).into_iter().max().unwrap();
    hmp.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
    assert_clean(&img);
    let vm_size_line = snapshot_list(&img);
    // "Copy the image to the new host."
    let img2 = b.join("vm.qcow2");
    std::fs::copy(&img, &img2).unwrap();
    let (mut vm2, _h2) = start(&img2, &b.join("m.sock"), "2", &["-loadvm", "my_tag"]);
    let first = vm2.wait_for("HEARTBEAT", T);
    let s = field(&first, "seq").unwrap();
    assert!(s > at_save.saturating_sub(2) && s <= at_save + 2, "continues from {at_save}: {first}");
    assert!(!vm2.seen.iter().any(|l| l.contains("GUEST READY")), "the guest must not boot again");
    vm2.send(b"v");
    vm2.wait_for("LEDGER OK", T);
    vm2.wait_for("DISK OK", T);
    vm2.send(b"q");
    assert_eq!(vm2.wait_exit(T), Some(0));
    assert_clean(&img2);
    assert!(vm_size_line.contains("my_tag"));
    // QEMU can delete our snapshot and the image stays clean.
    sh("qemu-img", &["snapshot", "-d", "my_tag", img2.to_str().unwrap()]);
    assert!(!snapshot_list(&img2).contains("my_tag"));
    assert_clean(&img2);
}

#[test]
fn cold_migration_to_another_host_directory() {
    cold_migration();
}

#[test]
fn snapshot_errors_are_clear_and_harmless() {
    let dir = tmpdir("snaperr");
    // Raw disk: cannot hold snapshots.
    let raw = dir.join("vm.raw");
    create_image(&raw, "raw", "16M");
    let drive = format!("file={},format=raw", raw.display());
    let sock = dir.join("r.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut vm = Vm::guest(&["-m", "128", "-drive", &drive, "-monitor", &mon], "mode=dirty mib=8 rate=5 hb_ms=100");
    vm.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock);
    let out = hmp.cmd("savevm x");
    assert!(out.contains("does not support snapshots"), "{out}");
    assert!(hmp.cmd("info status").contains("running"));
    drop(vm);
    // No disk at all.
    let sock2 = dir.join("n.sock");
    let mon2 = format!("unix:{},server,nowait", sock2.display());
    let mut vm = Vm::guest(&["-m", "128", "-monitor", &mon2], "mode=idle");
    vm.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock2);
    assert!(hmp.cmd("savevm x").contains("No block device can accept snapshots"));
    drop(vm);
    // Unknown tag: the VM carries on untouched.
    let img = dir.join("vm.qcow2");
    create_image(&img, "qcow2", "16M");
    let (mut vm, mut hmp) = start(&img, &dir.join("q.sock"), "1", &[]);
    let out = hmp.cmd("loadvm nosuch");
    assert!(out.contains("nosuch") && out.contains("does not exist"), "{out}");
    assert!(hmp.cmd("info status").contains("running"));
    let h1 = vm.wait_for("HEARTBEAT", T);
    let h2 = vm.wait_for("HEARTBEAT", T);
    assert_eq!(field(&h2, "seq"), field(&h1, "seq").map(|s| s + 1));
    hmp.cmd("savevm good");
    assert!(hmp.cmd("delvm good").trim().is_empty());
    assert!(!hmp.cmd("info snapshots").contains("good"));
    hmp.cmd("savevm good");
    hmp.quit();
    vm.wait_exit(T);
    // Loading into a VM with another -m is refused with a clear reason.
    let g = guest_bin();
    let drive = format!("file={}", img.display());
    let (code, err) = run_to_end(&["-m", "256", "-kernel", g.to_str().unwrap(), "-drive", &drive, "-loadvm", "good", "-serial", "none"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("512 MiB") && err.contains("256 MiB"), "{err}");
    assert_clean(&img);
}
