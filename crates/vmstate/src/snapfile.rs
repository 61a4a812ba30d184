//! The `savevm` VM-state layout (format version 2), built so that `loadvm` can resume the guest
//! before its RAM is read: guest RAM is stored as page-aligned data that can be found and
//! checked piece by piece, without reading what comes before it.
//!
//! Layout, in the qcow2 VM-state area (all integers little-endian):
//! ```text
//! 0      header page (4096 bytes, the rest zero):
//!          "GODWITVM" | u32 version = 2 | u32 largest chunk (pages)
//!          | u64 data_off | u64 data_len | u64 meta_off | u64 meta_len
//!          | u32 CRC-32 of meta | u32 CRC-32 of the 52 bytes before it
//! data_off (4096): the data chunks, back to back, each a whole number of pages
//! meta_off (page aligned, after the data):
//!          the machine-state sections as records of the stream format (`stream`, no header),
//!          closed by its END record (byte count + CRC-32)
//!          | u64 chunk count | per chunk: u64 gpa | u32 pages | u32 CRC-32 of its bytes
//! ```
//! A chunk is at most [`CHUNK_PAGES`] guest pages that are contiguous in guest-physical
//! memory and not all zero; chunk `i` starts at `data_off + 4096 * (pages of chunks 0..i)`.
//! Guest pages in no chunk are zero. Chunks are in ascending address order, never overlap.
//!
//! A loader reads the header and the meta (a few KiB to a few MiB), checks both checksums,
//! the sections and the chunk list against the VM, and only then switches the VM over;
//! chunks are read later, each checked against its CRC before the guest can see it.
//! Version 1 (a plain [`crate::stream`]) is what `savevm` wrote before; readers keep
//! accepting it.

use crate::stream::{Item, StreamReader, StreamWriter, PAGE_SIZE};
use crate::{Result, Section, StateError};

pub const VERSION: u32 = 2;
/// Pages per chunk written by `savevm` (256 KiB: one fault reads and checks at most this).
pub const CHUNK_PAGES: u32 = 64;
/// Largest chunk a reader accepts.
pub const MAX_CHUNK_PAGES: u32 = 1024;
/// Size of the header page; also where the data starts.
pub const HEADER_SIZE: u64 = 4096;
/// Largest meta block a reader accepts (sections + 16 bytes per 256 KiB chunk of RAM: 64 MiB
/// covers guests of about 1 TiB).
pub const MAX_META: u64 = 64 << 20;
const HEADER_USED: usize = 56;

/// One stored run of guest pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub gpa: u64,
    pub npages: u32,
    pub crc: u32,
}

impl Chunk {
    pub fn len(&self) -> u64 {
        self.npages as u64 * PAGE_SIZE as u64
    }
    pub fn is_empty(&self) -> bool {
        self.npages == 0
    }
    pub fn end(&self) -> u64 {
        self.gpa + self.len()
    }
}

/// The fixed header at the start of a version-2 state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub max_chunk_pages: u32,
    pub data_off: u64,
    pub data_len: u64,
    pub meta_off: u64,
    pub meta_len: u64,
    pub meta_crc: u32,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_SIZE as usize);
        b.extend_from_slice(crate::stream::MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.max_chunk_pages.to_le_bytes());
        for v in [self.data_off, self.data_len, self.meta_off, self.meta_len] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.meta_crc.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(HEADER_SIZE as usize, 0);
        b
    }

    /// Parses and checks the header of a state of `total` bytes.
    pub fn parse(b: &[u8], total: u64) -> Result<Header> {
        let bad = |m: &str| Err(StateError::Stream(format!("VM state header: {m}")));
        if b.len() < HEADER_USED {
            return bad("truncated");
        }
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if &b[0..8] != crate::stream::MAGIC {
            return bad("not a Godwit VM state (bad magic)");
        }
        if u32at(8) != VERSION {
            return bad(&format!("format version {} is not {VERSION}", u32at(8)));
        }
        if crc32fast::hash(&b[..52]) != u32at(52) {
            return bad("checksum mismatch: corrupted");
        }
        let h = Header {
            max_chunk_pages: u32at(12),
            data_off: u64at(16),
            data_len: u64at(24),
            meta_off: u64at(32),
            meta_len: u64at(40),
            meta_crc: u32at(48),
        };
        let page = PAGE_SIZE as u64;
        let data_end = h.data_off.checked_add(h.data_len);
        let meta_end = h.meta_off.checked_add(h.meta_len);
        if h.data_off < HEADER_SIZE
            || !h.data_off.is_multiple_of(page)
            || !h.data_len.is_multiple_of(page)
            || !h.meta_off.is_multiple_of(page)
            || data_end.is_none_or(|e| e > h.meta_off)
            || meta_end.is_none_or(|e| e > total)
            || h.meta_len > MAX_META
            || h.max_chunk_pages == 0
            || h.max_chunk_pages > MAX_CHUNK_PAGES
        {
            return bad(&format!("layout out of range ({h:?}, state of {total} bytes)"));
        }
        Ok(h)
    }
}

/// Encodes the meta block (sections + chunk list).
pub fn encode_meta(sections: &[Section], chunks: &[Chunk]) -> Result<Vec<u8>> {
    let mut w = StreamWriter::without_header(Vec::new());
    for s in sections {
        w.section(s)?;
    }
    w.end()?;
    let mut b = w.into_inner();
    b.extend_from_slice(&(chunks.len() as u64).to_le_bytes());
    for c in chunks {
        b.extend_from_slice(&c.gpa.to_le_bytes());
        b.extend_from_slice(&c.npages.to_le_bytes());
        b.extend_from_slice(&c.crc.to_le_bytes());
    }
    Ok(b)
}

/// Parses a meta block already checked against the header's CRC: the sections and the chunks
/// (checked for order, size and that they add up to `h.data_len`).
pub fn parse_meta(h: &Header, meta: &[u8]) -> Result<(Vec<Section>, Vec<Chunk>)> {
    if crc32fast::hash(meta) != h.meta_crc {
        return Err(StateError::Stream("VM state meta block: checksum mismatch: corrupted".into()));
    }
    let mut r = StreamReader::without_header(meta);
    let mut sections = Vec::new();
    loop {
        match r.next_item()? {
            Item::Section(s) if sections.len() < 4096 => sections.push(s),
            Item::End => break,
            other => return Err(StateError::Stream(format!("VM state meta block: unexpected {other:?}"))),
        }
    }
    let rest = &meta[r.bytes_read() as usize..];
    let bad = |m: String| Err(StateError::Stream(format!("VM state chunk list: {m}")));
    if rest.len() < 8 {
        return bad("truncated".into());
    }
    let n = u64::from_le_bytes(rest[..8].try_into().unwrap_or([0; 8]));
    let body = &rest[8..];
    if n.checked_mul(16) != Some(body.len() as u64) {
        return bad(format!("{n} chunks in {} bytes", body.len()));
    }
    let mut chunks = Vec::with_capacity(n as usize);
    let mut pages = 0u64;
    let mut prev_end = 0u64;
    for e in body.chunks_exact(16) {
        let gpa = u64::from_le_bytes(e[..8].try_into().unwrap_or([0; 8]));
        let npages = u32::from_le_bytes(e[8..12].try_into().unwrap_or([0; 4]));
        let crc = u32::from_le_bytes(e[12..16].try_into().unwrap_or([0; 4]));
        if !gpa.is_multiple_of(PAGE_SIZE as u64) || npages == 0 || npages > h.max_chunk_pages || gpa < prev_end {
            return bad(format!("chunk at {gpa:#x} of {npages} pages out of order or size"));
        }
        let c = Chunk { gpa, npages, crc };
        prev_end = match gpa.checked_add(c.len()) {
            Some(e) => e,
            None => return bad("address overflow".into()),
        };
        pages += npages as u64;
        chunks.push(c);
    }
    if pages * PAGE_SIZE as u64 != h.data_len {
        return bad(format!("{pages} pages listed, the data holds {} bytes", h.data_len));
    }
    Ok((sections, chunks))
}

/// Byte offsets (from the start of the state) of each chunk's data.
pub fn chunk_offsets(h: &Header, chunks: &[Chunk]) -> Vec<u64> {
    let mut at = h.data_off;
    chunks
        .iter()
        .map(|c| {
            let o = at;
            at += c.len();
            o
        })
        .collect()
}

/// True when `head` (the first bytes of a state) is a version-2 state.
pub fn is_v2(head: &[u8]) -> bool {
    head.len() >= 12 && &head[..8] == crate::stream::MAGIC && head[8..12] == VERSION.to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Header, Vec<u8>, Vec<Section>, Vec<Chunk>) {
        let sections = vec![Section { id: "vcpu.0".into(), version: 3, data: vec![9; 100] }];
        let chunks = vec![
            Chunk { gpa: 0x1000, npages: 64, crc: 1 },
            Chunk { gpa: 0x41000, npages: 2, crc: 2 },
            Chunk { gpa: 0x100000, npages: 1, crc: 3 },
        ];
        let meta = encode_meta(&sections, &chunks).unwrap();
        let data_len = 67 * 4096;
        let h = Header {
            max_chunk_pages: CHUNK_PAGES,
            data_off: HEADER_SIZE,
            data_len,
            meta_off: HEADER_SIZE + data_len,
            meta_len: meta.len() as u64,
            meta_crc: crc32fast::hash(&meta),
        };
        (h, meta, sections, chunks)
    }

    #[test]
    fn roundtrip() {
        let (h, meta, sections, chunks) = sample();
        let total = h.meta_off + h.meta_len;
        let enc = h.encode();
        assert!(is_v2(&enc));
        assert_eq!(enc.len(), 4096);
        let h2 = Header::parse(&enc, total).unwrap();
        assert_eq!(h2, h);
        let (s2, c2) = parse_meta(&h2, &meta).unwrap();
        assert_eq!((s2, c2.clone()), (sections, chunks));
        assert_eq!(chunk_offsets(&h2, &c2), vec![4096, 4096 + 64 * 4096, 4096 + 66 * 4096]);
        assert!(Header::parse(&enc, total - 1).is_err(), "meta past the end of the state");
    }

    #[test]
    fn every_flipped_byte_is_an_error() {
        let (h, meta, _, _) = sample();
        let total = h.meta_off + h.meta_len;
        let enc = h.encode();
        for i in 0..HEADER_USED {
            let mut b = enc.clone();
            b[i] ^= 0x04;
            assert!(Header::parse(&b, total).is_err(), "header flip at {i}");
        }
        for i in 0..meta.len() {
            let mut m = meta.clone();
            m[i] ^= 0x04;
            assert!(parse_meta(&h, &m).is_err(), "meta flip at {i}");
        }
    }

    proptest::proptest! {
        /// Arbitrary bytes as a header or a meta block: an error or a value, never a panic.
        #[test]
        fn garbage_never_panics(head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
                                meta in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
                                total in 0u64..(1 << 40)) {
            let mut b = crate::stream::MAGIC.to_vec();
            b.extend_from_slice(&VERSION.to_le_bytes());
            b.extend_from_slice(&head);
            let _ = Header::parse(&b, total);
            let _ = Header::parse(&head, total);
            let h = Header { max_chunk_pages: CHUNK_PAGES, data_off: 4096, data_len: 4096, meta_off: 8192,
                             meta_len: meta.len() as u64, meta_crc: crc32fast::hash(&meta) };
            let _ = parse_meta(&h, &meta);
        }
    }

    #[test]
    fn chunk_lists_are_checked() {
        let (mut h, _, sections, _) = sample();
        let mut check = |chunks: &[Chunk], data_len: u64| {
            let meta = encode_meta(&sections, chunks).unwrap();
            h.meta_crc = crc32fast::hash(&meta);
            h.data_len = data_len;
            parse_meta(&h, &meta)
        };
        let c = |gpa, npages| Chunk { gpa, npages, crc: 0 };
        assert!(check(&[c(0, 1), c(0x1000, 1)], 2 * 4096).is_ok());
        assert!(check(&[c(0x1000, 1), c(0, 1)], 2 * 4096).is_err(), "out of order");
        assert!(check(&[c(0, 2), c(0x1000, 1)], 3 * 4096).is_err(), "overlap");
        assert!(check(&[c(0x10, 1)], 4096).is_err(), "unaligned");
        assert!(check(&[c(0, 0)], 0).is_err(), "empty chunk");
        assert!(check(&[c(0, CHUNK_PAGES + 1)], (CHUNK_PAGES as u64 + 1) * 4096).is_err(), "too large");
        assert!(check(&[c(0, 1)], 2 * 4096).is_err(), "sizes disagree");
        assert!(check(&[c(!0xfff, 2)], 2 * 4096).is_err(), "overflow");
    }
}
