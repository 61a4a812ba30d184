//! The monitor as seen by a client nobody here wrote: QEMU's own `qemu.qmp` Python package
//! (from PyPI) connects to the mock VM's QMP socket, negotiates, queries, stops and resumes the
//! VM and receives the events. The package must be installed (`pip install qemu.qmp`); if it
//! is not, this test fails saying so.

mod common;

use common::*;
use monitor::{Backend, Event, Protocol, RunState};
use std::process::Command;

#[test]
fn qemu_qmp_python_client_drives_the_monitor() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("pyqmp"), Protocol::Qmp);
    let monitor::ListenAddr::Unix(path) = srv.local_addr().clone() else {
        unreachable!()
    };
    let rx = vm.events.subscribe(64);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/qemu_qmp_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): this test needs Python 3 and `pip install qemu.qmp`")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        panic!("the qemu.qmp Python package is missing: install it with `pip install qemu.qmp`\n{stdout}");
    }
    assert!(
        out.status.success(),
        "qemu.qmp client failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert_eq!(
        stdout.lines().last(),
        Some("QEMU.QMP CLIENT OK"),
        "{stdout}\n{stderr}"
    );
    // What the client did really happened to the VM: one STOP, one RESUME, running again.
    let seen: Vec<Event> = rx.try_iter().map(|r| r.event.clone()).collect();
    assert_eq!(seen, [Event::Stop, Event::Resume]);
    assert_eq!(vm.vm.run_state(), RunState::Running);
}
