//! `-serial file:PATH` writes the guest's console to PATH, as QEMU does, whether the monitor is
//! on stdio (no `-monitor`) or on a socket; stdout then carries no guest output.

mod common;
use common::*;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn wait_file(path: &std::path::Path, pat: &str) -> String {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(pat) {
            return text;
        }
        assert!(t0.elapsed() < T, "{} never showed {pat:?}; it holds:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serial_file_without_monitor_keeps_the_monitor_on_stdio() {
    let dir = tmpdir("serial-file");
    let log = dir.join("console.log");
    let spec = format!("file:{}", log.display());
    let mut vm = Vm::guest(&["-m", "64", "-serial", &spec], "mode=idle hb_ms=50");
    wait_file(&log, "GUEST READY");
    let text = wait_file(&log, "HEARTBEAT");
    assert!(text.contains("HEARTBEAT seq="), "{text}");
    // stdout is the monitor's, not the guest's.
    vm.send(b"info status\n");
    vm.wait_for("VM status: running", T);
    assert!(!vm.seen.iter().any(|l| l.contains("HEARTBEAT") || l.contains("GUEST READY")), "{:?}", vm.seen);
    vm.send(b"quit\n");
    assert_eq!(vm.wait_exit(T), Some(0));
}

#[test]
fn serial_file_with_a_socket_monitor() {
    let dir = tmpdir("serial-file-mon");
    let log = dir.join("console.log");
    let sock = dir.join("m.sock");
    let spec = format!("file:{}", log.display());
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut vm = Vm::guest(&["-m", "64", "-serial", &spec, "-monitor", &mon], "mode=idle hb_ms=50");
    wait_file(&log, "HEARTBEAT");
    let mut hmp = Hmp::connect(&sock);
    assert!(hmp.cmd("info status").contains("running"));
    assert!(!vm.collect_for(Duration::from_millis(300)).iter().any(|l| l.contains("HEARTBEAT")));
    hmp.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
}
