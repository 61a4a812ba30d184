//! Structured reply data shared by both front ends, shaped like QEMU's QAPI schema so that the
//! serde form is what QMP clients expect (`query-status`, `query-version`, `query-cpus-fast`,
//! snapshots, jobs), plus the small enums events carry.

use crate::runstate::RunState;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Why the VM shut down or reset (QEMU's `ShutdownCause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownCause {
    None,
    HostError,
    HostQmpQuit,
    HostQmpSystemReset,
    HostSignal,
    HostUi,
    GuestShutdown,
    GuestReset,
    GuestPanic,
    SubsystemReset,
    SnapshotLoad,
}

/// Status of a migration (QEMU's `MigrationStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
}

impl MigrationStatus {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Active => "active",
            MigrationStatus::PostcopyActive => "postcopy-active",
            MigrationStatus::PostcopyPaused => "postcopy-paused",
            MigrationStatus::PostcopyRecover => "postcopy-recover",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Colo => "colo",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::WaitUnplug => "wait-unplug",
        }
    }

    /// A migration in this status will not change any more by itself (a foreground `migrate`
    /// stops waiting). `postcopy-paused` waits for the operator, so it counts as settled too.
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            MigrationStatus::None
                | MigrationStatus::Completed
                | MigrationStatus::Failed
                | MigrationStatus::Cancelled
                | MigrationStatus::PostcopyPaused
        )
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status of a job (QEMU's `JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl JobStatus {
    /// QEMU's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }
}

/// Kind of a job (the subset of QEMU's `JobType` Godwit runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobType {
    SnapshotSave,
    SnapshotLoad,
    SnapshotDelete,
    /// `drive-mirror` / `blockdev-mirror`.
    Mirror,
}

/// `query-jobs` element (QEMU's `JobInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub job_type: JobType,
    pub status: JobStatus,
    pub current_progress: u64,
    pub total_progress: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// `query-status` reply: `{"status": "running", "singlestep": false, "running": true}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub singlestep: bool,
    pub status: RunState,
}

impl From<RunState> for StatusInfo {
    fn from(status: RunState) -> Self {
        StatusInfo {
            running: status.is_running(),
            singlestep: false,
            status,
        }
    }
}

/// The `qemu` member of `query-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionTriple {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

/// `query-version` reply and the `version` member of the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub qemu: VersionTriple,
    pub package: String,
}

/// The QEMU release whose monitor protocol Godwit speaks (and is benchmarked against).
pub const QEMU_COMPAT_VERSION: VersionTriple = VersionTriple {
    major: 7,
    minor: 2,
    micro: 0,
};

impl Default for VersionInfo {
    fn default() -> Self {
        VersionInfo {
            qemu: QEMU_COMPAT_VERSION,
            package: format!("godwit {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// `query-cpus-fast` element (QEMU's `CpuInfoFast`, x86 subset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfo {
    pub cpu_index: u32,
    pub qom_path: String,
    pub thread_id: i64,
    pub target: String,
}

impl CpuInfo {
    /// An x86_64 vCPU with QEMU's usual QOM path.
    pub fn new(cpu_index: u32, thread_id: i64) -> Self {
        CpuInfo {
            cpu_index,
            qom_path: format!("/machine/unattached/device[{cpu_index}]"),
            thread_id,
            target: "x86_64".to_string(),
        }
    }
}

/// One network card and its backend, for `info network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct NicInfo {
    /// Card name (`net0`, ...).
    pub name: String,
    pub model: String,
    pub macaddr: String,
    /// Backend type (`tap`) and interface.
    pub backend: String,
    pub ifname: String,
    /// Godwit's counters: frames to and from the guest, dropped, announcements sent.
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub announces: u64,
}

/// One internal snapshot (QEMU's `SnapshotInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: i64,
    pub date_nsec: u32,
    pub vm_clock_sec: i64,
    pub vm_clock_nsec: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub icount: Option<u64>,
}

/// Which address space an `x`/`xp` dump reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySpace {
    /// Guest-virtual addresses, translated through vCPU `cpu`'s page tables (`x`).
    Virtual { cpu: u32 },
    /// Guest-physical addresses (`xp`).
    Physical,
}
