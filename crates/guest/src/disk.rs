//! The disk ledger (CPL3, BSP only, with `disk=on`): the first `disk_mib` MiB of the virtio-blk
//! disk are rewritten in passes, in batches of 128 sectors, each batch flushed; a per-sector
//! expected-generation table in guest RAM says what each sector must hold. Non-blocking: the
//! BSP calls `step` from its main loop, one request in flight at a time.
//!
//! Sector s at generation g holds: word 0 = s, word 1 = g, word 2 = checksum(s, g, nonce),
//! word 3 = nonce (the TSC at boot, so data left by an earlier boot never matches), words
//! 4..63 = seed(s, g, nonce) + j * K. A sector is recorded at g once its write has completed.

use crate::virtio::{Blk, T_FLUSH, T_IN, T_OUT};
use core::ptr::{read_volatile, write_volatile};

pub const BATCH: u64 = 128;
const K1: u64 = 0x9e37_79b9_7f4a_7c15;

#[repr(C, align(4096))]
struct Buf([u64; (BATCH * 64) as usize]);
static BUF: crate::kernel::Racy<Buf> = crate::kernel::Racy::new(Buf([0; (BATCH * 64) as usize]));

#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn expect(s: u64, g: u64, nonce: u64, j: usize) -> u64 {
    let seed = mix(s ^ g.rotate_left(32) ^ nonce ^ 0x3c6e_f372_fe94_f82b);
    match j {
        0 => s,
        1 => g,
        2 => mix(seed ^ s ^ g ^ 0xa54f_f53a_5f1d_36f1),
        3 => nonce,
        _ => seed.wrapping_add((j as u64).wrapping_mul(K1)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Writing,
    Flushing,
    Failed,
}

pub struct Disk {
    blk: Blk,
    pub sectors: u64,
    ledger: *mut u64,
    nonce: u64,
    cursor: u64,
    gen: u64,
    batch_start: u64,
    batch_len: u64,
    state: State,
    /// Sectors written (completed) so far.
    pub written: u64,
    pub error: u8,
}

pub enum VerifyResult {
    Ok { sectors: u64, gen: u64, unwritten: u64 },
    Bad { sector: u64, expected: u64, found: u64, word: usize },
    Failed(u8),
}

impl Disk {
    pub fn new(blk: Blk, sectors: u64, ledger: u64, nonce: u64) -> Disk {
        unsafe { core::ptr::write_bytes(ledger as *mut u64, 0, sectors as usize) };
        Disk {
            blk,
            sectors,
            ledger: ledger as *mut u64,
            nonce,
            cursor: 0,
            gen: 0,
            batch_start: 0,
            batch_len: 0,
            state: State::Idle,
            written: 0,
            error: 0,
        }
    }

    /// The expected-generation table (for the `c` self-test).
    pub fn ledger(&self) -> *mut u64 {
        self.ledger
    }

    pub fn failed(&self) -> bool {
        self.state == State::Failed
    }

    fn buf() -> *mut u64 {
        BUF.get() as *mut u64
    }

    fn fail(&mut self, st: u8) {
        self.state = State::Failed;
        self.error = st.max(1);
    }

    /// Advance the state machine without waiting. Returns true if a request is in flight.
    pub fn step(&mut self) -> bool {
        self.advance(true)
    }

    fn advance(&mut self, start_new: bool) -> bool {
        loop {
            match self.state {
                State::Failed => return false,
                State::Idle => {
                    if self.sectors == 0 || !start_new {
                        return false;
                    }
                    if self.cursor == 0 {
                        self.gen += 1;
                    }
                    let n = BATCH.min(self.sectors - self.cursor);
                    let b = Self::buf();
                    for i in 0..n {
                        let s = self.cursor + i;
                        for j in 0..64usize {
                            unsafe { b.add((i * 64) as usize + j).write(expect(s, self.gen, self.nonce, j)) };
                        }
                    }
                    self.batch_start = self.cursor;
                    self.batch_len = n;
                    self.blk.submit(T_OUT, self.cursor, b as u64, (n * 512) as u32);
                    self.state = State::Writing;
                    return true;
                }
                State::Writing => match self.blk.poll() {
                    None => return true,
                    Some(0) => {
                        for i in 0..self.batch_len {
                            unsafe { write_volatile(self.ledger.add((self.batch_start + i) as usize), self.gen) };
                        }
                        self.written += self.batch_len;
                        crate::user::U.disk_written.store(self.written, core::sync::atomic::Ordering::Relaxed);
                        self.cursor = (self.batch_start + self.batch_len) % self.sectors;
                        if self.blk.flush {
                            self.blk.submit(T_FLUSH, 0, 0, 0);
                            self.state = State::Flushing;
                            return true;
                        }
                        self.state = State::Idle;
                    }
                    Some(st) => {
                        self.fail(st);
                        return false;
                    }
                },
                State::Flushing => match self.blk.poll() {
                    None => return true,
                    Some(0) => self.state = State::Idle,
                    Some(st) => {
                        self.fail(st);
                        return false;
                    }
                },
            }
        }
    }

    /// Finish the batch in flight (write and flush) so that disk and ledger agree.
    pub fn quiesce(&mut self, mut tick: impl FnMut()) {
        while self.advance(false) {
            tick();
            core::hint::spin_loop();
        }
    }

    /// Wait for the request in flight (10 s at most: then status 0xfe).
    fn wait(&mut self, tick: &mut impl FnMut()) -> u8 {
        let t0 = crate::kernel::rdtsc();
        let limit = 10 * crate::kernel::K.tsc_hz.load(core::sync::atomic::Ordering::Relaxed);
        loop {
            if let Some(st) = self.blk.poll() {
                return st;
            }
            if crate::kernel::rdtsc().wrapping_sub(t0) > limit {
                return 0xfe;
            }
            tick();
            core::hint::spin_loop();
        }
    }

    /// Read the disk region back and compare every sector with the ledger. Sectors never
    /// written by this boot (ledger 0) are not compared. Call after `quiesce`.
    pub fn verify(&mut self, mut tick: impl FnMut()) -> VerifyResult {
        if self.state == State::Failed {
            return VerifyResult::Failed(self.error);
        }
        let b = Self::buf();
        let mut gen = 0;
        let mut unwritten = 0;
        let mut s0 = 0;
        while s0 < self.sectors {
            let n = BATCH.min(self.sectors - s0);
            self.blk.submit(T_IN, s0, b as u64, (n * 512) as u32);
            let st = self.wait(&mut tick);
            if st != 0 {
                self.fail(st);
                return VerifyResult::Failed(st);
            }
            for i in 0..n {
                let s = s0 + i;
                let g = unsafe { read_volatile(self.ledger.add(s as usize)) };
                if g == 0 {
                    unwritten += 1;
                    continue;
                }
                gen = gen.max(g);
                let w = unsafe { core::slice::from_raw_parts(b.add((i * 64) as usize), 64) };
                if let Some(j) = (0..64).find(|&j| w[j] != expect(s, g, self.nonce, j)) {
                    return VerifyResult::Bad { sector: s, expected: g, found: w[1], word: j };
                }
            }
            s0 += n;
        }
        VerifyResult::Ok { sectors: self.sectors, gen, unwritten }
    }
}
