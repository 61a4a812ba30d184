//! The test guest on a qcow2 overlay made by `qemu-img create -b base.qcow2 -F qcow2`: disk
//! ledger `DISK OK`, savevm into the overlay (the top image), cold migration of the overlay to
//! another directory holding the base, `-loadvm` there with `DISK OK` again, `qemu-img check`
//! clean, the base untouched and locked against writers meanwhile; and a live migration of a
//! guest on an overlay over shared storage.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn raw_of(img: &Path, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    sh("qemu-img", &["convert", "-U", "-O", "raw", img.to_str().unwrap(), out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

fn start(top: &Path, sock: &Path, extra: &[&str]) -> (Vm, Hmp) {
    let drive = format!("file={}", top.display());
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut args = vec!["-m", "256", "-smp", "2", "-drive", &drive, "-monitor", &mon];
    args.extend_from_slice(extra);
    let mut vm = Vm::guest(&args, "mode=dirty mib=32 rate=10 disk=on disk_mib=4 hb_ms=100 cpus=2");
    if extra.is_empty() {
        vm.wait_for("GUEST READY", T);
    }
    let hmp = Hmp::connect(sock);
    (vm, hmp)
}

#[test]
fn guest_on_an_overlay_savevm_and_loadvm() {
    let dir = tmpdir("backing-e2e");
    let base = dir.join("base.qcow2");
    let top = dir.join("vm.qcow2");
    create_image(&base, "qcow2", "64M");
    // Base data outside the guest's ledger region, readable through the overlay.
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5c 40M 3M", "-c", "write -P 0x5d 63M 100000", base.to_str().unwrap()]);
    let base_before = raw_of(&base, &dir.join("b0.raw"));
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);

    let (mut vm, mut hmp) = start(&top, &dir.join("m.sock"), &[]);
    for _ in 0..5 {
        vm.wait_for("HEARTBEAT", T);
    }
    // While the VM runs, the base is a shared read-only backing file: a writer is refused.
    let g = guest_bin();
    let bdrive = format!("file={}", base.display());
    let (code, err) = run_to_end(&["-m", "64", "-kernel", g.to_str().unwrap(), "-drive", &bdrive]);
    assert_eq!(code, 1, "a second VM writing the base must be refused: {err}");
    assert!(err.contains("lock"), "{err}");
    assert_eq!(hmp.cmd("savevm snap1").trim(), "", "savevm prints nothing on success");
    for _ in 0..5 {
        vm.wait_for("HEARTBEAT", T);
    }
    vm.send(b"v");
    vm.wait_for("LEDGER OK", T);
    vm.wait_for("DISK OK", T);
    hmp.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
    let (c, out) = qemu_img_check(&top);
    assert_eq!(c, 0, "qemu-img check of the overlay: {out}");
    let list = sh("qemu-img", &["snapshot", "-U", "-l", top.to_str().unwrap()]);
    assert!(list.contains("snap1") && list.contains("MiB"), "the VM state lives in the overlay: {list}");
    // The guest's writes went to the overlay; the base is unchanged and shows through.
    assert_eq!(raw_of(&base, &dir.join("b1.raw")), base_before, "the base was modified");
    let flat = raw_of(&top, &dir.join("t.raw"));
    assert_eq!(&flat[40 << 20..43 << 20], &base_before[40 << 20..43 << 20]);
    assert_eq!(&flat[63 << 20..(63 << 20) + 100_000], &base_before[63 << 20..(63 << 20) + 100_000]);
    let (written, _) = check_dump(&flat, 8192);
    assert!(written > 0, "the guest's ledger sectors are in the overlay");

    // Cold migration: the overlay moves to "another host" where the base already exists at
    // the same (relative) place; start there from the snapshot in the overlay.
    let host2 = dir.join("host2");
    std::fs::create_dir_all(&host2).unwrap();
    std::fs::copy(&base, host2.join("base.qcow2")).unwrap();
    std::fs::copy(&top, host2.join("vm.qcow2")).unwrap();
    let (base, top) = (host2.join("base.qcow2"), host2.join("vm.qcow2"));
    let (mut vm2, mut hmp2) = start(&top, &dir.join("m2.sock"), &["-loadvm", "snap1"]);
    vm2.wait_for("HEARTBEAT", T);
    assert!(!vm2.seen.iter().any(|l| l.contains("GUEST READY")), "the guest must not boot again");
    vm2.send(b"v");
    vm2.wait_for("LEDGER OK", T);
    vm2.wait_for("DISK OK", T);
    hmp2.quit();
    assert_eq!(vm2.wait_exit(T), Some(0));
    let (c, out) = qemu_img_check(&top);
    assert_eq!(c, 0, "qemu-img check after -loadvm: {out}");
    assert_eq!(raw_of(&base, &dir.join("b2.raw")), base_before, "the base was modified");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn live_migration_of_a_guest_on_an_overlay_over_shared_storage() {
    let dir = tmpdir("backing-live");
    let base = dir.join("base.qcow2");
    let top = dir.join("vm.qcow2");
    create_image(&base, "qcow2", "32M");
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x6e 20M 2M", base.to_str().unwrap()]);
    let base_before = raw_of(&base, &dir.join("b0.raw"));
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    let append = "mode=dirty mib=32 rate=10 disk=on disk_mib=4 hb_ms=100 cpus=2";
    let drive = format!("file={}", top.display());
    let port = free_port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    // Destination first (it only probes the overlay until the handover), then the source.
    let mut dst = Vm::guest(&["-m", "256", "-smp", "2", "-drive", &drive, "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let sock = dir.join("src.sock");
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut src = Vm::guest(&["-m", "256", "-smp", "2", "-drive", &drive, "-monitor", &mon], append);
    src.wait_for("GUEST READY", T);
    for _ in 0..5 {
        src.wait_for("HEARTBEAT", T);
    }
    let mut hmp = Hmp::connect(&sock);
    let out = hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    assert!(out.contains("completed"), "{out}");
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    for _ in 0..5 {
        dst.wait_for("HEARTBEAT", T);
    }
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    dst.wait_for("DISK OK", T);
    hmp.quit();
    let _ = src.wait_exit(T);
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
    let (c, out) = qemu_img_check(&top);
    assert_eq!(c, 0, "qemu-img check of the overlay after migration: {out}");
    assert_eq!(raw_of(&base, &dir.join("b1.raw")), base_before, "the base was modified");
    let flat = raw_of(&top, &dir.join("t.raw"));
    assert_eq!(&flat[20 << 20..22 << 20], &base_before[20 << 20..22 << 20]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overlay_with_a_missing_or_looping_base_is_refused_clearly() {
    let dir = tmpdir("backing-bad");
    let g = guest_bin();
    let top = dir.join("vm.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", top.to_str().unwrap(), "16M"]);
    let drive = format!("file={}", top.display());
    let (code, err) = run_to_end(&["-m", "64", "-kernel", g.to_str().unwrap(), "-drive", &drive]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("backing file 'gone.qcow2'") && err.contains("No such file"), "{err}");
    let a = dir.join("a.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-b", "a.qcow2", "-F", "qcow2", a.to_str().unwrap(), "16M"]);
    let drive = format!("file={}", a.display());
    let (code, err) = run_to_end(&["-m", "64", "-kernel", g.to_str().unwrap(), "-drive", &drive]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("loop"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
