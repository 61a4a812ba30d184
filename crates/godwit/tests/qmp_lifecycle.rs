//! Run-state corners QEMU clients rely on, over raw QMP: a destination started with
//! `-S -incoming ...` stays `paused` after the migration completes, until `cont` (QEMU's
//! autostart), while one without `-S` runs at once; and `quit` is answered before the
//! connection closes.

mod common;
use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// A raw QMP connection that keeps the events it reads past.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Raw {
    fn connect(path: &std::path::Path) -> Raw {
        let end = Instant::now() + T;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > end => panic!("QMP socket {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(T)).unwrap();
        let mut raw = Raw { w: s.try_clone().unwrap(), r: BufReader::new(s), events: Vec::new() };
        let greeting = raw.line().expect("QMP greeting");
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        assert!(raw.ask(r#"{"execute":"qmp_capabilities"}"#).get("return").is_some());
        raw
    }

    /// The next message, `None` at EOF.
    fn line(&mut self) -> Option<Value> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))),
            Err(e) => panic!("reading QMP: {e}"),
        }
    }

    fn send(&mut self, cmd: &str) {
        self.w.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    }

    fn ask(&mut self, cmd: &str) -> Value {
        self.send(cmd);
        loop {
            let v = self.line().unwrap_or_else(|| panic!("connection closed before the answer to {cmd}"));
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn status(&mut self) -> Value {
        self.ask(r#"{"execute":"query-status"}"#)["return"].clone()
    }

    fn event_names(&self) -> Vec<String> {
        self.events.iter().map(|e| e["event"].as_str().unwrap_or("").to_string()).collect()
    }
}

/// Migrates a running test guest into a destination started with `dst_extra` (and a QMP
/// socket, `-incoming tcp:...`); returns (destination, its QMP, source's last lines).
fn migrate_into(name: &str, dst_extra: &[&str]) -> (Vm, Raw, Vm) {
    let dir = tmpdir(name);
    let (ssock, dsock) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let append = "mode=dirty mib=32 rate=20 hb_ms=50";
    let port = free_port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let dspec = format!("unix:{},server,nowait", dsock.display());
    let mut dargs = vec!["-m", "128", "-qmp", &dspec, "-incoming", &incoming];
    dargs.extend_from_slice(dst_extra);
    let dst = Vm::guest(&dargs, append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let mut dq = Raw::connect(&dsock);
    assert_eq!(dq.status()["status"], "inmigrate");
    let sspec = format!("unix:{},server,nowait", ssock.display());
    let mut src = Vm::guest(&["-m", "128", "-qmp", &sspec], append);
    src.wait_for("GUEST READY", T);
    src.wait_for("HEARTBEAT", T);
    let mut sq = Raw::connect(&ssock);
    let r = sq.ask(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{incoming}"}}}}"#));
    assert!(r.get("return").is_some(), "{r}");
    loop {
        let m = sq.ask(r#"{"execute":"query-migrate"}"#);
        if m["return"]["status"] == "completed" {
            break;
        }
        assert!(m["return"]["status"] != "failed", "{m}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The destination leaves `inmigrate` once it has the whole state.
    loop {
        let s = dq.status();
        if s["status"] != "inmigrate" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    src.collect_for(Duration::from_millis(100));
    (dst, dq, src)
}

#[test]
fn incoming_with_dash_s_stays_paused_until_cont() {
    let (mut dst, mut dq, src) = migrate_into("incoming-S", &["-S"]);
    let s = dq.status();
    assert_eq!((s["status"].clone(), s["running"].clone()), (Value::from("paused"), Value::from(false)), "as QEMU after -S -incoming");
    // The guest does not run: no heartbeat while we wait, no RESUME event.
    let lines = dst.collect_for(Duration::from_millis(500));
    assert!(!lines.iter().any(|l| l.starts_with("HEARTBEAT")), "the guest ran before cont: {lines:?}");
    dq.status();
    assert!(!dq.event_names().iter().any(|n| n == "RESUME"), "RESUME before cont: {:?}", dq.event_names());
    // `cont` starts it where the source left it.
    assert!(dq.ask(r#"{"execute":"cont"}"#).get("return").is_some());
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    let s = dq.status();
    assert_eq!((s["status"].clone(), s["running"].clone()), (Value::from("running"), Value::from(true)));
    assert_eq!(dq.event_names().iter().filter(|n| *n == "RESUME").count(), 1, "{:?}", dq.event_names());
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
}

#[test]
fn incoming_without_dash_s_runs_at_once() {
    let (mut dst, mut dq, src) = migrate_into("incoming-run", &[]);
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    let s = dq.status();
    assert_eq!((s["status"].clone(), s["running"].clone()), (Value::from("running"), Value::from(true)));
    assert!(dq.event_names().iter().any(|n| n == "RESUME"), "{:?}", dq.event_names());
    // `cont` on a running destination (libvirt sends it whatever -S) changes nothing.
    assert!(dq.ask(r#"{"execute":"cont"}"#).get("return").is_some());
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
}

/// `quit` over QMP: the answer comes before the connection closes, then SHUTDOWN (QEMU's
/// order), then EOF, and the process exits 0. A few VMs in a row, since a lost answer was a
/// race with the process exit.
#[test]
fn quit_is_answered_before_the_connection_closes() {
    let dir = tmpdir("qmp-quit");
    for i in 0..5 {
        let sock = dir.join(format!("q{i}.sock"));
        let spec = format!("unix:{},server,nowait", sock.display());
        let mut vm = Vm::guest(&["-m", "64", "-qmp", &spec], "mode=idle hb_ms=100");
        vm.wait_for("GUEST READY", T);
        let mut q = Raw::connect(&sock);
        assert_eq!(q.status()["status"], "running");
        q.send(r#"{"execute":"quit","id":"bye"}"#);
        let mut after = Vec::new();
        while let Some(v) = q.line() {
            after.push(v);
        }
        let at = after.iter().position(|v| v.get("return").is_some());
        assert!(at.is_some(), "run {i}: no answer to quit before EOF: {after:?}");
        let reply = &after[at.unwrap()];
        assert_eq!((reply["return"].clone(), reply["id"].clone()), (serde_json::json!({}), Value::from("bye")), "{reply}");
        let shutdown = after.iter().position(|v| v["event"] == "SHUTDOWN");
        assert!(shutdown.is_some_and(|s| s > at.unwrap()), "run {i}: SHUTDOWN after the answer: {after:?}");
        let e = &after[shutdown.unwrap()]["data"];
        assert_eq!((e["guest"].clone(), e["reason"].clone()), (Value::from(false), Value::from("host-qmp-quit")));
        assert_eq!(vm.wait_exit(T), Some(0));
    }
}
