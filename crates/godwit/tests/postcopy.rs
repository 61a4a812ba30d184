//! Post-copy end to end: two godwit processes, a guest dirtying memory faster than the capped
//! link (plain pre-copy never converges), `postcopy-ram` + `migrate_start_postcopy`: the guest
//! runs on the destination after a short pause and its memory ledger checks out once every
//! page arrived. With the link cut half-way through the post-copy phase both sides wait in
//! `postcopy-paused`, `migrate_recover` + `migrate -r` continue over a new connection, and the
//! ledger still checks out.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(90);
const GUEST: &str = "mode=dirty mib=64 rate=0 hb_ms=100 cpus=2";

struct Pair {
    src: Vm,
    dst: Vm,
    hmp: Hmp,
    dhmp: Hmp,
    port: u16,
    _dir: common::TestDir,
}

fn pair(name: &str) -> Pair {
    pair_with(name, false)
}

/// With `disk`: a qcow2 image both processes open (shared storage) and the guest's disk ledger.
fn pair_with(name: &str, disk: bool) -> Pair {
    let dir = tmpdir(name);
    let (sock, dsock) = (dir.join("src.sock"), dir.join("dst.sock"));
    let port = free_port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let dmon = format!("unix:{},server,nowait", dsock.display());
    let img = dir.join("shared.qcow2");
    let drive = format!("file={}", img.display());
    let mut extra: Vec<&str> = Vec::new();
    let append = if disk {
        create_image(&img, "qcow2", "32M");
        extra.extend_from_slice(&["-drive", &drive]);
        format!("{GUEST} disk=on disk_mib=4")
    } else {
        GUEST.to_string()
    };
    let mut dargs = vec!["-m", "256", "-smp", "2", "-incoming", &incoming, "-monitor", &dmon];
    dargs.extend_from_slice(&extra);
    let dst = Vm::guest(&dargs, &append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let dhmp = Hmp::connect(&dsock);
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut sargs = vec!["-m", "256", "-smp", "2", "-monitor", &mon];
    sargs.extend_from_slice(&extra);
    let mut src = Vm::guest(&sargs, &append);
    src.wait_for("GUEST READY", T);
    src.wait_for("HEARTBEAT", T);
    let hmp = Hmp::connect(&sock);
    Pair { src, dst, hmp, dhmp, port, _dir: dir }
}

fn value(info: &str, key: &str) -> Option<u64> {
    info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn status(h: &mut Hmp) -> String {
    let info = h.cmd("info migrate");
    info.lines()
        .find_map(|l| l.strip_prefix("Migration status: "))
        .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
        .unwrap_or_default()
}

fn wait_status(h: &mut Hmp, want: &str, timeout: Duration) -> String {
    let end = Instant::now() + timeout;
    loop {
        let info = h.cmd("info migrate");
        if info.contains(&format!("Migration status: {want}")) {
            return info;
        }
        assert!(Instant::now() < end, "never reached {want}: {info}");
        assert!(!info.contains("Migration status: failed"), "{info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a post-copy migration to `port` on a guest pre-copy cannot move over 16 MB/s.
fn start(p: &mut Pair, port: u16) {
    p.hmp.cmd("migrate_set_parameter max-bandwidth 16M");
    p.hmp.cmd("migrate_set_parameter downtime-limit 30");
    // Post-copy is not capped by max-bandwidth (as in QEMU); cap it too so the guest on the
    // destination really waits for pages (and a cut can land half-way).
    p.hmp.cmd("migrate_set_parameter max-postcopy-bandwidth 16M");
    assert_eq!(p.hmp.cmd("migrate_set_capability postcopy-ram on").trim(), "");
    assert!(p.hmp.cmd("info migrate_capabilities").contains("postcopy-ram: on"));
    // Before a migration runs, post-copy cannot start.
    assert!(!p.hmp.cmd("migrate_start_postcopy").trim().is_empty());
    p.hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{port}"));
    // Let the first full pass and a dirty round go by: pre-copy is not converging.
    let end = Instant::now() + T;
    loop {
        let info = p.hmp.cmd("info migrate");
        if value(&info, "dirty sync count: ").unwrap_or(0) >= 2 {
            assert!(info.contains("Migration status: active"), "{info}");
            break;
        }
        assert!(Instant::now() < end, "{info}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(p.hmp.cmd("migrate_start_postcopy").trim(), "");
}

/// The destination's guest continues the source's heartbeat sequence and its ledger holds.
fn check_destination(p: &mut Pair) {
    p.src.collect_for(Duration::from_millis(200));
    let first = p.dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&p.src.seen, &p.dst.seen, &first);
    p.dst.send(b"v");
    p.dst.wait_for("LEDGER OK", T);
    let a = p.dst.wait_for("HEARTBEAT", T);
    let b = p.dst.wait_for("HEARTBEAT", T);
    assert!(field(&b, "dirtied") > field(&a, "dirtied"), "the guest stopped writing: {a} / {b}");
    assert!(p.hmp.cmd("info status").contains("postmigrate"));
    p.dst.send(b"q");
    assert_eq!(p.dst.wait_exit(T), Some(0));
}

fn report(info: &str, what: &str) {
    eprintln!(
        "{what}: downtime {:?} ms, total {:?} ms, postcopy requests {:?}, postcopy ram {:?} KiB",
        value(info, "downtime: "),
        value(info, "total time: "),
        value(info, "postcopy request count: "),
        value(info, "postcopy ram: ")
    );
}

#[test]
fn postcopy_finishes_a_non_converging_guest() {
    let mut p = pair("postcopy");
    let port = p.port;
    start(&mut p, port);
    let info = wait_status(&mut p.hmp, "completed", T);
    report(&info, "post-copy");
    // How long the pause was is reported (and measured against the limit by the benchmark,
    // bench mig-postcopy), not asserted: timings on a loaded 2-core machine are no test.
    value(&info, "downtime: ").expect("downtime reported");
    assert!(value(&info, "postcopy ram: ").unwrap_or(0) > 0, "nothing moved after the switch: {info}");
    assert!(value(&info, "postcopy request count: ").unwrap_or(0) > 0, "the guest never waited for a page: {info}");
    check_destination(&mut p);
}

/// A TCP proxy that forwards one connection both ways until `cut` is set, then closes both.
fn cutting_proxy(to: u16, cut: Arc<AtomicBool>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let pump = |mut from: TcpStream, mut to: TcpStream, cut: Arc<AtomicBool>| {
            std::thread::spawn(move || {
                from.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    if cut.load(Ordering::SeqCst) {
                        let _ = from.shutdown(Shutdown::Both);
                        let _ = to.shutdown(Shutdown::Both);
                        return;
                    }
                    match from.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if to.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => return,
                    }
                }
            })
        };
        let h1 = pump(a.try_clone().unwrap(), b.try_clone().unwrap(), cut.clone());
        let h2 = pump(b, a, cut);
        let _ = h1.join();
        let _ = h2.join();
    });
    port
}

#[test]
fn postcopy_recovers_from_a_cut_link() {
    let mut p = pair("postcopy-cut");
    let cut = Arc::new(AtomicBool::new(false));
    let proxied = cutting_proxy(p.port, cut.clone());
    start(&mut p, proxied);
    let info = wait_status(&mut p.hmp, "postcopy-active", T);
    // Half-way through the post-copy phase.
    let total = value(&info, "remaining ram: ").unwrap_or(0);
    let end = Instant::now() + T;
    loop {
        let info = p.hmp.cmd("info migrate");
        let left = value(&info, "remaining ram: ").unwrap_or(0);
        if left <= total / 2 {
            assert!(info.contains("Migration status: postcopy-active"), "finished before the cut: {info}");
            break;
        }
        assert!(Instant::now() < end, "{info}");
        std::thread::sleep(Duration::from_millis(20));
    }
    cut.store(true, Ordering::SeqCst);
    wait_status(&mut p.hmp, "postcopy-paused", T);
    wait_status(&mut p.dhmp, "postcopy-paused", T);
    // The guest keeps running on the destination meanwhile (what it needs from the source
    // waits); the source cannot give it up.
    assert!(p.hmp.cmd("migrate_cancel").contains("cannot be cancelled"));
    assert_eq!(status(&mut p.hmp), "postcopy-paused");
    // Recovery: the destination listens again, the source reconnects.
    let port2 = free_port();
    assert_eq!(p.dhmp.cmd(&format!("migrate_recover tcp:127.0.0.1:{port2}")).trim(), "");
    p.dst.wait_stderr("waiting for the source to resume post-copy", T);
    let out = p.hmp.cmd(&format!("migrate -d -r tcp:127.0.0.1:{port2}"));
    assert!(!out.contains("rror"), "{out}");
    let info = wait_status(&mut p.hmp, "completed", T);
    report(&info, "post-copy with a cut link");
    // How long the pause was is reported (and measured against the limit by the benchmark,
    // bench mig-postcopy), not asserted: timings on a loaded 2-core machine are no test.
    value(&info, "downtime: ").expect("downtime reported");
    wait_status(&mut p.dhmp, "completed", T);
    check_destination(&mut p);
}

/// `strategy auto` with `postcopy-ram` on: the forecast says pre-copy cannot converge, so the
/// migration switches to post-copy by itself after the first full pass.
#[test]
fn strategy_auto_picks_postcopy_when_precopy_cannot_converge() {
    let mut p = pair("postcopy-auto");
    p.hmp.cmd("migrate_set_parameter max-bandwidth 16M");
    assert_eq!(p.hmp.cmd("migrate_set_capability postcopy-ram on").trim(), "");
    let f = p.hmp.cmd("info migrate_forecast");
    assert!(f.contains("precopy: does not converge"), "{f}");
    assert!(f.contains("postcopy: converges") && f.contains("recommended: postcopy"), "{f}");
    p.hmp.cmd("migrate_set_parameter strategy auto");
    p.hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{}", p.port));
    let info = wait_status(&mut p.hmp, "completed", T);
    report(&info, "strategy auto (post-copy)");
    assert!(value(&info, "postcopy ram: ").unwrap_or(0) > 0, "post-copy was not used: {info}");
    value(&info, "downtime: ").expect("downtime reported");
    check_destination(&mut p);
}

/// The QMP side: QEMU's command and capability names, and the refusals QEMU gives when
/// post-copy is not in a state for them.
#[test]
fn qmp_postcopy_commands() {
    use std::io::BufRead;
    let dir = tmpdir("postcopy-qmp");
    let sock = dir.join("qmp.sock");
    let spec = format!("unix:{},server,nowait", sock.display());
    let mut vm = Vm::guest(&["-m", "64", "-qmp", &spec], "mode=idle hb_ms=100");
    vm.wait_for("GUEST READY", T);
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let mut ask = |cmd: &str| -> serde_json::Value {
        w.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v.get("event").is_none() {
                return v;
            }
        }
    };
    assert!(ask(r#"{"execute":"qmp_capabilities"}"#).get("return").is_some());
    let e = ask(r#"{"execute":"migrate-start-postcopy"}"#);
    assert!(e["error"]["desc"].as_str().unwrap_or("").contains("postcopy"), "{e}");
    let c = ask(r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"postcopy-ram","state":true}]}}"#);
    assert!(c.get("return").is_some(), "{c}");
    let q = ask(r#"{"execute":"query-migrate-capabilities"}"#);
    let on = q["return"].as_array().unwrap().iter().any(|c| c["capability"] == "postcopy-ram" && c["state"] == true);
    assert!(on, "{q}");
    let e = ask(r#"{"execute":"migrate-start-postcopy"}"#);
    assert!(e["error"]["desc"].as_str().unwrap_or("").contains("No migration"), "{e}");
    let e = ask(r#"{"execute":"migrate-recover","arguments":{"uri":"tcp:127.0.0.1:1"}}"#);
    assert!(e["error"]["desc"].as_str().unwrap_or("").contains("postcopy is paused"), "{e}");
    let e = ask(r#"{"execute":"migrate","arguments":{"uri":"tcp:127.0.0.1:1","resume":true}}"#);
    assert!(e["error"]["desc"].as_str().unwrap_or("").contains("postcopy is paused"), "{e}");
    let p = ask(r#"{"execute":"migrate-set-parameters","arguments":{"max-postcopy-bandwidth":1000000}}"#);
    assert!(p.get("return").is_some(), "{p}");
    let q = ask(r#"{"execute":"query-migrate-parameters"}"#);
    assert_eq!(q["return"]["max-postcopy-bandwidth"], 1000000, "{q}");
}

/// With a virtio-blk disk on shared storage doing I/O all along: the disk is handed over at
/// the switch, the device's DMA into guest pages still on the source goes through the same
/// on-demand path, and both ledgers check out.
#[test]
fn postcopy_with_a_busy_shared_disk() {
    let mut p = pair_with("postcopy-disk", true);
    let port = p.port;
    start(&mut p, port);
    let info = wait_status(&mut p.hmp, "completed", T);
    report(&info, "post-copy with a disk");
    value(&info, "downtime: ").expect("downtime reported");
    p.dst.wait_for("HEARTBEAT", T);
    p.dst.send(b"v");
    p.dst.wait_for("LEDGER OK", T);
    let d = p.dst.wait_for("DISK", T);
    assert!(d.contains("DISK OK"), "{d}");
}
