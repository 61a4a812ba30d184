//! A migration driven over QMP the way libvirt drives QEMU (capabilities `events`,
//! `return-path`, `pause-before-switchover` → `pre-switchover` + STOP → `migrate-continue`,
//! `-incoming defer` + `migrate-incoming`, status followed through MIGRATION events), by the
//! PyPI `qemu.qmp` client — then the guest's ledger is checked on the destination. A second
//! test checks that without the `events` capability no MIGRATION event is sent.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

#[test]
fn libvirt_style_qmp_migration_with_pause_before_switchover() {
    let dir = tmpdir("libvirt-qmp");
    let (ssock, dsock) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let append = "mode=dirty mib=64 rate=20 hb_ms=50";
    let dspec = format!("unix:{},server,nowait", dsock.display());
    let mut dst = Vm::guest(&["-m", "256", "-qmp", &dspec, "-incoming", "defer"], append);
    let sspec = format!("unix:{},server,nowait", ssock.display());
    let mut src = Vm::guest(&["-m", "256", "-qmp", &sspec], append);
    src.wait_for("GUEST READY", T);
    src.wait_for("HEARTBEAT", T);
    let port = free_port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libvirt_style_migration.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&ssock)
        .arg(&dsock)
        .arg(port.to_string())
        .output()
        .expect("python3 (Debian package python3)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(3), "the qemu.qmp package is missing: pip install qemu.qmp\n{text}");
    assert!(out.status.success() && text.contains("LIBVIRT-STYLE MIGRATION OK"), "{text}");
    eprintln!("{text}");
    src.collect_for(Duration::from_millis(300));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
}

/// A raw QMP connection that keeps the events it reads past.
struct Raw {
    w: std::os::unix::net::UnixStream,
    r: BufReader<std::os::unix::net::UnixStream>,
    events: Vec<serde_json::Value>,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut raw = Raw { w: s.try_clone().unwrap(), r: BufReader::new(s), events: Vec::new() };
        let mut greeting = String::new();
        raw.r.read_line(&mut greeting).unwrap();
        assert!(greeting.contains("\"QMP\""), "{greeting}");
        assert!(raw.ask(r#"{"execute":"qmp_capabilities"}"#).get("return").is_some());
        raw
    }
    fn ask(&mut self, cmd: &str) -> serde_json::Value {
        self.w.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        loop {
            let mut l = String::new();
            self.r.read_line(&mut l).unwrap();
            let v: serde_json::Value = serde_json::from_str(&l).unwrap();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }
}

#[test]
fn migration_events_follow_the_events_capability() {
    let dir = tmpdir("mig-events");
    let sock = dir.join("src.qmp");
    let port = free_port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let mut dst = Vm::guest(&["-m", "128", "-incoming", &incoming], "mode=idle hb_ms=100");
    dst.wait_stderr("waiting for an incoming migration", T);
    let spec = format!("unix:{},server,nowait", sock.display());
    let mut src = Vm::guest(&["-m", "128", "-qmp", &spec], "mode=idle hb_ms=100");
    src.wait_for("GUEST READY", T);
    let mut q = Raw::connect(&sock);
    let caps = q.ask(r#"{"execute":"query-migrate-capabilities"}"#);
    let events_cap = caps["return"].as_array().unwrap().iter().find(|c| c["capability"] == "events").cloned();
    assert_eq!(events_cap.map(|c| c["state"].clone()), Some(serde_json::json!(false)), "{caps}");
    let r = q.ask(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{incoming}"}}}}"#));
    assert!(r.get("return").is_some(), "{r}");
    let t0 = Instant::now();
    loop {
        let m = q.ask(r#"{"execute":"query-migrate"}"#);
        if m["return"]["status"] == "completed" {
            break;
        }
        assert!(m["return"]["status"] != "failed" && t0.elapsed() < T, "{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let any late event arrive, then look at everything read so far.
    std::thread::sleep(Duration::from_millis(200));
    q.ask(r#"{"execute":"query-status"}"#);
    let names: Vec<String> = q.events.iter().map(|e| e["event"].as_str().unwrap_or("").to_string()).collect();
    assert!(names.iter().any(|n| n == "STOP"), "the source stopped: {names:?}");
    assert!(!names.iter().any(|n| n.starts_with("MIGRATION")), "MIGRATION events without the capability: {names:?}");
    dst.wait_for("HEARTBEAT", T);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
}
