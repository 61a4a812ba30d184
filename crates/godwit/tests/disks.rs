//! Disks end to end: the guest's disk ledger through raw and qcow2 images, what lands in the
//! image (read back with qemu-img), image locking, read-only disks, a kill -9 mid-workload.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn guest_disk_roundtrip(fmt: &str) {
    let dir = tmpdir(&format!("disk-{fmt}"));
    let img = dir.join(format!("d.{fmt}"));
    create_image(&img, fmt, "16M");
    let drive = format!("file={},format={fmt}", img.display());
    let mut vm = Vm::guest(&["-m", "256", "-smp", "2", "-drive", &drive], "mode=dirty mib=16 rate=10 disk=on disk_mib=4 hb_ms=200 cpus=2");
    vm.wait_for("GUEST READY", T);
    for _ in 0..10 {
        vm.wait_for("HEARTBEAT", T);
    }
    vm.send(b"v");
    vm.wait_for("LEDGER OK", T);
    let ok = vm.wait_for("DISK OK", T);
    let gen = field(&ok, "gen").unwrap();
    assert!(gen >= 1, "{ok}");
    vm.send(b"q");
    assert_eq!(vm.wait_exit(T), Some(0));
    // What the guest flushed is in the image, as QEMU's tools read it.
    let raw = dir.join("dump.raw");
    sh("qemu-img", &["convert", "-f", fmt, "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    let (written, gmax) = check_dump(&bytes, 8192);
    assert!(written > 0 && gmax >= gen, "written {written}, max gen {gmax}, guest said {ok}");
    if fmt == "qcow2" {
        let (code, out) = qemu_img_check(&img);
        assert_eq!(code, 0, "{out}");
    }
}

#[test]
fn raw_image_roundtrip() {
    guest_disk_roundtrip("raw");
}

#[test]
fn qcow2_image_roundtrip() {
    guest_disk_roundtrip("qcow2");
}

#[test]
fn qcow2_with_qemu_snapshots_boots_its_active_layer() {
    let dir = tmpdir("disk-qemusnap");
    let img = dir.join("d.qcow2");
    create_image(&img, "qcow2", "16M");
    let p = img.to_str().unwrap();
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0xaa 0 1M", p]);
    sh("qemu-img", &["snapshot", "-c", "s1", p]);
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0xbb 0 512k", p]);
    let drive = format!("file={p}");
    let mut vm = Vm::guest(&["-m", "128", "-drive", &drive], "mode=idle disk=on disk_mib=2 hb_ms=100 cpus=1");
    vm.wait_for("GUEST READY", T);
    for _ in 0..20 {
        vm.wait_for("HEARTBEAT", T);
    }
    vm.send(b"v");
    vm.wait_for("DISK OK", T);
    vm.send(b"q");
    assert_eq!(vm.wait_exit(T), Some(0));
    let (code, out) = qemu_img_check(&img);
    assert_eq!(code, 0, "{out}");
    // The snapshot QEMU made is untouched by the guest's writes.
    let snap = dir.join("s1.raw");
    sh("qemu-img", &["convert", "-l", "snapshot.name=s1", "-O", "raw", p, snap.to_str().unwrap()]);
    let b = std::fs::read(&snap).unwrap();
    assert!(b[..1 << 20].iter().all(|&x| x == 0xaa));
}

#[test]
fn second_writer_is_refused_by_the_lock() {
    let dir = tmpdir("disk-lock");
    let img = dir.join("d.qcow2");
    create_image(&img, "qcow2", "16M");
    let drive = format!("file={}", img.display());
    let mut vm = Vm::guest(&["-m", "64", "-drive", &drive], "mode=idle");
    vm.wait_for("GUEST READY", T);
    let g = guest_bin();
    let (code, err) = run_to_end(&["-m", "64", "-kernel", g.to_str().unwrap(), "-drive", &drive]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("lock"), "{err}");
    // QEMU's own tools see our lock too.
    let out = std::process::Command::new("qemu-img").args(["info", img.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("lock"));
}

#[test]
fn read_only_disk_fails_guest_writes_cleanly() {
    let dir = tmpdir("disk-ro");
    let img = dir.join("d.raw");
    create_image(&img, "raw", "16M");
    let before = std::fs::read(&img).unwrap();
    let drive = format!("file={},format=raw,readonly=on", img.display());
    let mut vm = Vm::guest(&["-m", "64", "-drive", &drive], "mode=idle disk=on disk_mib=1 hb_ms=100 cpus=1");
    vm.wait_for("GUEST READY", T);
    for _ in 0..5 {
        vm.wait_for("HEARTBEAT", T);
    }
    vm.send(b"v");
    let l = vm.wait_for("DISK", T);
    assert!(l.contains("DISK BAD") && (l.contains("ioerror") || l.contains("nodevice")), "{l}");
    vm.send(b"q");
    assert_eq!(vm.wait_exit(T), Some(0), "the VMM survives");
    assert!(std::fs::read(&img).unwrap() == before, "a read-only image must not change");
}

#[test]
fn kill_9_mid_workload_leaves_a_clean_or_leaky_image() {
    let dir = tmpdir("disk-kill");
    let img = dir.join("d.qcow2");
    create_image(&img, "qcow2", "64M");
    let drive = format!("file={}", img.display());
    let mut vm = Vm::guest(&["-m", "128", "-drive", &drive], "mode=dirty mib=8 rate=0 disk=on disk_mib=32 hb_ms=100 cpus=1");
    vm.wait_for("GUEST READY", T);
    for _ in 0..15 {
        vm.wait_for("HEARTBEAT", T);
    }
    vm.child.kill().unwrap();
    let _ = vm.child.wait();
    let (code, out) = qemu_img_check(&img);
    assert!(code == 0 || code == 3, "corruption after kill -9 (exit {code}): {out}");
}

#[test]
fn bad_drive_options() {
    let g = guest_bin();
    let k = g.to_str().unwrap();
    let (code, err) = run_to_end(&["-kernel", k, "-drive", "file=/nonexistent.img,format=raw"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent.img"), "{err}");
    let (code, err) = run_to_end(&["-kernel", k, "-drive", "file=x,format=vmdk"]);
    assert_eq!(code, 1);
    assert!(err.contains("vmdk"), "{err}");
    let (code, err) = run_to_end(&["-kernel", k, "-device", "virtio-blk-device,drive=nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("nope"), "{err}");
}
