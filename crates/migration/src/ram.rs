//! Choosing and sending guest pages: which pages were ever touched (the kernel's page map, so
//! an idle 1 GiB guest is not scanned page by page), runs of set bits in a dirty bitmap, and
//! the shared encoder (`vmstate::ram`) that turns runs into RAM records.

use crate::RamRegion;
use std::io::Write;
use vmstate::ram::{encode_range, RamStats};
use vmstate::stream::{StreamWriter, PAGE_SIZE};

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// A bitmap (1 bit per page) of the pages of `r` that hold anything: present in RAM or swapped
/// out. Pages never touched are zero and need not be read. If the page map cannot be read,
/// every page is marked.
///
/// The kernel's `PAGEMAP_SCAN` (Linux 6.7+) answers with runs of such pages after walking
/// only the page tables that exist, so the cost follows touched memory, not guest size (a
/// 64 GiB guest's page map is 128 MiB of entries to read one by one). Older kernels get the
/// entry-by-entry read.
pub fn populated_pages(r: &RamRegion) -> Vec<u64> {
    let npages = (r.size / PAGE_SIZE as u64) as usize;
    let mut bits = vec![0u64; npages.div_ceil(64)];
    let ok = std::fs::File::open("/proc/self/pagemap").and_then(|f| match scan_populated(&f, r, &mut bits) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)) => {
            bits.iter_mut().for_each(|w| *w = 0);
            read_populated(&f, r, &mut bits)
        }
        Err(e) => Err(e),
    });
    if let Err(e) = ok {
        tracing::debug!("page map unreadable ({e}); scanning every page");
        bits.iter_mut().for_each(|w| *w = !0);
        if npages % 64 != 0 {
            if let Some(last) = bits.last_mut() {
                *last = (1u64 << (npages % 64)) - 1;
            }
        }
    }
    bits
}

/// Marks the pages in `first..first + n`.
fn mark_range(bits: &mut [u64], first: usize, n: usize) {
    let (mut p, end) = (first, first + n);
    while p < end {
        if p % 64 == 0 && end - p >= 64 {
            bits[p / 64] = !0;
            p += 64;
        } else {
            bits[p / 64] |= 1 << (p % 64);
            p += 1;
        }
    }
}

/// `struct pm_scan_arg` of `<linux/fs.h>`.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30) | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16) | (0x66 << 8) | 16;

fn scan_populated(f: &std::fs::File, r: &RamRegion, bits: &mut [u64]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let end = r.host + r.size;
    let mut regions = vec![PageRegion::default(); 4096];
    let mut at = r.host;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: at,
            end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: 0,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        };
        // SAFETY: PAGEMAP_SCAN on our own page map, with a correctly sized argument and an
        // output array of `vec_len` regions that we own.
        let n = unsafe { libc::ioctl(f.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg as *mut PmScanArg) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        for g in &regions[..n as usize] {
            let (s, e) = (g.start.max(r.host), g.end.min(end));
            if s < e {
                mark_range(bits, ((s - r.host) / PAGE_SIZE as u64) as usize, ((e - s) / PAGE_SIZE as u64) as usize);
            }
        }
        if arg.walk_end <= at {
            return Err(std::io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        at = arg.walk_end;
    }
    Ok(())
}

/// The page map read entry by entry (kernels without `PAGEMAP_SCAN`).
fn read_populated(f: &std::fs::File, r: &RamRegion, bits: &mut [u64]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let npages = (r.size / PAGE_SIZE as u64) as usize;
    let first = r.host / PAGE_SIZE as u64;
    const BATCH: usize = 64 * 1024;
    let mut buf = vec![0u8; BATCH * 8];
    let mut done = 0usize;
    while done < npages {
        let n = (npages - done).min(BATCH);
        let bytes = &mut buf[..n * 8];
        f.read_exact_at(bytes, (first + done as u64) * 8)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().unwrap_or([0xff; 8]));
            if v & (PM_PRESENT | PM_SWAPPED) != 0 {
                let p = done + i;
                bits[p / 64] |= 1 << (p % 64);
            }
        }
        done += n;
    }
    Ok(())
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

    #[test]
    fn page_map_sees_touched_pages() {
        let mut v = vec![0u8; 64 * PAGE_SIZE + PAGE_SIZE];
        let base = (v.as_ptr() as usize).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let off = base - v.as_ptr() as usize;
        v[off + 5 * PAGE_SIZE] = 1;
        let r = RamRegion { gpa: 0, size: 64 * PAGE_SIZE as u64, host: base as u64 };
        let bits = populated_pages(&r);
        assert!(bits[0] >> 5 & 1 == 1);
    }

    #[test]
    fn page_map_scan_and_entry_read_agree() {
        // 8 MiB, some single pages, a 2 MiB block and a run across a word boundary touched.
        let size = 8 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let m = unsafe { libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(m, libc::MAP_FAILED);
        // SAFETY: our mapping.
        unsafe { libc::madvise(m, size, libc::MADV_NOHUGEPAGE) };
        let mem = unsafe { std::slice::from_raw_parts_mut(m as *mut u8, size) };
        let mut want = vec![0u64; size / PAGE_SIZE / 64];
        let mut touch = |p: usize| {
            mem[p * PAGE_SIZE] = 1;
            want[p / 64] |= 1 << (p % 64);
        };
        for p in [0usize, 3, 63, 64, 65, 700, 2047] {
            touch(p);
        }
        for p in 1024..1536 {
            touch(p);
        }
        for p in 120..200 {
            touch(p);
        }
        let r = RamRegion { gpa: 0, size: size as u64, host: m as u64 };
        let f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut read = vec![0u64; want.len()];
        read_populated(&f, &r, &mut read).unwrap();
        assert_eq!(read, want);
        let mut scanned = vec![0u64; want.len()];
        match scan_populated(&f, &r, &mut scanned) {
            Ok(()) => assert_eq!(scanned, want),
            Err(e) => eprintln!("PAGEMAP_SCAN not available here ({e}): only the entry read was checked"),
        }
        assert_eq!(populated_pages(&r), want);
        // SAFETY: our mapping, no longer used.
        unsafe { libc::munmap(m, size) };
    }
}
