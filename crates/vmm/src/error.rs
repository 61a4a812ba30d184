//! Typed errors of the VM core.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM: {op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("invalid memory size: {0}")]
    MemorySize(String),
    #[error("cannot allocate {size} MiB of guest memory: {reason}")]
    MemoryAlloc { size: u64, reason: String },
    #[error("guest memory access at {addr:#x}: {reason}")]
    GuestMemory { addr: u64, reason: String },
    #[error("invalid vCPU count {0} (1..={max})", max = crate::MAX_VCPUS)]
    VcpuCount(usize),
    #[error("kernel '{path}': {reason}")]
    Kernel { path: PathBuf, reason: String },
    #[error("initrd '{path}': {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("vCPU {0} thread: {1}")]
    VcpuThread(usize, String),
    #[error("device setup: {0}")]
    Device(String),
    #[error(transparent)]
    State(#[from] vmstate::StateError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for mapping a kvm-ioctls error with the operation's name.
pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}
