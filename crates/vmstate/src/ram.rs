//! Guest RAM encoding shared by `savevm` and every migration round: a page range is split
//! into runs of all-zero pages (recorded, not stored) and runs of data pages (stored).

use crate::stream::{StreamWriter, PAGE_SIZE};
use crate::Result;
use std::io::Write;

/// True when the page is all zero bytes (vectorizes well: 8-byte words, OR-reduced).
pub fn is_zero_page(page: &[u8]) -> bool {
    let (head, words, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words.chunks(64).all(|c| c.iter().fold(0u64, |a, &w| a | w) == 0)
}

/// Counters of one encoding pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RamStats {
    pub zero_pages: u64,
    pub data_pages: u64,
}

impl RamStats {
    pub fn add(&mut self, o: RamStats) {
        self.zero_pages += o.zero_pages;
        self.data_pages += o.data_pages;
    }
}

/// Encodes the pages of `mem` (guest-physical address `gpa`) into `w`, coalescing runs.
/// With `record_zero == false` zero pages are skipped entirely (the reader's memory is known
/// to be zero there, e.g. a fresh VM).
pub fn encode_range<W: Write>(
    w: &mut StreamWriter<W>,
    gpa: u64,
    mem: &[u8],
    record_zero: bool,
) -> Result<RamStats> {
    let mut st = RamStats::default();
    let npages = mem.len() / PAGE_SIZE;
    let mut i = 0;
    while i < npages {
        let zero = is_zero_page(&mem[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        let mut j = i + 1;
        while j < npages && is_zero_page(&mem[j * PAGE_SIZE..(j + 1) * PAGE_SIZE]) == zero {
            j += 1;
        }
        let at = gpa + (i * PAGE_SIZE) as u64;
        if zero {
            if record_zero {
                w.ram_zero(at, (j - i) as u64)?;
            }
            st.zero_pages += (j - i) as u64;
        } else {
            w.ram_data(at, &mem[i * PAGE_SIZE..j * PAGE_SIZE])?;
            st.data_pages += (j - i) as u64;
        }
        i = j;
    }
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Item, StreamReader};

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE];
        assert!(is_zero_page(&p));
        p[PAGE_SIZE - 1] = 1;
        assert!(!is_zero_page(&p));
        p[PAGE_SIZE - 1] = 0;
        p[0] = 1;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn runs_roundtrip() {
        let mut mem = vec![0u8; 16 * PAGE_SIZE];
        for p in [1usize, 2, 3, 7, 15] {
            mem[p * PAGE_SIZE + 5] = p as u8;
        }
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        let st = encode_range(&mut w, 0x100000, &mem, true).unwrap();
        w.end().unwrap();
        assert_eq!(st, RamStats { zero_pages: 11, data_pages: 5 });
        let buf = w.into_inner();
        let mut out = vec![0xAAu8; 16 * PAGE_SIZE];
        let mut r = StreamReader::new(&buf[..]).unwrap();
        loop {
            match r.next_item().unwrap() {
                Item::RamData { gpa, npages } => {
                    let off = (gpa - 0x100000) as usize;
                    r.read_pages_into(&mut out[off..off + npages as usize * PAGE_SIZE]).unwrap();
                }
                Item::RamZero { gpa, npages } => {
                    let off = (gpa - 0x100000) as usize;
                    out[off..off + npages as usize * PAGE_SIZE].fill(0);
                }
                Item::End => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(out, mem);
    }
}
