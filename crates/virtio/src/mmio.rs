//! The virtio-mmio transport, register layout version 2 ("modern", virtio 1.x §4.2.2).
//!
//! One [`MmioTransport`] is one 0x200-byte MMIO window in front of one [`VirtioDevice`]. It
//! emulates the registers on the vCPU thread that trapped (it is a [`BusDevice`]): feature
//! negotiation (the driver must accept `VIRTIO_F_VERSION_1`), queue configuration, status with
//! reset, interrupt status/acknowledge, config generation and the device config space at
//! 0x100. When the driver sets `DRIVER_OK` the configured queues are validated against guest
//! memory and handed to the device, which then works on its own thread.
//!
//! Queue notifications: each queue has an eventfd. The VMM registers it with KVM as an
//! ioeventfd on `QueueNotify` ([`MmioTransport::ioevents`]), so a guest kick never leaves the
//! kernel; a `QueueNotify` write that does reach this transport (no ioeventfd registered)
//! signals the same eventfd, so both paths end on the device's worker thread.
//!
//! Interrupts: one eventfd ([`MmioTransport::irq_evt`]) that the VMM registers as an irqfd for
//! [`MmioTransport::gsi`]. Save/restore of the whole transport lives in `state.rs`.

use crate::device::{features, irq, status, ActivateContext, Interrupt, VirtioDevice};
use crate::error::{Error, Result};
use crate::{slot, GuestMemoryMmap, MMIO_SIZE};
use devices::bus::BusDevice;
use std::sync::{Arc, Mutex, MutexGuard};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// "virt" in little endian.
pub const MAGIC: u32 = 0x7472_6976;
/// Register layout version implemented (2 = virtio 1.x).
pub const VERSION: u32 = 2;
/// Vendor id reported to the guest: "GDWT" read as a little-endian u32.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"GDWT");

/// Register offsets within the window.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// An ioeventfd the VMM should register with KVM (`register_ioevent` on the MMIO bus, 4-byte
/// writes of `datamatch` at `addr`).
#[derive(Debug)]
pub struct IoEvent<'a> {
    /// Guest-physical address of `QueueNotify`.
    pub addr: u64,
    /// The queue index the guest writes there.
    pub datamatch: u32,
    /// The eventfd to signal.
    pub fd: &'a EventFd,
}

/// A virtio device on a virtio-mmio window.
pub struct MmioTransport<D: VirtioDevice> {
    pub(crate) index: usize,
    base: u64,
    gsi: u32,
    pub(crate) device: D,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) status: u32,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    pub(crate) driver_features: u64,
    pub(crate) queue_sel: u32,
    pub(crate) queues: Vec<Arc<Mutex<Queue>>>,
    queue_evts: Vec<EventFd>,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) config_generation: u32,
    pub(crate) activated: bool,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` in virtio-mmio slot `index` (address and GSI from [`crate::slot`]).
    pub fn new(index: usize, device: D, mem: GuestMemoryMmap) -> Result<Self> {
        let (base, gsi) = slot(index)?;
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for (i, &max) in device.queue_max_sizes().iter().enumerate() {
            let q = Queue::new(max).map_err(|source| Error::Queue { index: i, source })?;
            queues.push(Arc::new(Mutex::new(q)));
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(Error::io("queue eventfd"))?);
        }
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).map_err(Error::io("irq eventfd"))?));
        Ok(MmioTransport {
            index,
            base,
            gsi,
            device,
            mem,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            queue_evts,
            interrupt,
            config_generation: 0,
            activated: false,
        })
    }

    /// Guest-physical base of the register window.
    pub fn mmio_base(&self) -> u64 {
        self.base
    }
    /// Length of the register window (insert into the MMIO bus at `mmio_base()`).
    pub fn mmio_len(&self) -> u64 {
        MMIO_SIZE
    }
    /// The GSI to register [`MmioTransport::irq_evt`] for.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
    /// The interrupt eventfd (register with KVM as an irqfd on [`MmioTransport::gsi`]).
    pub fn irq_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }
    /// The queue notification eventfds to register as ioeventfds.
    pub fn ioevents(&self) -> Vec<IoEvent<'_>> {
        self.queue_evts
            .iter()
            .enumerate()
            .map(|(i, fd)| IoEvent { addr: self.base + reg::QUEUE_NOTIFY, datamatch: i as u32, fd })
            .collect()
    }
    /// The `virtio_mmio.device=` kernel command-line argument describing this device (for a
    /// Linux guest booted without ACPI/DT entries for it).
    pub fn cmdline_arg(&self) -> String {
        format!("virtio_mmio.device={:#x}@{:#x}:{}", MMIO_SIZE, self.base, self.gsi)
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }
    /// The device, mutably (e.g. to swap a disk backend while paused).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }
    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }
    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }
    /// Queue `i`'s progress: (next available index to take, next used index to fill).
    pub fn queue_indices(&self, i: usize) -> Option<(u16, u16)> {
        self.queues.get(i).map(|q| {
            let q = lock(q);
            (q.next_avail(), q.next_used())
        })
    }
    /// True once the driver set `DRIVER_OK` and the device took over the queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Quiesces the device: no new request is started, those in flight finish, the backend is
    /// flushed. Call with the vCPUs paused, before saving state or at migration switchover.
    pub fn pause(&mut self) -> Result<()> {
        self.device.pause()
    }
    /// Lets the device process requests again (also those queued while paused).
    pub fn resume(&mut self) {
        self.device.resume()
    }
    /// Makes the worker look at every queue (as if the driver had notified each).
    pub(crate) fn kick_all_queues(&self) {
        for e in &self.queue_evts {
            let _ = e.write(1);
        }
    }

    /// True between [`MmioTransport::pause`] and [`MmioTransport::resume`].
    pub fn is_paused(&self) -> bool {
        self.device.is_paused()
    }

    /// Tells the driver the config space changed (bumps the generation, raises the config
    /// interrupt).
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.trigger(irq::CONFIG);
        }
    }

    /// Resets the transport and the device, as the driver's write of 0 to `Status` does.
    pub fn reset(&mut self) {
        self.device.reset();
        for q in &self.queues {
            lock(q).reset();
        }
        for e in &self.queue_evts {
            let _ = e.read(); // drop stale kicks (EAGAIN when there are none)
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.set_status(0);
        self.activated = false;
    }

    fn features_ok(&self) -> bool {
        let offered = self.device.device_features();
        self.driver_features & !offered == 0 && self.driver_features & features::VERSION_1 != 0
    }

    /// Validates the queues and hands them to the device.
    pub(crate) fn activate(&mut self) -> Result<()> {
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        for (i, q) in self.queues.iter().enumerate() {
            let mut q = lock(q);
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(Error::BadQueue { index: i, reason: "rings are not in guest RAM" });
            }
        }
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for e in &self.queue_evts {
            evts.push(e.try_clone().map_err(Error::io("cloning a queue eventfd"))?);
        }
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            queues: self.queues.clone(),
            queue_evts: evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        })?;
        self.activated = true;
        Ok(())
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            tracing::warn!("virtio-mmio {}: driver cleared status bits ({old:#x} -> {v:#x}); ignored", self.index);
            return;
        }
        let mut new = v;
        let added = v & !old;
        if added & status::FEATURES_OK != 0 && !self.features_ok() {
            tracing::warn!(
                "virtio-mmio {}: driver features {:#x} refused (offered {:#x}, VERSION_1 required)",
                self.index,
                self.driver_features,
                self.device.device_features()
            );
            new &= !status::FEATURES_OK;
        }
        if added & status::DRIVER_OK != 0 {
            if new & status::FEATURES_OK == 0 || self.activated {
                new &= !status::DRIVER_OK;
            } else if let Err(e) = self.activate() {
                tracing::warn!("virtio-mmio {}: activation failed: {e}", self.index);
                new = (new & !status::DRIVER_OK) | status::DEVICE_NEEDS_RESET;
            }
        }
        self.status = new;
    }

    fn selected_queue(&self) -> Option<&Arc<Mutex<Queue>>> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Applies `f` to the selected queue if the driver may still configure it: before
    /// `DRIVER_OK`, and (except for `QueueReady` itself) while the queue is not ready.
    fn config_queue(&mut self, even_if_ready: bool, f: impl FnOnce(&mut Queue)) {
        if self.status & status::DRIVER_OK != 0 || self.activated {
            tracing::debug!("virtio-mmio {}: queue write after DRIVER_OK ignored", self.index);
            return;
        }
        if let Some(q) = self.selected_queue() {
            let mut q = lock(q);
            if even_if_ready || !q.ready() {
                f(&mut q);
            }
        }
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(lock(q).max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(lock(q).ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    tracing::debug!("virtio-mmio {}: DriverFeatures write outside negotiation ignored", self.index);
                    return;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => self.config_queue(false, |q| {
                let ok = u16::try_from(v).is_ok_and(|n| q.try_set_size(n).is_ok());
                if !ok {
                    tracing::warn!("virtqueue size {v} refused (power of two up to {} required)", q.max_size());
                }
            }),
            reg::QUEUE_READY => self.config_queue(true, |q| q.set_ready(v == 1)),
            reg::QUEUE_DESC_LOW => self.config_queue(false, |q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.config_queue(false, |q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.config_queue(false, |q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.config_queue(false, |q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.config_queue(false, |q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.config_queue(false, |q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => {
                // With VIRTIO_F_NOTIFICATION_DATA (not offered) the high bits would carry more.
                if let Some(e) = self.queue_evts.get((v & 0xffff) as usize) {
                    if let Err(e) = e.write(1) {
                        tracing::warn!("virtio-mmio {}: queue notify failed: {e}", self.index);
                    }
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio {}: write {v:#x} to {offset:#x} ignored", self.index),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            // Registers below 0x100 are 32-bit only.
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if let (4, 0) = (data.len(), offset % 4) {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, v);
        } else {
            tracing::debug!("virtio-mmio {}: {}-byte write to {offset:#x} ignored", self.index, data.len());
        }
    }
}

impl<D: VirtioDevice> Drop for MmioTransport<D> {
    fn drop(&mut self) {
        // Stop the worker before the queues and memory it uses go away.
        self.device.reset();
    }
}
