//! The command layer shared by both front ends: every VM-facing command as a typed [`Command`]
//! (HMP and QMP parse into it) and every answer as a typed [`Reply`] (QMP serializes it, HMP
//! renders it as text).

use crate::migration::{CapabilityStatus, MigrationForecast, MigrationInfo, MigrationParameters};
use crate::types::{CpuInfo, JobInfo, MemorySpace, NicInfo, SnapshotInfo, StatusInfo, VersionInfo};
use serde_json::{json, Value};
use std::path::PathBuf;

/// Largest `x`/`xp` dump, in bytes (the output of anything bigger is unreadable anyway).
pub const MAX_MEMORY_DUMP: u64 = 1 << 20;

/// Which snapshot, and where its parts live (the arguments of `savevm`/`snapshot-save`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotRequest {
    /// The snapshot's tag (name). `savevm` without a tag gets `vm-YYYYMMDDHHMMSS`.
    pub tag: String,
    /// Block node that receives the VM state (QMP `vmstate`); `None` = the VMM's choice.
    pub vmstate: Option<String>,
    /// Block nodes to snapshot (QMP `devices`); `None` = all writable disks.
    pub devices: Option<Vec<String>>,
}

/// Arguments of `migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrateArgs {
    /// Destination, e.g. `tcp:HOST:PORT` or `unix:PATH`.
    pub uri: String,
    /// HMP `-d`: return at once. (QMP `migrate` always returns at once.)
    pub detach: bool,
    /// HMP `-r` alone / QMP `resume`: resume a paused post-copy migration.
    pub resume: bool,
    /// HMP `-r FILE` / QMP `x-report-file`: write Godwit's per-round migration report here.
    pub report_file: Option<PathBuf>,
}

/// Arguments of `announce-self` / `announce_self`: members left out take the `announce-*`
/// migration parameters' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AnnounceArgs {
    pub initial: Option<u64>,
    pub max: Option<u64>,
    pub rounds: Option<u64>,
    pub step: Option<u64>,
}

/// Kind of asynchronous snapshot job (QMP `snapshot-save`/`-load`/`-delete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOp {
    Save,
    Load,
    Delete,
}

/// A command against the VM. Front-end-only commands (`help`, `qmp_capabilities`,
/// `human-monitor-command`, `query-commands`) are not here.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    QueryStatus,
    QueryVersion,
    QueryCpus,
    Stop,
    Cont,
    SystemReset,
    SystemPowerdown,
    Quit,
    /// Read guest memory for `x`/`xp` (at most [`MAX_MEMORY_DUMP`] bytes).
    ReadMemory {
        space: MemorySpace,
        addr: u64,
        len: u64,
    },
    /// `savevm`: synchronous.
    SnapshotSave(SnapshotRequest),
    /// `loadvm`: synchronous.
    SnapshotLoad(SnapshotRequest),
    /// `delvm`: synchronous.
    SnapshotDelete(SnapshotRequest),
    /// `info snapshots`.
    QuerySnapshots,
    /// QMP `snapshot-save`/`-load`/`-delete`: run as a job, answered at once.
    SnapshotJob {
        job_id: String,
        op: SnapshotOp,
        request: SnapshotRequest,
    },
    QueryJobs,
    JobDismiss {
        id: String,
    },
    Migrate(MigrateArgs),
    MigrateCancel,
    MigrateIncoming {
        uri: String,
    },
    QueryMigrate,
    MigrateSetParameters(MigrationParameters),
    QueryMigrateParameters,
    MigrateSetCapabilities(Vec<CapabilityStatus>),
    QueryMigrateCapabilities,
    MigrateStartPostcopy,
    /// `migrate-continue` / `migrate_continue`: leave `pre-switchover` (`state` names the
    /// status the caller expects the migration to be in).
    MigrateContinue { state: String },
    MigrateRecover {
        uri: String,
    },
    QueryMigrateForecast,
    /// Announce the NICs' MACs on their backends now (RARP rounds).
    AnnounceSelf(AnnounceArgs),
    /// `info network`.
    QueryNetwork,
    /// Block nodes, the NBD server, mirror jobs (`crate::block`).
    Block(crate::block::BlockCommand),
}

impl Command {
    /// The QMP name of the command (used in error messages).
    pub fn qmp_name(&self) -> &'static str {
        match self {
            Command::QueryStatus => "query-status",
            Command::QueryVersion => "query-version",
            Command::QueryCpus => "query-cpus-fast",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::SystemReset => "system_reset",
            Command::SystemPowerdown => "system_powerdown",
            Command::Quit => "quit",
            Command::ReadMemory {
                space: MemorySpace::Physical,
                ..
            } => "xp",
            Command::ReadMemory { .. } => "x",
            Command::SnapshotSave(_) => "savevm",
            Command::SnapshotLoad(_) => "loadvm",
            Command::SnapshotDelete(_) => "delvm",
            Command::QuerySnapshots => "info snapshots",
            Command::SnapshotJob {
                op: SnapshotOp::Save,
                ..
            } => "snapshot-save",
            Command::SnapshotJob {
                op: SnapshotOp::Load,
                ..
            } => "snapshot-load",
            Command::SnapshotJob {
                op: SnapshotOp::Delete,
                ..
            } => "snapshot-delete",
            Command::QueryJobs => "query-jobs",
            Command::JobDismiss { .. } => "job-dismiss",
            Command::Migrate(_) => "migrate",
            Command::MigrateCancel => "migrate_cancel",
            Command::MigrateIncoming { .. } => "migrate-incoming",
            Command::QueryMigrate => "query-migrate",
            Command::MigrateSetParameters(_) => "migrate-set-parameters",
            Command::QueryMigrateParameters => "query-migrate-parameters",
            Command::MigrateSetCapabilities(_) => "migrate-set-capabilities",
            Command::QueryMigrateCapabilities => "query-migrate-capabilities",
            Command::MigrateStartPostcopy => "migrate-start-postcopy",
            Command::MigrateContinue { .. } => "migrate-continue",
            Command::MigrateRecover { .. } => "migrate-recover",
            Command::QueryMigrateForecast => "query-migrate-forecast",
            Command::AnnounceSelf(_) => "announce-self",
            Command::QueryNetwork => "info network",
            Command::Block(b) => b.qmp_name(),
        }
    }
}

/// The structured answer to a [`Command`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Success without data (`{"return": {}}`, no HMP output).
    Empty,
    Status(StatusInfo),
    Version(VersionInfo),
    Cpus(Vec<CpuInfo>),
    Memory(Vec<u8>),
    Snapshots(Vec<SnapshotInfo>),
    Jobs(Vec<JobInfo>),
    Migration(MigrationInfo),
    MigrationParameters(MigrationParameters),
    MigrationCapabilities(Vec<CapabilityStatus>),
    Forecast(MigrationForecast),
    Network(Vec<NicInfo>),
    /// A block command's answer: the QMP value and its HMP text.
    Block { json: Value, text: String },
}

impl Reply {
    /// The QMP `return` value.
    pub fn to_json(&self) -> Value {
        fn ser<T: serde::Serialize>(v: &T) -> Value {
            serde_json::to_value(v).unwrap_or(Value::Null)
        }
        match self {
            Reply::Empty => json!({}),
            Reply::Status(s) => ser(s),
            Reply::Version(v) => ser(v),
            Reply::Cpus(c) => ser(c),
            Reply::Memory(m) => ser(m),
            Reply::Snapshots(s) => ser(s),
            Reply::Jobs(j) => ser(j),
            Reply::Migration(m) => ser(m),
            Reply::MigrationParameters(p) => ser(p),
            Reply::MigrationCapabilities(c) => ser(c),
            Reply::Forecast(f) => ser(f),
            Reply::Network(n) => ser(n),
            Reply::Block { json, .. } => json.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runstate::RunState;

    #[test]
    fn query_status_matches_qemu_schema() {
        let r = Reply::Status(StatusInfo::from(RunState::Running));
        assert_eq!(
            r.to_json(),
            json!({"status": "running", "singlestep": false, "running": true})
        );
        let r = Reply::Status(StatusInfo::from(RunState::Postmigrate));
        assert_eq!(
            r.to_json(),
            json!({"status": "postmigrate", "singlestep": false, "running": false})
        );
    }

    #[test]
    fn query_migrate_uses_qemu_member_names() {
        let info = MigrationInfo {
            status: Some(crate::types::MigrationStatus::Active),
            total_time: Some(10),
            setup_time: Some(1),
            expected_downtime: Some(3),
            ram: Some(crate::migration::RamStats {
                transferred: 4096,
                mbps: 1.5,
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = Reply::Migration(info).to_json();
        assert_eq!(v["status"], "active");
        assert_eq!(v["total-time"], 10);
        assert_eq!(v["setup-time"], 1);
        assert_eq!(v["expected-downtime"], 3);
        assert!(v.get("downtime").is_none());
        for key in [
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
            assert!(v["ram"].get(key).is_some(), "ram.{key} missing");
        }
        assert_eq!(
            Reply::Migration(MigrationInfo::default()).to_json(),
            json!({})
        );
    }
}
