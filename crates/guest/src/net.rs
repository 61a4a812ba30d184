//! A minimal virtio-net driver and responder (CPL3, BSP only, with `net=on`): it answers ARP
//! requests for its IP address and ICMP echo requests (ping) to it, and counts frames. Polled
//! from the BSP's main loop (once per timer tick or sooner), so no interrupt is needed: the
//! used rings are read, the available rings carry `NO_INTERRUPT`.
//!
//! Device: virtio 1.x over virtio-mmio, found by scanning `0xfeb00000 + i*0x200` for device id
//! 1. Features accepted: `VERSION_1` (required), `MAC` (the address comes from the config space
//! unless `mac=` is given), `MRG_RXBUF` when offered (every buffer holds a whole frame, so
//! `num_buffers` is always 1, but the header layout is the same). Both queues have 16 entries;
//! each receive buffer and each transmit slot is 2 KiB (12-byte header + frame).
//!
//! The counters live in guest RAM, so they carry across migrations and snapshots; `s` prints
//! them. Frames are parsed defensively: anything short, truncated or not for us is counted in
//! `other` and ignored.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, AtomicU64, Ordering::*};

use crate::virtio::{
    rd, wr, F_VERSION_1, MAGIC, MMIO_BASE, MMIO_SLOTS, MMIO_STRIDE, R_CONFIG, R_DEVICE_ID, R_DEV_FEATURES,
    R_DEV_FEATURES_SEL, R_DRV_FEATURES, R_DRV_FEATURES_SEL, R_MAGIC, R_QUEUE_DESC, R_QUEUE_DEVICE, R_QUEUE_DRIVER,
    R_QUEUE_NOTIFY, R_QUEUE_NUM, R_QUEUE_NUM_MAX, R_QUEUE_READY, R_QUEUE_SEL, R_STATUS, R_VERSION,
    S_ACKNOWLEDGE as S_ACK, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK,
};

const F_MAC: u64 = 1 << 5;
const F_MRG_RXBUF: u64 = 1 << 15;

const QN: usize = 16;
const BUF: usize = 2048;
const HDR: usize = 12;
const DESC_F_WRITE: u64 = 2 << 32;

const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;

/// Frame counters (in guest RAM, so they migrate).
pub struct NetStats {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    pub arp: AtomicU64,
    pub icmp: AtomicU64,
    pub other: AtomicU64,
}
pub static STATS: NetStats = unsafe { core::mem::zeroed() };

#[repr(C, align(4096))]
struct Ring {
    desc: [[u64; 2]; QN],
    avail: [u16; 3 + QN],
    _pad: [u8; 512 - 16 * QN - 2 * (3 + QN)],
    used: [u32; 2 + 2 * QN],
}

#[repr(C, align(4096))]
struct NetMem {
    rx: Ring,
    tx: Ring,
    rxbuf: [[u8; BUF]; QN],
    txbuf: [[u8; BUF]; QN],
}
static MEM: crate::kernel::Racy<NetMem> = crate::kernel::Racy::new(unsafe { core::mem::zeroed() });


pub enum ProbeError {
    NoDevice,
    Features,
    Queue,
}

pub struct Nic {
    base: u64,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    rx_avail: u16,
    rx_seen: u16,
    tx_avail: u16,
    tx_seen: u16,
}

fn setup_queue(base: u64, q: u32, ring: *mut Ring) -> Result<(), ProbeError> {
    wr(base, R_QUEUE_SEL, q);
    if (rd(base, R_QUEUE_NUM_MAX) as usize) < QN || rd(base, R_QUEUE_READY) != 0 {
        return Err(ProbeError::Queue);
    }
    let desc = unsafe { &raw const (*ring).desc } as u64;
    let avail = unsafe { &raw const (*ring).avail } as u64;
    let used = unsafe { &raw const (*ring).used } as u64;
    unsafe { write_volatile(&raw mut (*ring).avail[0], 1) }; // VIRTQ_AVAIL_F_NO_INTERRUPT
    wr(base, R_QUEUE_NUM, QN as u32);
    wr(base, R_QUEUE_DESC, desc as u32);
    wr(base, R_QUEUE_DESC + 4, (desc >> 32) as u32);
    wr(base, R_QUEUE_DRIVER, avail as u32);
    wr(base, R_QUEUE_DRIVER + 4, (avail >> 32) as u32);
    wr(base, R_QUEUE_DEVICE, used as u32);
    wr(base, R_QUEUE_DEVICE + 4, (used >> 32) as u32);
    wr(base, R_QUEUE_READY, 1);
    Ok(())
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// The Internet checksum of `b`.
fn csum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    let mut i = 0;
    while i + 1 < b.len() {
        s += u32::from(be16(b, i));
        i += 2;
    }
    if i < b.len() {
        s += u32::from(b[i]) << 8;
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

impl Nic {
    /// Finds the first virtio-net device and brings it up; `mac` overrides the device's.
    pub fn probe(ip: [u8; 4], mac: Option<[u8; 6]>) -> Result<Nic, ProbeError> {
        let base = (0..MMIO_SLOTS)
            .map(|i| MMIO_BASE + i * MMIO_STRIDE)
            .find(|&b| rd(b, R_MAGIC) == MAGIC && rd(b, R_VERSION) == 2 && rd(b, R_DEVICE_ID) == 1)
            .ok_or(ProbeError::NoDevice)?;
        wr(base, R_STATUS, 0);
        wr(base, R_STATUS, S_ACK);
        wr(base, R_STATUS, S_ACK | S_DRIVER);
        wr(base, R_DEV_FEATURES_SEL, 0);
        let lo = rd(base, R_DEV_FEATURES) as u64;
        wr(base, R_DEV_FEATURES_SEL, 1);
        let feats = lo | (rd(base, R_DEV_FEATURES) as u64) << 32;
        if feats & F_VERSION_1 == 0 {
            return Err(ProbeError::Features);
        }
        let want = F_VERSION_1 | (feats & (F_MAC | F_MRG_RXBUF));
        wr(base, R_DRV_FEATURES_SEL, 0);
        wr(base, R_DRV_FEATURES, want as u32);
        wr(base, R_DRV_FEATURES_SEL, 1);
        wr(base, R_DRV_FEATURES, (want >> 32) as u32);
        wr(base, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        if rd(base, R_STATUS) & S_FEATURES_OK == 0 {
            return Err(ProbeError::Features);
        }
        let m = MEM.get();
        unsafe { core::ptr::write_bytes(m, 0, 1) };
        setup_queue(base, 0, unsafe { &raw mut (*m).rx })?;
        setup_queue(base, 1, unsafe { &raw mut (*m).tx })?;
        let mut dev_mac = [0u8; 6];
        if want & F_MAC != 0 {
            for (i, b) in dev_mac.iter_mut().enumerate() {
                *b = unsafe { read_volatile((base + R_CONFIG + i as u64) as *const u8) };
            }
        }
        let mut nic = Nic { base, mac: mac.unwrap_or(dev_mac), ip, rx_avail: 0, rx_seen: 0, tx_avail: 0, tx_seen: 0 };
        // Every receive buffer goes to the device once.
        for i in 0..QN {
            unsafe {
                let buf = &raw const (*m).rxbuf[i] as u64;
                write_volatile(&raw mut (*m).rx.desc[i][0], buf);
                write_volatile(&raw mut (*m).rx.desc[i][1], BUF as u64 | DESC_F_WRITE);
            }
            nic.post_rx(i as u16);
        }
        compiler_fence(SeqCst);
        unsafe { write_volatile(&raw mut (*m).rx.avail[1], nic.rx_avail) };
        wr(base, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        wr(base, R_QUEUE_NOTIFY, 0);
        Ok(nic)
    }

    /// Puts receive descriptor `id` in the available ring (published by the caller).
    fn post_rx(&mut self, id: u16) {
        let m = MEM.get();
        unsafe { write_volatile(&raw mut (*m).rx.avail[2 + (self.rx_avail as usize % QN)], id) };
        self.rx_avail = self.rx_avail.wrapping_add(1);
    }

    /// Handles every frame the device has delivered; returns how many.
    pub fn poll(&mut self) -> u64 {
        let m = MEM.get();
        self.reclaim_tx();
        let mut n = 0;
        loop {
            let used_idx = unsafe { read_volatile(&raw const (*m).rx.used[0]) >> 16 } as u16;
            if used_idx == self.rx_seen {
                break;
            }
            compiler_fence(SeqCst);
            let e = 1 + 2 * (self.rx_seen as usize % QN);
            let (id, len) = unsafe { (read_volatile(&raw const (*m).rx.used[e]), read_volatile(&raw const (*m).rx.used[e + 1])) };
            self.rx_seen = self.rx_seen.wrapping_add(1);
            n += 1;
            STATS.rx.fetch_add(1, Relaxed);
            if (id as usize) < QN {
                let len = (len as usize).min(BUF);
                let mut frame = [0u8; BUF];
                let buf = unsafe { &*(&raw const (*m).rxbuf[id as usize]) };
                frame[..len].copy_from_slice(&buf[..len]);
                if len > HDR {
                    self.handle(&frame[HDR..len]);
                }
                self.post_rx(id as u16);
            } else {
                STATS.other.fetch_add(1, Relaxed);
            }
        }
        if n > 0 {
            compiler_fence(SeqCst);
            unsafe { write_volatile(&raw mut (*m).rx.avail[1], self.rx_avail) };
            compiler_fence(SeqCst);
            wr(self.base, R_QUEUE_NOTIFY, 0);
        }
        n
    }

    fn reclaim_tx(&mut self) {
        let m = MEM.get();
        self.tx_seen = unsafe { read_volatile(&raw const (*m).tx.used[0]) >> 16 } as u16;
    }

    /// Sends `frame` (without header); dropped if every transmit slot is in flight.
    fn send(&mut self, frame: &[u8]) {
        self.reclaim_tx();
        if self.tx_avail.wrapping_sub(self.tx_seen) as usize >= QN || frame.len() + HDR > BUF {
            STATS.other.fetch_add(1, Relaxed);
            return;
        }
        let m = MEM.get();
        let slot = self.tx_avail as usize % QN;
        let len = (frame.len().max(60)) + HDR;
        unsafe {
            let buf = &mut *(&raw mut (*m).txbuf[slot]);
            buf[..HDR].fill(0);
            buf[HDR..HDR + frame.len()].copy_from_slice(frame);
            buf[HDR + frame.len()..len].fill(0);
            write_volatile(&raw mut (*m).tx.desc[slot][0], buf.as_ptr() as u64);
            write_volatile(&raw mut (*m).tx.desc[slot][1], len as u64);
            write_volatile(&raw mut (*m).tx.avail[2 + slot], slot as u16);
            compiler_fence(SeqCst);
            self.tx_avail = self.tx_avail.wrapping_add(1);
            write_volatile(&raw mut (*m).tx.avail[1], self.tx_avail);
        }
        compiler_fence(SeqCst);
        wr(self.base, R_QUEUE_NOTIFY, 1);
        STATS.tx.fetch_add(1, Relaxed);
    }

    fn handle(&mut self, f: &[u8]) {
        if f.len() < 14 {
            STATS.other.fetch_add(1, Relaxed);
            return;
        }
        let for_us = f[0..6] == self.mac || f[0..6] == [0xff; 6];
        match be16(f, 12) {
            ETH_ARP if for_us => self.arp(f),
            ETH_IP if f[0..6] == self.mac => self.ip(f),
            _ => {
                STATS.other.fetch_add(1, Relaxed);
            }
        }
    }

    fn arp(&mut self, f: &[u8]) {
        let a = &f[14..];
        // Ethernet/IPv4 request for our address.
        if a.len() < 28 || be16(a, 0) != 1 || be16(a, 2) != ETH_IP || a[4] != 6 || a[5] != 4 || be16(a, 6) != 1 || a[24..28] != self.ip {
            STATS.other.fetch_add(1, Relaxed);
            return;
        }
        let mut r = [0u8; 42];
        r[0..6].copy_from_slice(&a[8..14]);
        r[6..12].copy_from_slice(&self.mac);
        r[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
        r[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        r[22..28].copy_from_slice(&self.mac);
        r[28..32].copy_from_slice(&self.ip);
        r[32..42].copy_from_slice(&a[8..18]); // requester's MAC and IP
        STATS.arp.fetch_add(1, Relaxed);
        self.send(&r);
    }

    fn ip(&mut self, f: &[u8]) {
        let p = &f[14..];
        if p.len() < 20 || p[0] >> 4 != 4 {
            STATS.other.fetch_add(1, Relaxed);
            return;
        }
        let ihl = (p[0] & 15) as usize * 4;
        let total = be16(p, 2) as usize;
        // ICMP echo request to us, not fragmented, whole.
        if ihl < 20 || total < ihl + 8 || total > p.len() || p[9] != 1 || p[16..20] != self.ip || be16(p, 6) & 0x3fff != 0 || p[ihl] != 8 {
            STATS.other.fetch_add(1, Relaxed);
            return;
        }
        let mut r = [0u8; BUF];
        let n = 14 + total;
        r[0..6].copy_from_slice(&f[6..12]);
        r[6..12].copy_from_slice(&self.mac);
        r[12..14].copy_from_slice(&ETH_IP.to_be_bytes());
        r[14..n].copy_from_slice(&p[..total]);
        let q = &mut r[14..n];
        q[8] = 64; // TTL
        q[10..12].fill(0);
        let (src, dst) = ([q[12], q[13], q[14], q[15]], [q[16], q[17], q[18], q[19]]);
        q[12..16].copy_from_slice(&dst);
        q[16..20].copy_from_slice(&src);
        let c = csum(&q[..ihl]);
        q[10..12].copy_from_slice(&c.to_be_bytes());
        let icmp = &mut q[ihl..total];
        icmp[0] = 0; // echo reply
        icmp[2..4].fill(0);
        let c = csum(icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        STATS.icmp.fetch_add(1, Relaxed);
        self.send(&r[..n]);
    }
}
