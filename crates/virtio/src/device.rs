//! What a virtio device is to its transport: the [`VirtioDevice`] trait (identity, features,
//! config space, activation with the driver's queues, reset, quiesce), the shared
//! [`Interrupt`] line, and the virtio status and feature constants the transport uses.
//!
//! The transport ([`crate::mmio::MmioTransport`]) owns the queues' configuration and the
//! notification eventfds; when the driver sets `DRIVER_OK` it hands them to the device, which
//! processes requests on its own worker thread and signals completions through [`Interrupt`].

use crate::error::Result;
use crate::GuestMemoryMmap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Transport-level feature bits this crate deals with.
pub mod features {
    /// virtio 1.x ("modern") device; the transport refuses drivers that do not accept it.
    pub const VERSION_1: u64 = 1 << 32;
    /// Indirect descriptor tables (handled by `virtio-queue`'s chain walker).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event`/`avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// Interrupt status bits (the virtio-mmio `InterruptStatus` register).
pub mod irq {
    /// The device used a buffer in at least one virtqueue.
    pub const VRING: u32 = 1;
    /// The device configuration changed.
    pub const CONFIG: u32 = 2;
}

/// The interrupt line of one device: the `InterruptStatus` bits plus the eventfd that the VMM
/// registers with KVM as an irqfd (GSI from [`crate::slot`]).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub(crate) fn new(evt: EventFd) -> Self {
        Interrupt { status: AtomicU32::new(0), evt }
    }

    /// Sets `bits` in the interrupt status and pulses the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!("virtio: raising the interrupt failed: {e}");
        }
    }

    /// The current `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits (`InterruptACK`).
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn set_status(&self, v: u32) {
        self.status.store(v, Ordering::SeqCst);
    }

    /// The eventfd KVM turns into the interrupt.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// What a device receives when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory (clones share the mapping and its dirty bitmap).
    pub mem: GuestMemoryMmap,
    /// The driver-configured queues, shared with the transport (which reads them for state).
    pub queues: Vec<Arc<Mutex<Queue>>>,
    /// One notification eventfd per queue (clones of those the VMM registered as ioeventfds;
    /// the transport also signals them on `QueueNotify` writes that reach it).
    pub queue_evts: Vec<EventFd>,
    /// The interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block).
    fn device_type(&self) -> u32;
    /// Short name used in the state section id (`dev.virtio-<name><index>`).
    fn name(&self) -> &'static str;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (including [`features::VERSION_1`]).
    fn device_features(&self) -> u64;
    /// Reads the device config space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space (ignored where read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Size of the config space in bytes.
    fn config_len(&self) -> usize;
    /// Starts processing the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<()>;
    /// Stops processing (waits for the worker) and forgets the activation.
    fn reset(&mut self);
    /// Quiesces: stops taking new requests, waits for those in flight, flushes. Idempotent.
    fn pause(&mut self) -> Result<()>;
    /// Undoes [`VirtioDevice::pause`]; requests the driver queued meanwhile are then processed.
    fn resume(&mut self);
    /// True between `pause` and `resume`.
    fn is_paused(&self) -> bool;
}
