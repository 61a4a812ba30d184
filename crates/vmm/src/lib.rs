//! Godwit's VM core: a KVM virtual machine with its RAM, vCPU threads, the legacy devices and
//! the PVH boot path, plus the pieces savevm and live migration build on — a clean
//! pause/resume, dirty tracking and a complete save/restore of vCPU, VM and device state.

pub mod boot;
pub mod cpuid;
pub mod error;
pub mod linux;
pub mod memory;
pub mod netdev;
pub mod pagesize;
pub mod runner;
pub mod vcpu;
pub mod vm;
pub mod vmstate_kvm;

pub use error::{Error, Result};
pub use vm::{Vm, VmConfig};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: usize = 64;
