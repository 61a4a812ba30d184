//! Incremental storage migration (`sync: top`, libvirt's `--copy-storage-inc`), end to end.
//! The test guest runs on a qcow2 overlay of a base image holding 128 MiB of data; the base is
//! copied to the destination's directory beforehand and the destination's overlay is created
//! over that copy with `qemu-img create -b` (as libvirt does). The source mirrors into the
//! destination's NBD export through a counting relay with `sync: top`, then RAM migrates.
//!
//! Checked: the destination guest's `LEDGER OK` and `DISK OK`; the bytes the mirror sent are
//! bounded by what the source's top image holds (`qemu-img map`, depth 0) plus what the guest
//! wrote meanwhile (its heartbeat's sector count) — far below the base's data, which a full
//! copy must send; `qemu-img check` clean on the destination overlay; and `qemu-img compare`
//! of the destination chain against the source chain equal while both are stopped.
//! Driven both ways: HMP `drive_mirror -n` (no `-f`: top, as QEMU) and QMP `blockdev-mirror`
//! with `sync: "top"` over `blockdev-add` nodes (libvirt's sequence).

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
const GUEST: &str = "mode=dirty mib=32 rate=20 hb_ms=100 disk=on disk_mib=8";
/// Data in the base image (outside the guest's 8 MiB ledger region).
const BASE_DATA: u64 = 128 * MIB;

/// A minimal QMP client (events are skipped).
struct Qmp {
    w: std::os::unix::net::UnixStream,
    r: BufReader<std::os::unix::net::UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let end = Instant::now() + T;
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => panic!("QMP {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(T)).unwrap();
        let mut q = Qmp { w: s.try_clone().unwrap(), r: BufReader::new(s) };
        assert!(q.read().get("QMP").is_some());
        q.ok("qmp_capabilities", json!({}));
        q
    }
    fn read(&mut self) -> Value {
        let mut l = String::new();
        assert!(self.r.read_line(&mut l).expect("QMP read") > 0, "QMP connection closed");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
    }
    fn ok(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        self.w.write_all(format!("{msg}\n").as_bytes()).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_none() {
                return v.get("return").cloned().unwrap_or_else(|| panic!("{name} {args} failed: {v}"));
            }
        }
    }
    /// Polls `query-block-jobs` until `pred` holds for the job list.
    fn wait_jobs(&mut self, what: &str, pred: impl Fn(&[Value]) -> bool) {
        let end = Instant::now() + T;
        loop {
            let j = self.ok("query-block-jobs", json!({}));
            if pred(j.as_array().unwrap()) {
                return;
            }
            assert!(Instant::now() < end, "{what}: {j}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A TCP relay to `to` counting the bytes sent towards it (the mirror's requests).
fn counting_relay(to: u16) -> (u16, Arc<AtomicU64>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for a in l.incoming() {
            let Ok(a) = a else { return };
            let Ok(b) = std::net::TcpStream::connect(("127.0.0.1", to)) else { continue };
            let pump = |mut from: std::net::TcpStream, mut to: std::net::TcpStream, n: Option<Arc<AtomicU64>>| {
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(k) = from.read(&mut buf) {
                        if k == 0 || to.write_all(&buf[..k]).is_err() {
                            break;
                        }
                        if let Some(n) = &n {
                            n.fetch_add(k as u64, Ordering::SeqCst);
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            };
            pump(a.try_clone().unwrap(), b.try_clone().unwrap(), Some(c.clone()));
            pump(b, a, None);
        }
    });
    (port, count)
}

/// Bytes the image itself (not its backing chain) holds, data or zero clusters.
fn top_allocated(img: &Path) -> u64 {
    let out = sh("qemu-img", &["map", "-U", "--output=json", img.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v.as_array().unwrap().iter().filter(|e| e["depth"] == 0 && (e["data"] == true || e["zero"] == true)).map(|e| e["length"].as_u64().unwrap()).sum()
}

/// `qemu-img compare` of two qcow2 chains from the end of the guest's 8 MiB ledger region on:
/// each chain read through (`qemu-img dd`, every byte, base included) into a raw file first.
fn compare_past_ledger(a: &Path, b: &Path) {
    let tail = |p: &Path, out: &Path| {
        let _ = std::fs::remove_file(out);
        let (i, o) = (format!("if={}", p.display()), format!("of={}", out.display()));
        sh("qemu-img", &["dd", "-U", "-f", "qcow2", "-O", "raw", "bs=1M", "skip=8", &i, &o]);
    };
    let (ra, rb) = (a.with_extension("tail.raw"), b.with_extension("tail.raw"));
    tail(a, &ra);
    tail(b, &rb);
    let out = std::process::Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", ra.to_str().unwrap(), rb.to_str().unwrap()]).output().expect("qemu-img");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("Images are identical"), "qemu-img compare of the chains past the ledger: {text}");
    let _ = (std::fs::remove_file(ra), std::fs::remove_file(rb));
}

fn godwit(dir: &Path, name: &str, image: &Path, extra: &[&str]) -> (Vm, Qmp) {
    let (q, h) = (dir.join(format!("{name}.qmp")), dir.join(format!("{name}.hmp")));
    let drive = format!("file={},format=qcow2,if=none,id=drive-virtio-disk0,node-name=libvirt-1-format", image.display());
    let qmp = format!("unix:{},server,nowait", q.display());
    let hmp = format!("unix:{},server,nowait", h.display());
    let mut args = vec!["-m", "256", "-drive", &drive, "-device", "virtio-blk-device,drive=drive-virtio-disk0", "-qmp", &qmp, "-monitor", &hmp];
    args.extend_from_slice(extra);
    let vm = Vm::guest(&args, GUEST);
    let qmp = Qmp::connect(&q);
    (vm, qmp)
}

#[derive(Clone, Copy)]
enum Via {
    HmpDriveMirror,
    QmpBlockdevMirror,
}

fn incremental(name: &str, via: Via) {
    let dir = tmpdir(name);
    let (s, d) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir_all(&s).unwrap();
    std::fs::create_dir_all(&d).unwrap();
    let (base, top, dtop) = (s.join("base.qcow2"), s.join("vm.qcow2"), d.join("vm.qcow2"));
    create_image(&base, "qcow2", "256M");
    sh("qemu-io", &["-f", "qcow2", "-c", &format!("write -P 0x5c 16M {BASE_DATA}"), base.to_str().unwrap()]);
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    // The top already holds data, and a zeroed range that hides base data.
    sh("qemu-io", &["-f", "qcow2", "-c", "write -P 0x77 100M 3M", "-c", "write -z 40M 1M", top.to_str().unwrap()]);
    std::fs::copy(&base, d.join("base.qcow2")).unwrap();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dtop.to_str().unwrap()]);

    let (nbd_port, mig_port) = (free_port(), free_port());
    let (mut dvm, mut dq) = godwit(&dir, "dst", &dtop, &["-S", "-incoming", "defer"]);
    dq.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": nbd_port.to_string()}}}));
    dq.ok("block-export-add", json!({"type": "nbd", "id": "exp0", "node-name": "libvirt-1-format", "name": "drive-virtio-disk0", "writable": true}));
    dq.ok("migrate-incoming", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));
    let (relay, sent) = counting_relay(nbd_port);

    let (mut svm, mut sq) = godwit(&dir, "src", &top, &[]);
    svm.wait_for("GUEST READY", T);
    svm.wait_for("disk=", T);
    let hb = svm.wait_for("disk=", T);
    let w1 = field(&hb, "disk").unwrap_or_else(|| panic!("no disk count in {hb}"));
    let job = match via {
        Via::HmpDriveMirror => {
            let mut h = Hmp::connect(&dir.join("src.hmp"));
            let out = h.cmd(&format!("drive_mirror -n drive-virtio-disk0 nbd://127.0.0.1:{relay}/drive-virtio-disk0"));
            assert_eq!(out.trim(), "", "drive_mirror: {out}");
            "drive-virtio-disk0"
        }
        Via::QmpBlockdevMirror => {
            sq.ok(
                "blockdev-add",
                json!({"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": relay.to_string()},
                       "export": "drive-virtio-disk0", "node-name": "migration-vda-storage", "read-only": false}),
            );
            sq.ok("blockdev-add", json!({"node-name": "migration-vda-format", "read-only": false, "driver": "raw", "file": "migration-vda-storage"}));
            sq.ok(
                "blockdev-mirror",
                json!({"job-id": "drive-virtio-disk0", "device": "libvirt-1-format", "target": "migration-vda-format",
                       "sync": "top", "auto-finalize": true, "auto-dismiss": true}),
            );
            "drive-virtio-disk0"
        }
    };
    sq.wait_jobs("mirror not ready", |j| j.iter().any(|x| x["device"] == job && x["ready"] == true));
    sq.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));
    let end = Instant::now() + T;
    loop {
        let m = sq.ok("query-migrate", json!({}));
        match m["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => panic!("migration: {m}"),
            _ => assert!(Instant::now() < end, "migration did not settle: {m}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sq.ok("query-status", json!({}))["status"], "postmigrate");
    sq.ok("block-job-cancel", json!({"device": job}));
    sq.wait_jobs("mirror did not end", |j| j.is_empty());
    let wire = sent.load(Ordering::SeqCst);
    dvm.wait_stderr("incoming migration completed", T);
    dq.ok("nbd-server-stop", json!({}));

    let top_bytes = top_allocated(&top);

    // Godwit's destination resumes after an incoming migration even with -S (QEMU waits
    // for `cont`, which libvirt sends): continue it if it waits.
    if dq.ok("query-status", json!({}))["status"] != "running" {
        dq.ok("cont", json!({}));
    }
    let hb = dvm.wait_for("HEARTBEAT", T);
    let hb = if field(&hb, "disk").is_some() { hb } else { dvm.wait_for("disk=", T) };
    let w2 = field(&hb, "disk").unwrap();
    dvm.send(b"v");
    dvm.wait_for("LEDGER OK", T);
    let disk = dvm.wait_for("DISK ", T);
    assert!(disk.starts_with("DISK OK"), "{disk}");
    dvm.send(b"q");
    assert_eq!(dvm.wait_exit(T), Some(0));
    // `quit` may close the connection before its answer: do not wait for one.
    let _ = sq.w.write_all(b"{\"execute\": \"quit\"}\n");
    assert!(svm.wait_exit(T).is_some(), "the source did not quit");
    let (code, out) = qemu_img_check(&dtop);
    assert_eq!(code, 0, "destination overlay: {out}");
    // Both stopped: the destination chain reads as the source chain, except in the guest's
    // ledger region (rewritten on the destination since; `DISK OK` vouches for it).
    compare_past_ledger(&top, &dtop);
    let dst_top = top_allocated(&dtop);

    // What crossed the wire: the top image's clusters (at most what it holds at the end), the
    // guest's writes during the job (each sent at most once per write), NBD headers.
    let written = w2.saturating_sub(w1) * 512;
    let bound = top_bytes + written + (top_bytes + written) / 50 + MIB;
    eprintln!("sync top: wire {wire} bytes; top image {top_bytes}; guest wrote {written}; destination top {dst_top}");
    assert!(wire <= bound, "wire {wire} > top image {top_bytes} + guest writes {written} + headers");
    assert!(wire < BASE_DATA / 2, "wire {wire}: the base's {BASE_DATA} bytes of data must not cross");
    assert!(wire >= 3 * MIB, "the top's 3 MiB of data must cross ({wire})");
    assert!(dst_top < BASE_DATA / 2, "the destination's top holds only the mirrored layer ({dst_top})");
}

#[test]
fn hmp_drive_mirror_without_f_copies_only_the_top_image() {
    incremental("stor-inc-hmp", Via::HmpDriveMirror);
}

#[test]
fn qmp_blockdev_mirror_sync_top_copies_only_the_top_image() {
    incremental("stor-inc-qmp", Via::QmpBlockdevMirror);
}
