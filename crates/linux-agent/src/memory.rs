//! The memory ledger: a region of `mib` MiB rewritten page by page in passes (pass k at
//! generation k, each page stamped by `pattern::Stamp`), at `rate` MiB/s, with a ledger of the
//! generation each page holds. `verify` pauses the writer between two pages and checks every
//! page against the ledger: stale, torn, zeroed or misplaced pages are found.

use crate::pattern::Stamp;
use crate::sys::Pacer;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WORDS: usize = 512;
/// Pages written under one hold of the lock.
const BATCH: usize = 64;

struct Region {
    words: Vec<u64>,
    ledger: Vec<u64>,
    /// Next page to write and its generation.
    next: usize,
    gen: u64,
}

pub struct Memory {
    region: Mutex<Region>,
    pages: usize,
    nonce: u64,
    /// MiB/s (0: as fast as possible).
    pub rate: AtomicU64,
    pub dirtied: AtomicU64,
    pub max_gen: AtomicU64,
    paused: AtomicBool,
}

impl Memory {
    /// Allocates the region (lazily zero pages) or says why not.
    pub fn new(mib: u64, rate: u64, nonce: u64) -> Result<Arc<Memory>, String> {
        let pages = usize::try_from(mib * 256).map_err(|_| "region too large".to_string())?;
        let mut words = Vec::new();
        words.try_reserve_exact(pages * WORDS).map_err(|e| format!("cannot allocate {mib} MiB: {e}"))?;
        words.resize(pages * WORDS, 0);
        let ledger = vec![0u64; pages];
        Ok(Arc::new(Memory {
            region: Mutex::new(Region { words, ledger, next: 0, gen: 1 }),
            pages,
            nonce,
            rate: AtomicU64::new(rate),
            dirtied: AtomicU64::new(0),
            max_gen: AtomicU64::new(0),
            paused: AtomicBool::new(false),
        }))
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Starts the writer thread.
    pub fn start(self: &Arc<Self>) {
        if self.pages == 0 {
            return;
        }
        let me = self.clone();
        let _ = std::thread::Builder::new().name("memory".into()).spawn(move || me.run());
    }

    fn run(&self) {
        let mut pace = Pacer::new();
        let mut last_rate = u64::MAX;
        loop {
            let rate = self.rate.load(Ordering::Relaxed);
            if rate != last_rate {
                (pace, last_rate) = (Pacer::new(), rate);
            }
            if !self.write_batch() {
                std::thread::sleep(Duration::from_millis(20));
                pace.restart();
                continue;
            }
            pace.wrote(BATCH as u64 * 4096, rate);
        }
    }

    /// Writes the next pages; false when paused.
    fn write_batch(&self) -> bool {
        let Ok(mut r) = self.region.lock() else { return false };
        if self.paused.load(Ordering::Relaxed) {
            return false;
        }
        let r = &mut *r;
        for _ in 0..BATCH {
            let i = r.next;
            let s = Stamp::new(i as u64, r.gen, self.nonce);
            s.fill(&mut r.words[i * WORDS..(i + 1) * WORDS]);
            r.ledger[i] = r.gen;
            self.max_gen.store(r.gen, Ordering::Relaxed);
            self.dirtied.fetch_add(1, Ordering::Relaxed);
            r.next += 1;
            if r.next == self.pages {
                r.next = 0;
                r.gen += 1;
            }
        }
        true
    }

    /// Pauses (true) or resumes the writer; returns once no batch is in flight.
    pub fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::Relaxed);
        drop(self.region.lock());
    }

    /// `LEDGER OK pages=P gen=G` or `LEDGER BAD page=X expected=E found=F word=W value=0x..`.
    pub fn verify(&self) -> String {
        match self.region.lock() {
            Ok(r) => Self::check(&r, self.nonce),
            Err(_) => "LEDGER BAD page=0 expected=0 found=0 word=0 value=0x0 reason=lock".into(),
        }
    }

    fn check(r: &Region, nonce: u64) -> String {
        let mut gmax = 0;
        for (i, &g) in r.ledger.iter().enumerate() {
            let page = &r.words[i * WORDS..(i + 1) * WORDS];
            let bad = if g == 0 {
                page.iter().position(|&w| w != 0).map(|j| (j, page[j]))
            } else {
                Stamp::new(i as u64, g, nonce).check(page)
            };
            if let Some((j, v)) = bad {
                return format!("LEDGER BAD page={i} expected={g} found={} word={j} value={v:#x}", page[1]);
            }
            gmax = gmax.max(g);
        }
        format!("LEDGER OK pages={} gen={gmax}", r.ledger.len())
    }

    /// The verifier's self-test: flips one bit in word 100 of the middle page, verifies (must
    /// be BAD at that page), undoes it.
    pub fn self_test(&self) -> String {
        let Ok(mut r) = self.region.lock() else { return "LEDGER BAD reason=lock".into() };
        if self.pages == 0 {
            return "LEDGER OK pages=0 gen=0".into();
        }
        let at = (self.pages / 2) * WORDS + 100;
        r.words[at] ^= 1 << 17;
        let line = Self::check(&r, self.nonce);
        r.words[at] ^= 1 << 17;
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_finds_each_kind_of_damage() {
        let m = Memory::new(1, 0, 42).unwrap();
        assert_eq!(m.verify(), "LEDGER OK pages=256 gen=0");
        for _ in 0..6 {
            m.write_batch();
        }
        // 384 pages written: generation 2 on the first 128.
        assert_eq!(m.verify(), "LEDGER OK pages=256 gen=2");
        assert!(m.self_test().starts_with("LEDGER BAD page=128 expected=1 found=1 word=100 "), "{}", m.self_test());
        assert_eq!(m.verify(), "LEDGER OK pages=256 gen=2");
        let mut r = m.region.lock().unwrap();
        // A stale page: the ledger says 2, the page holds generation 1 (a lost write).
        let old = r.ledger[5];
        r.ledger[5] = 3;
        assert!(Memory::check(&r, 42).starts_with("LEDGER BAD page=5 expected=3 found=2 word=1"));
        r.ledger[5] = old;
        drop(r);
        // A never-written page that is not zero.
        let m = Memory::new(1, 0, 42).unwrap();
        m.write_batch();
        let mut r = m.region.lock().unwrap();
        r.words[200 * WORDS + 7] = 1;
        assert_eq!(Memory::check(&r, 42), "LEDGER BAD page=200 expected=0 found=0 word=7 value=0x1");
    }
}
