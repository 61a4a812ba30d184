//! A polled virtio-blk driver over virtio-mmio (virtio 1.x, register layout version 2), run at
//! CPL3: one virtqueue, no interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT). The disk ledger keeps one
//! request in flight (`submit`/`poll`, slot 0); the throughput benchmark up to [`SLOTS`]
//! (`push`/`kick`/`reap`): slot k owns descriptors 3k..3k+2 and its own header and status byte.
//! Transports are looked for at QEMU microvm's addresses, `0xfeb00000 + i * 0x200`, i < 24.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicU64, Ordering::SeqCst};

pub(crate) const MMIO_BASE: u64 = 0xfeb0_0000;
pub(crate) const MMIO_STRIDE: u64 = 0x200;
pub(crate) const MMIO_SLOTS: u64 = 24;
pub(crate) const MAGIC: u32 = 0x7472_6976;

pub(crate) const R_MAGIC: u64 = 0x000;
pub(crate) const R_VERSION: u64 = 0x004;
pub(crate) const R_DEVICE_ID: u64 = 0x008;
pub(crate) const R_DEV_FEATURES: u64 = 0x010;
pub(crate) const R_DEV_FEATURES_SEL: u64 = 0x014;
pub(crate) const R_DRV_FEATURES: u64 = 0x020;
pub(crate) const R_DRV_FEATURES_SEL: u64 = 0x024;
pub(crate) const R_QUEUE_SEL: u64 = 0x030;
pub(crate) const R_QUEUE_NUM_MAX: u64 = 0x034;
pub(crate) const R_QUEUE_NUM: u64 = 0x038;
pub(crate) const R_QUEUE_READY: u64 = 0x044;
pub(crate) const R_QUEUE_NOTIFY: u64 = 0x050;
/// `VIRTQ_USED_F_NO_NOTIFY` in the used ring's flags: the device needs no notification now.
const USED_F_NO_NOTIFY: u16 = 1;
pub(crate) const R_STATUS: u64 = 0x070;
pub(crate) const R_QUEUE_DESC: u64 = 0x080;
pub(crate) const R_QUEUE_DRIVER: u64 = 0x090;
pub(crate) const R_QUEUE_DEVICE: u64 = 0x0a0;
pub(crate) const R_CONFIG_GEN: u64 = 0x0fc;
pub(crate) const R_CONFIG: u64 = 0x100;

pub(crate) const S_ACKNOWLEDGE: u32 = 1;
pub(crate) const S_DRIVER: u32 = 2;
pub(crate) const S_DRIVER_OK: u32 = 4;
pub(crate) const S_FEATURES_OK: u32 = 8;

const F_BLK_RO: u64 = 1 << 5;
const F_BLK_FLUSH: u64 = 1 << 9;
pub(crate) const F_VERSION_1: u64 = 1 << 32;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;

const QSIZE: u16 = 64;
/// Requests that can be in flight at once (three descriptors each).
pub const SLOTS: usize = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// The virtqueue and the request header/status, in one page of guest RAM.
#[repr(C, align(4096))]
struct QueueMem {
    desc: [[u64; 2]; QSIZE as usize], // addr, (len u32 | flags u16 | next u16)
    avail: [u16; 3 + QSIZE as usize],
    _pad0: [u8; 256 - 2 * (3 + QSIZE as usize)],
    used: [u32; 1 + 2 * QSIZE as usize + 1],
    _pad1: [u8; 248],
    hdr: [[u64; 2]; SLOTS],
    status: [[u8; 16]; SLOTS],
}
static QMEM: crate::kernel::Racy<QueueMem> = crate::kernel::Racy::new(unsafe { core::mem::zeroed() });

pub struct Blk {
    base: u64,
    qn: u16,
    avail_idx: u16,
    used_seen: u16,
    pub flush: bool,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub busy: bool,
    /// Requests that fit in flight at once with this queue size (at most [`SLOTS`]).
    pub slots: usize,
}

#[inline(always)]
pub(crate) fn rd(base: u64, off: u64) -> u32 {
    unsafe { read_volatile((base + off) as *const u32) }
}
#[inline(always)]
pub(crate) fn wr(base: u64, off: u64, v: u32) {
    unsafe { write_volatile((base + off) as *mut u32, v) }
}

pub enum ProbeError {
    NoDevice,
    ReadOnly,
    Features,
    Queue,
}

impl Blk {
    /// Find the first virtio-blk transport and bring it up.
    pub fn probe() -> Result<Blk, ProbeError> {
        let base = (0..MMIO_SLOTS)
            .map(|i| MMIO_BASE + i * MMIO_STRIDE)
            .find(|&b| rd(b, R_MAGIC) == MAGIC && rd(b, R_VERSION) == 2 && rd(b, R_DEVICE_ID) == 2)
            .ok_or(ProbeError::NoDevice)?;
        wr(base, R_STATUS, 0);
        wr(base, R_STATUS, S_ACKNOWLEDGE);
        wr(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        wr(base, R_DEV_FEATURES_SEL, 0);
        let lo = rd(base, R_DEV_FEATURES) as u64;
        wr(base, R_DEV_FEATURES_SEL, 1);
        let feats = lo | (rd(base, R_DEV_FEATURES) as u64) << 32;
        if feats & F_VERSION_1 == 0 {
            return Err(ProbeError::Features);
        }
        if feats & F_BLK_RO != 0 {
            return Err(ProbeError::ReadOnly);
        }
        let want = F_VERSION_1 | (feats & F_BLK_FLUSH);
        wr(base, R_DRV_FEATURES_SEL, 0);
        wr(base, R_DRV_FEATURES, want as u32);
        wr(base, R_DRV_FEATURES_SEL, 1);
        wr(base, R_DRV_FEATURES, (want >> 32) as u32);
        wr(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if rd(base, R_STATUS) & S_FEATURES_OK == 0 {
            return Err(ProbeError::Features);
        }
        wr(base, R_QUEUE_SEL, 0);
        let max = rd(base, R_QUEUE_NUM_MAX);
        if max < 3 || rd(base, R_QUEUE_READY) != 0 {
            return Err(ProbeError::Queue);
        }
        let q = QMEM.get();
        let n = (QSIZE as u32).min(max);
        unsafe { core::ptr::write_bytes(q, 0, 1) };
        let desc = unsafe { &raw const (*q).desc } as u64;
        let avail = unsafe { &raw const (*q).avail } as u64;
        let used = unsafe { &raw const (*q).used } as u64;
        unsafe { write_volatile(&raw mut (*q).avail[0], 1) }; // VIRTQ_AVAIL_F_NO_INTERRUPT
        wr(base, R_QUEUE_NUM, n);
        wr(base, R_QUEUE_DESC, desc as u32);
        wr(base, R_QUEUE_DESC + 4, (desc >> 32) as u32);
        wr(base, R_QUEUE_DRIVER, avail as u32);
        wr(base, R_QUEUE_DRIVER + 4, (avail >> 32) as u32);
        wr(base, R_QUEUE_DEVICE, used as u32);
        wr(base, R_QUEUE_DEVICE + 4, (used >> 32) as u32);
        wr(base, R_QUEUE_READY, 1);
        wr(base, R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let capacity = loop {
            let g = rd(base, R_CONFIG_GEN);
            let c = rd(base, R_CONFIG) as u64 | (rd(base, R_CONFIG + 4) as u64) << 32;
            if rd(base, R_CONFIG_GEN) == g {
                break c;
            }
        };
        let slots = (n as usize / 3).min(SLOTS);
        Ok(Blk { base, qn: n as u16, avail_idx: 0, used_seen: 0, flush: want & F_BLK_FLUSH != 0, capacity, busy: false, slots })
    }

    /// Queue one request (header, optional data buffer, status) and notify the device.
    pub fn submit(&mut self, kind: u32, sector: u64, buf: u64, len: u32) {
        self.push(0, kind, sector, buf, len);
        self.kick();
        self.busy = true;
    }

    /// Make request `slot` (< `slots`, not in flight) available to the device, without
    /// notifying it yet.
    pub fn push(&mut self, slot: usize, kind: u32, sector: u64, buf: u64, len: u32) {
        let q = QMEM.get();
        let d0 = (3 * slot) as u16;
        unsafe {
            write_volatile(&raw mut (*q).hdr[slot][0], kind as u64);
            write_volatile(&raw mut (*q).hdr[slot][1], sector);
            write_volatile(&raw mut (*q).status[slot][0], 0xff);
            let hdr = &raw const (*q).hdr[slot] as u64;
            let st = &raw const (*q).status[slot] as u64;
            let d = &raw mut (*q).desc;
            let pack = |len: u32, flags: u16, next: u16| len as u64 | (flags as u64) << 32 | (next as u64) << 48;
            let (i0, i1, i2) = (d0 as usize, d0 as usize + 1, d0 as usize + 2);
            write_volatile(&raw mut (*d)[i0][0], hdr);
            if len > 0 {
                write_volatile(&raw mut (*d)[i0][1], pack(16, DESC_F_NEXT, d0 + 1));
                let f = if kind == T_IN { DESC_F_WRITE | DESC_F_NEXT } else { DESC_F_NEXT };
                write_volatile(&raw mut (*d)[i1][0], buf);
                write_volatile(&raw mut (*d)[i1][1], pack(len, f, d0 + 2));
            } else {
                write_volatile(&raw mut (*d)[i0][1], pack(16, DESC_F_NEXT, d0 + 2));
            }
            write_volatile(&raw mut (*d)[i2][0], st);
            write_volatile(&raw mut (*d)[i2][1], pack(1, DESC_F_WRITE, 0));
            let a = &raw mut (*q).avail;
            write_volatile(&raw mut (*a)[2 + (self.avail_idx % self.qn) as usize], d0);
            compiler_fence(SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            write_volatile(&raw mut (*a)[1], self.avail_idx);
        }
    }

    /// Notify the device of what `push` made available — unless the device said it does not
    /// need it (`VIRTQ_USED_F_NO_NOTIFY`: it is serving or watching the ring), as Linux's
    /// driver does. The available index must be visible before the flag is read; a device
    /// that clears the flag re-reads the ring afterwards, so one side always sees the other.
    /// The barrier is a locked exchange (`mfence` is not emulated at CPL0 on every host).
    pub fn kick(&mut self) {
        static BARRIER: AtomicU64 = AtomicU64::new(0);
        BARRIER.swap(0, SeqCst);
        let q = QMEM.get();
        let flags = unsafe { read_volatile(&raw const (*q).used[0]) } as u16;
        if flags & USED_F_NO_NOTIFY != 0 {
            return;
        }
        wr(self.base, R_QUEUE_NOTIFY, 0);
    }

    /// The next completed request, if any: (slot, status byte).
    pub fn reap(&mut self) -> Option<(usize, u8)> {
        let q = QMEM.get();
        let used_idx = unsafe { read_volatile(&raw const (*q).used[0]) >> 16 } as u16;
        if used_idx == self.used_seen {
            return None;
        }
        compiler_fence(SeqCst);
        let e = (self.used_seen % self.qn) as usize;
        let id = unsafe { read_volatile(&raw const (*q).used[1 + 2 * e]) } as usize;
        self.used_seen = self.used_seen.wrapping_add(1);
        let slot = (id / 3).min(SLOTS - 1);
        Some((slot, unsafe { read_volatile(&raw const (*q).status[slot][0]) }))
    }

    /// The status byte of the request in flight once the device has completed it.
    pub fn poll(&mut self) -> Option<u8> {
        if !self.busy {
            return None;
        }
        let (_, st) = self.reap()?;
        self.busy = false;
        Some(st)
    }
}
