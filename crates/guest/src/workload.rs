//! The page ledger (CPL3): placement of the dirty region and its expected-generation table,
//! the page pattern, the rate-limited writer each CPU runs, and verification.
//!
//! Page `i` written at generation `g` holds: word 0 = i, word 1 = g, word 2 = a checksum of
//! (i, g), words 3..3+R = `seed(i, g) + j * K` (no repeated bytes a compressor could use),
//! words 3+R..512 = one word repeated (`filler(i, g)`), where R = 509 * `entropy` / 100
//! (`entropy=100`, the default: every body word is the progression). After a page is written,
//! `ledger[i] = g`.
//! A page whose ledger entry is 0 has never been written and must be all zero.

use crate::kernel::{MemEntry, K, MAX_MEMMAP, MEMMAP};
use crate::user::U;
use core::sync::atomic::Ordering::*;

const K1: u64 = 0x9e37_79b9_7f4a_7c15;
pub const PAGE: u64 = 4096;
const TWO_MIB: u64 = 2 << 20;
/// Highest address the page tables map (64 GiB).
const MAPPED_TOP: u64 = 64 << 30;

#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
#[inline(always)]
fn seed(idx: u64, gen: u64) -> u64 {
    mix(idx ^ gen.rotate_left(32) ^ 0x6a09_e667_f3bc_c909)
}
#[inline(always)]
fn checksum(idx: u64, gen: u64) -> u64 {
    mix(seed(idx, gen) ^ idx ^ gen ^ 0xbb67_ae85_84ca_a73b)
}

#[inline(always)]
fn filler(idx: u64, gen: u64) -> u64 {
    checksum(idx, gen) ^ K1
}

/// Body words (after the 3 header words) that carry the progression, for `entropy` percent.
pub fn random_words(entropy: u64) -> u64 {
    509 * entropy.min(100) / 100
}

/// Where the region and its ledger are: (region address, pages, ledger address).
pub struct Layout {
    pub region: u64,
    pub pages: u64,
    pub ledger: u64,
}

fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

/// Place the ledger, the region and `extra` bytes after it (the disk ledger) in RAM after the
/// image: in the highest RAM range of the PVH memory map that holds `want` pages (above 4 GiB
/// when the VM has RAM there), else in the one that holds the most.
pub fn place(want: u64, extra: u64) -> Layout {
    let image_end = align_up(&raw const crate::boot::__image_end as u64, PAGE);
    let n = (K.mem_entries.load(Relaxed) as usize).min(MAX_MEMMAP);
    let map: &[MemEntry; MAX_MEMMAP] = unsafe { &*MEMMAP.get() };
    let mut best = Layout { region: 0, pages: 0, ledger: 0 };
    for e in &map[..n] {
        if e.kind != 1 {
            continue;
        }
        let start = e.addr.max(image_end);
        let end = (e.addr + e.size).min(MAPPED_TOP);
        if end <= start + 2 * TWO_MIB + extra {
            continue;
        }
        let ledger = align_up(start, PAGE);
        let fit = |p: u64| align_up(align_up(ledger + 8 * p, PAGE), TWO_MIB) + p * PAGE + extra <= end;
        let mut pages = want.min((end - ledger - extra) / (PAGE + 8));
        while pages > 0 && !fit(pages) {
            pages -= 1.max(pages / 64);
        }
        let full = best.pages == want && best.region != 0;
        if (pages == want && e.addr >= best.ledger) || (!full && (pages > best.pages || best.region == 0)) {
            best = Layout { region: align_up(align_up(ledger + 8 * pages, PAGE), TWO_MIB), pages, ledger };
        }
    }
    best
}

/// Write page `idx` of the region at generation `gen`, `rnd` body words pseudo-random.
#[inline(always)]
pub unsafe fn fill(p: *mut u64, idx: u64, gen: u64, rnd: u64) {
    let s = seed(idx, gen);
    p.write(idx);
    p.add(1).write(gen);
    p.add(2).write(checksum(idx, gen));
    let split = 3 + rnd.min(509);
    for j in 3..split {
        p.add(j as usize).write(s.wrapping_add(j.wrapping_mul(K1)));
    }
    let f = filler(idx, gen);
    for j in split..512u64 {
        p.add(j as usize).write(f);
    }
}

/// The first word of page `idx` that differs from generation `gen`'s content, if any.
pub unsafe fn check(p: *const u64, idx: u64, gen: u64) -> Option<usize> {
    let w = core::slice::from_raw_parts(p, 512);
    if gen == 0 {
        let mut acc = 0u64;
        for &x in w {
            acc |= x;
        }
        return if acc == 0 { None } else { w.iter().position(|&x| x != 0) };
    }
    let s = seed(idx, gen);
    let split = 3 + random_words(crate::user::cfg().entropy) as usize;
    let f = filler(idx, gen);
    let expect = |j: usize| match j {
        0 => idx,
        1 => gen,
        2 => checksum(idx, gen),
        j if j < split => s.wrapping_add((j as u64).wrapping_mul(K1)),
        _ => f,
    };
    let mut acc = (w[0] ^ idx) | (w[1] ^ gen) | (w[2] ^ checksum(idx, gen));
    for j in 3..split {
        acc |= w[j] ^ s.wrapping_add((j as u64).wrapping_mul(K1));
    }
    for &x in &w[split..] {
        acc |= x ^ f;
    }
    if acc == 0 {
        return None;
    }
    (0..512).find(|&j| w[j] != expect(j))
}

/// One CPU's writer over its share [start, end) of the region.
pub struct Worker {
    cpu: usize,
    start: u64,
    end: u64,
    cursor: u64,
    gen: u64,
    credit: u64,
    last: u64,
    /// TSC cycles per page (0 = unlimited) and the most credit that may pile up.
    cost: u64,
    cap: u64,
    region: u64,
    ledger: *mut u64,
    /// Pseudo-random body words per page (`entropy=`).
    rnd: u64,
}

impl Worker {
    pub fn new(cpu: usize) -> Worker {
        let cfg = crate::user::cfg();
        let st = &U.cpu[cpu];
        let (start, end) = (st.start.load(Relaxed), st.end.load(Relaxed));
        let ncpus = K.ncpus.load(Relaxed).max(1);
        let tsc = K.tsc_hz.load(Relaxed);
        let (cost, cap) = if cfg.rate == 0 {
            (0, 0)
        } else {
            let pps = (cfg.rate * 256 / ncpus).max(1);
            let cost = (tsc / pps).max(1);
            (cost, (2 * tsc / cfg.hz.max(1)).max(4 * cost))
        };
        Worker {
            cpu,
            start,
            end,
            cursor: start,
            gen: st.gen.load(Relaxed),
            credit: 0,
            last: crate::kernel::rdtsc(),
            cost,
            cap,
            region: U.region.load(Relaxed),
            ledger: U.ledger.load(Relaxed) as *mut u64,
            rnd: random_words(cfg.entropy),
        }
    }

    /// Write up to `max` pages (fewer when the rate budget runs out); returns how many.
    pub fn run(&mut self, max: u64) -> u64 {
        if self.start >= self.end {
            return 0;
        }
        if self.cost != 0 {
            let now = crate::kernel::rdtsc();
            if now > self.last {
                self.credit = (self.credit + (now - self.last)).min(self.cap);
            }
            self.last = now;
        }
        let st = &U.cpu[self.cpu];
        let mut n = 0;
        while n < max {
            if self.cost != 0 {
                if self.credit < self.cost {
                    break;
                }
                self.credit -= self.cost;
            }
            if self.cursor == self.start {
                self.gen += 1;
                st.gen.store(self.gen, Relaxed);
            }
            let idx = self.cursor;
            unsafe {
                fill((self.region + idx * PAGE) as *mut u64, idx, self.gen, self.rnd);
                core::sync::atomic::compiler_fence(Release);
                core::ptr::write_volatile(self.ledger.add(idx as usize), self.gen);
            }
            self.cursor = if idx + 1 == self.end { self.start } else { idx + 1 };
            n += 1;
        }
        if n > 0 {
            st.dirtied.store(st.dirtied.load(Relaxed) + n, Release);
        }
        n
    }
}
