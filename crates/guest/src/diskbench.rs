//! The disk throughput benchmark (CPL3, BSP, `diskbench=OP`): for `secs` seconds, keep `qd`
//! requests of one kind in flight on the virtio-blk disk, then print one `DISKBENCH` line
//! (docs/guest.md). Polled, no interrupts, so the numbers measure the VMM's request path
//! (notification → device → completion in the used ring), not interrupt delivery.
//!
//! - `randread4k` / `randwrite4k`: 4 KiB requests at uniformly random 4 KiB-aligned offsets
//!   of the first `disk_mib` MiB (a fixed xorshift seed: every run, and both VMMs, see the
//!   same offsets).
//! - `seqread1m` / `seqwrite1m`: 1 MiB requests walking the first `disk_mib` MiB in order,
//!   wrapping around.
//!
//! New requests are made available in a batch and the device notified once per batch (one
//! MMIO write), as a Linux driver does with a plugged queue. The I/O buffers are the first
//! `qd` × request-size bytes of the memory region (so `mode=dirty` and `v` are not combined
//! with it); they are touched before the clock starts. Writes end with one flush, timed
//! separately (`flush_ms`): it is not part of the throughput.

use crate::config::Config;
use crate::fmt::Line;
use crate::kernel::{rdtsc, K};
use crate::virtio::{Blk, ProbeError, SLOTS, T_FLUSH, T_IN, T_OUT};
use core::sync::atomic::Ordering::Relaxed;

/// A workload.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Op {
    None,
    RandRead4k,
    RandWrite4k,
    SeqRead1m,
    SeqWrite1m,
}

impl Op {
    pub fn parse(v: &[u8]) -> Op {
        match v {
            b"randread4k" => Op::RandRead4k,
            b"randwrite4k" => Op::RandWrite4k,
            b"seqread1m" => Op::SeqRead1m,
            b"seqwrite1m" => Op::SeqWrite1m,
            _ => Op::None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Op::None => "none",
            Op::RandRead4k => "randread4k",
            Op::RandWrite4k => "randwrite4k",
            Op::SeqRead1m => "seqread1m",
            Op::SeqWrite1m => "seqwrite1m",
        }
    }
    fn block(self) -> u64 {
        match self {
            Op::RandRead4k | Op::RandWrite4k => 4096,
            _ => 1 << 20,
        }
    }
    fn write(self) -> bool {
        matches!(self, Op::RandWrite4k | Op::SeqWrite1m)
    }
    fn random(self) -> bool {
        matches!(self, Op::RandRead4k | Op::RandWrite4k)
    }
}

fn warn(why: &str) {
    Line::new().s("GUEST WARN diskbench: ").s(why).send();
}

/// Runs the workload `c.diskbench` with buffers in `[buf, buf + buf_len)`.
pub fn run(c: &Config, buf: u64, buf_len: u64) {
    if c.disk || c.dirty {
        return warn("not combined with disk=on or mode=dirty (they share the device and the region)");
    }
    let mut blk = match Blk::probe() {
        Ok(b) => b,
        Err(e) => {
            return warn(match e {
                ProbeError::NoDevice => "no virtio-blk device",
                ProbeError::ReadOnly => "the virtio-blk device is read-only",
                ProbeError::Features => "feature negotiation failed",
                ProbeError::Queue => "queue unusable",
            })
        }
    };
    let op = c.diskbench;
    let bs = op.block();
    let span = (c.disk_mib << 20).min(blk.capacity * 512) / bs;
    if span == 0 {
        return warn("disk_mib or the disk is smaller than one request");
    }
    let qd = (c.qd as usize).min(blk.slots).min((buf_len / bs) as usize).max(1);
    // Touch the buffers (first-touch page faults are not the disk's time); writes carry a
    // non-zero pattern.
    for i in 0..(qd as u64 * bs / 8) {
        let p = (buf + i * 8) as *mut u64;
        unsafe { p.write_volatile(if op.write() { i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 } else { 0 }) };
    }
    let hz = K.tsc_hz.load(Relaxed).max(1);
    let kind = if op.write() { T_OUT } else { T_IN };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut cursor = 0u64;
    let mut next_off = || {
        if op.random() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % span) * bs
        } else {
            let o = cursor * bs;
            cursor = (cursor + 1) % span;
            o
        }
    };
    let mut free = [0usize; SLOTS];
    for (i, f) in free.iter_mut().enumerate() {
        *f = i;
    }
    let mut nfree = qd;
    let mut started = [0u64; SLOTS];
    let (mut ios, mut errors, mut lat) = (0u64, 0u64, 0u64);
    let t0 = rdtsc();
    let deadline = t0 + c.secs * hz;
    let mut t_end = t0;
    loop {
        let now = rdtsc();
        let submitting = now < deadline;
        if submitting && nfree > 0 {
            while nfree > 0 {
                nfree -= 1;
                let s = free[nfree];
                started[s] = rdtsc();
                blk.push(s, kind, next_off() / 512, buf + s as u64 * bs, bs as u32);
            }
            blk.kick();
        }
        if !submitting && nfree == qd {
            break;
        }
        while let Some((s, st)) = blk.reap() {
            let t = rdtsc();
            ios += 1;
            lat += t - started[s];
            if st != 0 {
                errors += 1;
            }
            t_end = t;
            free[nfree] = s;
            nfree += 1;
        }
        core::hint::spin_loop();
    }
    let mut flush_ms = 0;
    if op.write() && blk.flush {
        let f0 = rdtsc();
        blk.push(0, T_FLUSH, 0, 0, 0);
        blk.kick();
        while blk.reap().is_none() {
            core::hint::spin_loop();
        }
        flush_ms = (rdtsc() - f0) * 1000 / hz;
    }
    let us = ((t_end - t0) * 1_000_000 / hz).max(1);
    let bytes = ios * bs;
    // MiB/s with one decimal.
    let mibps10 = (bytes as u128 * 10_000_000 / us as u128 / (1 << 20)) as u64;
    let lat_us = if ios > 0 { (lat as u128 * 1_000_000 / hz as u128 / ios as u128) as u64 } else { 0 };
    Line::new()
        .s("DISKBENCH op=").s(op.name())
        .s(" qd=").u(qd as u64)
        .s(" bs=").u(bs)
        .s(" ios=").u(ios)
        .s(" bytes=").u(bytes)
        .s(" ms=").u(us / 1000)
        .s(" iops=").u(ios * 1_000_000 / us)
        .s(" mibps=").u(mibps10 / 10).s(".").u(mibps10 % 10)
        .s(" lat_us=").u(lat_us)
        .s(" errors=").u(errors)
        .s(" flush_ms=").u(flush_ms)
        .send();
}
