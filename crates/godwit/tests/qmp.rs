//! QMP against the real VMM: the `qemu.qmp` Python library (a client nobody here wrote) drives
//! a running godwit — negotiation, query-status, stop/cont with their events,
//! human-monitor-command, an error reply — and a raw-socket client checks the migration
//! commands' QEMU field names.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[test]
fn qemu_qmp_library_drives_godwit() {
    let dir = tmpdir("qmp-py");
    let sock = dir.join("qmp.sock");
    let spec = format!("unix:{},server,nowait", sock.display());
    let mut vm = Vm::guest(&["-m", "64", "-qmp", &spec], "mode=idle hb_ms=100");
    vm.wait_for("GUEST READY", T);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitor/tests/qemu_qmp_client.py");
    let out = std::process::Command::new("python3").arg(&script).arg(&sock).output().expect("python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(3), "the qemu.qmp package is missing: pip install qemu.qmp\n{text}");
    assert!(out.status.success() && text.contains("QEMU.QMP CLIENT OK"), "{text}");
    // The guest still runs.
    let h = vm.wait_for("HEARTBEAT", T);
    assert!(field(&h, "seq").is_some());
}

#[test]
fn qmp_migration_commands_use_qemu_names() {
    let dir = tmpdir("qmp-raw");
    let sock = dir.join("qmp.sock");
    let spec = format!("unix:{},server,nowait", sock.display());
    let mut vm = Vm::guest(&["-m", "64", "-qmp", &spec], "mode=idle hb_ms=100");
    vm.wait_for("GUEST READY", T);
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"QMP\""), "{line}");
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
    let st = ask(r#"{"execute":"query-status"}"#);
    assert_eq!(st["return"]["status"], "running");
    let p = ask(r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":25}}"#);
    assert!(p.get("return").is_some(), "{p}");
    let q = ask(r#"{"execute":"query-migrate-parameters"}"#);
    assert_eq!(q["return"]["downtime-limit"], 25, "{q}");
    let m = ask(r#"{"execute":"query-migrate"}"#);
    assert!(m.get("return").is_some(), "{m}");
    let bad = ask(r#"{"execute":"migrate","arguments":{"uri":"exec:cat"}}"#);
    assert!(bad["error"]["desc"].as_str().unwrap_or("").contains("exec:cat"), "{bad}");
    let inc = ask(r#"{"execute":"migrate-incoming","arguments":{"uri":"tcp:127.0.0.1:1"}}"#);
    assert!(inc.get("error").is_some(), "migrate-incoming needs -incoming defer: {inc}");
}

#[test]
fn incoming_defer_then_migrate_incoming() {
    let dir = tmpdir("defer");
    let qsock = dir.join("dst.sock");
    let qspec = format!("unix:{},server,nowait", qsock.display());
    let append = "mode=dirty mib=32 rate=10 hb_ms=100 cpus=1";
    let mut dst = Vm::guest(&["-m", "128", "-incoming", "defer", "-qmp", &qspec], append);
    let s = {
        let end = std::time::Instant::now() + T;
        loop {
            match std::os::unix::net::UnixStream::connect(&qsock) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => panic!("{e}"),
            }
        }
    };
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut l = String::new();
    r.read_line(&mut l).unwrap();
    for cmd in [r#"{"execute":"qmp_capabilities"}"#, r#"{"execute":"query-status"}"#] {
        w.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        l.clear();
        r.read_line(&mut l).unwrap();
    }
    assert!(l.contains("inmigrate"), "{l}");
    let port = free_port();
    w.write_all(format!(r#"{{"execute":"migrate-incoming","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#).as_bytes()).unwrap();
    w.write_all(b"\n").unwrap();
    l.clear();
    r.read_line(&mut l).unwrap();
    assert!(l.contains("return"), "{l}");
    dst.wait_stderr("waiting for an incoming migration", T);
    let ssock = dir.join("src.sock");
    let mon = format!("unix:{},server,nowait", ssock.display());
    let mut src = Vm::guest(&["-m", "128", "-monitor", &mon], append);
    src.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&ssock);
    let out = hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    assert!(out.contains("completed"), "{out}");
    dst.wait_for("HEARTBEAT", T);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
}

/// `system_powerdown` presses the ACPI power button: `POWERDOWN`, the test guest (which polls
/// the button's event register) prints `GUEST POWEROFF` and enters S5, Godwit sends
/// `SHUTDOWN` (guest: true, guest-shutdown) and exits 0. With `-no-shutdown` it stays, in state
/// `shutdown`, until `quit`.
#[test]
fn system_powerdown_presses_the_power_button() {
    for no_shutdown in [false, true] {
        let dir = tmpdir("qmp-powerdown");
        let sock = dir.join("qmp.sock");
        let spec = format!("unix:{},server,nowait", sock.display());
        let mut args = vec!["-m", "64", "-qmp", &spec];
        if no_shutdown {
            args.push("-no-shutdown");
        }
        let mut vm = Vm::guest(&args, "mode=idle hb_ms=100");
        vm.wait_for("GUEST READY", T);
        let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        // Null at the end of the stream.
        let mut next = || -> serde_json::Value {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            if l.is_empty() {
                return serde_json::Value::Null;
            }
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
        };
        assert!(next().get("QMP").is_some());
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
        assert!(next().get("return").is_some());
        w.write_all(b"{\"execute\":\"system_powerdown\"}\n").unwrap();
        let mut seen = Vec::new();
        loop {
            let v = next();
            let end = v.is_null() || v["event"] == "SHUTDOWN";
            seen.push(v);
            if end {
                break;
            }
        }
        let names: Vec<String> = seen.iter().map(|v| v.get("event").map_or("return".into(), |e| e.as_str().unwrap_or("?").to_string())).collect();
        assert!(names.contains(&"POWERDOWN".to_string()) && names.contains(&"return".to_string()), "{names:?}");
        // Without -no-shutdown the process exits right after SHUTDOWN, which may beat its
        // delivery; with it, SHUTDOWN must come.
        let shutdown = seen.last().unwrap();
        if no_shutdown || !shutdown.is_null() {
            assert_eq!(shutdown["data"]["guest"], true, "{names:?} {shutdown}");
            assert_eq!(shutdown["data"]["reason"], "guest-shutdown", "{shutdown}");
        }
        vm.wait_for("GUEST POWEROFF", T);
        if no_shutdown {
            w.write_all(b"{\"execute\":\"query-status\"}\n").unwrap();
            let st = loop {
                let v = next();
                if v.get("return").is_some() {
                    break v;
                }
            };
            assert_eq!(st["return"]["status"], "shutdown", "{st}");
            w.write_all(b"{\"execute\":\"quit\"}\n").unwrap();
        }
        assert_eq!(vm.wait_exit(T), Some(0));
    }
}

/// A press the guest never read (the VM stopped) does not survive `system_reset`: the new boot
/// runs on instead of powering off at its first timer tick.
#[test]
fn system_reset_forgets_an_unread_power_button_press() {
    let dir = tmpdir("qmp-powerdown-reset");
    let sock = dir.join("qmp.sock");
    let spec = format!("unix:{},server,nowait", sock.display());
    let mut vm = Vm::guest(&["-m", "64", "-qmp", &spec], "mode=idle hb_ms=100");
    vm.wait_for("GUEST READY", T);
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut ask = |cmd: &str| {
        w.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes()).unwrap();
        loop {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            if v.get("return").is_some() || v.get("error").is_some() {
                assert!(v.get("return").is_some(), "{cmd}: {v}");
                return;
            }
        }
    };
    ask("qmp_capabilities");
    ask("stop");
    ask("system_powerdown");
    ask("system_reset");
    ask("cont");
    vm.wait_for("GUEST READY", T);
    for _ in 0..3 {
        vm.wait_for("HEARTBEAT", T);
    }
    assert!(!vm.seen.iter().any(|l| l.contains("GUEST POWEROFF")), "{:?}", vm.seen);
    vm.send(b"q");
    assert_eq!(vm.wait_exit(T), Some(0));
}
