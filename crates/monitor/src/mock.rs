//! A fake VM implementing [`Backend`], so the monitor (its tests, the `monitor-mock` binary, the
//! Python `qemu.qmp` test) runs without KVM. It follows QEMU's run-state rules through a
//! [`RunStateMachine`], emits the events QEMU would, keeps snapshots in memory, simulates a
//! migration in a few passes on a thread, and has 64 KiB of patterned "guest memory" for
//! `x`/`xp`. Test hooks: [`Gate`]s that hold `savevm` or a migration pass until the test opens
//! them, and a quit callback.

use crate::backend::{Backend, CmdResult};
use crate::command::{MigrateArgs, SnapshotRequest};
use crate::error::CommandError;
use crate::events::{Event, EventBus};
use crate::migration::{
    CapabilityStatus, MigrationCapability, MigrationForecast, MigrationInfo, MigrationParameters,
    MigrationStrategy, RamStats, StrategyForecast,
};
use crate::runstate::{RunState, RunStateMachine};
use crate::types::{CpuInfo, MemorySpace, MigrationStatus, ShutdownCause, SnapshotInfo};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Size of the mock's guest memory, mapped at guest-physical 0 (and identity-mapped virtually).
pub const MOCK_MEMORY: usize = 64 * 1024;
/// What the mock claims as RAM size in migration statistics.
const MOCK_RAM_TOTAL: u64 = 1 << 30;

/// The byte at guest-physical `addr` of a fresh mock VM.
pub fn mock_memory_byte(addr: usize) -> u8 {
    (addr as u8) ^ ((addr >> 8) as u8)
}

/// A one-shot barrier a test opens to let a held operation continue.
#[derive(Clone, Default)]
pub struct Gate {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl Gate {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn open(&self) {
        let (m, c) = &*self.inner;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = true;
        c.notify_all();
    }
    fn wait(&self) {
        let (m, c) = &*self.inner;
        let mut open = m.lock().unwrap_or_else(|e| e.into_inner());
        while !*open {
            open = c.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Snapshot {
    info: SnapshotInfo,
    memory: Vec<u8>,
}

#[derive(Default)]
struct Migration {
    info: MigrationInfo,
    cancel: bool,
}

/// The fake VM.
pub struct MockVm {
    state: Arc<RunStateMachine>,
    events: EventBus,
    cpus: u32,
    started: Instant,
    memory: Mutex<Vec<u8>>,
    snapshots: Mutex<Vec<Snapshot>>,
    next_snapshot_id: Mutex<u64>,
    migration: Arc<Mutex<Migration>>,
    params: Mutex<MigrationParameters>,
    caps: Mutex<Vec<CapabilityStatus>>,
    savevm_gate: Mutex<Option<Gate>>,
    migrate_gate: Mutex<Option<Gate>>,
    pass_delay: Duration,
    quit_requested: AtomicBool,
    quit_hook: Mutex<Option<Box<dyn FnMut() + Send>>>,
}

impl MockVm {
    /// A VM in `initial` state with `cpus` vCPUs, emitting on `events`.
    pub fn new(events: EventBus, initial: RunState, cpus: u32) -> Arc<MockVm> {
        let params = MigrationParameters {
            downtime_limit: Some(30),
            max_bandwidth: Some(128 << 20),
            cpu_throttle_initial: Some(20),
            cpu_throttle_increment: Some(10),
            max_cpu_throttle: Some(99),
            strategy: Some(MigrationStrategy::Precopy),
            ..Default::default()
        };
        let caps = MigrationCapability::ALL
            .iter()
            .map(|&capability| CapabilityStatus {
                capability,
                state: false,
            });
        Arc::new(MockVm {
            state: Arc::new(RunStateMachine::new(initial, events.clone())),
            events,
            cpus: cpus.max(1),
            started: Instant::now(),
            memory: Mutex::new((0..MOCK_MEMORY).map(mock_memory_byte).collect()),
            snapshots: Mutex::new(Vec::new()),
            next_snapshot_id: Mutex::new(1),
            migration: Arc::new(Mutex::new(Migration::default())),
            params: Mutex::new(params),
            caps: Mutex::new(caps.collect()),
            savevm_gate: Mutex::new(None),
            migrate_gate: Mutex::new(None),
            pass_delay: Duration::from_millis(20),
            quit_requested: AtomicBool::new(false),
            quit_hook: Mutex::new(None),
        })
    }

    /// Makes the next `savevm`s wait (after stopping the VM) until the returned gate opens.
    pub fn hold_savevm(&self) -> Gate {
        let g = Gate::new();
        *lock(&self.savevm_gate) = Some(g.clone());
        g
    }

    /// Makes migrations wait before their first pass until the returned gate opens.
    pub fn hold_migration(&self) -> Gate {
        let g = Gate::new();
        *lock(&self.migrate_gate) = Some(g.clone());
        g
    }

    /// Called (once per request) when `quit` or `Ctrl-a x` asks the VM to end.
    pub fn set_quit_hook(&self, f: impl FnMut() + Send + 'static) {
        *lock(&self.quit_hook) = Some(Box::new(f));
    }

    pub fn quit_requested(&self) -> bool {
        self.quit_requested.load(Ordering::SeqCst)
    }

    /// Forces a state (test setup, e.g. `inmigrate`).
    pub fn force_state(&self, s: RunState) {
        self.state.force(s);
    }

    /// Writes guest memory (so tests can see `loadvm` restore it).
    pub fn poke(&self, addr: usize, bytes: &[u8]) {
        let mut m = lock(&self.memory);
        if let Some(dst) = addr
            .checked_add(bytes.len())
            .and_then(|end| m.get_mut(addr..end))
        {
            dst.copy_from_slice(bytes);
        }
    }

    fn set(&self, s: RunState) -> CmdResult {
        self.state
            .set(s)
            .map(|_| ())
            .map_err(|e| CommandError::generic(e.to_string()))
    }

    fn migration_active(&self) -> bool {
        lock(&self.migration)
            .info
            .status
            .is_some_and(|s| !s.is_settled())
    }

    fn cap(&self, c: MigrationCapability) -> bool {
        lock(&self.caps)
            .iter()
            .any(|s| s.capability == c && s.state)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_secs() -> (i64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

impl Backend for MockVm {
    fn run_state(&self) -> RunState {
        self.state.get()
    }

    fn stop(&self) -> CmdResult {
        if self.state.get().is_running() {
            self.set(RunState::Paused)?;
        }
        Ok(())
    }

    fn cont(&self) -> CmdResult {
        let s = self.state.get();
        if s.needs_reset() {
            return Err(CommandError::generic(
                "Resetting the Virtual Machine is required",
            ));
        }
        if matches!(s, RunState::Inmigrate | RunState::Suspended) || s.is_running() {
            return Ok(());
        }
        if self.migration_active() {
            return Err(CommandError::generic(
                "Migration is in progress; cannot resume now",
            ));
        }
        self.set(RunState::Running)
    }

    fn quit(&self, cause: ShutdownCause) -> CmdResult {
        self.events.emit(Event::Shutdown {
            guest: false,
            reason: cause,
        });
        self.quit_requested.store(true, Ordering::SeqCst);
        if let Some(hook) = lock(&self.quit_hook).as_mut() {
            hook();
        }
        Ok(())
    }

    fn system_reset(&self) -> CmdResult {
        self.events.emit(Event::Reset {
            guest: false,
            reason: ShutdownCause::HostQmpSystemReset,
        });
        *lock(&self.memory) = (0..MOCK_MEMORY).map(mock_memory_byte).collect();
        let s = self.state.get();
        if !matches!(
            s,
            RunState::Running | RunState::Inmigrate | RunState::FinishMigrate
        ) {
            self.state.force(RunState::Prelaunch);
        }
        Ok(())
    }

    fn system_powerdown(&self) -> CmdResult {
        self.events.emit(Event::Powerdown);
        // The fake guest honours ACPI power-off at once, if it is running to see the button.
        if self.state.get().is_running() {
            self.events.emit(Event::Shutdown {
                guest: true,
                reason: ShutdownCause::GuestShutdown,
            });
            self.set(RunState::Shutdown)?;
        }
        Ok(())
    }

    fn query_cpus(&self) -> Result<Vec<CpuInfo>, CommandError> {
        let pid = i64::from(std::process::id());
        Ok((0..self.cpus)
            .map(|i| CpuInfo::new(i, pid + 1 + i64::from(i)))
            .collect())
    }

    fn read_memory(&self, space: MemorySpace, addr: u64, buf: &mut [u8]) -> CmdResult {
        if let MemorySpace::Virtual { cpu } = space {
            if cpu >= self.cpus {
                return Err(CommandError::generic("invalid CPU"));
            }
        }
        let m = lock(&self.memory);
        let start = usize::try_from(addr).ok();
        let src = start.and_then(|s| s.checked_add(buf.len()).and_then(|e| m.get(s..e)));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(CommandError::generic("Cannot access memory")),
        }
    }

    fn snapshot_save(&self, req: &SnapshotRequest) -> CmdResult {
        let was_running = self.state.get().is_running();
        if was_running {
            self.set(RunState::SaveVm)?;
        }
        let gate = lock(&self.savevm_gate).clone();
        if let Some(g) = gate {
            g.wait();
        }
        let (date_sec, date_nsec) = now_secs();
        let clock = self.started.elapsed();
        let memory = lock(&self.memory).clone();
        {
            let mut snaps = lock(&self.snapshots);
            snaps.retain(|s| s.info.name != req.tag);
            let mut next = lock(&self.next_snapshot_id);
            let info = SnapshotInfo {
                id: next.to_string(),
                name: req.tag.clone(),
                vm_state_size: memory.len() as u64,
                date_sec,
                date_nsec,
                vm_clock_sec: clock.as_secs() as i64,
                vm_clock_nsec: clock.subsec_nanos(),
                icount: None,
            };
            *next += 1;
            snaps.push(Snapshot { info, memory });
        }
        if was_running {
            self.set(RunState::Running)?;
        }
        Ok(())
    }

    fn snapshot_load(&self, req: &SnapshotRequest) -> CmdResult {
        let memory = lock(&self.snapshots)
            .iter()
            .find(|s| s.info.name == req.tag)
            .map(|s| s.memory.clone())
            .ok_or_else(|| {
                CommandError::generic(format!(
                    "Snapshot '{}' does not exist in one or more devices",
                    req.tag
                ))
            })?;
        let was_running = self.state.get().is_running();
        if was_running {
            self.set(RunState::RestoreVm)?;
        }
        *lock(&self.memory) = memory;
        if was_running {
            self.set(RunState::Running)?;
        }
        Ok(())
    }

    fn snapshot_delete(&self, req: &SnapshotRequest) -> CmdResult {
        let mut snaps = lock(&self.snapshots);
        let before = snaps.len();
        snaps.retain(|s| s.info.name != req.tag);
        if snaps.len() == before {
            return Err(CommandError::generic(format!(
                "Snapshot '{}' not found",
                req.tag
            )));
        }
        Ok(())
    }

    fn query_snapshots(&self) -> Result<Vec<SnapshotInfo>, CommandError> {
        Ok(lock(&self.snapshots)
            .iter()
            .map(|s| s.info.clone())
            .collect())
    }

    fn migrate(&self, args: &MigrateArgs) -> CmdResult {
        if args.resume {
            return Err(CommandError::generic(
                "Cannot resume if there is no paused migration",
            ));
        }
        let proto = args.uri.split(':').next().unwrap_or("");
        if !matches!(proto, "tcp" | "unix" | "exec" | "fd" | "fail") || !args.uri.contains(':') {
            return Err(CommandError::generic(format!(
                "unknown migration protocol: {}",
                args.uri
            )));
        }
        if self.migration_active() {
            return Err(CommandError::generic(
                "There's a migration process in progress",
            ));
        }
        let s = self.state.get();
        if !matches!(
            s,
            RunState::Running | RunState::Paused | RunState::Postmigrate
        ) {
            return Err(CommandError::generic(format!(
                "Cannot migrate in state '{s}'"
            )));
        }
        {
            let mut m = lock(&self.migration);
            *m = Migration::default();
            m.info.status = Some(MigrationStatus::Setup);
        }
        self.events.emit(Event::Migration {
            status: MigrationStatus::Setup,
        });
        let worker = MigrationWorker {
            migration: self.migration.clone(),
            state: self.state.clone(),
            events: self.events.clone(),
            gate: lock(&self.migrate_gate).clone(),
            pass_delay: self.pass_delay,
            fail: proto == "fail",
        };
        std::thread::Builder::new()
            .name("mock-migration".into())
            .spawn(move || worker.run())
            .map_err(|e| CommandError::generic(format!("cannot start migration thread: {e}")))?;
        Ok(())
    }

    fn migrate_cancel(&self) -> CmdResult {
        let mut m = lock(&self.migration);
        if m.info.status.is_some_and(|s| !s.is_settled()) {
            m.cancel = true;
        }
        Ok(())
    }

    fn migrate_incoming(&self, uri: &str) -> CmdResult {
        if self.state.get() != RunState::Inmigrate {
            return Err(CommandError::generic(
                "'-incoming' was not specified on the command line",
            ));
        }
        if !uri.contains(':') {
            return Err(CommandError::generic(format!(
                "unknown migration protocol: {uri}"
            )));
        }
        {
            let mut m = lock(&self.migration);
            m.info = MigrationInfo {
                status: Some(MigrationStatus::Completed),
                ..Default::default()
            };
        }
        self.events.emit(Event::Migration {
            status: MigrationStatus::Active,
        });
        self.events.emit(Event::Migration {
            status: MigrationStatus::Completed,
        });
        self.set(RunState::Running)
    }

    fn query_migrate(&self) -> Result<MigrationInfo, CommandError> {
        Ok(lock(&self.migration).info.clone())
    }

    fn migrate_set_parameters(&self, params: &MigrationParameters) -> CmdResult {
        lock(&self.params).merge(params);
        Ok(())
    }

    fn query_migrate_parameters(&self) -> Result<MigrationParameters, CommandError> {
        Ok(lock(&self.params).clone())
    }

    fn migrate_set_capabilities(&self, caps: &[CapabilityStatus]) -> CmdResult {
        if self.migration_active() {
            return Err(CommandError::generic(
                "There's a migration process in progress",
            ));
        }
        let mut mine = lock(&self.caps);
        for c in caps {
            if let Some(m) = mine.iter_mut().find(|m| m.capability == c.capability) {
                m.state = c.state;
            }
        }
        Ok(())
    }

    fn query_migrate_capabilities(&self) -> Result<Vec<CapabilityStatus>, CommandError> {
        Ok(lock(&self.caps).clone())
    }

    fn migrate_start_postcopy(&self) -> CmdResult {
        if !self.cap(MigrationCapability::PostcopyRam) {
            return Err(CommandError::generic(
                "Enable postcopy with migrate_set_capability before the start of migration",
            ));
        }
        if !self.migration_active() {
            return Err(CommandError::generic(
                "Postcopy must be started after migration has been started",
            ));
        }
        Ok(())
    }

    fn migrate_recover(&self, _uri: &str) -> CmdResult {
        Err(CommandError::generic(
            "Migrate recover can only be run when postcopy is paused.",
        ))
    }

    fn query_migrate_forecast(&self) -> Result<MigrationForecast, CommandError> {
        let bandwidth = lock(&self.params).max_bandwidth.unwrap_or(128 << 20).max(1);
        let dirty_rate: u64 = 16 << 20;
        let ram = MOCK_RAM_TOTAL;
        let precopy_time = (ram * 1000) / bandwidth.saturating_sub(dirty_rate).max(1);
        Ok(MigrationForecast {
            ram_total: ram,
            dirty_rate,
            sample_time: 100,
            bandwidth,
            strategies: vec![StrategyForecast {
                strategy: MigrationStrategy::Precopy,
                converges: dirty_rate < bandwidth,
                total_time: (dirty_rate < bandwidth).then_some(precopy_time),
                downtime: (dirty_rate < bandwidth).then_some(5),
            }],
            recommended: Some(MigrationStrategy::Precopy),
        })
    }
}

/// Runs one simulated migration: three passes, then the switch-over.
struct MigrationWorker {
    migration: Arc<Mutex<Migration>>,
    state: Arc<RunStateMachine>,
    events: EventBus,
    gate: Option<Gate>,
    pass_delay: Duration,
    fail: bool,
}

impl MigrationWorker {
    fn run(self) {
        let h = self;
        let started = Instant::now();
        let set_status = |s: MigrationStatus| {
            lock(&h.migration).info.status = Some(s);
            h.events.emit(Event::Migration { status: s });
        };
        set_status(MigrationStatus::Active);
        if let Some(g) = &h.gate {
            g.wait();
        }
        let mut transferred = 0u64;
        for pass in 1..=3u64 {
            if lock(&h.migration).cancel {
                set_status(MigrationStatus::Cancelling);
                set_status(MigrationStatus::Cancelled);
                return;
            }
            h.events.emit(Event::MigrationPass { pass });
            std::thread::sleep(h.pass_delay);
            transferred += MOCK_RAM_TOTAL >> (pass * 2);
            let elapsed = started.elapsed().as_millis() as u64;
            let mut m = lock(&h.migration);
            m.info.total_time = Some(elapsed);
            m.info.setup_time = Some(1);
            m.info.expected_downtime = Some(5);
            m.info.ram = Some(RamStats {
                transferred,
                remaining: MOCK_RAM_TOTAL >> (pass * 2 + 2),
                total: MOCK_RAM_TOTAL,
                duplicate: 200_000,
                normal: transferred / 4096,
                normal_bytes: transferred,
                dirty_pages_rate: 1000 / pass,
                mbps: (transferred * 8) as f64 / 1e6 / (elapsed.max(1) as f64 / 1000.0),
                dirty_sync_count: pass,
                page_size: 4096,
                pages_per_second: transferred / 4096 * 1000 / elapsed.max(1),
                ..Default::default()
            });
        }
        if h.fail {
            {
                let mut m = lock(&h.migration);
                m.info.error_desc = Some("mock: the destination went away".into());
            }
            set_status(MigrationStatus::Failed);
            return;
        }
        // Switch-over: stop the VM (STOP), finish, leave it in postmigrate.
        h.state.force(RunState::FinishMigrate);
        {
            let mut m = lock(&h.migration);
            m.info.downtime = Some(4);
            m.info.expected_downtime = None;
            m.info.total_time = Some(started.elapsed().as_millis() as u64);
        }
        h.state.force(RunState::Postmigrate);
        set_status(MigrationStatus::Completed);
    }
}
