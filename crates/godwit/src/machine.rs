//! The running machine as the monitor sees it: implements `monitor::Backend` on top of the VM,
//! keeps QEMU's run state, runs outgoing migrations on their own thread and serves incoming
//! ones. One command layer: HMP and QMP both end up here.

use crate::drives::SharedDisk;
use crate::vmglue::VmHandle;
use devices::{VmEvents, VmRequest};
use migration::sender::{self, Shared};
use migration::stats::{Params, Stats, Status};
use migration::transport::Uri;
use monitor::backend::{Backend, CmdResult};
use monitor::command::{MigrateArgs, SnapshotRequest};
use monitor::error::CommandError;
use monitor::events::{Event, EventBus};
use monitor::migration::{
    CapabilityStatus, MigrationCapability, MigrationForecast, MigrationInfo, MigrationParameters, MigrationStrategy,
    RamStats,
};
use monitor::runstate::{RunState, RunStateMachine};
use monitor::types::{CpuInfo, MemorySpace, MigrationStatus, ShutdownCause, SnapshotInfo, VersionInfo};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vmm::Vm;

pub struct Machine {
    pub vm: Arc<Vm>,
    pub state: Arc<RunStateMachine>,
    pub events: EventBus,
    pub mig: Arc<Shared>,
    mig_thread: Mutex<Option<JoinHandle<()>>>,
    requests: VmEvents,
    pub disks: Vec<SharedDisk>,
    /// An incoming migration listener was started (`-incoming URI` or `migrate-incoming`).
    pub incoming_started: std::sync::atomic::AtomicBool,
    /// Why `quit` was asked (its SHUTDOWN event is sent at exit, after the answer).
    quit_cause: Mutex<Option<ShutdownCause>>,
    /// Run the guest when an incoming migration completes; `-S` clears it (QEMU's autostart).
    pub autostart: std::sync::atomic::AtomicBool,
    /// How NICs are announced after a migration or `loadvm` (`announce-*` parameters).
    pub announce: Arc<Mutex<net::AnnounceParams>>,
    /// Migration capabilities the engine's parameters do not keep (`events`, inherent ones).
    pub caps: crate::capabilities::Caps,
    /// A failed migration left the source fenced (paused, disks released) after the final
    /// state was sent: `cont` must take the disks back first.
    fenced: std::sync::atomic::AtomicBool,
}

fn status_of(s: Status) -> MigrationStatus {
    match s {
        Status::None => MigrationStatus::None,
        Status::Setup => MigrationStatus::Setup,
        Status::Active => MigrationStatus::Active,
        Status::Device => MigrationStatus::Device,
        Status::Cancelling => MigrationStatus::Cancelling,
        Status::Cancelled => MigrationStatus::Cancelled,
        Status::Completed => MigrationStatus::Completed,
        Status::Failed => MigrationStatus::Failed,
        Status::PostcopyActive => MigrationStatus::PostcopyActive,
        Status::PostcopyPaused => MigrationStatus::PostcopyPaused,
        Status::PostcopyRecover => MigrationStatus::PostcopyRecover,
        Status::PreSwitchover => MigrationStatus::PreSwitchover,
    }
}

/// `query-migrate` data from the engine's statistics.
pub fn migration_info(st: &Stats) -> MigrationInfo {
    if st.status == Status::None {
        return MigrationInfo::default();
    }
    let done = st.status == Status::Completed || st.status == Status::PostcopyActive;
    MigrationInfo {
        status: Some(status_of(st.status)),
        total_time: Some(st.live_total_ms()),
        setup_time: Some(st.setup_time_ms),
        expected_downtime: (!done).then_some(st.expected_downtime_ms),
        downtime: done.then_some(st.downtime_ms.round() as u64),
        error_desc: st.error.clone(),
        cpu_throttle_percentage: (st.cpu_throttle_percentage > 0).then_some(st.cpu_throttle_percentage),
        ram: Some(RamStats {
            transferred: st.transferred,
            remaining: st.remaining,
            total: st.total,
            duplicate: st.duplicate,
            normal: st.normal,
            normal_bytes: st.normal_bytes,
            dirty_pages_rate: st.dirty_pages_rate,
            mbps: st.mbps,
            dirty_sync_count: st.dirty_sync_count,
            page_size: 4096,
            pages_per_second: st.pages_per_second,
            precopy_bytes: st.transferred.saturating_sub(st.postcopy_bytes),
            postcopy_requests: st.postcopy_requests,
            postcopy_bytes: st.postcopy_bytes,
            multifd_bytes: st.multifd_bytes,
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Machine {
    pub fn new(vm: Arc<Vm>, initial: RunState, events: EventBus, disks: Vec<SharedDisk>) -> Arc<Machine> {
        let requests = vm.events();
        Arc::new(Machine {
            vm,
            state: Arc::new(RunStateMachine::new(initial, events.clone())),
            events,
            mig: Shared::new(),
            mig_thread: Mutex::new(None),
            requests,
            disks,
            incoming_started: std::sync::atomic::AtomicBool::new(false),
            autostart: std::sync::atomic::AtomicBool::new(true),
            quit_cause: Mutex::new(None),
            announce: Arc::new(Mutex::new(net::AnnounceParams::default())),
            caps: Default::default(),
            fenced: Default::default(),
        })
    }

    pub fn handle(&self) -> VmHandle {
        VmHandle {
            vm: self.vm.clone(),
            state: self.state.clone(),
            disks: self.disks.clone(),
            announce: self.announce.clone(),
            autostart: self.autostart.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// At exit, in QEMU's order: the monitors' answers (`quit`'s `{"return": {}}`) are written,
    /// then the SHUTDOWN event of a `quit` — each wait bounded, for clients that do not read.
    pub fn before_exit(&self) {
        const LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
        monitor::flush::wait_sent(LIMIT);
        let cause = self.quit_cause.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reason) = cause {
            self.events.emit(Event::Shutdown { guest: false, reason });
            monitor::flush::wait_sent(LIMIT);
        }
    }

    /// The current announcement parameters.
    pub fn announce_params(&self) -> net::AnnounceParams {
        *self.announce.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn migration_running(&self) -> bool {
        self.mig.stats().status.is_running()
    }

    /// Starts an outgoing migration on its own thread.
    pub fn start_migration(self: &Arc<Self>, uri: &str, report: Option<std::path::PathBuf>) -> CmdResult {
        // A lazy loadvm still filling RAM finishes first (the page map must see every page).
        crate::lazyload::settle().map_err(CommandError::generic)?;
        let uri = crate::compat::resolve_fd_uri(self, uri)?;
        let uri = Uri::parse(&uri).map_err(|e| CommandError::generic(e.to_string()))?;
        if self.migration_running() {
            return Err(CommandError::generic("There's a migration process in progress"));
        }
        if self.state.get() != RunState::Running && self.state.get() != RunState::Paused {
            return Err(CommandError::generic(format!("cannot migrate a VM in state {}", self.state.get().as_str())));
        }
        let was_paused = self.state.get() == RunState::Paused;
        if self.mig.params().strategy_auto && !was_paused {
            // Forecast first; plain pre-copy when it converges, auto-converge when only that does.
            // Post-copy instead when pre-copy cannot converge and this host can serve it.
            let (_, choice) = crate::forecast::forecast(self).map_err(CommandError::generic)?;
            let mut p = self.mig.params.lock().unwrap_or_else(|p| p.into_inner());
            p.auto_converge = choice == crate::forecast::Choice::AutoConverge;
            p.postcopy_auto_start = choice == crate::forecast::Choice::Postcopy;
            if p.postcopy_auto_start {
                p.postcopy = true;
            }
            tracing::info!("strategy auto: {choice:?}");
        }
        self.mig.postcopy_start.store(false, std::sync::atomic::Ordering::SeqCst);
        // Mark the start before the thread runs so a query right after `migrate` sees it.
        self.mig.stats.lock().unwrap_or_else(|p| p.into_inner()).status = Status::Setup;
        // As QEMU, MIGRATION "setup" goes out before `migrate` returns: libvirt follows the job
        // by events alone and takes a reply with no status yet for a job that is not active.
        if self.caps.events() {
            self.events.emit(Event::Migration { status: MigrationStatus::Setup });
        }
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                let h = me.handle();
                let ev = me.events.clone();
                // MIGRATION / MIGRATION_PASS only with the `events` capability, as QEMU.
                let res = sender::migrate(&h, &uri, &me.mig, &|e| match e {
                    _ if !me.caps.events() => {}
                    sender::Event::Status(Status::Setup) => {} // sent above
                    sender::Event::Status(s) => ev.emit(Event::Migration { status: status_of(s) }),
                    sender::Event::Pass(p) => ev.emit(Event::MigrationPass { pass: p }),
                });
                match res {
                    // Postmigrate was set before `completed` was published (vmglue).
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!("migration failed: {e}");
                        if me.state.get() == RunState::FinishMigrate {
                            // The sender's fence kept the guest paused (see sender::roll_back).
                            me.fenced.store(true, std::sync::atomic::Ordering::SeqCst);
                            me.state.force(RunState::Paused);
                        }
                        if was_paused && me.state.get() == RunState::Running {
                            me.vm.pause();
                            me.state.force(RunState::Paused);
                        }
                    }
                }
                if let Some(path) = report {
                    if let Err(e) = crate::report::write(&path, &me.mig.stats()) {
                        tracing::warn!("cannot write migration report {}: {e}", path.display());
                    }
                }
            })
            .map_err(|e| CommandError::generic(e.to_string()))?;
        if let Some(old) = self.mig_thread.lock().unwrap_or_else(|p| p.into_inner()).replace(t) {
            let _ = old.join();
        }
        Ok(())
    }
}

/// `Backend` is implemented on `Arc<Machine>` holder so commands can start threads.
pub struct MachineBackend(pub Arc<Machine>);

impl Backend for MachineBackend {
    fn run_state(&self) -> RunState {
        self.0.state.get()
    }

    fn stop(&self) -> CmdResult {
        let m = &self.0;
        m.state
            .update(|s| match s {
                RunState::Running => {
                    m.vm.pause();
                    Ok(RunState::Paused)
                }
                other => Ok::<_, CommandError>(other),
            })
            .map(|_| ())
    }

    fn cont(&self) -> CmdResult {
        let m = &self.0;
        m.state
            .update(|s| match s {
                RunState::Paused if m.fenced.load(std::sync::atomic::Ordering::SeqCst) => {
                    // After a fenced migration the disks were handed over: take them back, or
                    // refuse while the destination holds them.
                    for d in &m.disks {
                        d.reacquire().map_err(|e| {
                            CommandError::generic(format!("cannot resume: the disks are in use elsewhere ({e})"))
                        })?;
                    }
                    m.fenced.store(false, std::sync::atomic::Ordering::SeqCst);
                    m.vm.resume();
                    Ok(RunState::Running)
                }
                RunState::Paused | RunState::Prelaunch | RunState::IoError => {
                    // Stopped on a disk error: the disks retry the requests they kept.
                    crate::ioerror::clear();
                    m.vm.resume();
                    Ok(RunState::Running)
                }
                RunState::Running => Ok(RunState::Running),
                RunState::Inmigrate => Err(CommandError::generic("the VM starts when the incoming migration completes")),
                s if s.needs_reset() => Err(CommandError::generic("Resetting the Virtual Machine is required")),
                s => Err(CommandError::generic(format!("cannot continue a VM in state {}", s.as_str()))),
            })
            .map(|_| ())
    }

    fn quit(&self, cause: ShutdownCause) -> CmdResult {
        // The SHUTDOWN event follows the answer (`Machine::before_exit`), as in QEMU.
        *self.0.quit_cause.lock().unwrap_or_else(|p| p.into_inner()) = Some(cause);
        self.0.requests.send(VmRequest::Quit);
        Ok(())
    }

    fn query_network(&self) -> Result<Vec<monitor::types::NicInfo>, CommandError> {
        Ok(self
            .0
            .vm
            .nic_info()
            .into_iter()
            .enumerate()
            .map(|(i, n)| monitor::types::NicInfo {
                name: format!("net{i}"),
                model: "virtio-net-device".into(),
                macaddr: n.mac.to_string(),
                backend: "tap".into(),
                ifname: n.ifname,
                rx_frames: n.counters.rx_frames,
                tx_frames: n.counters.tx_frames,
                rx_dropped: n.counters.rx_dropped,
                tx_dropped: n.counters.tx_dropped,
                announces: n.counters.announces,
            })
            .collect())
    }

    fn announce_self(&self, a: &monitor::command::AnnounceArgs) -> CmdResult {
        let mut p = self.0.announce_params();
        let check = |name: &str, v: Option<u64>, lo: u64, hi: u64| match v {
            Some(v) if !(lo..=hi).contains(&v) => Err(CommandError::generic(format!(
                "Parameter '{name}' expects an integer in the range of {lo} to {hi}"
            ))),
            _ => Ok(v),
        };
        if let Some(v) = check("rounds", a.rounds, 0, 1000)? {
            p.rounds = v as u32;
        }
        if let Some(v) = check("initial", a.initial, 0, 100_000)? {
            p.initial_ms = v;
        }
        if let Some(v) = check("max", a.max, 0, 100_000)? {
            p.max_ms = v;
        }
        if let Some(v) = check("step", a.step, 1, 10_000)? {
            p.step_ms = v;
        }
        self.0.vm.announce(p);
        Ok(())
    }

    fn system_reset(&self) -> CmdResult {
        self.0.vm.reset().map_err(|e| CommandError::generic(e.to_string()))?;
        self.0.events.emit(Event::Reset { guest: false, reason: ShutdownCause::HostQmpSystemReset });
        Ok(())
    }

    fn system_powerdown(&self) -> CmdResult {
        self.0.vm.press_power_button();
        self.0.events.emit(Event::Powerdown);
        Ok(())
    }

    fn version(&self) -> VersionInfo {
        VersionInfo::default()
    }

    fn query_cpus(&self) -> Result<Vec<CpuInfo>, CommandError> {
        Ok((0..self.0.vm.vcpu_count()).map(|i| CpuInfo::new(i as u32, crate::compat::vcpu_thread_id(i))).collect())
    }

    fn read_memory(&self, space: MemorySpace, addr: u64, buf: &mut [u8]) -> CmdResult {
        let phys = match space {
            MemorySpace::Physical => Some(addr),
            MemorySpace::Virtual { cpu } => self.0.vm.translate(cpu as usize, addr),
        };
        let src = phys
            .and_then(|p| self.0.vm.ram().host_slice(p, buf.len() as u64))
            .ok_or_else(|| CommandError::generic(format!("Cannot access memory at {addr:#x}")))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn snapshot_save(&self, req: &SnapshotRequest) -> CmdResult {
        crate::snapshots::save(&self.0, &req.tag)
    }

    fn snapshot_load(&self, req: &SnapshotRequest) -> CmdResult {
        crate::snapshots::load(&self.0, &req.tag)
    }

    fn snapshot_delete(&self, req: &SnapshotRequest) -> CmdResult {
        crate::snapshots::delete(&self.0, &req.tag)
    }

    fn query_snapshots(&self) -> Result<Vec<SnapshotInfo>, CommandError> {
        crate::snapshots::list(&self.0)
    }

    fn migrate(&self, args: &MigrateArgs) -> CmdResult {
        if args.resume {
            return self.0.mig.recover(&args.uri).map_err(CommandError::generic);
        }
        self.0.start_migration(&args.uri, args.report_file.clone())
    }

    fn block(&self, cmd: &monitor::block::BlockCommand) -> Result<serde_json::Value, CommandError> {
        crate::storage::block(&self.0, cmd)
    }

    fn start_mirror(
        &self,
        args: &monitor::block::MirrorArgs,
    ) -> Result<Arc<dyn monitor::jobs::BlockJobDriver>, CommandError> {
        crate::storage::start_mirror(&self.0, args)
    }

    fn migrate_incoming(&self, uri: &str) -> CmdResult {
        if self.0.state.get() != RunState::Inmigrate {
            return Err(CommandError::generic("The incoming migration is only allowed with -incoming defer"));
        }
        if self.0.incoming_started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(CommandError::generic("The incoming migration has already been started"));
        }
        crate::incoming::start(&self.0, uri).map_err(|e| {
            self.0.incoming_started.store(false, std::sync::atomic::Ordering::SeqCst);
            CommandError::generic(e)
        })
    }

    fn migrate_cancel(&self) -> CmdResult {
        use migration::stats::Status as S;
        if matches!(self.0.mig.stats().status, S::PostcopyActive | S::PostcopyPaused | S::PostcopyRecover) {
            return Err(CommandError::generic("post-copy cannot be cancelled: the guest runs on the destination"));
        }
        self.0.mig.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn query_migrate(&self) -> Result<MigrationInfo, CommandError> {
        Ok(migration_info(&self.0.mig.stats()))
    }

    fn migrate_set_parameters(&self, p: &MigrationParameters) -> CmdResult {
        {
            let mut a = self.0.announce.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = p.announce_rounds {
                a.rounds = v as u32;
            }
            if let Some(v) = p.announce_initial {
                a.initial_ms = v;
            }
            if let Some(v) = p.announce_max {
                a.max_ms = v;
            }
            if let Some(v) = p.announce_step {
                a.step_ms = v;
            }
        }
        let mut params = self.0.mig.params.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = p.downtime_limit {
            params.downtime_limit_ms = d;
        }
        if let Some(b) = p.max_bandwidth {
            params.max_bandwidth = b;
        }
        if let Some(b) = p.max_postcopy_bandwidth {
            params.max_postcopy_bandwidth = b;
        }
        crate::transport_params::set(&mut params, p);
        if let Some(v) = p.cpu_throttle_initial {
            params.throttle_initial = v as u8;
        }
        if let Some(v) = p.cpu_throttle_increment {
            params.throttle_increment = v as u8;
        }
        if let Some(v) = p.max_cpu_throttle {
            params.throttle_max = v as u8;
        }
        match p.strategy {
            Some(MigrationStrategy::Auto) => params.strategy_auto = true,
            Some(MigrationStrategy::Precopy) => {
                params.strategy_auto = false;
                params.auto_converge = false;
                params.postcopy_auto_start = false;
            }
            Some(MigrationStrategy::AutoConverge) => {
                params.strategy_auto = false;
                params.auto_converge = true;
                params.postcopy_auto_start = false;
            }
            Some(MigrationStrategy::Postcopy) => {
                params.strategy_auto = false;
                params.auto_converge = false;
                params.postcopy = true;
                params.postcopy_auto_start = true;
            }
            None => {}
        }
        Ok(())
    }

    fn migrate_start_postcopy(&self) -> CmdResult {
        self.0.mig.start_postcopy().map_err(CommandError::generic)
    }

    fn migrate_recover(&self, uri: &str) -> CmdResult {
        self.0.mig.recover(uri).map_err(CommandError::generic)
    }

    fn query_migrate_forecast(&self) -> Result<MigrationForecast, CommandError> {
        if self.0.migration_running() {
            return Err(CommandError::generic("There's a migration process in progress"));
        }
        if self.0.state.get() != RunState::Running {
            return Err(CommandError::generic("the forecast samples a running guest; the VM is not running"));
        }
        Ok(crate::forecast::forecast(&self.0).map_err(CommandError::generic)?.0)
    }

    fn migrate_set_capabilities(&self, caps: &[CapabilityStatus]) -> CmdResult {
        if self.0.migration_running() {
            return Err(CommandError::generic("There's a migration process in progress"));
        }
        // Check everything first: a refused capability changes nothing.
        crate::capabilities::Caps::check(caps)?;
        let mut params = self.0.mig.params.lock().unwrap_or_else(|e| e.into_inner());
        crate::transport_params::check_caps(&params, caps)?;
        for c in caps {
            match c.capability {
                MigrationCapability::AutoConverge => params.auto_converge = c.state,
                MigrationCapability::PostcopyRam => params.postcopy = c.state,
                MigrationCapability::PauseBeforeSwitchover => params.pause_before_switchover = c.state,
                MigrationCapability::Multifd => params.multifd = c.state,
                _ => {}
            }
        }
        self.0.caps.apply(caps);
        Ok(())
    }

    fn query_migrate_capabilities(&self) -> Result<Vec<CapabilityStatus>, CommandError> {
        let p = self.0.mig.params();
        Ok(MigrationCapability::ALL
            .iter()
            .map(|&capability| CapabilityStatus {
                capability,
                state: match capability {
                    MigrationCapability::AutoConverge => p.auto_converge,
                    MigrationCapability::PostcopyRam => p.postcopy,
                    MigrationCapability::PauseBeforeSwitchover => p.pause_before_switchover,
                    MigrationCapability::Multifd => p.multifd,
                    other => self.0.caps.state(other),
                },
            })
            .collect())
    }

    fn migrate_continue(&self, state: &str) -> CmdResult {
        let now = self.0.mig.stats().status;
        if now != migration::stats::Status::PreSwitchover || state != "pre-switchover" {
            return Err(CommandError::generic(format!(
                "Migration not in expected state: {} (it is {})",
                state,
                now.as_str()
            )));
        }
        self.0.mig.switchover_continue.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn query_migrate_parameters(&self) -> Result<MigrationParameters, CommandError> {
        let p: Params = self.0.mig.params();
        let a = self.0.announce_params();
        Ok(MigrationParameters {
            announce_rounds: Some(u64::from(a.rounds)),
            announce_initial: Some(a.initial_ms),
            announce_max: Some(a.max_ms),
            announce_step: Some(a.step_ms),
            downtime_limit: Some(p.downtime_limit_ms),
            max_bandwidth: Some(p.max_bandwidth),
            max_postcopy_bandwidth: Some(p.max_postcopy_bandwidth),
            multifd_channels: Some(u64::from(p.multifd_channels)),
            multifd_compression: Some(crate::transport_params::compression_out(p.multifd_compression)),
            multifd_zlib_level: Some(u64::from(p.multifd_zlib_level)),
            multifd_zstd_level: Some(u64::from(p.multifd_zstd_level)),
            tls_creds: Some(p.tls_creds.clone()),
            tls_hostname: Some(p.tls_hostname.clone()),
            tls_authz: Some(p.tls_authz.clone()),
            cpu_throttle_initial: Some(p.throttle_initial as u64),
            cpu_throttle_increment: Some(p.throttle_increment as u64),
            max_cpu_throttle: Some(p.throttle_max as u64),
            strategy: Some(if p.strategy_auto {
                MigrationStrategy::Auto
            } else if p.postcopy_auto_start {
                MigrationStrategy::Postcopy
            } else if p.auto_converge {
                MigrationStrategy::AutoConverge
            } else {
                MigrationStrategy::Precopy
            }),
            ..Default::default()
        })
    }
}
