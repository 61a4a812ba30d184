//! The [`Backend`] trait: everything the monitor needs from the VM. The `godwit` binary
//! implements it; the monitor never sees the VMM's types. One method per command; every method
//! but the core lifecycle ones has a default answering "not supported yet", so a VMM implements
//! commands as its features land.
//!
//! Methods are called from monitor client threads, possibly several at once, so they take
//! `&self` and the VMM does its own locking. A long method (savevm, loadvm) only blocks the
//! client that issued it; events keep flowing to the others.

use crate::command::{MigrateArgs, SnapshotRequest};
use crate::error::CommandError;
use crate::migration::{CapabilityStatus, MigrationForecast, MigrationInfo, MigrationParameters};
use crate::runstate::RunState;
use crate::types::{CpuInfo, MemorySpace, ShutdownCause, SnapshotInfo, VersionInfo};

/// Result of a backend call without data.
pub type CmdResult = Result<(), CommandError>;

/// The VM as the monitor sees it.
pub trait Backend: Send + Sync + 'static {
    // --- lifecycle (required) -------------------------------------------------------------

    /// The current run state (`query-status`, `info status`).
    fn run_state(&self) -> RunState;

    /// Pause the vCPUs (`stop`). Stopping a VM that is not running is not an error. The
    /// VMM emits `STOP` if the VM was running (see [`crate::RunStateMachine`]).
    fn stop(&self) -> CmdResult;

    /// Resume (`cont`/`c`). QEMU refuses with "Resetting the Virtual Machine is required"
    /// when [`RunState::needs_reset`]; in `inmigrate` it only arranges to start after the
    /// incoming migration. The VMM emits `RESUME`.
    fn cont(&self) -> CmdResult;

    /// Leave: the VMM emits `SHUTDOWN` (guest false, `cause`) and exits soon after the monitor
    /// has sent its reply. `cause` is `host-qmp-quit` for `quit` and `host-ui` for `Ctrl-a x`.
    fn quit(&self, cause: ShutdownCause) -> CmdResult;

    // --- lifecycle (optional) -------------------------------------------------------------

    /// `info network`: the network cards and their backends.
    fn query_network(&self) -> Result<Vec<crate::types::NicInfo>, CommandError> {
        Ok(Vec::new())
    }

    /// `announce-self` / `announce_self`: send the NICs' announcement frames now.
    fn announce_self(&self, _args: &crate::command::AnnounceArgs) -> CmdResult {
        Err(CommandError::unsupported("announce-self"))
    }

    /// `system_reset`: reset the VM, emitting `RESET` (guest false, `host-qmp-system-reset`).
    fn system_reset(&self) -> CmdResult {
        Err(CommandError::unsupported("system_reset"))
    }

    /// `system_powerdown`: press the ACPI power button, emitting `POWERDOWN`.
    fn system_powerdown(&self) -> CmdResult {
        Err(CommandError::unsupported("system_powerdown"))
    }

    /// `query-version` and the QMP greeting.
    fn version(&self) -> VersionInfo {
        VersionInfo::default()
    }

    /// `query-cpus-fast`, `info cpus`.
    fn query_cpus(&self) -> Result<Vec<CpuInfo>, CommandError> {
        Err(CommandError::unsupported("query-cpus-fast"))
    }

    /// Fill `buf` from guest memory at `addr` (`x`: guest-virtual through vCPU `cpu`'s page
    /// tables; `xp`: guest-physical). An address that cannot be read is an error; the monitor
    /// then prints QEMU's "Cannot access memory".
    fn read_memory(&self, space: MemorySpace, addr: u64, buf: &mut [u8]) -> CmdResult {
        let _ = (space, addr, buf);
        Err(CommandError::unsupported("x"))
    }

    // --- snapshots ------------------------------------------------------------------------

    /// `savevm TAG` / the body of a `snapshot-save` job: replaces a snapshot with the same tag.
    fn snapshot_save(&self, req: &SnapshotRequest) -> CmdResult {
        let _ = req;
        Err(CommandError::unsupported("savevm"))
    }

    /// `loadvm TAG` / the body of a `snapshot-load` job. On failure the VM is as it was.
    fn snapshot_load(&self, req: &SnapshotRequest) -> CmdResult {
        let _ = req;
        Err(CommandError::unsupported("loadvm"))
    }

    /// `delvm TAG` / the body of a `snapshot-delete` job.
    fn snapshot_delete(&self, req: &SnapshotRequest) -> CmdResult {
        let _ = req;
        Err(CommandError::unsupported("delvm"))
    }

    /// `info snapshots`: the snapshots present on all disks.
    fn query_snapshots(&self) -> Result<Vec<SnapshotInfo>, CommandError> {
        Err(CommandError::unsupported("info snapshots"))
    }

    // --- migration ------------------------------------------------------------------------

    /// `migrate`: start an outgoing migration and return at once (QEMU's semantics: progress
    /// via `query-migrate` and `MIGRATION`/`MIGRATION_PASS` events). HMP's foreground
    /// `migrate` waits by polling [`query_migrate`](Self::query_migrate).
    fn migrate(&self, args: &MigrateArgs) -> CmdResult {
        let _ = args;
        Err(CommandError::unsupported("migrate"))
    }

    /// `migrate_cancel`.
    fn migrate_cancel(&self) -> CmdResult {
        Err(CommandError::unsupported("migrate_cancel"))
    }

    /// `migrate-incoming URI` (with `-incoming defer`).
    fn migrate_incoming(&self, uri: &str) -> CmdResult {
        let _ = uri;
        Err(CommandError::unsupported("migrate-incoming"))
    }

    /// `query-migrate`, `info migrate`. `MigrationInfo::default()` (`{}`) when no migration
    /// has run.
    fn query_migrate(&self) -> Result<MigrationInfo, CommandError> {
        Err(CommandError::unsupported("query-migrate"))
    }

    /// `migrate-set-parameters` / `migrate_set_parameter`: only the members that are set
    /// change; values are already range-checked.
    fn migrate_set_parameters(&self, params: &MigrationParameters) -> CmdResult {
        let _ = params;
        Err(CommandError::unsupported("migrate-set-parameters"))
    }

    /// `query-migrate-parameters`, `info migrate_parameters`.
    fn query_migrate_parameters(&self) -> Result<MigrationParameters, CommandError> {
        Err(CommandError::unsupported("query-migrate-parameters"))
    }

    /// `migrate-set-capabilities` / `migrate_set_capability`.
    fn migrate_set_capabilities(&self, caps: &[CapabilityStatus]) -> CmdResult {
        let _ = caps;
        Err(CommandError::unsupported("migrate-set-capabilities"))
    }

    /// `query-migrate-capabilities`, `info migrate_capabilities`.
    fn query_migrate_capabilities(&self) -> Result<Vec<CapabilityStatus>, CommandError> {
        Err(CommandError::unsupported("query-migrate-capabilities"))
    }

    /// `migrate-continue` / `migrate_continue STATE`: a migration waiting in `pre-switchover`
    /// (capability `pause-before-switchover`) goes on to the switchover.
    fn migrate_continue(&self, state: &str) -> CmdResult {
        let _ = state;
        Err(CommandError::unsupported("migrate-continue"))
    }

    /// `migrate-start-postcopy`.
    fn migrate_start_postcopy(&self) -> CmdResult {
        Err(CommandError::unsupported("migrate-start-postcopy"))
    }

    /// `migrate-recover URI` (destination side of post-copy recovery).
    fn migrate_recover(&self, uri: &str) -> CmdResult {
        let _ = uri;
        Err(CommandError::unsupported("migrate-recover"))
    }

    /// Block nodes and the NBD server (every [`crate::block::BlockCommand`] but the mirror and
    /// the job verbs, which [`start_mirror`](Self::start_mirror) and the job registry serve).
    fn block(&self, cmd: &crate::block::BlockCommand) -> Result<serde_json::Value, CommandError> {
        Err(CommandError::unsupported(cmd.qmp_name()))
    }

    /// `drive-mirror` / `blockdev-mirror`: check the arguments, connect the target and return
    /// the job's engine; the monitor's job registry runs it.
    fn start_mirror(
        &self,
        args: &crate::block::MirrorArgs,
    ) -> Result<std::sync::Arc<dyn crate::jobs::BlockJobDriver>, CommandError> {
        let _ = args;
        Err(CommandError::unsupported("blockdev-mirror"))
    }

    /// `query-migrate-forecast`, `info migrate_forecast` (Godwit's own).
    fn query_migrate_forecast(&self) -> Result<MigrationForecast, CommandError> {
        Err(CommandError::unsupported("query-migrate-forecast"))
    }
}
