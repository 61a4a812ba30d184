//! Storage migration without shared storage, end to end: source and destination godwit each
//! with its own local qcow2 image (the destination's created empty, same virtual size), the
//! test guest rewriting memory and its disk ledger throughout. The destination exports its
//! drive over NBD, the source mirrors into it, then RAM migrates; the destination must print
//! `LEDGER OK` and `DISK OK`, its image must pass `qemu-img check`, the source must be
//! `postmigrate`. Both QEMU spellings are driven: `drive-mirror` (and HMP), and the sequence
//! libvirt 9.0 issues (`blockdev-add` ×2, `blockdev-mirror`, `block-job-cancel`,
//! `job-dismiss`, `blockdev-del`). A destination killed during the mirror leaves the source
//! running with its ledgers intact, the job reports the error, and a second attempt succeeds.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);
const GUEST: &str = "mode=dirty mib=32 rate=20 hb_ms=100 disk=on disk_mib=8";

/// A QMP client that keeps the events it reads.
struct Qmp {
    w: std::os::unix::net::UnixStream,
    r: BufReader<std::os::unix::net::UnixStream>,
    events: Vec<Value>,
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
        let mut q = Qmp { w: s.try_clone().unwrap(), r: BufReader::new(s), events: Vec::new() };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        let r = q.cmd("qmp_capabilities", json!({}));
        assert!(r.get("return").is_some(), "{r}");
        q
    }

    fn read(&mut self) -> Value {
        let mut l = String::new();
        let n = self.r.read_line(&mut l).expect("QMP read");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("bad QMP line {l:?}: {e}"))
    }

    /// Runs a command; returns the whole reply (`return` or `error`).
    fn cmd(&mut self, name: &str, args: Value) -> Value {
        let msg = json!({"execute": name, "arguments": args});
        self.w.write_all(format!("{msg}\n").as_bytes()).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Runs a command that must succeed; returns its `return` value.
    fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(name, args.clone());
        r.get("return").cloned().unwrap_or_else(|| panic!("{name} {args} failed: {r}"))
    }

    /// Waits for an event matching `name` and `pred` (already received or coming).
    fn wait_event(&mut self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + T;
        let mut seen = 0;
        loop {
            while seen < self.events.len() {
                let e = &self.events[seen];
                seen += 1;
                if e["event"] == name && pred(&e["data"]) {
                    return e.clone();
                }
            }
            assert!(Instant::now() < end, "no {name} event; got {:?}", self.events);
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    fn status(&mut self) -> String {
        self.ok("query-status", json!({}))["status"].as_str().unwrap().to_string()
    }

    fn wait_migration(&mut self) -> Value {
        let end = Instant::now() + T;
        loop {
            let m = self.ok("query-migrate", json!({}));
            match m["status"].as_str() {
                Some("completed") | Some("failed") | Some("cancelled") => return m,
                _ => {}
            }
            assert!(Instant::now() < end, "migration did not settle: {m}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct Host {
    vm: Vm,
    qmp: Qmp,
    image: PathBuf,
}

fn drive_args(image: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={},format=qcow2,if=none,id=drive-virtio-disk0,node-name=libvirt-1-format", image.display()),
        "-device".into(),
        "virtio-blk-device,drive=drive-virtio-disk0".into(),
    ]
}

fn start(dir: &Path, name: &str, image: &Path, extra: &[&str]) -> Host {
    start_in(None, dir, name, image, extra)
}

/// Starts godwit, inside network namespace `ns` when given.
fn start_in(ns: Option<&str>, dir: &Path, name: &str, image: &Path, extra: &[&str]) -> Host {
    let qmp_path = dir.join(format!("{name}.qmp"));
    let hmp_path = dir.join(format!("{name}.hmp"));
    let mut args: Vec<String> = vec!["-m".into(), "256".into()];
    args.extend(drive_args(image));
    args.extend(["-qmp".into(), format!("unix:{},server,nowait", qmp_path.display())]);
    args.extend(["-monitor".into(), format!("unix:{},server,nowait", hmp_path.display())]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let vm = match ns {
        None => Vm::guest(&refs, GUEST),
        Some(ns) => {
            let (g, godwit) = (guest_bin(), godwit_bin());
            let mut full = vec!["netns", "exec", ns, godwit.to_str().unwrap(), "-kernel", g.to_str().unwrap(), "-append", GUEST];
            full.extend_from_slice(&refs);
            Vm::spawn_cmd("ip", &full)
        }
    };
    let qmp = Qmp::connect(&qmp_path);
    Host { vm, qmp, image: image.to_path_buf() }
}

fn hmp_of(dir: &Path, name: &str) -> Hmp {
    Hmp::connect(&dir.join(format!("{name}.hmp")))
}

/// Source with a 64 MiB qcow2 disk and an empty destination image of the same size.
fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let (s, d) = (dir.join("src.qcow2"), dir.join("dst.qcow2"));
    create_image(&s, "qcow2", "64M");
    create_image(&d, "qcow2", "64M");
    (s, d)
}

fn source(dir: &Path, image: &Path) -> Host {
    let mut src = start(dir, "src", image, &[]);
    src.vm.wait_for("GUEST READY", T);
    // Let the guest write some of its disk region first.
    let h = src.vm.wait_for("disk=", T);
    assert!(h.contains("disk="), "{h}");
    src
}

/// Verifies the destination: running guest, LEDGER OK + DISK OK, clean image after quit.
fn check_destination(dst: &mut Host) {
    dst.vm.wait_for("HEARTBEAT", T);
    dst.vm.send(b"v");
    dst.vm.wait_for("LEDGER OK", T);
    let d = dst.vm.wait_for("DISK ", T);
    assert!(d.starts_with("DISK OK"), "{d}");
    dst.vm.send(b"q");
    assert_eq!(dst.vm.wait_exit(T), Some(0));
    let (code, out) = qemu_img_check(&dst.image);
    assert_eq!(code, 0, "destination image: {out}");
}

#[test]
fn drive_mirror_then_migrate() {
    let dir = tmpdir("stor-drive-mirror");
    let (si, di) = images(&dir);
    let (nbd_port, mig_port) = (free_port(), free_port());
    let mut dst = start(&dir, "dst", &di, &["-incoming", "defer"]);
    // Destination over HMP, as an operator would.
    let mut dh = hmp_of(&dir, "dst");
    assert_eq!(dh.cmd(&format!("nbd_server_start 127.0.0.1:{nbd_port}")).trim(), "");
    assert_eq!(dh.cmd("nbd_server_add -w drive-virtio-disk0").trim(), "");
    assert!(dh.cmd("nbd_server_add -w drive-virtio-disk0").contains("already"), "a second export of that name is refused");
    assert_eq!(dh.cmd(&format!("migrate_incoming tcp:127.0.0.1:{mig_port}")).trim(), "");

    let mut src = source(&dir, &si);
    let nodes = src.qmp.ok("query-named-block-nodes", json!({}));
    assert!(nodes.as_array().unwrap().iter().any(|n| n["node-name"] == "libvirt-1-format" && n["drv"] == "qcow2"), "{nodes}");
    let blk = src.qmp.ok("query-block", json!({}));
    assert_eq!(blk[0]["device"], "drive-virtio-disk0");
    assert_eq!(blk[0]["inserted"]["node-name"], "libvirt-1-format");
    let bad = src.qmp.cmd("drive-mirror", json!({"device": "nope", "target": "nbd://127.0.0.1:1/x", "sync": "full", "mode": "existing", "format": "raw"}));
    assert_eq!(bad["error"]["class"], "DeviceNotFound", "{bad}");
    src.qmp.ok(
        "drive-mirror",
        json!({"device": "drive-virtio-disk0", "job-id": "mirror0", "sync": "full", "mode": "existing", "format": "raw",
               "target": format!("nbd://127.0.0.1:{nbd_port}/drive-virtio-disk0")}),
    );
    src.qmp.wait_event("BLOCK_JOB_READY", |d| d["device"] == "mirror0");
    let jobs = src.qmp.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["ready"], true, "{jobs}");
    assert_eq!(jobs[0]["offset"], jobs[0]["len"], "{jobs}");
    let mut sh = hmp_of(&dir, "src");
    assert!(sh.cmd("info block-jobs").contains("Type mirror, device mirror0"), "HMP shows the job");
    src.qmp.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));
    let m = src.qmp.wait_migration();
    assert_eq!(m["status"], "completed", "{m}");
    assert_eq!(src.qmp.status(), "postmigrate");
    // A ready mirror cancelled = done, target consistent (QEMU semantics).
    src.qmp.ok("block-job-cancel", json!({"device": "mirror0"}));
    let done = src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "mirror0");
    assert!(done["data"].get("error").is_none(), "{done}");
    assert_eq!(dh.cmd("nbd_server_stop").trim(), "");
    check_destination(&mut dst);
}

#[test]
fn libvirt_blockdev_mirror_sequence() {
    let dir = tmpdir("stor-libvirt");
    let (si, di) = images(&dir);
    let (nbd_port, mig_port) = (free_port(), free_port());
    let mut dst = start(&dir, "dst", &di, &["-S", "-incoming", "defer"]);
    dst.qmp.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "::", "port": nbd_port.to_string()}}}));
    dst.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "libvirt-nbd-libvirt-1-format", "node-name": "libvirt-1-format",
               "name": "drive-virtio-disk0", "writable": true}),
    );
    dst.qmp.ok("migrate-incoming", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));

    let mut src = source(&dir, &si);
    let q = &mut src.qmp;
    q.ok(
        "blockdev-add",
        json!({"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": nbd_port.to_string()},
               "export": "drive-virtio-disk0", "node-name": "migration-vda-storage", "read-only": false, "discard": "unmap"}),
    );
    q.ok("blockdev-add", json!({"node-name": "migration-vda-format", "read-only": false, "driver": "raw", "file": "migration-vda-storage"}));
    q.ok(
        "blockdev-mirror",
        json!({"job-id": "drive-virtio-disk0", "device": "libvirt-1-format", "target": "migration-vda-format",
               "speed": 9223372036853727232u64, "sync": "full", "auto-finalize": true, "auto-dismiss": false}),
    );
    q.wait_event("JOB_STATUS_CHANGE", |d| d["id"] == "drive-virtio-disk0" && d["status"] == "ready");
    let busy = q.cmd("blockdev-del", json!({"node-name": "migration-vda-storage"}));
    assert!(busy.get("error").is_some(), "a node in use cannot be deleted: {busy}");
    q.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));
    let m = q.wait_migration();
    assert_eq!(m["status"], "completed", "{m}");
    q.ok("block-job-cancel", json!({"device": "drive-virtio-disk0"}));
    q.wait_event("JOB_STATUS_CHANGE", |d| d["id"] == "drive-virtio-disk0" && d["status"] == "concluded");
    let jobs = q.ok("query-jobs", json!({}));
    let job = jobs.as_array().unwrap().iter().find(|j| j["id"] == "drive-virtio-disk0").cloned().unwrap();
    assert!(job.get("error").is_none(), "{job}");
    assert_eq!(job["type"], "mirror");
    q.ok("job-dismiss", json!({"id": "drive-virtio-disk0"}));
    q.wait_event("JOB_STATUS_CHANGE", |d| d["id"] == "drive-virtio-disk0" && d["status"] == "null");
    q.ok("blockdev-del", json!({"node-name": "migration-vda-format"}));
    q.ok("blockdev-del", json!({"node-name": "migration-vda-storage"}));
    assert_eq!(q.status(), "postmigrate");
    // Destination: stop the server, continue.
    dst.vm.wait_stderr("incoming migration completed", T);
    dst.qmp.ok("nbd-server-stop", json!({}));
    dst.qmp.ok("cont", json!({}));
    assert_eq!(dst.qmp.status(), "running");
    check_destination(&mut dst);
}

#[test]
fn destination_killed_during_mirror_then_retry() {
    let dir = tmpdir("stor-kill");
    let (si, di) = images(&dir);
    let (nbd_port, mig_port) = (free_port(), free_port());
    let dst = start(&dir, "dst", &di, &["-incoming", "defer"]);
    let mut dq = dst.qmp;
    let mut dvm = dst.vm;
    dq.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": nbd_port.to_string()}}}));
    dq.ok("nbd-server-add", json!({"device": "drive-virtio-disk0", "writable": true}));
    let mut src = source(&dir, &si);
    // Slow enough (256 KiB/s over 64 MiB) that the destination dies mid-copy.
    src.qmp.ok(
        "drive-mirror",
        json!({"device": "drive-virtio-disk0", "job-id": "m1", "sync": "full", "mode": "existing", "format": "raw",
               "speed": 256 * 1024, "target": format!("nbd://127.0.0.1:{nbd_port}/drive-virtio-disk0")}),
    );
    std::thread::sleep(Duration::from_millis(500));
    let jobs = src.qmp.ok("query-block-jobs", json!({}));
    assert_eq!(jobs[0]["ready"], false, "{jobs}");
    dvm.child.kill().unwrap();
    let _ = dvm.child.wait();
    drop(dq);
    // Faster now, so the failure is found at once.
    src.qmp.ok("block-job-set-speed", json!({"device": "m1", "speed": 0}));
    src.qmp.wait_event("BLOCK_JOB_ERROR", |d| d["device"] == "m1");
    let done = src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "m1");
    assert!(done["data"]["error"].as_str().is_some_and(|e| !e.is_empty()), "{done}");
    assert_eq!(src.qmp.status(), "running");
    src.vm.send(b"v");
    src.vm.wait_for("LEDGER OK", T);
    let d = src.vm.wait_for("DISK ", T);
    assert!(d.starts_with("DISK OK"), "{d}");

    // Second attempt, to a fresh destination on a fresh empty image.
    create_image(&di, "qcow2", "64M");
    let nbd2 = free_port();
    let mut dst2 = start(&dir, "dst2", &di, &["-incoming", "defer"]);
    dst2.qmp.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": nbd2.to_string()}}}));
    dst2.qmp.ok("nbd-server-add", json!({"device": "drive-virtio-disk0", "writable": true}));
    dst2.qmp.ok("migrate-incoming", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));
    src.qmp.ok(
        "drive-mirror",
        json!({"device": "drive-virtio-disk0", "job-id": "m2", "sync": "full", "mode": "existing", "format": "raw",
               "target": format!("nbd://127.0.0.1:{nbd2}/drive-virtio-disk0")}),
    );
    src.qmp.wait_event("BLOCK_JOB_READY", |d| d["device"] == "m2");
    src.qmp.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));
    assert_eq!(src.qmp.wait_migration()["status"], "completed");
    src.qmp.ok("block-job-cancel", json!({"device": "m2"}));
    src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "m2");
    dst2.qmp.ok("nbd-server-stop", json!({}));
    check_destination(&mut dst2);
}

/// A TCP relay between the source's mirror and the destination's NBD server that can cut the
/// link or corrupt the next reply bytes (a flipped bit in the NBD reply stream).
struct Relay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    corrupt: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let corrupt = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let (c2, k2) = (conns.clone(), corrupt.clone());
        std::thread::spawn(move || {
            for a in l.incoming() {
                let Ok(a) = a else { return };
                let Ok(b) = std::net::TcpStream::connect(("127.0.0.1", to)) else { continue };
                c2.lock().unwrap().extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                let pump = |mut from: std::net::TcpStream, mut to: std::net::TcpStream, flip: Option<Arc<AtomicBool>>| {
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if let Some(f) = &flip {
                                if f.swap(false, Ordering::SeqCst) {
                                    buf[0] ^= 0x40;
                                }
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                };
                pump(a.try_clone().unwrap(), b.try_clone().unwrap(), None);
                pump(b, a, Some(k2.clone()));
            }
        });
        Relay { port, cut, corrupt, conns }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

enum Fault {
    LinkCut,
    CorruptReply,
}

/// Mirror (slowed) through a relay, break it, and check the source is unharmed.
fn mirror_fault(name: &str, fault: Fault) {
    let dir = tmpdir(name);
    let (si, di) = images(&dir);
    let nbd_port = free_port();
    let mut dst = start(&dir, "dst", &di, &["-incoming", "defer"]);
    dst.qmp.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": nbd_port.to_string()}}}));
    dst.qmp.ok("nbd-server-add", json!({"device": "drive-virtio-disk0", "writable": true}));
    let relay = Relay::start(nbd_port);
    let mut src = source(&dir, &si);
    src.qmp.ok(
        "drive-mirror",
        json!({"device": "drive-virtio-disk0", "job-id": "mf", "sync": "full", "mode": "existing", "format": "raw",
               "speed": 512 * 1024, "auto-dismiss": false,
               "target": format!("nbd://127.0.0.1:{}/drive-virtio-disk0", relay.port)}),
    );
    std::thread::sleep(Duration::from_millis(400));
    let t0 = Instant::now();
    match fault {
        Fault::LinkCut => relay.cut(),
        Fault::CorruptReply => relay.corrupt.store(true, std::sync::atomic::Ordering::SeqCst),
    }
    let done = src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "mf");
    let err = done["data"]["error"].as_str().unwrap_or("").to_string();
    assert!(!err.is_empty(), "{done}");
    if let Fault::CorruptReply = fault {
        assert!(err.contains("magic") || err.contains("handle"), "a corrupted reply is named: {err}");
    }
    src.qmp.wait_event("JOB_STATUS_CHANGE", |d| d["id"] == "mf" && d["status"] == "concluded");
    let jobs = src.qmp.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["status"], "concluded", "{jobs}");
    assert!(jobs[0]["error"].as_str().is_some(), "{jobs}");
    src.qmp.ok("job-dismiss", json!({"id": "mf"}));
    eprintln!("fault reported after {:?}", t0.elapsed());
    assert_eq!(src.qmp.status(), "running");
    src.vm.send(b"v");
    src.vm.wait_for("LEDGER OK", T);
    let d = src.vm.wait_for("DISK ", T);
    assert!(d.starts_with("DISK OK"), "{d}");
    let _ = dst.vm.child.kill();
}

#[test]
fn link_cut_during_mirror_leaves_source_running() {
    mirror_fault("stor-cut", Fault::LinkCut);
}

#[test]
fn corrupted_nbd_reply_fails_the_job_not_the_guest() {
    mirror_fault("stor-corrupt", Fault::CorruptReply);
}

/// The mirror is ready (write-through) and RAM is migrating when the destination dies: the
/// migration fails, the next guest write cannot reach the target so the job ends with an
/// error, and the guest runs on with both ledgers intact.
#[test]
fn destination_killed_during_migration_phase() {
    let dir = tmpdir("stor-kill-mig");
    let (si, di) = images(&dir);
    let (nbd_port, mig_port) = (free_port(), free_port());
    // `-incoming tcp:` this time: the export works on a VM already listening for RAM.
    let incoming = format!("tcp:127.0.0.1:{mig_port}");
    let mut dst = start(&dir, "dst", &di, &["-incoming", &incoming]);
    dst.vm.wait_stderr("waiting for an incoming migration", T);
    dst.qmp.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": nbd_port.to_string()}}}));
    dst.qmp.ok("nbd-server-add", json!({"device": "drive-virtio-disk0", "writable": true}));
    let mut src = source(&dir, &si);
    src.qmp.ok(
        "drive-mirror",
        json!({"device": "drive-virtio-disk0", "job-id": "mk", "sync": "full", "mode": "existing", "format": "raw",
               "target": format!("nbd://127.0.0.1:{nbd_port}/drive-virtio-disk0")}),
    );
    src.qmp.wait_event("BLOCK_JOB_READY", |d| d["device"] == "mk");
    src.qmp.ok("migrate-set-parameters", json!({"max-bandwidth": 8 << 20}));
    src.qmp.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(src.qmp.ok("query-migrate", json!({}))["status"], "active");
    dst.vm.child.kill().unwrap();
    assert_eq!(src.qmp.wait_migration()["status"], "failed");
    let done = src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "mk");
    assert!(done["data"]["error"].as_str().is_some(), "{done}");
    assert_eq!(src.qmp.status(), "running");
    src.vm.send(b"v");
    src.vm.wait_for("LEDGER OK", T);
    let d = src.vm.wait_for("DISK ", T);
    assert!(d.starts_with("DISK OK"), "{d}");
}

/// Two namespaces joined by a veth pair (10.78.N.1 and .2), removed on drop.
struct Hosts {
    a: String,
    b: String,
    b_addr: String,
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("iproute2 (ip) is needed for this test");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Hosts {
    fn new() -> Hosts {
        let pid = std::process::id();
        let n = pid % 200 + 20;
        let (a, b) = (format!("gw-stor-a-{pid}"), format!("gw-stor-b-{pid}"));
        let (va, vb) = (format!("gsa{n}"), format!("gsb{n}"));
        for ns in [&a, &b] {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).output();
            ip(&["netns", "add", ns]);
        }
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb]);
        ip(&["link", "set", &va, "netns", &a]);
        ip(&["link", "set", &vb, "netns", &b]);
        let b_addr = format!("10.78.{n}.2");
        ip(&["-n", &a, "addr", "add", &format!("10.78.{n}.1/24"), "dev", &va]);
        ip(&["-n", &b, "addr", "add", &format!("{b_addr}/24"), "dev", &vb]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Hosts { a, b, b_addr }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Two "hosts" (network namespaces), each with its own local image in its own directory: the
/// disk travels over NBD between them, then RAM; the source's image is left as it was.
#[test]
fn two_hosts_with_separate_local_disks() {
    let hosts = Hosts::new();
    let dir = tmpdir("stor-hosts");
    let (ha, hb) = (dir.join("host-a"), dir.join("host-b"));
    std::fs::create_dir_all(&ha).unwrap();
    std::fs::create_dir_all(&hb).unwrap();
    let (si, di) = (ha.join("vm.qcow2"), hb.join("vm.qcow2"));
    create_image(&si, "qcow2", "64M");
    create_image(&di, "qcow2", "64M");
    let mut dst = start_in(Some(&hosts.b), &dir, "dst", &di, &["-incoming", "defer"]);
    let b = hosts.b_addr.clone();
    dst.qmp.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": b, "port": "10809"}}}));
    dst.qmp.ok("block-export-add", json!({"type": "nbd", "id": "e0", "node-name": "libvirt-1-format", "name": "vda", "writable": true}));
    dst.qmp.ok("migrate-incoming", json!({"uri": format!("tcp:{b}:6666")}));
    let mut src = start_in(Some(&hosts.a), &dir, "src", &si, &[]);
    src.vm.wait_for("GUEST READY", T);
    src.vm.wait_for("disk=", T);
    src.qmp.ok(
        "drive-mirror",
        json!({"device": "libvirt-1-format", "job-id": "vda", "sync": "full", "mode": "existing", "format": "raw",
               "target": format!("nbd://{b}:10809/vda")}),
    );
    src.qmp.wait_event("BLOCK_JOB_READY", |d| d["device"] == "vda");
    src.qmp.ok("migrate", json!({"uri": format!("tcp:{b}:6666")}));
    assert_eq!(src.qmp.wait_migration()["status"], "completed");
    assert_eq!(src.qmp.status(), "postmigrate");
    src.qmp.ok("block-job-cancel", json!({"device": "vda"}));
    src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "vda");
    dst.qmp.ok("nbd-server-stop", json!({}));
    check_destination(&mut dst);
    // `quit` (the reply may not come: the VMM can close first).
    let _ = src.qmp.w.write_all(b"{\"execute\": \"quit\"}\n");
    assert!(src.vm.wait_exit(T).is_some(), "the source quits");
    let (code, out) = qemu_img_check(&si);
    assert_eq!(code, 0, "source image: {out}");
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The mirror writing into QEMU's own NBD server (`qemu-nbd`), then `block-job-complete`:
/// the drive pivots onto the target, and the running guest's disk ledger verifies against
/// what it now reads over NBD from `qemu-nbd`.
#[test]
fn mirror_into_qemu_nbd_and_complete_pivots_the_drive() {
    let dir = tmpdir("stor-qemu-nbd");
    let (si, di) = images(&dir);
    let port = free_port();
    let qnbd = std::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-x", "vda", "-b", "127.0.0.1", "-p", &port.to_string(), "--persistent"])
        .arg(&di)
        .spawn()
        .expect("qemu-nbd is needed for this test (Debian qemu-utils)");
    let qnbd = Child(qnbd);
    let mut src = source(&dir, &si);
    let target = format!("nbd://127.0.0.1:{port}/vda");
    let end = Instant::now() + T;
    loop {
        let r = src.qmp.cmd(
            "drive-mirror",
            json!({"device": "drive-virtio-disk0", "job-id": "p", "sync": "full", "mode": "existing", "format": "raw", "target": target}),
        );
        if r.get("return").is_some() {
            break;
        }
        assert!(Instant::now() < end, "qemu-nbd never accepted: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    src.qmp.wait_event("BLOCK_JOB_READY", |d| d["device"] == "p");
    let mut sh = hmp_of(&dir, "src");
    let info = sh.cmd("info block");
    assert!(info.contains("drive-virtio-disk0 (libvirt-1-format)"), "{info}");
    let locked = |p: &Path| !std::process::Command::new("qemu-img").arg("info").arg(p).output().unwrap().status.success();
    assert!(locked(&si), "the running VM holds its image's lock");
    src.qmp.ok("block-job-complete", json!({"device": "p"}));
    let done = src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "p");
    assert!(done["data"].get("error").is_none(), "{done}");
    // Pivoted: the source image is closed and unlocked, the drive now lives on qemu-nbd.
    assert!(!locked(&si), "after the pivot the old image is released");
    // The guest goes on writing, now into qemu-nbd, and its ledgers verify from there.
    src.vm.wait_for("HEARTBEAT", T);
    src.vm.wait_for("HEARTBEAT", T);
    src.vm.send(b"v");
    src.vm.wait_for("LEDGER OK", T);
    let d = src.vm.wait_for("DISK ", T);
    assert!(d.starts_with("DISK OK"), "{d}");
    // The guest leaves through its exit port (a QMP `quit` may close before it answers).
    src.vm.send(b"q");
    let _ = src.vm.wait_exit(T);
    drop(qnbd);
    let (code, out) = qemu_img_check(&di);
    assert_eq!(code, 0, "qemu-nbd's image: {out}");
}

/// A migration whose switchover would leave the destination with an incomplete disk is
/// refused and the source resumes: the mirror not ready yet, or (through a relay) the NBD link
/// cut during the RAM migration so the ready mirror fails on the next guest write.
fn switchover_refused(name: &str, cut_link: bool) {
    let dir = tmpdir(name);
    let (si, di) = images(&dir);
    let (nbd_port, mig_port) = (free_port(), free_port());
    let incoming = format!("tcp:127.0.0.1:{mig_port}");
    let mut dst = start(&dir, "dst", &di, &["-incoming", &incoming]);
    dst.vm.wait_stderr("waiting for an incoming migration", T);
    dst.qmp.ok("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": nbd_port.to_string()}}}));
    dst.qmp.ok("nbd-server-add", json!({"device": "drive-virtio-disk0", "writable": true}));
    let relay = Relay::start(nbd_port);
    let mut src = source(&dir, &si);
    let speed = if cut_link { 0 } else { 256 * 1024 };
    src.qmp.ok(
        "drive-mirror",
        json!({"device": "drive-virtio-disk0", "job-id": "sw", "sync": "full", "mode": "existing", "format": "raw",
               "speed": speed, "target": format!("nbd://127.0.0.1:{}/drive-virtio-disk0", relay.port)}),
    );
    if cut_link {
        src.qmp.wait_event("BLOCK_JOB_READY", |d| d["device"] == "sw");
        // Slow live phase (the link is cut in it), then a switchover whatever is left.
        src.qmp.ok("migrate-set-parameters", json!({"max-bandwidth": 8 << 20, "downtime-limit": 60000}));
    }
    src.qmp.ok("migrate", json!({"uri": format!("tcp:127.0.0.1:{mig_port}")}));
    if cut_link {
        std::thread::sleep(Duration::from_millis(300));
        relay.cut();
        let done = src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "sw");
        assert!(done["data"]["error"].as_str().is_some(), "{done}");
    }
    let m = src.qmp.wait_migration();
    assert_eq!(m["status"], "failed", "{m}");
    let why = m["error-desc"].as_str().unwrap_or("").to_string();
    assert!(why.contains("mirror"), "the refusal names the mirror: {why}");
    assert_eq!(src.qmp.status(), "running");
    if !cut_link {
        let r = src.qmp.cmd("block-job-cancel", json!({"device": "sw"}));
        if r.get("return").is_some() {
            src.qmp.wait_event("BLOCK_JOB_CANCELLED", |d| d["device"] == "sw");
        } else {
            // The destination exits after the refused migration and its NBD export goes with
            // it: the job may have ended on its own first, with an error (seen on a loaded host).
            assert_eq!(r["error"]["class"], "DeviceNotActive", "{r}");
            let done = src.qmp.wait_event("BLOCK_JOB_COMPLETED", |d| d["device"] == "sw");
            assert!(done["data"]["error"].as_str().is_some(), "{done}");
        }
    }
    src.vm.wait_for("HEARTBEAT", T);
    src.vm.send(b"v");
    src.vm.wait_for("LEDGER OK", T);
    let d = src.vm.wait_for("DISK ", T);
    assert!(d.starts_with("DISK OK"), "{d}");
    let _ = dst.vm.child.kill();
}

#[test]
fn switchover_refused_while_the_mirror_is_not_ready() {
    switchover_refused("stor-notready", false);
}

#[test]
fn nbd_link_cut_during_migration_fails_the_migration_not_the_guest() {
    switchover_refused("stor-cut-mig", true);
}
