//! Hostile and broken clients: malformed JSON, non-objects, wrong argument types, huge lines,
//! deep nesting, binary garbage, half-closed and vanished sockets, clients that never read.
//! Each gets a clear error (or is dropped) while the VM keeps running and other clients keep
//! being served.

mod common;

use common::*;
use monitor::{Event, Protocol, RunState, ServeOptions};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

fn error_desc(v: &Value) -> String {
    assert!(v.get("return").is_none(), "expected an error, got {v}");
    assert_eq!(v["error"]["class"], "GenericError", "{v}");
    v["error"]["desc"].as_str().unwrap().to_string()
}

#[test]
fn malformed_qmp_input_gets_qemu_errors_and_the_connection_survives() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("badjson"), Protocol::Qmp);
    let mut q = Qmp::ready(srv.local_addr());
    let cases: &[(&[u8], &str)] = &[
        (b"{\"execute\": }", "JSON parse error, "),
        (b"nonsense\n", "JSON parse error, "),
        (b"}", "JSON parse error, stray '}'"),
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b"42 ", "QMP input must be a JSON object"),
        (b"{}", "QMP input lacks member 'execute'"),
        (b"{\"execute\": 5}", "QMP input member 'execute' must be a string"),
        (b"{\"execute\": \"stop\", \"arguments\": []}", "QMP input member 'arguments' must be an object"),
        (b"{\"execute\": \"stop\", \"bogus\": 1}", "QMP input member 'bogus' is unexpected"),
        (b"{\"execute\": \"stop\", \"exec-oob\": \"stop\"}", "QMP input must not contain both 'execute' and 'exec-oob'"),
        (b"{\"exec-oob\": \"query-status\"}", "The command query-status does not support OOB"),
        (b"{\"execute\": \"human-monitor-command\", \"arguments\": {\"command-line\": 1}}",
         "Invalid parameter type for 'command-line', expected: string"),
        (b"{\"execute\": \"migrate-set-parameters\", \"arguments\": {\"downtime-limit\": -5}}",
         "Invalid parameter type for 'downtime-limit', expected: integer"),
        (b"{\"execute\": \"migrate\", \"arguments\": {\"uri\": \"tcp:h:1\", \"detach\": \"yes\"}}",
         "Invalid parameter type for 'detach', expected: boolean"),
        (b"{\"execute\": \"cont\", \"arguments\": {\"x\": null}}", "Parameter 'x' is unexpected"),
        (b"{\"execute\": \"stop\" \"x\"}", "JSON parse error, "),
        // A raw newline inside a string is invalid JSON: the message ends there, so the next
        // line starts afresh (a client can always resynchronize with a newline).
        (b"{\"execute\": \"st\n", "JSON parse error, control character in string"),
    ];
    for (input, want) in cases {
        q.send_raw(input);
        let r = q.reply();
        let desc = error_desc(&r);
        assert!(
            desc.starts_with(want),
            "for {:?}: got {desc:?}",
            String::from_utf8_lossy(input)
        );
    }
    // Still in business, and nothing moved the VM.
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    assert!(q.events.is_empty(), "no events: {:?}", q.events);
}

#[test]
fn huge_and_deep_messages_are_refused_without_killing_the_session() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("huge"), Protocol::Qmp);
    let mut q = Qmp::ready(srv.local_addr());
    let mut other = Qmp::ready(srv.local_addr());
    // 3 MiB inside one string, then a newline: one error, then normal service.
    let mut big = b"{\"execute\": \"".to_vec();
    big.resize(big.len() + (3 << 20), b'a');
    big.extend_from_slice(b"\"}\n");
    let writer = {
        let mut w = q.w.try_clone();
        std::thread::spawn(move || w.write_all(&big).unwrap())
    };
    let desc = error_desc(&q.reply());
    writer.join().unwrap();
    assert!(desc.contains("longer than"), "{desc}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    // Nesting beyond the limit.
    q.send_raw(&[b'['; 5000]);
    q.send_raw(b"\n");
    assert!(error_desc(&q.reply()).contains("nesting"));
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    assert_eq!(other.ok("query-status", json!({}))["status"], "running");

    // HMP: a 2 MiB line is reported once and skipped.
    let hsrv = serve(&vm, &unix_spec("huge-h"), Protocol::Hmp);
    let mut h = Hmp::connect(hsrv.local_addr());
    let mut line = vec![b'x'; 2 << 20];
    line.push(b'\n');
    let writer = {
        let mut w = h.w.try_clone();
        std::thread::spawn(move || w.write_all(&line).unwrap())
    };
    let out = h.until_prompt();
    writer.join().unwrap();
    assert_eq!(out, "line too long (more than 1048576 bytes), ignored\r\n");
    assert_eq!(h.cmd("info status"), "VM status: running\n");
}

#[test]
fn binary_garbage_on_both_protocols() {
    let vm = mock_vm(RunState::Running);
    let qsrv = serve(&vm, &unix_spec("bin-q"), Protocol::Qmp);
    let hsrv = serve(&vm, &unix_spec("bin-h"), Protocol::Hmp);
    // Deterministic pseudo-random bytes.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let garbage: Vec<u8> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    {
        let mut q = Qmp::ready(qsrv.local_addr());
        let mut w = q.w.try_clone();
        let g = garbage.clone();
        let t = std::thread::spawn(move || {
            let _ = w.write_all(&g);
            let _ = w.write_all(b"\n{\"execute\": \"query-status\", \"id\": \"after\"}");
        });
        // Every reply is an error until ours arrives.
        loop {
            let r = q.reply();
            if r["id"] == "after" {
                assert_eq!(r["return"]["status"], "running");
                break;
            }
            assert!(r.get("error").is_some(), "{r}");
        }
        t.join().unwrap();
    }
    {
        let mut h = Hmp::connect(hsrv.local_addr());
        let mut w = h.w.try_clone();
        // NUL-free so the line structure is the newlines in the garbage.
        let g: Vec<u8> = garbage
            .iter()
            .map(|&b| if b == 0 { 1 } else { b })
            .collect();
        let t = std::thread::spawn(move || {
            let _ = w.write_all(&g);
            let _ = w.write_all(b"\ninfo status\n");
        });
        let mut seen = String::new();
        let mut buf = [0u8; 65536];
        while !seen.contains("VM status: running\r\n(qemu) ") {
            let n = h.r.read(&mut buf).unwrap();
            assert!(n > 0);
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.len() > 200_000 {
                seen = seen.split_off(seen.len() - 1000);
            }
        }
        t.join().unwrap();
    }
    // No garbage line happened to stop, reset or quit the VM.
    assert_eq!(monitor::Backend::run_state(&*vm.vm), RunState::Running);
    assert!(!vm.vm.quit_requested());
}

#[test]
fn half_closed_and_vanishing_clients() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("half"), Protocol::Qmp);
    let hsrv = serve(&vm, &unix_spec("half-h"), Protocol::Hmp);
    let mut survivor = Qmp::ready(srv.local_addr());

    // Half-close: the commands sent before EOF are all answered, then the server closes.
    let mut q = Qmp::connect(srv.local_addr());
    q.send_raw(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-status\",\"id\":1}{\"execute\":\"stop\",\"id\":2}{\"exe");
    q.w.shutdown_write();
    assert_eq!(q.reply(), json!({"return": {}}));
    assert_eq!(q.reply()["id"], 1);
    assert_eq!(q.reply(), json!({"return": {}, "id": 2}));
    let last = q.reply();
    assert!(error_desc(&last).contains("JSON parse error"), "{last}");
    while let Some(m) = q.read_msg() {
        assert!(m.get("event").is_some(), "only events may follow: {m}");
    }
    assert_eq!(survivor.event()["event"], "STOP");

    // HMP half-close: the pending command runs and its output arrives before EOF.
    let mut h = Hmp::connect(hsrv.local_addr());
    h.w.write_all(b"cont\ninfo status\n").unwrap();
    h.w.shutdown_write();
    let mut rest = String::new();
    h.r.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "(qemu) VM status: running\r\n(qemu) ");
    assert_eq!(survivor.event()["event"], "RESUME");

    // A client that disappears in the middle of a long command: the command completes,
    // the VM is consistent, the others carry on.
    let gate = vm.vm.hold_savevm();
    {
        let mut gone = Hmp::connect(hsrv.local_addr());
        gone.w.write_all(b"savevm abandoned\n").unwrap();
        assert_eq!(survivor.event()["event"], "STOP");
    } // dropped: socket closed while savevm waits
    assert_eq!(survivor.ok("query-status", json!({}))["status"], "save-vm");
    gate.open();
    assert_eq!(survivor.event()["event"], "RESUME");
    let snaps = survivor.ok(
        "human-monitor-command",
        json!({"command-line": "info snapshots"}),
    );
    assert!(snaps.as_str().unwrap().contains("abandoned"), "{snaps}");

    // Connections that close abruptly right after connecting or mid-message.
    for junk in [
        &b""[..],
        b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"sto",
        b"\xff\xfe",
    ] {
        let mut c = Qmp::connect(srv.local_addr());
        c.send_raw(junk);
    }
    assert_eq!(survivor.ok("query-status", json!({}))["status"], "running");
}

#[test]
fn a_client_that_never_reads_is_dropped_and_others_get_every_event() {
    let vm = mock_vm(RunState::Running);
    let small = serve_with(
        &vm,
        &unix_spec("stuck"),
        Protocol::Qmp,
        ServeOptions {
            queue: 4,
            ..Default::default()
        },
    );
    let big = serve_with(
        &vm,
        &unix_spec("healthy"),
        Protocol::Qmp,
        ServeOptions {
            queue: 100_000,
            ..Default::default()
        },
    );
    let mut stuck = Qmp::ready(small.local_addr());
    let mut healthy = Qmp::ready(big.local_addr());
    assert_eq!(vm.events.subscriber_count(), 2);
    const N: u64 = 20_000;
    for pass in 0..N {
        vm.events.emit(Event::MigrationPass { pass });
    }
    // The stuck client's queue overflowed: it was unsubscribed and its socket shut down.
    assert_eq!(vm.events.subscriber_count(), 1);
    // It can still read what was sent before the cut (the last line may be cut short).
    let mut rest = Vec::new();
    stuck.r.read_to_end(&mut rest).unwrap();
    let text = String::from_utf8_lossy(&rest);
    let complete: Vec<&str> = text
        .split_inclusive("\r\n")
        .filter(|l| l.ends_with("\r\n"))
        .collect();
    for line in &complete {
        let m: Value = serde_json::from_str(line).unwrap();
        assert_eq!(m["event"], "MIGRATION_PASS");
    }
    let received = complete.len() as u64;
    assert!(
        received < N,
        "the stuck client cannot have received everything"
    );
    for pass in 0..N {
        let e = healthy.event();
        assert_eq!(e["data"]["pass"], pass);
    }
    assert_eq!(healthy.ok("query-status", json!({}))["status"], "running");
}

#[test]
fn many_clients_at_once() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, "tcp:127.0.0.1:0,server,nowait", Protocol::Qmp);
    let addr = srv.local_addr().clone();
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut q = Qmp::ready(&addr);
                for j in 0..50 {
                    let r = q.cmd(json!({"execute": "query-status", "id": [i, j]}));
                    assert_eq!(r["id"], json!([i, j]));
                    assert!(r["return"]["status"].is_string());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(monitor::Backend::run_state(&*vm.vm), RunState::Running);
}

#[test]
fn too_many_clients_are_turned_away_politely() {
    let vm = mock_vm(RunState::Running);
    let srv = serve_with(
        &vm,
        &unix_spec("max"),
        Protocol::Qmp,
        ServeOptions {
            max_clients: 2,
            ..Default::default()
        },
    );
    let _a = Qmp::ready(srv.local_addr());
    let _b = Qmp::ready(srv.local_addr());
    let mut c = Stream::connect(srv.local_addr());
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    assert_eq!(text, "too many monitor clients connected\r\n");
}

/// Someone removes the socket file while the server listens (a cleanup script, a test's
/// scratch directory going away): shutting down must still stop the accept thread rather
/// than wait forever for a wake-up connection that can no longer be made.
#[test]
fn shutdown_returns_when_the_socket_file_is_gone() {
    let vm = mock_vm(RunState::Running);
    let path = sock_path("gone");
    let mut server = serve(&vm, &format!("unix:{},server,nowait", path.display()), Protocol::Hmp);
    let _client = UnixStream::connect(&path).expect("connect");
    std::fs::remove_file(&path).expect("remove the socket file");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.shutdown();
        let _ = tx.send(());
    });
    assert!(rx.recv_timeout(IO_TIMEOUT).is_ok(), "shutdown did not return after the socket file was removed");
}
