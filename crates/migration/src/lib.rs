//! Godwit's migration engine. One picture: a VM is a set of components that describe
//! themselves (`vmstate::Section`s) plus guest RAM; `savevm` writes that description into the
//! qcow2 VM-state area ([`snapshot`]), live migration streams it over a socket with RAM sent in
//! pre-copy rounds ([`sender`], [`receiver`], wire format in [`protocol`]).
//!
//! The engine knows the VM only through the narrow [`MigratableVm`] trait.

pub mod protocol;
pub mod postcopy;
pub mod postcopy_dest;
pub mod authz;
pub mod forecast;
pub mod multifd;
pub mod ram;
pub mod receiver;
pub mod sender;
pub mod snapshot;
pub mod snapshot_v2;
pub mod lazy_ram;
pub mod stats;
pub mod tls;
pub mod transport;
pub mod uffd;

use vmstate::Section;

/// Errors of the migration engine.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("{0}")]
    State(#[from] vmstate::StateError),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("destination refused: {0}")]
    Refused(String),
    #[error("incompatible VMs: {0}")]
    Incompatible(String),
    #[error("migration cancelled")]
    Cancelled,
    #[error("VM: {0}")]
    Vm(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("invalid migration URI '{0}': expected tcp:HOST:PORT or unix:PATH")]
    Uri(String),
}

pub type Result<T> = std::result::Result<T, MigrationError>;

/// A RAM region of the guest: guest-physical base, size, and the host address it is mapped at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub size: u64,
    pub host: u64,
}

/// What the engine needs from a VM.
pub trait MigratableVm: Send + Sync {
    /// Guest RAM regions (stable for the VM's lifetime).
    fn ram_regions(&self) -> Vec<RamRegion>;
    /// Zeroes guest RAM (drops the pages), e.g. before loading a snapshot into it.
    fn discard_ram(&self) -> std::result::Result<(), String>;
    /// Dirty tracking: on/off and harvest (one bitmap per region, 1 bit per 4 KiB page).
    fn set_dirty_logging(&self, on: bool) -> std::result::Result<(), String>;
    fn take_dirty(&self) -> std::result::Result<Vec<Vec<u64>>, String>;
    /// Clean pause / resume of every vCPU.
    fn pause(&self);
    fn resume(&self);
    /// Machine state (the VM must be paused).
    fn save_state(&self) -> std::result::Result<Vec<Section>, String>;
    /// Validates saved state against this VM without changing anything.
    fn check_state(&self, sections: &[Section]) -> std::result::Result<(), String>;
    fn restore_state(&self, sections: &[Section]) -> std::result::Result<(), String>;
    /// Destination, the incoming migration done: run the guest (`resume`), or, for a
    /// destination started with `-S`, leave it paused until `cont` (as QEMU's autostart).
    fn resume_incoming(&self) {
        self.resume();
    }
    /// Destination: pages are about to arrive over the stream. A VM may back RAM differently
    /// when it is filled page by page (vmm's `pagesize`).
    fn before_receiving_pages(&self) {}
    /// Destination: the switchover has begun and the guest resumes within milliseconds.
    fn prepare_resume(&self) {}
    /// Source: the guest runs on the destination; called before `completed` is published, so
    /// whoever sees that status also sees the VM's post-migration run state (as QEMU sets
    /// `postmigrate` before a query can report `completed`).
    fn migration_completed(&self) {}
    /// Holds the vCPUs back `pct` percent of the time (auto-converge); 0 releases them.
    fn set_throttle(&self, pct: u8) {
        let _ = pct;
    }
    /// A short description both sides compare before any RAM moves (RAM size, vCPUs, devices).
    fn config_summary(&self) -> String;
    /// Source, at switchover, VM paused: drain and flush disks, release image locks.
    fn before_switchover(&self) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Source, after a failed switchover: take the image locks back before the guest resumes.
    fn after_failed_switchover(&self) -> std::result::Result<(), String> {
        Ok(())
    }
    /// Destination, after the state is restored and before the guest runs: re-read disk
    /// metadata and take the image locks.
    fn before_resume_incoming(&self) -> std::result::Result<(), String> {
        Ok(())
    }
}
