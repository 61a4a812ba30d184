//! `-drive ...,cache=` end to end: with every cache mode the guest's disk ledger verifies and
//! what it flushed is in the image as `qemu-img convert` reads it, `qemu-img check` stays clean;
//! `none`/`directsync` really open the image with `O_DIRECT` (and `directsync`/`writethrough`
//! with `O_DSYNC`), seen in the process's `/proc/PID/fdinfo`; a bad mode is a one-line error.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const O_DIRECT: u64 = 0o40000;
const O_DSYNC: u64 = 0o10000;

/// The open flags of `pid`'s descriptor on `img`.
fn open_flags(pid: u32, img: &Path) -> u64 {
    let img = std::fs::canonicalize(img).unwrap();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(img.as_path()) {
            continue;
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap();
        // The lock descriptor is read-only and plain: take the one opened for the data.
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 8).ok())
            .unwrap();
        if flags & 3 != 0 {
            return flags;
        }
    }
    panic!("godwit has no writable descriptor on {}", img.display());
}

fn run_mode(fmt: &str, cache: &str) {
    let dir = tmpdir(&format!("cache-{fmt}-{cache}"));
    let img = dir.join(format!("d.{fmt}"));
    create_image(&img, fmt, "16M");
    let drive = format!("file={},format={fmt},cache={cache}", img.display());
    let mut vm = Vm::guest(&["-m", "256", "-smp", "1", "-drive", &drive], "mode=idle disk=on disk_mib=4 hb_ms=200");
    vm.wait_for("GUEST READY", T);
    let flags = open_flags(vm.child.id(), &img);
    let direct = matches!(cache, "none" | "directsync");
    let dsync = matches!(cache, "directsync" | "writethrough");
    assert_eq!(flags & O_DIRECT != 0, direct, "cache={cache}: fd flags {flags:o}");
    assert_eq!(flags & O_DSYNC != 0, dsync, "cache={cache}: fd flags {flags:o}");
    for _ in 0..6 {
        vm.wait_for("HEARTBEAT", T);
    }
    vm.send(b"v");
    let ok = vm.wait_for("DISK OK", T);
    let gen = field(&ok, "gen").unwrap();
    vm.send(b"q");
    assert_eq!(vm.wait_exit(T), Some(0));
    let raw = dir.join("dump.raw");
    sh("qemu-img", &["convert", "-f", fmt, "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    let (written, gmax) = check_dump(&bytes, 8192);
    assert!(written > 0 && gmax >= gen, "cache={cache}: written {written}, max gen {gmax}, guest said {ok}");
    if fmt == "qcow2" {
        let (code, out) = qemu_img_check(&img);
        assert_eq!(code, 0, "cache={cache}: {out}");
    } else {
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 16 << 20, "the raw image kept its size");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cache_none_raw() {
    run_mode("raw", "none");
}

#[test]
fn cache_none_qcow2() {
    run_mode("qcow2", "none");
}

#[test]
fn cache_directsync_qcow2() {
    run_mode("qcow2", "directsync");
}

#[test]
fn cache_writethrough_and_unsafe_qcow2() {
    run_mode("qcow2", "writethrough");
    run_mode("qcow2", "unsafe");
}

/// A qcow2 image made by qemu-img with an odd cluster size and a raw image whose size is not a
/// multiple of 4 KiB, both used with cache=none: guest data lands, metadata stays consistent.
#[test]
fn cache_none_odd_layouts() {
    let dir = tmpdir("cache-odd");
    let q = dir.join("small.qcow2");
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", q.to_str().unwrap(), "16M"]);
    let r = dir.join("odd.raw");
    std::fs::write(&r, vec![0u8; (16 << 20) + 512]).unwrap();
    for (img, fmt) in [(&q, "qcow2"), (&r, "raw")] {
        let drive = format!("file={},format={fmt},cache=none", img.display());
        let mut vm = Vm::guest(&["-m", "256", "-drive", &drive], "mode=idle disk=on disk_mib=4 hb_ms=200");
        vm.wait_for("GUEST READY", T);
        for _ in 0..4 {
            vm.wait_for("HEARTBEAT", T);
        }
        vm.send(b"v");
        vm.wait_for("DISK OK", T);
        vm.send(b"q");
        assert_eq!(vm.wait_exit(T), Some(0));
        let raw = dir.join("dump.raw");
        sh("qemu-img", &["convert", "-f", fmt, "-O", "raw", img.to_str().unwrap(), raw.to_str().unwrap()]);
        let (written, _) = check_dump(&std::fs::read(&raw).unwrap(), 8192);
        assert!(written > 0, "{fmt}");
    }
    let (code, out) = qemu_img_check(&q);
    assert_eq!(code, 0, "{out}");
    assert_eq!(std::fs::metadata(&r).unwrap().len(), (16 << 20) + 512, "the odd raw image kept its size");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_cache_mode_is_one_line() {
    let g = guest_bin();
    let (code, err) = run_to_end(&["-kernel", g.to_str().unwrap(), "-drive", "file=x.img,format=raw,cache=fast"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid cache mode 'fast'"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
