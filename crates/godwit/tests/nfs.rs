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

/// A test NFS server; it removes its own directory when dropped.
fn server(_name: &str) -> Ganesha {
    Ganesha::start(&std::env::temp_dir()).unwrap_or_else(|e| panic!("cannot start the test NFS server: {e}"))
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
    // ... and so is a second Godwit there, before its guest runs.
    let (guest, godwit) = (guest_bin(), godwit_bin());
    let (okw, out) = tool(
        std::path::Path::new("ip"),
        &["netns", "exec", &bns, godwit.to_str().unwrap(), "-m", "256", "-kernel", guest.to_str().unwrap(), "-drive", &drive,
          "-device", "virtio-blk-device,drive=disk0", "-serial", "none"],
    );
    assert!(!okw && out.contains("Failed to get \"write\" lock"), "a second Godwit must be refused: {out}");
    vm.collect_for(Duration::from_millis(200));
    let before_save = seqs(&vm.seen).into_iter().max().unwrap();
    assert_eq!(hmp.cmd("savevm tag1").trim(), "", "savevm on the NFS image");
    vm.collect_for(Duration::from_millis(300));
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
    assert!(s > before_save && s <= at_save + 2, "continues from the snapshot ({before_save}..{at_save}): {first}");
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

/// Live migration between two hosts with the disk on the NFS server (a third host), the guest
/// dirtying memory and writing its disk while it moves.
#[test]
fn nfs_live_migration_between_two_hosts() {
    live_migration("live", "mode=dirty mib=128 rate=40 disk=on disk_mib=8 hb_ms=100 cpus=2");
}

/// The same with a guest whose memory is idle (only its disk workload runs).
#[test]
fn nfs_live_migration_idle_guest() {
    live_migration("idle", "mode=idle mib=64 disk=on disk_mib=8 hb_ms=100 cpus=2");
}

/// The destination verifies both ledgers, holds the writer lock afterwards (the source let go
/// of it), and the image checks clean.
fn live_migration(name: &str, append: &str) {
    require_kvm();
    let mut g = server(name);
    create_image(&g.export().join("vm.qcow2"), "qcow2", "64M");
    let url = g.url("vm.qcow2", "");
    let a = g.add_host("a").unwrap();
    let b = g.add_host("b").unwrap();
    let (ans, bns) = (a.ns.clone().unwrap(), b.ns.clone().unwrap());
    let drive = format!("file={url},format=qcow2");
    let incoming = format!("tcp:{}:6666", b.addr);
    let dst = in_ns(&bns, &["-m", "512", "-smp", "2", "-drive", &drive, "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let dir = tmpdir(&format!("nfs-{name}"));
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

/// A QMP client that collects events.
struct Qmp {
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &std::path::Path) -> Qmp {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > end => panic!("QMP {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(T)).unwrap();
        let mut q = Qmp { r: std::io::BufReader::new(s.try_clone().unwrap()), w: s, events: Vec::new() };
        q.line(); // greeting
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }
    fn line(&mut self) -> Value {
        use std::io::BufRead;
        let mut l = String::new();
        self.r.read_line(&mut l).expect("QMP read");
        assert!(!l.is_empty(), "QMP closed");
        json(&l)
    }
    fn cmd(&mut self, c: &str) -> Value {
        use std::io::Write;
        self.w.write_all(format!("{c}\n").as_bytes()).unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }
    /// Waits for event `name` (or finds it among those already seen).
    fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.line();
            if v["event"] == name {
                return v;
            }
            self.events.push(v);
        }
    }
}

/// Boots the disk workload on an NFS image with `policy` (werror/rerror), HMP and QMP on
/// sockets; returns after a few heartbeats with the disk being written.
fn faulty(g: &Ganesha, name: &str, policy: &str) -> (Vm, Hmp, Qmp, TestDir) {
    create_image(&g.export().join("vm.qcow2"), "qcow2", "64M");
    // A short retry window: the policy applies 3 s after the server went away.
    let url = g.url("vm.qcow2", "hard-timeout=3");
    let drive = format!("file={url},format=qcow2,if=none,id=disk0,{policy}");
    let dir = tmpdir(name);
    let (hs, qs) = (dir.join("h.sock"), dir.join("q.sock"));
    let mon = format!("unix:{},server,nowait", hs.display());
    let qmp = format!("unix:{},server,nowait", qs.display());
    let mut vm = Vm::guest(
        &["-m", "256", "-smp", "2", "-drive", &drive, "-device", "virtio-blk-device,drive=disk0", "-monitor", &mon, "-qmp", &qmp],
        "mode=dirty mib=32 rate=10 disk=on disk_mib=4 hb_ms=100 cpus=2",
    );
    vm.wait_for("GUEST READY", T);
    let hmp = Hmp::connect(&hs);
    let q = Qmp::connect(&qs);
    loop {
        let hb = vm.wait_for("HEARTBEAT", T);
        if field(&hb, "disk").unwrap_or(0) > 64 {
            break;
        }
    }
    (vm, hmp, q, dir)
}

/// werror=stop: the server is SIGKILLed in the middle of the disk workload; after the retry
/// window the VM stops with io-error (BLOCK_IO_ERROR, paused (io-error)); the server comes
/// back, `cont` retries the kept request, and both ledgers verify: nothing lost or torn.
#[test]
fn nfs_server_crash_with_werror_stop_pauses_then_cont_finishes() {
    require_kvm();
    let mut g = server("stop");
    let (mut vm, mut hmp, mut q, _dir) = faulty(&g, "nfs-stop", "werror=stop,rerror=stop");
    g.kill();
    let ev = q.event("BLOCK_IO_ERROR");
    let d = &ev["data"];
    assert_eq!(d["device"], "disk0", "{ev}");
    assert_eq!(d["action"], "stop", "{ev}");
    assert_eq!(d["nospace"], false, "{ev}");
    q.event("STOP");
    assert_eq!(hmp.cmd("info status").trim(), "VM status: paused (io-error)");
    let st = q.cmd(r#"{"execute":"query-status"}"#);
    assert_eq!(st["return"]["status"], "io-error", "{st}");
    // query-block / info block show the NFS drive and its failed I/O status, as QEMU does.
    let qb = q.cmd(r#"{"execute":"query-block"}"#);
    let b = &qb["return"][0];
    assert_eq!(b["device"], "disk0", "{qb}");
    assert_eq!(b["io-status"], "failed", "{qb}");
    assert_eq!(b["inserted"]["drv"], "qcow2", "{qb}");
    assert!(b["inserted"]["file"].as_str().unwrap_or("").starts_with("nfs://"), "{qb}");
    let nodes = q.cmd(r#"{"execute":"query-named-block-nodes"}"#);
    assert!(nodes["return"].as_array().unwrap().iter().any(|n| n["drv"] == "nfs"), "{nodes}");
    let ib = hmp.cmd("info block");
    assert!(ib.contains("disk0") && ib.contains("nfs://") && ib.contains("I/O status:       failed"), "{ib}");
    // While stopped the guest makes no progress (lines printed before the stop drained first).
    vm.collect_for(Duration::from_millis(300));
    let before = vm.seen.len();
    vm.collect_for(Duration::from_millis(500));
    assert!(!vm.seen[before..].iter().any(|l| l.starts_with("HEARTBEAT")), "the VM must be paused");
    g.restart().unwrap();
    assert_eq!(hmp.cmd("cont").trim(), "");
    q.event("RESUME");
    let qb = q.cmd(r#"{"execute":"query-block"}"#);
    assert_eq!(qb["return"][0]["io-status"], "ok", "cont clears the I/O status: {qb}");
    let mut disk0 = 0;
    for _ in 0..10 {
        let hb = vm.wait_for("HEARTBEAT", T);
        disk0 = disk0.max(field(&hb, "disk").unwrap_or(0));
    }
    let later = loop {
        let hb = vm.wait_for("HEARTBEAT", T);
        let w = field(&hb, "disk").unwrap_or(0);
        if w > disk0 {
            break w;
        }
    };
    assert!(later > disk0, "the disk workload continues after cont");
    assert!(!vm.seen.iter().any(|l| l.contains("GUEST WARN disk")), "the guest saw an error");
    vm.send(b"v");
    vm.wait_for("LEDGER OK", T);
    vm.wait_for("DISK OK", T);
    hmp.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
    let (okc, check) = qemu_img(&["check", "--output=json", &g.url("vm.qcow2", "")]);
    assert!(okc, "qemu-img check: {check}");
    let c = json(&check);
    assert!(c.get("corruptions").is_none(), "{check}");
}

/// werror=report: the guest gets an error status for the failed request; Godwit keeps running.
#[test]
fn nfs_server_crash_with_werror_report_reaches_the_guest() {
    require_kvm();
    let mut g = server("report");
    let (mut vm, mut hmp, mut q, _dir) = faulty(&g, "nfs-report", "werror=report,rerror=report");
    g.kill();
    let ev = q.event("BLOCK_IO_ERROR");
    assert_eq!(ev["data"]["action"], "report", "{ev}");
    assert_eq!(ev["data"]["nospace"], false, "{ev}");
    assert_eq!(ev["data"]["operation"], "write", "{ev}");
    vm.wait_for("GUEST WARN disk I/O error status=1", T);
    // Still running: heartbeats go on and the monitor says so.
    vm.wait_for("HEARTBEAT", T);
    vm.wait_for("HEARTBEAT", T);
    assert_eq!(hmp.cmd("info status").trim(), "VM status: running");
    g.restart().unwrap();
    hmp.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
}

/// The NFS server dies during a live migration (werror=stop, a 3 s retry window): the
/// migration fails or completes, never are both sides running; when the server is back the
/// side that holds the VM continues (`cont` if it stopped on the error), both ledgers verify
/// and the image checks clean.
#[test]
fn nfs_server_crash_during_live_migration() {
    require_kvm();
    let mut g = server("migcrash");
    create_image(&g.export().join("vm.qcow2"), "qcow2", "64M");
    let url = g.url("vm.qcow2", "hard-timeout=3");
    let a = g.add_host("a").unwrap();
    let b = g.add_host("b").unwrap();
    let (ans, bns) = (a.ns.clone().unwrap(), b.ns.clone().unwrap());
    let drive = format!("file={url},format=qcow2,werror=stop,rerror=stop");
    let append = "mode=dirty mib=64 rate=20 disk=on disk_mib=4 hb_ms=100 cpus=2";
    let incoming = format!("tcp:{}:6666", b.addr);
    let dir = tmpdir("nfs-migcrash");
    let (ssock, dsock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let (smon, dmon) = (format!("unix:{},server,nowait", ssock.display()), format!("unix:{},server,nowait", dsock.display()));
    let mut dst = in_ns(&bns, &["-m", "256", "-smp", "2", "-drive", &drive, "-incoming", &incoming, "-monitor", &dmon], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let mut src = in_ns(&ans, &["-m", "256", "-smp", "2", "-drive", &drive, "-monitor", &smon], append);
    src.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&ssock);
    loop {
        let hb = src.wait_for("HEARTBEAT", T);
        if field(&hb, "disk").unwrap_or(0) > 64 {
            break;
        }
    }
    g.kill();
    let out = hmp.cmd(&format!("migrate {incoming}"));
    let info = hmp.wait_migration(T);
    let completed = info.contains("Migration status: completed");
    assert!(completed || info.contains("Migration status: failed"), "{out}\n{info}");
    eprintln!("migration with the NFS server down: {}", if completed { "completed" } else { "failed" });
    let mut dhmp = if completed { Some(Hmp::connect(&dsock)) } else { None };
    // Never both sides running.
    let s_status = hmp.cmd("info status");
    if completed {
        assert!(s_status.contains("postmigrate"), "source after a completed migration: {s_status}");
    } else {
        assert!(!s_status.contains("postmigrate"), "{s_status}");
        dst.collect_for(Duration::from_millis(300));
        assert!(!dst.seen.iter().any(|l| l.starts_with("HEARTBEAT")), "the destination ran after a failed migration");
    }
    g.restart().unwrap();
    let (vm, mon) = if completed { (&mut dst, dhmp.as_mut().unwrap()) } else { (&mut src, &mut hmp) };
    // The side that holds the VM: stopped on the error (cont retries) or running.
    let st = mon.cmd("info status");
    if st.contains("io-error") {
        assert_eq!(mon.cmd("cont").trim(), "");
    } else {
        assert!(st.contains("running"), "{st}");
    }
    let mut w0 = 0;
    for _ in 0..5 {
        w0 = w0.max(field(&vm.wait_for("HEARTBEAT", T), "disk").unwrap_or(0));
    }
    loop {
        if field(&vm.wait_for("HEARTBEAT", T), "disk").unwrap_or(0) > w0 {
            break;
        }
    }
    vm.send(b"v");
    vm.wait_for("LEDGER OK", T);
    vm.wait_for("DISK OK", T);
    mon.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
    hmp.quit();
    drop(dst);
    drop(src);
    let (okc, check) = qemu_img(&["check", "--output=json", &g.url("vm.qcow2", "")]);
    assert!(okc, "qemu-img check: {check}");
    assert!(json(&check).get("corruptions").is_none(), "{check}");
}
