//! Which pages of a memory mapping hold anything (present in RAM or swapped out), from the
//! kernel's page map: a bitmap of 1 bit per 4 KiB page. Pages never touched read as zero and
//! need not be read, sent or protected, so the migration engine (round 0, a destination
//! clearing its RAM) and the VM core (dirty logging) ask this instead of walking every page.

use crate::stream::PAGE_SIZE;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;

/// A bitmap (1 bit per page) of the pages of `host..host + size` that hold anything: present
/// in RAM or swapped out. Pages never touched are zero and need not be read. If the page map cannot be read,
/// every page is marked.
///
/// The kernel's `PAGEMAP_SCAN` (Linux 6.7+) answers with runs of such pages after walking
/// only the page tables that exist, so the cost follows touched memory, not guest size (a
/// 64 GiB guest's page map is 128 MiB of entries to read one by one). Older kernels get the
/// entry-by-entry read.
pub fn populated(host: u64, size: u64) -> Vec<u64> {
    let npages = (size / PAGE_SIZE as u64) as usize;
    let mut bits = vec![0u64; npages.div_ceil(64)];
    let ok = std::fs::File::open("/proc/self/pagemap").and_then(|f| match scan_populated(&f, host, size, &mut bits) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)) => {
            bits.iter_mut().for_each(|w| *w = 0);
            read_populated(&f, host, size, &mut bits)
        }
        Err(e) => Err(e),
    });
    if let Err(e) = ok {
        let _ = e; // unreadable page map: every page counts as populated
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

fn scan_populated(f: &std::fs::File, host: u64, size: u64, bits: &mut [u64]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let end = host + size;
    let mut regions = vec![PageRegion::default(); 4096];
    let mut at = host;
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
            let (s, e) = (g.start.max(host), g.end.min(end));
            if s < e {
                mark_range(bits, ((s - host) / PAGE_SIZE as u64) as usize, ((e - s) / PAGE_SIZE as u64) as usize);
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
fn read_populated(f: &std::fs::File, host: u64, size: u64, bits: &mut [u64]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let npages = (size / PAGE_SIZE as u64) as usize;
    let first = host / PAGE_SIZE as u64;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_map_sees_touched_pages() {
        let mut v = vec![0u8; 64 * PAGE_SIZE + PAGE_SIZE];
        let base = (v.as_ptr() as usize).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let off = base - v.as_ptr() as usize;
        v[off + 5 * PAGE_SIZE] = 1;
        let bits = populated(base as u64, 64 * PAGE_SIZE as u64);
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
                let f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let mut read = vec![0u64; want.len()];
        read_populated(&f, m as u64, size as u64, &mut read).unwrap();
        assert_eq!(read, want);
        let mut scanned = vec![0u64; want.len()];
        match scan_populated(&f, m as u64, size as u64, &mut scanned) {
            Ok(()) => assert_eq!(scanned, want),
            Err(e) => eprintln!("PAGEMAP_SCAN not available here ({e}): only the entry read was checked"),
        }
        assert_eq!(populated(m as u64, size as u64), want);
        // SAFETY: our mapping, no longer used.
        unsafe { libc::munmap(m, size) };
    }
}
