//! The virtio-blk device (virtio 1.x §5.2): one request queue served by a worker thread,
//! requests IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES against a [`BlockBackend`]. With a
//! backend that offers concurrent I/O ([`BlockBackend::parallel_io`]: raw images; the VMM's
//! drives also for the allocated clusters of qcow2 images), several data requests are in
//! flight at once on the device's I/O threads, straight between the image and guest memory
//! (see the `worker` and `pool` modules).
//!
//! Features offered: `VERSION_1`, `RING_INDIRECT_DESC`, `RING_EVENT_IDX`, `BLK_F_SEG_MAX`,
//! `BLK_F_BLK_SIZE` (512), `BLK_F_FLUSH`, `BLK_F_RO` for a read-only disk, and `BLK_F_DISCARD`
//! / `BLK_F_WRITE_ZEROES` when enabled in [`BlockConfig`] on a writable disk.
//!
//! Quiescing: [`VirtioDevice::pause`] stops the worker from starting new requests, waits for
//! those in flight to finish and be published, then flushes the backend; requests the driver
//! queues meanwhile stay in the available ring (not popped), so they survive a save/restore
//! exactly once. While paused
//! the backend can be replaced ([`Block::swap_backend`], migration handover) or used directly
//! ([`Block::with_backend`], e.g. for qcow2 snapshots).

pub mod policy;
mod pool;
mod request;
mod worker;

use crate::backend::BlockBackend;
use crate::device::{features, ActivateContext, VirtioDevice};
use crate::error::{Error, Result};
use crate::mmio::lock;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use virtio_bindings::virtio_blk as vb;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// virtio device id of a block device.
pub const DEVICE_ID: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Largest split virtqueue (virtio 1.x §2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Default (and maximum offered) queue size.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Longest serial the guest can read with GET_ID.
pub const SERIAL_LEN: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// Most ranges in one DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEG: u32 = 16;
/// Most sectors in one DISCARD / WRITE_ZEROES range (4 GiB - 512 B).
pub const MAX_DISCARD_SECTORS: u32 = (u32::MAX >> 9) & !7;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// How the VMM configures a disk.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Answer to GET_ID (at most 20 bytes; `-drive serial=`).
    pub serial: String,
    /// Queue size offered (power of two, 2..=32768).
    pub queue_size: u16,
    /// Refuse guest writes even if the backend is writable (`readonly=on`).
    pub read_only: bool,
    /// Offer DISCARD (when the disk is writable).
    pub discard: bool,
    /// Offer WRITE_ZEROES (when the disk is writable).
    pub write_zeroes: bool,
    /// What a failed backend I/O does (`werror`/`rerror`; QEMU's defaults).
    pub policy: policy::ErrorPolicy,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            serial: String::new(),
            queue_size: DEFAULT_QUEUE_SIZE,
            read_only: false,
            discard: true,
            write_zeroes: true,
            policy: policy::ErrorPolicy::default(),
        }
    }
}

/// The disk as the worker sees it.
pub(crate) type SharedBackend = Arc<Mutex<Box<dyn BlockBackend>>>;

/// Immutable facts about the disk the worker needs.
#[derive(Debug, Clone)]
pub(crate) struct DiskInfo {
    /// Usable size in bytes (whole sectors).
    pub capacity_bytes: u64,
    pub read_only: bool,
    pub serial: [u8; SERIAL_LEN],
    pub discard: bool,
    pub write_zeroes: bool,
    pub policy: policy::ErrorPolicy,
}

/// Worker control shared between the device and its thread.
#[derive(Debug, Default)]
pub(crate) struct Ctl {
    pub paused: bool,
    pub busy: bool,
    pub stop: bool,
    pub dead: bool,
    /// The worker stopped itself on a failed request (error policy `stop`); the request is
    /// back in the available ring and is retried on resume.
    pub io_error: bool,
}

pub(crate) struct Control {
    pub state: Mutex<Ctl>,
    pub cv: Condvar,
    /// Wakes the worker to look at `state` again.
    pub wake: EventFd,
}

/// A virtio-blk device.
pub struct Block {
    backend: SharedBackend,
    info: DiskInfo,
    features: u64,
    config_space: Vec<u8>,
    queue_sizes: [u16; 1],
    ctl: Arc<Control>,
    worker: Option<JoinHandle<()>>,
}

impl Block {
    /// A block device over `backend`.
    pub fn new(backend: Box<dyn BlockBackend>, config: BlockConfig) -> Result<Self> {
        let qs = config.queue_size;
        if qs < 2 || !qs.is_power_of_two() || qs > MAX_QUEUE_SIZE {
            return Err(Error::Config(format!("queue size {qs} is not a power of two in 2..=32768")));
        }
        if config.serial.len() > SERIAL_LEN {
            return Err(Error::Config(format!("serial '{}' is longer than {SERIAL_LEN} bytes", config.serial)));
        }
        let mut serial = [0u8; SERIAL_LEN];
        serial[..config.serial.len()].copy_from_slice(config.serial.as_bytes());
        let read_only = config.read_only || backend.is_read_only();
        let info = DiskInfo {
            capacity_bytes: backend.size() / SECTOR_SIZE * SECTOR_SIZE,
            read_only,
            serial,
            discard: config.discard && !read_only,
            write_zeroes: config.write_zeroes && !read_only,
            policy: config.policy,
        };
        let mut features = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | bit(vb::VIRTIO_BLK_F_SEG_MAX)
            | bit(vb::VIRTIO_BLK_F_BLK_SIZE)
            | bit(vb::VIRTIO_BLK_F_FLUSH);
        if read_only {
            features |= bit(vb::VIRTIO_BLK_F_RO);
        }
        if info.discard {
            features |= bit(vb::VIRTIO_BLK_F_DISCARD);
        }
        if info.write_zeroes {
            features |= bit(vb::VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let ctl = Arc::new(Control {
            state: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK).map_err(Error::io("worker eventfd"))?,
        });
        Ok(Block {
            config_space: config_space(&info, qs),
            backend: Arc::new(Mutex::new(backend)),
            info,
            features,
            queue_sizes: [qs],
            ctl,
            worker: None,
        })
    }

    /// Guest-visible capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.info.capacity_bytes / SECTOR_SIZE
    }

    /// True if guest writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.info.read_only
    }

    /// True while the device is stopped on a failed request (error policy `stop`).
    pub fn stopped_on_error(&self) -> bool {
        lock(&self.ctl.state).io_error
    }

    /// Runs `f` on the backend (waits for a request using the backend lock, not for direct
    /// I/O in flight through [`BlockBackend::parallel_io`]). Pause first for a consistent view,
    /// e.g. before a qcow2 snapshot.
    pub fn with_backend<R>(&self, f: impl FnOnce(&mut dyn BlockBackend) -> R) -> R {
        let mut b = lock(&self.backend);
        f(&mut **b)
    }

    /// Replaces the backend (migration handover: the destination reopens the image). The
    /// device must be paused; the new disk must have the same size and be writable if the old
    /// one was (the guest negotiated against those). Returns the old backend, flushed.
    pub fn swap_backend(&mut self, new: Box<dyn BlockBackend>) -> Result<Box<dyn BlockBackend>> {
        if !self.is_paused() {
            return Err(Error::NotPaused("swapping the disk backend"));
        }
        let new_cap = new.size() / SECTOR_SIZE * SECTOR_SIZE;
        if new_cap != self.info.capacity_bytes {
            return Err(Error::BackendMismatch(format!(
                "size {} bytes, the guest sees {} bytes",
                new_cap, self.info.capacity_bytes
            )));
        }
        if new.is_read_only() && !self.info.read_only {
            return Err(Error::BackendMismatch("read-only, the guest sees a writable disk".into()));
        }
        let mut b = lock(&self.backend);
        b.flush().map_err(|e| Error::Flush(e.to_string()))?;
        Ok(std::mem::replace(&mut *b, new))
    }

    fn stop_worker(&mut self) {
        if let Some(h) = self.worker.take() {
            lock(&self.ctl.state).stop = true;
            let _ = self.ctl.wake.write(1);
            if h.join().is_err() {
                tracing::error!("virtio-blk worker panicked");
            }
            let mut c = lock(&self.ctl.state);
            c.stop = false;
            c.busy = false;
            c.dead = false;
        }
    }
}

/// Builds `struct virtio_blk_config` (little endian, up to `write_zeroes_may_unmap`).
fn config_space(info: &DiskInfo, queue_size: u16) -> Vec<u8> {
    let mut c = vec![0u8; 0x3c];
    let mut put = |off: usize, b: &[u8]| c[off..off + b.len()].copy_from_slice(b);
    put(0x00, &(info.capacity_bytes / SECTOR_SIZE).to_le_bytes()); // capacity
    put(0x0c, &(u32::from(queue_size) - 2).to_le_bytes()); // seg_max
    put(0x14, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    put(0x22, &1u16.to_le_bytes()); // num_queues
    put(0x24, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    put(0x28, &MAX_DISCARD_SEG.to_le_bytes()); // max_discard_seg
    put(0x2c, &8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
    put(0x30, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    put(0x34, &MAX_DISCARD_SEG.to_le_bytes()); // max_write_zeroes_seg
    put(0x38, &[1]); // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }
    fn name(&self) -> &'static str {
        "blk"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let Ok(off) = usize::try_from(offset) else { return };
        if off < self.config_space.len() {
            let n = data.len().min(self.config_space.len() - off);
            data[..n].copy_from_slice(&self.config_space[off..off + n]);
        }
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: config write at {offset:#x} ignored (read-only config)");
    }
    fn config_len(&self) -> usize {
        self.config_space.len()
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        self.stop_worker();
        let w = worker::Worker::new(ctx, self.backend.clone(), self.info.clone(), self.ctl.clone())?;
        let h = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || w.run())
            .map_err(Error::io("spawning the virtio-blk worker"))?;
        self.worker = Some(h);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn pause(&mut self) -> Result<()> {
        {
            let mut c = lock(&self.ctl.state);
            c.paused = true;
            while c.busy && !c.dead {
                c = self.ctl.cv.wait(c).unwrap_or_else(|p| p.into_inner());
            }
            if c.dead {
                return Err(Error::WorkerDied("virtio-blk".into()));
            }
            // Stopped on a failed request: a flush now would only meet the same failure.
            if c.io_error {
                return Ok(());
            }
        }
        lock(&self.backend).flush().map_err(|e| Error::Flush(e.to_string()))
    }

    fn resume(&mut self) {
        {
            let mut c = lock(&self.ctl.state);
            c.paused = false;
            c.io_error = false;
        }
        let _ = self.ctl.wake.write(1);
    }

    fn is_paused(&self) -> bool {
        lock(&self.ctl.state).paused
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
