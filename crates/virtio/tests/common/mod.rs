//! A mock guest for the virtio tests: guest RAM, and a driver that programs the virtio-mmio
//! registers and writes descriptor tables and available rings itself, the way a guest kernel
//! would, then waits for the device's used-ring entries.
#![allow(dead_code)]

use devices::bus::BusDevice;
use std::time::{Duration, Instant};
use virtio::block::{Block, BlockConfig};
use virtio::device::status;
use virtio::mmio::reg;
use virtio::{BlockBackend, GuestMemoryMmap, MemDisk, MmioTransport, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};

pub const RAM: u64 = 16 << 20;
pub const Q: u16 = 16;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
pub const HEAP: u64 = 0x10000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const VERSION_1: u64 = 1 << 32;
pub const F_RO: u64 = 1 << 5;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
pub const F_EVENT_IDX: u64 = 1 << 29;

/// How long a test waits for the worker before declaring it stuck (a hang guard, not a
/// performance threshold).
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory")
}

/// Waits until `f` holds; panics (fails the test) after [`PATIENCE`].
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A descriptor as the driver writes it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Data part of a block request.
pub enum Data {
    None,
    /// Device-readable payload, split into this many descriptors.
    Out(Vec<u8>, usize),
    /// Device-writable buffer of this length, split into this many descriptors.
    In(usize, usize),
}

/// What came back for one request.
#[derive(Debug)]
pub struct Done {
    pub status: u8,
    pub used_len: u32,
    pub data: Vec<u8>,
}

pub struct Driver {
    pub mem: GuestMemoryMmap,
    pub dev: MmioTransport<Block>,
    pub avail_idx: u16,
    pub used_seen: u16,
    next_desc: u16,
    heap: u64,
    /// The queue size the driver set up (ring indices wrap at it).
    pub qsize: u16,
}

impl Driver {
    /// A device in slot 0 over `disk`, not yet initialised by the driver.
    pub fn raw(disk: MemDisk, cfg: BlockConfig) -> Self {
        Self::raw_on(Box::new(disk), cfg)
    }

    /// A device in slot 0 over any backend, not yet initialised by the driver.
    pub fn raw_on(disk: Box<dyn virtio::BlockBackend>, cfg: BlockConfig) -> Self {
        let mem = guest_memory();
        let blk = Block::new(disk, cfg).expect("block device");
        let dev = MmioTransport::new(0, blk, mem.clone()).expect("transport");
        Self::with(dev, mem)
    }

    pub fn with(dev: MmioTransport<Block>, mem: GuestMemoryMmap) -> Self {
        Driver { mem, dev, avail_idx: 0, used_seen: 0, next_desc: 0, heap: HEAP, qsize: Q }
    }

    /// A device the driver brought up, accepting every offered feature in `mask`.
    pub fn start(disk: MemDisk, cfg: BlockConfig, mask: u64) -> Self {
        Self::start_on(Box::new(disk), cfg, mask)
    }

    /// Like [`Driver::start`] over any backend.
    pub fn start_on(disk: Box<dyn virtio::BlockBackend>, cfg: BlockConfig, mask: u64) -> Self {
        let mut d = Self::raw_on(disk, cfg);
        let offered = d.device_features();
        assert!(d.negotiate(offered & mask), "features refused");
        d.setup_queue(Q);
        d.driver_ok();
        d
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes());
    }

    pub fn device_features(&mut self) -> u64 {
        self.w32(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r32(reg::DEVICE_FEATURES) as u64;
        self.w32(reg::DEVICE_FEATURES_SEL, 1);
        lo | (self.r32(reg::DEVICE_FEATURES) as u64) << 32
    }

    /// Reset, ACKNOWLEDGE, DRIVER, write `want`, FEATURES_OK; true if the device kept it.
    pub fn negotiate(&mut self, want: u64) -> bool {
        self.w32(reg::STATUS, 0);
        self.w32(reg::STATUS, status::ACKNOWLEDGE);
        self.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.w32(reg::DRIVER_FEATURES_SEL, 0);
        self.w32(reg::DRIVER_FEATURES, want as u32);
        self.w32(reg::DRIVER_FEATURES_SEL, 1);
        self.w32(reg::DRIVER_FEATURES, (want >> 32) as u32);
        self.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.r32(reg::STATUS) & status::FEATURES_OK != 0
    }

    pub fn setup_queue(&mut self, size: u16) {
        self.qsize = size;
        self.w32(reg::QUEUE_SEL, 0);
        self.w32(reg::QUEUE_NUM, size as u32);
        self.w32(reg::QUEUE_DESC_LOW, DESC as u32);
        self.w32(reg::QUEUE_DESC_HIGH, 0);
        self.w32(reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        self.w32(reg::QUEUE_DRIVER_HIGH, 0);
        self.w32(reg::QUEUE_DEVICE_LOW, USED as u32);
        self.w32(reg::QUEUE_DEVICE_HIGH, 0);
        self.w32(reg::QUEUE_READY, 1);
    }

    pub fn driver_ok(&mut self) {
        let s = self.r32(reg::STATUS);
        self.w32(reg::STATUS, s | status::DRIVER_OK);
    }

    /// Allocates guest memory for a buffer (16-byte aligned, wraps around).
    pub fn alloc(&mut self, len: u64) -> u64 {
        if self.heap + len > RAM - 0x1000 {
            self.heap = HEAP;
        }
        let a = self.heap;
        self.heap = (a + len + 15) & !15;
        a
    }

    pub fn write_desc(&self, i: u16, d: Desc) {
        let a = DESC + 16 * u64::from(i);
        self.mem.write_obj(d.addr, GuestAddress(a)).unwrap();
        self.mem.write_obj(d.len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(d.flags, GuestAddress(a + 12)).unwrap();
        self.mem.write_obj(d.next, GuestAddress(a + 14)).unwrap();
    }

    /// Puts `head` in the available ring (the device sees it once the index is bumped).
    pub fn push_avail(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % self.qsize);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    pub fn notify(&mut self) {
        self.w32(reg::QUEUE_NOTIFY, 0);
    }

    /// Writes a chain of consecutive descriptors for `bufs` (addr, len, device-writable).
    pub fn chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.qsize;
            let last = k + 1 == bufs.len();
            let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(i, Desc { addr, len, flags, next: (i + 1) % self.qsize });
        }
        self.next_desc = (head + bufs.len() as u16) % self.qsize;
        head
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// Waits for `n` more used entries; returns them as (id, len).
    pub fn wait_used(&mut self, n: u16) -> Vec<(u32, u32)> {
        let target = self.used_seen.wrapping_add(n);
        wait_for("used ring entries", || self.used_idx() == target);
        let mut out = Vec::new();
        while self.used_seen != target {
            let e = USED + 4 + 8 * u64::from(self.used_seen % self.qsize);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Builds a block request and queues it (without notifying); returns the status and data
    /// addresses.
    pub fn queue_request(&mut self, kind: u32, sector: u64, data: &Data) -> (u64, Vec<(u64, u32)>) {
        let hdr = self.alloc(16);
        self.mem.write_obj(kind, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        let mut bufs = vec![(hdr, 16u32, false)];
        let mut pieces = Vec::new();
        let (bytes, n, write) = match data {
            Data::None => (0, 1, false),
            Data::Out(v, n) => (v.len(), *n, false),
            Data::In(len, n) => (*len, *n, true),
        };
        if bytes > 0 {
            let base = self.alloc(bytes as u64);
            if let Data::Out(v, _) = data {
                self.mem.write_slice(v, GuestAddress(base)).unwrap();
            } else {
                self.mem.write_slice(&vec![0xee; bytes], GuestAddress(base)).unwrap();
            }
            let step = bytes.div_ceil(n.max(1));
            let mut off = 0;
            while off < bytes {
                let l = step.min(bytes - off);
                bufs.push((base + off as u64, l as u32, write));
                pieces.push((base + off as u64, l as u32));
                off += l;
            }
        }
        let st = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        bufs.push((st, 1, true));
        let head = self.chain(&bufs);
        self.push_avail(head);
        (st, pieces)
    }

    /// One block request, start to finish.
    pub fn request(&mut self, kind: u32, sector: u64, data: Data) -> Done {
        let (st, pieces) = self.queue_request(kind, sector, &data);
        self.notify();
        let used = self.wait_used(1);
        let status: u8 = self.mem.read_obj(GuestAddress(st)).unwrap();
        let mut out = Vec::new();
        if let Data::In(..) = data {
            for (a, l) in pieces {
                let mut b = vec![0u8; l as usize];
                self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                out.extend_from_slice(&b);
            }
        }
        Done { status, used_len: used[0].1, data: out }
    }

    pub fn write(&mut self, sector: u64, data: Vec<u8>) -> u8 {
        self.request(T_OUT, sector, Data::Out(data, 1)).status
    }

    pub fn read(&mut self, sector: u64, len: usize) -> (u8, Vec<u8>) {
        let d = self.request(T_IN, sector, Data::In(len, 1));
        (d.status, d.data)
    }

    /// A sync point: pause waits for the worker to go idle.
    pub fn settle(&mut self) {
        self.dev.pause().expect("pause");
        self.dev.resume();
    }

    /// Waits until the device has taken every request the driver made available (whether or
    /// not it could return them), using pause as the sync point.
    pub fn drain(&mut self) {
        let target = self.avail_idx;
        let dev = &mut self.dev;
        wait_for("the device to take all requests", || {
            dev.pause().expect("pause");
            let (next_avail, _) = dev.queue_indices(0).unwrap();
            dev.resume();
            next_avail == target
        });
    }

    pub fn status_byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn device(&self) -> &Block {
        self.dev.device()
    }

    pub fn paused(&self) -> bool {
        self.dev.device().is_paused()
    }
}

/// A pattern that differs per sector and per generation.
pub fn pattern(sector: u64, len: usize, gen: u8) -> Vec<u8> {
    (0..len).map(|i| (sector as usize * 31 + i * 7 + gen as usize) as u8).collect()
}

/// A backend that counts every call (also failing ones) before passing it to a [`MemDisk`]:
/// shows whether the device itself stopped a bad request or left it to the backend.
pub struct Spy {
    pub disk: MemDisk,
    pub calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Spy {
    pub fn new(disk: MemDisk) -> (Self, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        (Spy { disk, calls: calls.clone() }, calls)
    }
    fn hit(&self) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl BlockBackend for Spy {
    fn format(&self) -> virtio::backend::ImageFormat {
        virtio::backend::ImageFormat::Raw
    }
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn is_read_only(&self) -> bool {
        self.disk.is_read_only()
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> qcow2::Result<()> {
        self.hit();
        self.disk.read_at(off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> qcow2::Result<()> {
        self.hit();
        self.disk.write_at(off, buf)
    }
    fn flush(&mut self) -> qcow2::Result<()> {
        self.disk.flush()
    }
    fn discard(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        self.hit();
        self.disk.discard(off, len)
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        self.hit();
        self.disk.write_zeroes(off, len)
    }
}
