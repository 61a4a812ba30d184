//! # virtio — Godwit's virtio devices
//!
//! A virtio-mmio transport (register layout version 2, virtio 1.x only) and a virtio-blk
//! device that serves its queue on a worker thread, through `vm-memory` (every device write
//! to guest RAM lands in the dirty bitmap) and `virtio-queue`.
//!
//! ## Placement contract
//! The same as QEMU's `microvm` machine, so one guest driver works under both: device `i` has
//! its 0x200-byte register window at [`MMIO_BASE`]` + i * `[`MMIO_STRIDE`] and raises GSI
//! [`IRQ_BASE`]` + i` (IOAPIC pins 16..23, so at most [`MAX_DEVICES`] devices). [`slot`]
//! computes both. A Linux guest without firmware tables finds a device from the
//! `virtio_mmio.device=0x200@0xfeb00000:16` command-line argument
//! ([`MmioTransport::cmdline_arg`]).
//!
//! ## What the VMM does
//! ```no_run
//! # use virtio::*;
//! # fn f(mem: GuestMemoryMmap, disk: Box<dyn BlockBackend>) -> Result<()> {
//! let blk = Block::new(disk, BlockConfig { serial: "disk0".into(), ..Default::default() })?;
//! let dev = MmioTransport::new(0, blk, mem)?;        // slot 0: 0xfeb00000, GSI 16
//! // vm.register_irqfd(dev.irq_evt(), dev.gsi());
//! // for e in dev.ioevents() { vm.register_ioevent(e.fd, &IoEventAddress::Mmio(e.addr), e.datamatch) }
//! // mmio_bus.insert(dev.mmio_base(), dev.mmio_len(), Arc::new(Mutex::new(dev)))
//! # Ok(()) }
//! ```
//! Then, with the vCPUs paused:
//! - `pause()` drains the requests in flight and flushes the disk: call it before
//!   `save_state()` (savevm, migration switchover) and before touching the image directly
//!   (`device().with_backend(|b| b.as_qcow2() ...)` for internal snapshots);
//! - `restore_state()` once guest RAM is in place (a running device re-activates and serves
//!   what is pending in the rings, unless it is paused); it keeps the paused/running mode;
//! - `device_mut().swap_backend(new)` while paused hands the disk over to a reopened image
//!   (migration destination) and returns the old one, flushed;
//! - `resume()` when the vCPUs run again.
//!
//! Requests are served on one worker thread per device; a `QueueNotify` write that reaches
//! the transport (no ioeventfd registered) only signals that thread, so the vCPU never waits
//! for the disk.
//!
//! ## Modules
//! - [`mmio`]: the transport registers, activation, notification/interrupt plumbing.
//! - [`device`]: the [`VirtioDevice`] trait and the shared interrupt line.
//! - [`block`]: virtio-blk (config space, requests, worker thread).
//! - [`net`]: virtio-net on a tap (receive/transmit thread, announcements after a move).
//! - [`backend`]: the [`BlockBackend`] disk interface (from `qcow2`) and an in-memory disk.
//! - `state`: [`vmstate::Stateful`] for the transport.

pub mod backend;
pub mod block;
pub mod device;
pub mod dirty;
pub mod error;
pub mod mmio;
pub mod net;
mod state;

pub use backend::{BackendError, BlockBackend, MemDisk};
pub use qcow2;
pub use block::policy::{ErrorAction, ErrorHook, ErrorPolicy, IoErrorReport};
pub use block::{Block, BlockConfig};
pub use device::{Interrupt, VirtioDevice};
pub use error::{Error, Result};
pub use mmio::{IoEvent, MmioTransport};
pub use crate::net::{Net, NetConfig, NetCounters};
pub use state::STATE_VERSION;

/// Guest memory as the VMM allocates it: mmap-backed regions with a dirty bitmap
/// ([`dirty::DirtyBitmap`]) that every `vm-memory` write marks.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<dirty::DirtyBitmap>;

/// Guest-physical address of the first virtio-mmio window.
pub const MMIO_BASE: u64 = 0xfeb0_0000;
/// Distance between two windows.
pub const MMIO_STRIDE: u64 = 0x200;
/// Size of one window.
pub const MMIO_SIZE: u64 = 0x200;
/// GSI of the first device.
pub const IRQ_BASE: u32 = 16;
/// Number of slots (GSIs 16..=23 on the IOAPIC).
pub const MAX_DEVICES: usize = 8;

/// The window address and GSI of virtio-mmio device `index`.
pub fn slot(index: usize) -> Result<(u64, u32)> {
    if index >= MAX_DEVICES {
        return Err(Error::NoSlot { index, max: MAX_DEVICES });
    }
    Ok((MMIO_BASE + index as u64 * MMIO_STRIDE, IRQ_BASE + index as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_microvm_layout() {
        assert_eq!(slot(0).unwrap(), (0xfeb0_0000, 16));
        assert_eq!(slot(3).unwrap(), (0xfeb0_0600, 19));
        assert_eq!(slot(7).unwrap(), (0xfeb0_0e00, 23));
        assert!(matches!(slot(8), Err(Error::NoSlot { index: 8, .. })));
    }
}
