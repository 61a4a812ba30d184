//! Choosing and sending guest pages: which pages were ever touched (the kernel's page map, see
//! `vmstate::pagemap`, so an idle 1 GiB guest is not scanned page by page), runs of set bits in
//! a dirty bitmap, and the shared encoder (`vmstate::ram`) that turns runs into RAM records.

use crate::RamRegion;
use std::io::Write;
use vmstate::ram::{encode_range, RamStats};
use vmstate::stream::{StreamWriter, PAGE_SIZE};

/// A bitmap (1 bit per page) of the pages of `r` that hold anything (see
/// [`vmstate::pagemap::populated`]).
pub fn populated_pages(r: &RamRegion) -> Vec<u64> {
    vmstate::pagemap::populated(r.host, r.size)
}

/// Number of set bits.
pub fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| w.count_ones() as u64).sum()
}

/// The first set bit at or after `from`, below `npages`.
pub fn next_set(bits: &[u64], from: usize, npages: usize) -> Option<usize> {
    let mut p = from;
    while p < npages {
        let w = bits[p / 64] >> (p % 64);
        if w == 0 {
            p = (p / 64 + 1) * 64;
            continue;
        }
        p += w.trailing_zeros() as usize;
        return (p < npages).then_some(p);
    }
    None
}

/// Runs of consecutive set bits as (first page, page count), capped at `max_run` pages.
pub fn runs(bits: &[u64], npages: usize, max_run: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut p = 0usize;
    std::iter::from_fn(move || {
        let is = |i: usize| bits[i / 64] >> (i % 64) & 1 == 1;
        p = next_set(bits, p, npages)?;
        let start = p;
        while p < npages && p - start < max_run && is(p) {
            p += 1;
        }
        Some((start, p - start))
    })
}

/// Sends the marked pages of `r`. Zero pages become RAM_ZERO records when `record_zero`,
/// otherwise they are skipped. `should_stop` is polled between runs (cancel).
pub fn send_marked<W: Write>(
    w: &mut StreamWriter<W>,
    r: &RamRegion,
    bits: &[u64],
    record_zero: bool,
    should_stop: &dyn Fn() -> bool,
) -> vmstate::Result<(RamStats, bool)> {
    let npages = (r.size / PAGE_SIZE as u64) as usize;
    let mut st = RamStats::default();
    for (first, n) in runs(bits, npages, 256) {
        if should_stop() {
            return Ok((st, false));
        }
        // SAFETY: the run lies inside the region's host mapping, which outlives the VM. The
        // guest may be writing these pages right now; what is read may be stale, and dirty
        // tracking sends such pages again.
        let mem = unsafe {
            std::slice::from_raw_parts((r.host + (first * PAGE_SIZE) as u64) as *const u8, n * PAGE_SIZE)
        };
        st.add(encode_range(w, r.gpa + (first * PAGE_SIZE) as u64, mem, record_zero)?);
    }
    Ok((st, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_bits() {
        let mut bits = vec![0u64; 3];
        for p in [0usize, 1, 2, 63, 64, 65, 130] {
            bits[p / 64] |= 1 << (p % 64);
        }
        let r: Vec<_> = runs(&bits, 150, 256).collect();
        assert_eq!(r, vec![(0, 3), (63, 3), (130, 1)]);
        let r: Vec<_> = runs(&bits, 150, 2).collect();
        assert_eq!(r, vec![(0, 2), (2, 1), (63, 2), (65, 1), (130, 1)]);
        assert_eq!(count(&bits), 7);
        assert_eq!(runs(&bits, 100, 8).count(), 2);
    }
}
