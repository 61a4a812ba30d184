//! The `monitor-mock` binary as a user runs it: `-nographic` (serial and monitor multiplexed on
//! stdio, `Ctrl-a c` / `Ctrl-a x`), `-qmp tcp:...` with an ephemeral port, and `-qmp stdio`.

mod common;

use common::Qmp;
use monitor::ListenAddr;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_monitor-mock");

/// Collects a child's stdout on a thread so the test can wait for text with a bound.
struct Output {
    rx: mpsc::Receiver<Vec<u8>>,
    seen: String,
}

impl Output {
    fn new(mut r: impl Read + Send + 'static) -> Output {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Output {
            rx,
            seen: String::new(),
        }
    }

    /// Waits until `needle` appears after what earlier calls consumed; returns the text up to
    /// and including it.
    fn expect(&mut self, needle: &str) -> String {
        loop {
            if let Some(i) = self.seen.find(needle) {
                let rest = self.seen.split_off(i + needle.len());
                return std::mem::replace(&mut self.seen, rest);
            }
            match self.rx.recv_timeout(Duration::from_secs(20)) {
                Ok(b) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("never saw {needle:?}; got {:?}", self.seen),
            }
        }
    }
}

fn spawn(args: &[&str]) -> (Child, ChildStdin, Output) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn monitor-mock");
    let stdin = child.stdin.take().unwrap();
    let out = Output::new(child.stdout.take().unwrap());
    (child, stdin, out)
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..400 {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("monitor-mock did not exit");
}

#[test]
fn nographic_console_switches_between_guest_and_monitor() {
    let (mut child, mut stdin, mut out) = spawn(&["-nographic"]);
    stdin.write_all(b"hello\r").unwrap();
    out.expect("guest: hello\r\n");
    stdin.write_all(b"\x01c").unwrap();
    out.expect("type 'help' for more information\r\n(qemu) ");
    stdin.write_all(b"info status\r").unwrap();
    assert_eq!(out.expect("(qemu) "), "VM status: running\r\n(qemu) ");
    stdin.write_all(b"stop\rinfo status\r").unwrap();
    out.expect("VM status: paused\r\n(qemu) ");
    stdin.write_all(b"\x01c").unwrap();
    stdin.write_all(b"back in the guest\n").unwrap();
    out.expect("guest: back in the guest\r\n");
    stdin.write_all(b"\x01h").unwrap();
    out.expect("C-a x    exit\r\n");
    stdin.write_all(b"\x01x").unwrap();
    out.expect("terminated\r\n");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn qmp_on_an_ephemeral_tcp_port_and_quit() {
    let mut child = Command::new(BIN)
        .args(["-qmp", "tcp:127.0.0.1:0,server,nowait", "-S"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn monitor-mock");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("monitor-mock: qmp on tcp:")
        .unwrap_or_else(|| panic!("{line}"));
    let mut q = Qmp::ready(&ListenAddr::Tcp(addr.parse().unwrap()));
    assert_eq!(q.ok("query-status", json!({}))["status"], "prelaunch");
    q.ok("cont", json!({}));
    assert_eq!(q.event()["event"], "RESUME");
    q.ok("quit", json!({}));
    let e = q.event();
    assert_eq!(e["data"]["reason"], "host-qmp-quit");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn qmp_on_stdio() {
    let (mut child, mut stdin, mut out) = spawn(&["-qmp", "stdio"]);
    out.expect("\"capabilities\":[]");
    stdin
        .write_all(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-status\"}")
        .unwrap();
    out.expect("{\"return\":{}}\r\n");
    out.expect("\"status\":\"running\"");
    drop(stdin);
    assert!(wait_exit(&mut child).success());
}
