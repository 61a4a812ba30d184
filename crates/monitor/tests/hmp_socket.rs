//! HMP over real unix and TCP sockets against the mock VM: banner and prompt, the QEMU text of
//! each command, errors on one line with the VM untouched, memory dumps, snapshots, migration,
//! and a backend that implements only the required methods.

mod common;

use common::*;
use monitor::mock::mock_memory_byte;
use monitor::{Backend, CmdResult, EventBus, Monitor, Protocol, RunState, ShutdownCause};
use std::sync::{Arc, Mutex};

#[test]
fn banner_prompt_status_stop_cont() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("basic"), Protocol::Hmp);
    let mut h = Hmp::connect(srv.local_addr());
    assert!(
        h.banner.contains("monitor") && h.banner.contains("type 'help'"),
        "{}",
        h.banner
    );
    assert_eq!(h.cmd("info status"), "VM status: running\n");
    assert_eq!(h.cmd("stop"), "");
    assert_eq!(h.cmd("info status"), "VM status: paused\n");
    assert_eq!(h.cmd("c"), "");
    assert_eq!(h.cmd("info status"), "VM status: running\n");
    assert_eq!(h.cmd(""), "");
    assert_eq!(h.cmd("info version"), "7.2.0 (godwit 0.1.0)\n");
    let cpus = h.cmd("info cpus");
    assert!(
        cpus.starts_with("* CPU #0: thread_id=") && cpus.contains("\n  CPU #1: thread_id="),
        "{cpus}"
    );
    assert_eq!(h.cmd("cpu 1"), "");
    assert!(h.cmd("info cpus").contains("\n* CPU #1"));
    assert_eq!(h.cmd("cpu 7"), "Error: invalid CPU index\n");
}

#[test]
fn errors_are_one_line_and_leave_the_vm_alone() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, "tcp:127.0.0.1:0,server,nowait", Protocol::Hmp);
    let mut h = Hmp::connect(srv.local_addr());
    let rx = vm.events.subscribe(64);
    for (line, want) in [
        ("foo", "unknown command: 'foo'\n"),
        ("info bar", "unknown command: 'info bar'\n"),
        (
            "stop please",
            "stop: extraneous characters at the end of line\n",
        ),
        ("loadvm", "loadvm: missing argument\n"),
        ("x /4z 0", "invalid char in format: 'z'\n"),
        ("x /4i 0", "instruction disassembly (/i) is not supported\n"),
        ("xp /1x 1+", "xp: unexpected end of expression\n"),
        (
            "migrate_set_parameter downtime-limit soon",
            "Parameter 'downtime-limit' expects a non-negative integer, got 'soon'\n",
        ),
        ("migrate_set_parameter warp 9", "Invalid parameter 'warp'\n"),
        (
            "migrate_set_capability auto-converge sometimes",
            "migrate_set_capability: expected 'on' or 'off', got 'sometimes'\n",
        ),
        ("savevm \"unterminated", "savevm: unterminated string\n"),
        (
            "loadvm missing",
            "Error: Snapshot 'missing' does not exist in one or more devices\n",
        ),
        (
            "migrate nowhere",
            "Error: unknown migration protocol: nowhere\n",
        ),
    ] {
        assert_eq!(h.cmd(line), want, "for {line:?}");
    }
    assert_eq!(h.cmd("info status"), "VM status: running\n");
    assert!(rx.try_recv().is_err(), "no event may have been emitted");
}

#[test]
fn help_texts() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("help"), Protocol::Hmp);
    let mut h = Hmp::connect(srv.local_addr());
    let all = h.cmd("help");
    for needle in [
        "cont|c  -- resume emulation",
        "quit|q  -- quit the emulator",
        "x /fmt addr --",
        "savevm [tag] --",
        "migrate [-d] [-r [file]] uri --",
        "migrate_set_capability capability state --",
    ] {
        assert!(all.contains(needle), "help lacks {needle:?}");
    }
    let info = h.cmd("info");
    assert!(info.contains("info status  -- show the current VM status"));
    assert!(info.contains("info migrate_parameters  --"));
    assert_eq!(h.cmd("help info"), info);
    assert_eq!(h.cmd("help stop"), "stop|s  -- stop emulation\n");
    assert_eq!(h.cmd("? nope"), "unknown command: 'nope'\n");
}

#[test]
fn memory_dumps() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("dump"), Protocol::Hmp);
    let mut h = Hmp::connect(srv.local_addr());
    let b = |a: usize| mock_memory_byte(a);
    let expected_bytes: Vec<String> = (0x100..0x10a).map(|a| format!("0x{:02x}", b(a))).collect();
    assert_eq!(
        h.cmd("xp /10xb 0x100"),
        format!(
            "0000000000000100: {}\n000000000000010{}: {}\n",
            expected_bytes[..8].join(" "),
            8,
            expected_bytes[8..].join(" ")
        )
    );
    let word = u32::from_le_bytes([b(0x200), b(0x201), b(0x202), b(0x203)]);
    assert_eq!(
        h.cmd("x /1xw 0x200"),
        format!("0000000000000200: 0x{word:08x}\n")
    );
    // Format and size are remembered; count defaults to 1.
    assert_eq!(
        h.cmd("x 0x200"),
        format!("0000000000000200: 0x{word:08x}\n")
    );
    assert_eq!(h.cmd("x/2u 0x100"), {
        let w0 = u32::from_le_bytes([b(0x100), b(0x101), b(0x102), b(0x103)]);
        let w1 = u32::from_le_bytes([b(0x104), b(0x105), b(0x106), b(0x107)]);
        format!("0000000000000100: {w0:>10} {w1:>10}\n")
    });
    // The readable part is printed, then QEMU's message for the rest.
    let out = h.cmd("xp /4xg 0xfff0");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("000000000000fff0: 0x"));
    assert_eq!(lines[1], "0000000000010000: Cannot access memory");
    assert_eq!(
        h.cmd("x /1x 0x100000000"),
        "0000000100000000: Cannot access memory\n"
    );
    assert!(h
        .cmd("x /999999999xg 0")
        .contains("too much memory requested"));
}

#[test]
fn snapshots_and_their_table() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("snap"), Protocol::Hmp);
    let mut h = Hmp::connect(srv.local_addr());
    assert_eq!(h.cmd("info snapshots"), "There is no snapshot available.\n");
    vm.vm.poke(0x10, b"before");
    assert_eq!(h.cmd("savevm first"), "");
    vm.vm.poke(0x10, b"after!");
    assert_eq!(h.cmd("savevm"), "");
    let table = h.cmd("info snapshots");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "List of snapshots present on all disks:");
    assert_eq!(
        lines[1],
        "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
    );
    assert!(
        lines[2].starts_with("--        first              64 KiB 2"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("--        vm-2"),
        "savevm without a tag gets vm-DATE: {table}"
    );
    assert_eq!(lines.len(), 4);
    assert_eq!(h.cmd("loadvm first"), "");
    assert_eq!(
        h.cmd("xp /6c 0x10"),
        "0000000000000010: 'b' 'e' 'f' 'o' 'r' 'e'\n"
    );
    assert_eq!(h.cmd("info status"), "VM status: running\n");
    assert_eq!(h.cmd("delvm first"), "");
    assert_eq!(h.cmd("delvm first"), "Error: Snapshot 'first' not found\n");
    assert_eq!(h.cmd("info snapshots").lines().count(), 3);
}

#[test]
fn migration_in_the_foreground_and_detached() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("mig"), Protocol::Hmp);
    let mut h = Hmp::connect(srv.local_addr());
    assert_eq!(h.cmd("migrate_set_parameter downtime-limit 40"), "");
    assert_eq!(h.cmd("migrate_set_parameter max-bandwidth 64M"), "");
    let params = h.cmd("info migrate_parameters");
    assert!(params.contains("downtime-limit: 40 ms\n"), "{params}");
    assert!(
        params.contains("max-bandwidth: 67108864 bytes/second\n"),
        "{params}"
    );
    assert_eq!(h.cmd("migrate_set_capability auto-converge on"), "");
    assert!(h
        .cmd("info migrate_capabilities")
        .contains("auto-converge: on\n"));
    assert_eq!(h.cmd("info migrate"), "capabilities: xbzrle: off rdma-pin-all: off auto-converge: on zero-blocks: off compress: off events: off postcopy-ram: off x-colo: off release-ram: off block: off return-path: off pause-before-switchover: off multifd: off dirty-bitmaps: off postcopy-blocktime: off late-block-activate: off x-ignore-shared: off validate-uuid: off background-snapshot: off zero-copy-send: off postcopy-preempt: off \n");

    // Foreground: returns when the migration has settled, with its outcome.
    let out = h.cmd("migrate tcp:127.0.0.1:1");
    assert!(out.contains("migrate: completed, total time "), "{out}");
    assert_eq!(h.cmd("info status"), "VM status: paused (postmigrate)\n");
    let info = h.cmd("info migrate");
    for needle in [
        "\nMigration status: completed\n",
        "\ntotal time: ",
        "\ndowntime: 4 ms\n",
        "\nsetup: 1 ms\n",
        "\ntransferred ram: ",
        "\nthroughput: ",
        "\nremaining ram: ",
        "\ntotal ram: 1048576 kbytes\n",
        "\nduplicate: 200000 pages\n",
        "\nnormal: ",
        "\ndirty sync count: 3\n",
        "\npages-per-second: ",
    ] {
        assert!(
            info.contains(needle),
            "info migrate lacks {needle:?}:\n{info}"
        );
    }
    // A failing one reports QEMU-style.
    assert_eq!(h.cmd("c"), "");
    assert_eq!(
        h.cmd("migrate fail:x"),
        "migrate: mock: the destination went away\n"
    );
    assert!(h
        .cmd("info migrate")
        .contains("Migration status: failed (mock: the destination went away)\n"));
    assert_eq!(h.cmd("info status"), "VM status: running\n");
    // Detached: returns at once; cancel stops it.
    let gate = vm.vm.hold_migration();
    assert_eq!(h.cmd("migrate -d tcp:127.0.0.1:1"), "");
    assert_eq!(
        h.cmd("migrate -d tcp:127.0.0.1:1"),
        "Error: There's a migration process in progress\n"
    );
    assert_eq!(h.cmd("migrate_cancel"), "");
    gate.open();
    let mut status = String::new();
    for _ in 0..1000 {
        status = h.cmd("info migrate");
        if status.contains("Migration status: cancelled") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(status.contains("Migration status: cancelled"), "{status}");
    assert_eq!(h.cmd("info status"), "VM status: running\n");
    let fc = h.cmd("info migrate_forecast");
    assert!(fc.contains("precopy: converges"), "{fc}");
    assert_eq!(
        h.cmd("migrate_start_postcopy"),
        "Error: Enable postcopy with migrate_set_capability before the start of migration\n"
    );
}

/// A backend with only the required methods: everything else answers "not supported yet".
struct Minimal {
    state: Mutex<RunState>,
    quits: Mutex<Vec<ShutdownCause>>,
}

impl Backend for Minimal {
    fn run_state(&self) -> RunState {
        *self.state.lock().unwrap()
    }
    fn stop(&self) -> CmdResult {
        *self.state.lock().unwrap() = RunState::Paused;
        Ok(())
    }
    fn cont(&self) -> CmdResult {
        *self.state.lock().unwrap() = RunState::Running;
        Ok(())
    }
    fn quit(&self, cause: ShutdownCause) -> CmdResult {
        self.quits.lock().unwrap().push(cause);
        Ok(())
    }
}

#[test]
fn unimplemented_backend_commands_say_so() {
    let backend = Arc::new(Minimal {
        state: Mutex::new(RunState::Running),
        quits: Mutex::new(vec![]),
    });
    let events = EventBus::new();
    let monitor = Monitor::new(backend.clone(), events);
    let spec = monitor::ChardevSpec::parse(&unix_spec("minimal")).unwrap();
    let srv =
        monitor::MonitorServer::start(monitor, &spec, Protocol::Hmp, Default::default()).unwrap();
    let mut h = Hmp::connect(srv.local_addr());
    for (line, name) in [
        ("savevm a", "savevm"),
        ("loadvm a", "loadvm"),
        ("delvm a", "delvm"),
        ("info snapshots", "info snapshots"),
        ("migrate tcp:h:1", "migrate"),
        ("migrate_cancel", "migrate_cancel"),
        ("info migrate", "query-migrate"),
        ("info migrate_parameters", "query-migrate-parameters"),
        (
            "migrate_set_parameter downtime-limit 1",
            "migrate-set-parameters",
        ),
        (
            "migrate_set_capability xbzrle on",
            "migrate-set-capabilities",
        ),
        ("info migrate_capabilities", "query-migrate-capabilities"),
        ("migrate_start_postcopy", "migrate-start-postcopy"),
        ("migrate_recover tcp:h:1", "migrate-recover"),
        ("migrate_incoming tcp:h:1", "migrate-incoming"),
        ("info migrate_forecast", "query-migrate-forecast"),
        ("x /1x 0", "x"),
        ("system_reset", "system_reset"),
        ("info cpus", "query-cpus-fast"),
    ] {
        assert_eq!(
            h.cmd(line),
            format!("Error: Command '{name}' is not supported by this VM yet\n"),
            "{line}"
        );
    }
    assert_eq!(h.cmd("info status"), "VM status: running\n");
    assert_eq!(h.cmd("q"), "");
    assert_eq!(*backend.quits.lock().unwrap(), [ShutdownCause::HostQmpQuit]);
}
