//! `-machine none`: no guest at all, only the monitors — what a management layer (libvirt)
//! starts to probe a binary's QMP (`query-machines`, `query-qmp-schema`, ...). The backend
//! keeps a run state for `query-status`/`stop`/`cont` and ends the process on `quit`.

use crate::cli::Options;
use monitor::events::{Event, EventBus};
use monitor::runstate::RunState;
use monitor::{Backend, ChardevSpec, CmdResult, Monitor, MonitorServer, Protocol, ServeOptions, ShutdownCause};
use std::process::ExitCode;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

struct NoMachine {
    state: Mutex<RunState>,
    events: EventBus,
    quit: Mutex<Sender<ShutdownCause>>,
}

impl NoMachine {
    fn set(&self, from: &[RunState], to: RunState, ev: Event) {
        if let Ok(mut s) = self.state.lock() {
            if from.contains(&s) {
                *s = to;
                self.events.emit(ev);
            }
        }
    }
}

impl Backend for NoMachine {
    fn run_state(&self) -> RunState {
        self.state.lock().map(|s| *s).unwrap_or(RunState::InternalError)
    }
    fn stop(&self) -> CmdResult {
        self.set(&[RunState::Running], RunState::Paused, Event::Stop);
        Ok(())
    }
    fn cont(&self) -> CmdResult {
        self.set(&[RunState::Paused, RunState::Prelaunch], RunState::Running, Event::Resume);
        Ok(())
    }
    fn quit(&self, cause: ShutdownCause) -> CmdResult {
        // The answer first, then SHUTDOWN (see `run`), as QEMU.
        if let Ok(q) = self.quit.lock() {
            let _ = q.send(cause);
        }
        Ok(())
    }
    /// The capabilities a guest started from this binary would offer, all off: what a
    /// probe reads to learn which ones exist.
    fn query_migrate_capabilities(&self) -> Result<Vec<monitor::CapabilityStatus>, monitor::CommandError> {
        Ok(monitor::MigrationCapability::ALL
            .iter()
            .map(|&capability| monitor::CapabilityStatus { capability, state: false })
            .collect())
    }
    fn query_cpus(&self) -> Result<Vec<monitor::CpuInfo>, monitor::CommandError> {
        Ok(Vec::new())
    }
}

fn start_servers(mon: &Arc<Monitor>, opts: &Options) -> Result<Vec<MonitorServer>, String> {
    let mut servers = Vec::new();
    for (specs, protocol, flag) in [(&opts.qmps, Protocol::Qmp, "-qmp"), (&opts.monitors, Protocol::Hmp, "-monitor")] {
        for spec in specs {
            let parsed = ChardevSpec::parse(spec).map_err(|e| format!("{flag} {spec}: {e}"))?;
            match parsed {
                ChardevSpec::None | ChardevSpec::Null => {}
                ChardevSpec::Stdio | ChardevSpec::MonStdio => {
                    return Err(format!("{flag} {spec}: -machine none serves its monitors on sockets only"))
                }
                other => servers.push(
                    MonitorServer::start(mon.clone(), &other, protocol, ServeOptions::default())
                        .map_err(|e| format!("{flag} {spec}: {e}"))?,
                ),
            }
        }
    }
    servers.extend(crate::compat::start_mons(mon, &opts.compat)?);
    if servers.is_empty() {
        return Err("-machine none needs a monitor socket (-qmp unix:PATH,server,nowait or -mon)".into());
    }
    Ok(servers)
}

/// Runs until `quit`. Errors before the monitors listen are returned (the caller prints them).
pub fn run(opts: &Options) -> Result<ExitCode, String> {
    if opts.kernel.is_some() || !opts.drives.is_empty() || !opts.devices.is_empty() || !opts.netdevs.is_empty() {
        return Err("-machine none runs no guest: -kernel, drives and devices need -machine microvm".into());
    }
    let ready = if opts.compat.daemonize { Some(crate::daemon::daemonize()?) } else { None };
    if let Some(p) = &opts.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pid file '{}': {e}", p.display()))?;
    }
    let events = EventBus::new();
    let (tx, rx) = channel();
    let initial = if opts.start_paused { RunState::Prelaunch } else { RunState::Running };
    let backend = Arc::new(NoMachine { state: Mutex::new(initial), events: events.clone(), quit: Mutex::new(tx) });
    let mon = Monitor::new(backend, events.clone());
    let servers = start_servers(&mon, opts).inspect_err(|_| {
        if let Some(p) = &opts.pidfile {
            let _ = std::fs::remove_file(p);
        }
    })?;
    if let Some(r) = ready {
        r.done();
    }
    if let Ok(reason) = rx.recv() {
        let limit = std::time::Duration::from_secs(2);
        monitor::flush::wait_sent(limit);
        events.emit(Event::Shutdown { guest: false, reason });
        monitor::flush::wait_sent(limit);
    }
    drop(servers);
    if let Some(p) = &opts.pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(ExitCode::SUCCESS)
}
