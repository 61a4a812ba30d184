//! QMP over real unix and TCP sockets against the mock VM: greeting, negotiation, queries,
//! stop/cont with STOP/RESUME broadcast to every client, errors, human-monitor-command, jobs,
//! migration events, and event delivery while another client runs a long command.

mod common;

use common::*;
use monitor::{Protocol, RunState};
use serde_json::json;

#[test]
fn greeting_and_negotiation_follow_qemu() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("nego"), Protocol::Qmp);
    let mut q = Qmp::connect(srv.local_addr());
    assert_eq!(
        q.greeting,
        json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "godwit 0.1.0"},
                       "capabilities": []}})
    );
    // Before negotiation every command is refused, as QEMU does.
    let e = q.err("query-status", json!({}));
    assert_eq!(e["class"], "CommandNotFound");
    assert_eq!(
        e["desc"],
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    // Capabilities we do not offer are refused, and negotiation is still possible afterwards.
    let e = q.err("qmp_capabilities", json!({"enable": ["oob"]}));
    assert_eq!(e["class"], "GenericError");
    assert_eq!(
        q.cmd(json!({"execute": "qmp_capabilities", "id": 1})),
        json!({"return": {}, "id": 1})
    );
    let e = q.err("qmp_capabilities", json!({}));
    assert_eq!(e["class"], "CommandNotFound");
    assert_eq!(
        e["desc"],
        "Capabilities negotiation is already complete, command ignored"
    );
}

#[test]
fn queries_and_ids() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, "tcp:127.0.0.1:0,server,nowait", Protocol::Qmp);
    let mut q = Qmp::ready(srv.local_addr());
    assert_eq!(
        q.ok("query-status", json!({})),
        json!({"status": "running", "singlestep": false, "running": true})
    );
    assert_eq!(
        q.ok("query-version", json!({}))["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
    let cmds = q.ok("query-commands", json!({}));
    let names: Vec<&str> = cmds
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in [
        "query-status",
        "stop",
        "cont",
        "human-monitor-command",
        "migrate",
        "query-migrate",
        "snapshot-save",
    ] {
        assert!(names.contains(&n), "query-commands lacks {n}");
    }
    let cpus = q.ok("query-cpus-fast", json!({}));
    assert_eq!(cpus.as_array().unwrap().len(), 2);
    assert_eq!(cpus[1]["cpu-index"], 1);
    // Any JSON value is a valid id and is echoed verbatim, on success and on error.
    for id in [json!("abc"), json!(7), json!({"nested": [1, 2]})] {
        let r = q.cmd(json!({"execute": "query-status", "id": id}));
        assert_eq!(r["id"], id);
        let r = q.cmd(json!({"execute": "no-such-command", "id": id}));
        assert_eq!(r["id"], id);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(
            r["error"]["desc"],
            "The command no-such-command has not been found"
        );
    }
}

#[test]
fn stop_and_cont_reach_every_client_on_every_transport() {
    let vm = mock_vm(RunState::Running);
    let unix = serve(&vm, &unix_spec("bcast"), Protocol::Qmp);
    let tcp = serve(&vm, "tcp:127.0.0.1:0,server,nowait", Protocol::Qmp);
    let mut a = Qmp::ready(unix.local_addr());
    let mut b = Qmp::ready(unix.local_addr());
    let mut c = Qmp::ready(tcp.local_addr());
    // A client that never negotiated gets no events.
    let mut idle = Qmp::connect(tcp.local_addr());

    assert_eq!(a.ok("stop", json!({})), json!({}));
    assert_eq!(c.ok("query-status", json!({}))["status"], "paused");
    for q in [&mut a, &mut b, &mut c] {
        let e = q.event();
        assert_eq!(e["event"], "STOP");
        assert!(e.get("data").is_none());
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(e["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
    }
    // Stopping a stopped VM is fine and emits nothing; cont from another client resumes.
    assert_eq!(b.ok("stop", json!({})), json!({}));
    assert_eq!(c.ok("cont", json!({})), json!({}));
    for q in [&mut a, &mut b, &mut c] {
        assert_eq!(q.event()["event"], "RESUME");
    }
    assert_eq!(a.ok("query-status", json!({}))["running"], true);
    // The un-negotiated client's next message is the reply, not an event.
    let r = idle.cmd(json!({"execute": "qmp_capabilities"}));
    assert_eq!(r, json!({"return": {}}));
    assert!(idle.events.is_empty());
}

#[test]
fn reset_powerdown_and_quit_events() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("life"), Protocol::Qmp);
    let mut q = Qmp::ready(srv.local_addr());
    q.ok("system_reset", json!({}));
    let e = q.event();
    assert_eq!(e["event"], "RESET");
    assert_eq!(
        e["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );

    q.ok("system_powerdown", json!({}));
    assert_eq!(q.event()["event"], "POWERDOWN");
    let e = q.event();
    assert_eq!(
        (e["event"].clone(), e["data"].clone()),
        (
            json!("SHUTDOWN"),
            json!({"guest": true, "reason": "guest-shutdown"})
        )
    );
    assert_eq!(q.event()["event"], "STOP");
    assert_eq!(q.ok("query-status", json!({}))["status"], "shutdown");
    let e = q.err("cont", json!({}));
    assert_eq!(e["desc"], "Resetting the Virtual Machine is required");
    assert_eq!(q.ok("query-status", json!({}))["status"], "shutdown");

    q.ok("quit", json!({}));
    let e = q.event();
    assert_eq!(
        (e["event"].clone(), e["data"].clone()),
        (
            json!("SHUTDOWN"),
            json!({"guest": false, "reason": "host-qmp-quit"})
        )
    );
    assert!(vm.vm.quit_requested());
}

#[test]
fn human_monitor_command_runs_hmp() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("hmc"), Protocol::Qmp);
    let mut q = Qmp::ready(srv.local_addr());
    assert_eq!(
        q.ok(
            "human-monitor-command",
            json!({"command-line": "info status"})
        ),
        "VM status: running\r\n"
    );
    assert_eq!(
        q.ok("human-monitor-command", json!({"command-line": "stop"})),
        ""
    );
    assert_eq!(q.event()["event"], "STOP");
    assert_eq!(
        q.ok(
            "human-monitor-command",
            json!({"command-line": "info status"})
        ),
        "VM status: paused\r\n"
    );
    assert_eq!(
        q.ok("human-monitor-command", json!({"command-line": "bogus"})),
        "unknown command: 'bogus'\r\n"
    );
    let cpus = q.ok(
        "human-monitor-command",
        json!({"command-line": "info cpus", "cpu-index": 1}),
    );
    let cpus = cpus.as_str().unwrap();
    assert!(cpus.starts_with("  CPU #0: thread_id="), "{cpus}");
    assert!(cpus.contains("\r\n* CPU #1: thread_id="), "{cpus}");
    // A foreground migrate cannot block a QMP caller: it continues detached, as in QEMU.
    let out = q.ok(
        "human-monitor-command",
        json!({"command-line": "migrate unix:/nowhere"}),
    );
    assert_eq!(
        out,
        "terminal does not allow synchronous migration, continuing detached\r\n"
    );
    assert_eq!(q.wait_event("MIGRATION")["data"]["status"], "setup");
    assert_eq!(
        q.err("human-monitor-command", json!({}))["desc"],
        "Parameter 'command-line' is missing"
    );
}

#[test]
fn snapshot_jobs_report_through_query_jobs_and_events() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("jobs"), Protocol::Qmp);
    let mut q = Qmp::ready(srv.local_addr());
    let args = json!({"job-id": "save0", "tag": "snap", "vmstate": "disk0", "devices": ["disk0"]});
    assert_eq!(q.ok("snapshot-save", args), json!({}));
    let mut statuses = Vec::new();
    while statuses.last() != Some(&json!("concluded")) {
        let e = q.wait_event("JOB_STATUS_CHANGE");
        assert_eq!(e["data"]["id"], "save0");
        statuses.push(e["data"]["status"].clone());
    }
    assert_eq!(
        statuses,
        [
            json!("created"),
            json!("running"),
            json!("waiting"),
            json!("pending"),
            json!("concluded")
        ]
    );
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(jobs[0]["id"], "save0");
    assert_eq!(jobs[0]["type"], "snapshot-save");
    assert_eq!(jobs[0]["status"], "concluded");
    assert!(jobs[0].get("error").is_none());
    q.ok("job-dismiss", json!({"id": "save0"}));
    assert_eq!(q.ok("query-jobs", json!({})), json!([]));

    // A failing load concludes with the error; the VM keeps running.
    let args = json!({"job-id": "load0", "tag": "nope", "vmstate": "disk0", "devices": ["disk0"]});
    q.ok("snapshot-load", args);
    loop {
        let e = q.wait_event("JOB_STATUS_CHANGE");
        if e["data"]["status"] == "concluded" {
            break;
        }
    }
    let jobs = q.ok("query-jobs", json!({}));
    assert_eq!(
        jobs[0]["error"],
        "Snapshot 'nope' does not exist in one or more devices"
    );
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    // The snapshot exists for HMP too.
    let text = q.ok(
        "human-monitor-command",
        json!({"command-line": "info snapshots"}),
    );
    assert!(text.as_str().unwrap().contains("--        snap "), "{text}");
    assert_eq!(
        q.err("snapshot-save", json!({"job-id": "x"}))["desc"],
        "Parameter 'tag' is missing"
    );
}

#[test]
fn migration_commands_and_events() {
    let vm = mock_vm(RunState::Running);
    let srv = serve(&vm, &unix_spec("mig"), Protocol::Qmp);
    let mut q = Qmp::ready(srv.local_addr());
    assert_eq!(q.ok("query-migrate", json!({})), json!({}));
    q.ok(
        "migrate-set-parameters",
        json!({"downtime-limit": 50, "max-bandwidth": 1_000_000}),
    );
    let p = q.ok("query-migrate-parameters", json!({}));
    assert_eq!(
        (p["downtime-limit"].clone(), p["max-bandwidth"].clone()),
        (json!(50), json!(1_000_000))
    );
    let e = q.err(
        "migrate-set-parameters",
        json!({"cpu-throttle-initial": 100}),
    );
    assert_eq!(
        e["desc"],
        "Parameter 'cpu-throttle-initial' expects an integer in the range of 1 to 99"
    );
    q.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "auto-converge", "state": true}]}),
    );
    let caps = q.ok("query-migrate-capabilities", json!({}));
    assert!(caps
        .as_array()
        .unwrap()
        .contains(&json!({"capability": "auto-converge", "state": true})));

    q.ok("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    let mut statuses = Vec::new();
    let mut passes = Vec::new();
    loop {
        let e = q.event();
        match e["event"].as_str().unwrap() {
            "MIGRATION" => statuses.push(e["data"]["status"].as_str().unwrap().to_string()),
            "MIGRATION_PASS" => passes.push(e["data"]["pass"].as_u64().unwrap()),
            "STOP" => {}
            other => panic!("unexpected event {other}"),
        }
        if statuses.last().map(String::as_str) == Some("completed") {
            break;
        }
    }
    assert_eq!(statuses, ["setup", "active", "completed"]);
    assert_eq!(passes, [1, 2, 3]);
    let info = q.ok("query-migrate", json!({}));
    assert_eq!(info["status"], "completed");
    for k in ["total-time", "setup-time", "downtime"] {
        assert!(info[k].is_u64(), "{k} in {info}");
    }
    for k in [
        "transferred",
        "remaining",
        "total",
        "duplicate",
        "normal",
        "normal-bytes",
        "dirty-pages-rate",
        "dirty-sync-count",
        "mbps",
        "pages-per-second",
    ] {
        assert!(info["ram"].get(k).is_some(), "ram.{k} in {info}");
    }
    assert_eq!(q.ok("query-status", json!({}))["status"], "postmigrate");
    let e = q.err("migrate", json!({"uri": "tcp:h:1", "blk": true}));
    assert!(e["desc"]
        .as_str()
        .unwrap()
        .contains("Block migration is not supported"));
    assert_eq!(
        q.err("migrate", json!({"uri": "carrier-pigeon"}))["desc"],
        "unknown migration protocol: carrier-pigeon"
    );
    assert!(q.ok("query-migrate-forecast", json!({}))["strategies"].is_array());
}

#[test]
fn events_keep_flowing_while_another_client_runs_a_long_command() {
    let vm = mock_vm(RunState::Running);
    let qmp = serve(&vm, &unix_spec("long-q"), Protocol::Qmp);
    let hmp = serve(&vm, &unix_spec("long-h"), Protocol::Hmp);
    let gate = vm.vm.hold_savevm();
    let mut watcher = Qmp::ready(qmp.local_addr());
    let mut saver = Qmp::ready(qmp.local_addr());
    let mut human = Hmp::connect(hmp.local_addr());

    // The HMP client's savevm stops the VM and then blocks inside the backend.
    human.w.write_all(b"savevm held\n").unwrap();
    assert_eq!(watcher.event()["event"], "STOP");
    assert_eq!(saver.event()["event"], "STOP");
    // While it is blocked, other clients are served...
    assert_eq!(watcher.ok("query-status", json!({}))["status"], "save-vm");
    // ...including a second savevm from QMP that will also wait at the gate on its own thread.
    saver.ok(
        "snapshot-save",
        json!({"job-id": "j1", "tag": "t1", "vmstate": "d", "devices": ["d"]}),
    );
    assert_eq!(
        watcher.wait_event("JOB_STATUS_CHANGE")["data"]["status"],
        "created"
    );
    gate.open();
    assert_eq!(human.until_prompt(), "");
    assert_eq!(watcher.wait_event("RESUME")["event"], "RESUME");
    // The queued job's savevm runs next (stopping the VM again): wait until it is done.
    for _ in 0..500 {
        let jobs = watcher.ok("query-jobs", json!({}));
        if jobs.as_array().is_some_and(|a| a.iter().all(|j| j["status"] == "concluded")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(human.cmd("info status"), "VM status: running\n");
}

use std::io::Write as _;

#[test]
fn server_with_wait_starts_only_once_a_client_is_there() {
    let vm = mock_vm(RunState::Running);
    let path = sock_path("wait");
    let spec = format!("unix:{},server", path.display());
    let monitor = vm.monitor.clone();
    let starter = std::thread::spawn(move || {
        let spec = monitor::ChardevSpec::parse(&spec).unwrap();
        monitor::MonitorServer::start(monitor, &spec, Protocol::Qmp, Default::default()).unwrap()
    });
    // The socket appears while start() is still blocked waiting for us.
    let mut tries = 0;
    while !path.exists() {
        tries += 1;
        assert!(tries < 2000, "socket never appeared");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!starter.is_finished());
    let mut q = Qmp::ready(&monitor::ListenAddr::Unix(path.clone()));
    let srv = starter.join().unwrap();
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    // Later clients are served by the accept loop as usual.
    let mut q2 = Qmp::ready(srv.local_addr());
    assert_eq!(q2.ok("query-status", json!({}))["status"], "running");
}
