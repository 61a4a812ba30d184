//! The VM-state stream: what `savevm` writes into the qcow2 VM-state area and what a live
//! migration sends over its socket (inside its own framing, see the `migration` crate).
//!
//! Layout (all integers little-endian):
//! ```text
//! header   : "GODWITVM" (8 bytes) | u32 format version
//! record   : u8 tag | tag-specific body
//!   0x01 SECTION  : u16 id_len | id (UTF-8) | u32 version | u32 len | len bytes
//!   0x02 RAM_DATA : u64 gpa | u32 npages | npages * 4096 bytes of page contents
//!   0x03 RAM_ZERO : u64 gpa | u32 npages            (pages that are all zero: not stored)
//!   0x0F END      : u64 bytes before END | u32 CRC-32 of those bytes (truncation and
//!                   corruption check; a reader discards everything it read on mismatch)
//! ```
//! Tags 0x40..=0x7F are reserved for the migration protocol's control records; a plain
//! stream reader reports them as [`Item::Control`] so the protocol layer can handle them.
//! Every length is bounded before anything is allocated: a hostile stream gets an error.

use crate::{Result, Section, StateError};
use std::io::{Read, Write};

pub const MAGIC: &[u8; 8] = b"GODWITVM";
pub const FORMAT_VERSION: u32 = 1;
pub const PAGE_SIZE: usize = 4096;

pub const TAG_SECTION: u8 = 0x01;
pub const TAG_RAM_DATA: u8 = 0x02;
pub const TAG_RAM_ZERO: u8 = 0x03;
pub const TAG_END: u8 = 0x0F;

/// Largest section payload accepted (vCPU XSAVE and friends are a few KiB).
pub const MAX_SECTION_LEN: u32 = 16 << 20;
/// Largest section id accepted.
pub const MAX_ID_LEN: u16 = 256;
/// Largest run of pages in one RAM record (1 GiB).
pub const MAX_PAGES_PER_RECORD: u32 = 1 << 18;

/// Writes records, counting bytes.
pub struct StreamWriter<W: Write> {
    w: W,
    bytes: u64,
    crc: crc32fast::Hasher,
    /// Guest RAM may change while it is being sent: pages are copied here once, and the copy
    /// is both checksummed and written, so the checksum always matches the bytes sent.
    scratch: Vec<u8>,
}

const SCRATCH: usize = 1024 * 1024;

impl<W: Write> StreamWriter<W> {
    /// Starts a stream: writes the header.
    pub fn new(w: W) -> Result<Self> {
        let mut s = StreamWriter { w, bytes: 0, crc: crc32fast::Hasher::new(), scratch: Vec::new() };
        s.put(MAGIC)?;
        s.put(&FORMAT_VERSION.to_le_bytes())?;
        Ok(s)
    }

    /// Continues a stream whose header was already written elsewhere.
    pub fn without_header(w: W) -> Self {
        StreamWriter { w, bytes: 0, crc: crc32fast::Hasher::new(), scratch: Vec::new() }
    }

    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// CRC-32 of every byte written so far (what `END` will carry if nothing else follows);
    /// control records can carry it so the reader checks the stream before acting on it.
    pub fn crc_so_far(&self) -> u32 {
        self.crc.clone().finalize()
    }

    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.w.write_all(b)?;
        self.crc.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    pub fn section(&mut self, s: &Section) -> Result<()> {
        let id = s.id.as_bytes();
        if id.len() > MAX_ID_LEN as usize || s.data.len() > MAX_SECTION_LEN as usize {
            return Err(StateError::Stream(format!("section '{}' too large to encode", s.id)));
        }
        let mut hdr = Vec::with_capacity(16 + id.len());
        hdr.push(TAG_SECTION);
        hdr.extend_from_slice(&(id.len() as u16).to_le_bytes());
        hdr.extend_from_slice(id);
        hdr.extend_from_slice(&s.version.to_le_bytes());
        hdr.extend_from_slice(&(s.data.len() as u32).to_le_bytes());
        self.put(&hdr)?;
        self.put(&s.data)
    }

    /// Writes pages of data starting at `gpa`; `data.len()` must be a multiple of the page size.
    pub fn ram_data(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        for (i, chunk) in data.chunks(MAX_PAGES_PER_RECORD as usize * PAGE_SIZE).enumerate() {
            if chunk.len() % PAGE_SIZE != 0 {
                return Err(StateError::Stream("RAM data not page aligned".into()));
            }
            let at = gpa + (i * MAX_PAGES_PER_RECORD as usize * PAGE_SIZE) as u64;
            let mut hdr = [0u8; 13];
            hdr[0] = TAG_RAM_DATA;
            hdr[1..9].copy_from_slice(&at.to_le_bytes());
            hdr[9..13].copy_from_slice(&((chunk.len() / PAGE_SIZE) as u32).to_le_bytes());
            self.put(&hdr)?;
            for piece in chunk.chunks(SCRATCH) {
                let mut scratch = std::mem::take(&mut self.scratch);
                scratch.clear();
                scratch.extend_from_slice(piece);
                let r = self.put(&scratch);
                self.scratch = scratch;
                r?;
            }
        }
        Ok(())
    }

    pub fn ram_zero(&mut self, gpa: u64, npages: u64) -> Result<()> {
        let mut left = npages;
        let mut at = gpa;
        while left > 0 {
            let n = left.min(MAX_PAGES_PER_RECORD as u64);
            let mut hdr = [0u8; 13];
            hdr[0] = TAG_RAM_ZERO;
            hdr[1..9].copy_from_slice(&at.to_le_bytes());
            hdr[9..13].copy_from_slice(&(n as u32).to_le_bytes());
            self.put(&hdr)?;
            left -= n;
            at += n * PAGE_SIZE as u64;
        }
        Ok(())
    }

    /// A raw control record for a protocol layered on this stream (tag 0x40..=0x7F).
    pub fn control(&mut self, tag: u8, body: &[u8]) -> Result<()> {
        if !(0x40..=0x7F).contains(&tag) || body.len() > MAX_SECTION_LEN as usize {
            return Err(StateError::Stream(format!("invalid control record tag {tag:#x}")));
        }
        let mut hdr = [0u8; 5];
        hdr[0] = tag;
        hdr[1..5].copy_from_slice(&(body.len() as u32).to_le_bytes());
        self.put(&hdr)?;
        self.put(body)
    }

    /// Ends the stream and flushes.
    pub fn end(&mut self) -> Result<()> {
        let total = self.bytes;
        let crc = self.crc.clone().finalize();
        let mut rec = [0u8; 13];
        rec[0] = TAG_END;
        rec[1..9].copy_from_slice(&total.to_le_bytes());
        rec[9..13].copy_from_slice(&crc.to_le_bytes());
        self.put(&rec)?;
        self.w.flush()?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.w.flush()?;
        Ok(())
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    pub fn into_inner(self) -> W {
        self.w
    }
}

/// One item read from a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Item {
    Section(Section),
    /// `npages` pages at `gpa` follow: the caller must consume them with
    /// [`StreamReader::read_pages_into`] or [`StreamReader::skip_pages`].
    RamData { gpa: u64, npages: u32 },
    RamZero { gpa: u64, npages: u32 },
    Control { tag: u8, body: Vec<u8> },
    End,
}

/// Reads records, validating every length.
pub struct StreamReader<R: Read> {
    r: R,
    bytes: u64,
    pending_pages: u64,
    crc: crc32fast::Hasher,
    /// CRC-32 of the stream up to the start of the last item read.
    crc_before_last: u32,
}

impl<R: Read> StreamReader<R> {
    /// Opens a stream: checks the header.
    pub fn new(mut r: R) -> Result<Self> {
        let mut hdr = [0u8; 12];
        r.read_exact(&mut hdr).map_err(|e| eof("stream header", e))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&hdr);
        if &hdr[0..8] != MAGIC {
            return Err(StateError::Stream("not a Godwit VM-state stream (bad magic)".into()));
        }
        let v = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        if v != FORMAT_VERSION {
            return Err(StateError::Stream(format!(
                "VM-state stream format version {v} not supported (this Godwit reads {FORMAT_VERSION})"
            )));
        }
        Ok(StreamReader { r, bytes: 12, pending_pages: 0, crc, crc_before_last: 0 })
    }

    /// Continues a stream whose header was checked elsewhere.
    pub fn without_header(r: R) -> Self {
        StreamReader { r, bytes: 0, pending_pages: 0, crc: crc32fast::Hasher::new(), crc_before_last: 0 }
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    /// CRC-32 of every byte before the last item [`StreamReader::next_item`] returned: compare
    /// it with a [`StreamWriter::crc_so_far`] value that item carries.
    pub fn crc_before_last_item(&self) -> u32 {
        self.crc_before_last
    }

    fn get(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| eof(what, e))?;
        self.crc.update(buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let mut b = [0u8; 4];
        self.get(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let mut b = [0u8; 8];
        self.get(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads the next item.
    pub fn next_item(&mut self) -> Result<Item> {
        if self.pending_pages != 0 {
            return Err(StateError::Stream("RAM pages of the previous record not consumed".into()));
        }
        let start = self.bytes;
        let crc_before = self.crc.clone().finalize();
        self.crc_before_last = crc_before;
        let mut tag = [0u8; 1];
        self.get(&mut tag, "record tag")?;
        match tag[0] {
            TAG_SECTION => {
                let mut l = [0u8; 2];
                self.get(&mut l, "section id length")?;
                let idlen = u16::from_le_bytes(l);
                if idlen == 0 || idlen > MAX_ID_LEN {
                    return Err(StateError::Stream(format!("section id length {idlen} out of range")));
                }
                let mut id = vec![0u8; idlen as usize];
                self.get(&mut id, "section id")?;
                let id = String::from_utf8(id)
                    .map_err(|_| StateError::Stream("section id is not UTF-8".into()))?;
                let version = self.u32("section version")?;
                let len = self.u32("section length")?;
                if len > MAX_SECTION_LEN {
                    return Err(StateError::Stream(format!("section '{id}' length {len} too large")));
                }
                let mut data = vec![0u8; len as usize];
                self.get(&mut data, "section payload")?;
                Ok(Item::Section(Section { id, version, data }))
            }
            TAG_RAM_DATA | TAG_RAM_ZERO => {
                let gpa = self.u64("RAM address")?;
                let npages = self.u32("RAM page count")?;
                if gpa % PAGE_SIZE as u64 != 0 || npages == 0 || npages > MAX_PAGES_PER_RECORD {
                    return Err(StateError::Stream(format!(
                        "bad RAM record at {gpa:#x} with {npages} pages"
                    )));
                }
                if tag[0] == TAG_RAM_DATA {
                    self.pending_pages = npages as u64;
                    Ok(Item::RamData { gpa, npages })
                } else {
                    Ok(Item::RamZero { gpa, npages })
                }
            }
            TAG_END => {
                let total = self.u64("end record")?;
                let crc = self.u32("end record")?;
                if total != start {
                    return Err(StateError::Stream(format!(
                        "stream end says {total} bytes, {start} were read"
                    )));
                }
                if crc != crc_before {
                    return Err(StateError::Stream(format!(
                        "stream checksum mismatch (CRC-32 {crc_before:#010x}, stream says {crc:#010x}): corrupted"
                    )));
                }
                Ok(Item::End)
            }
            t @ 0x40..=0x7F => {
                let len = self.u32("control length")?;
                if len > MAX_SECTION_LEN {
                    return Err(StateError::Stream(format!("control record length {len} too large")));
                }
                let mut body = vec![0u8; len as usize];
                self.get(&mut body, "control record")?;
                Ok(Item::Control { tag: t, body })
            }
            t => Err(StateError::Stream(format!("unknown record tag {t:#04x}"))),
        }
    }

    /// Reads the pages announced by the last `RamData` item into `dst` (exactly
    /// `npages * PAGE_SIZE` bytes, typically a slice of guest memory).
    pub fn read_pages_into(&mut self, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != self.pending_pages * PAGE_SIZE as u64 {
            return Err(StateError::Stream("RAM page buffer does not match the record".into()));
        }
        self.get(dst, "RAM pages")?;
        self.pending_pages = 0;
        Ok(())
    }

    /// Reads the pending pages piecewise: `dst` must be a page multiple no larger than
    /// what is left of the current record.
    pub fn read_some_pages_into(&mut self, dst: &mut [u8]) -> Result<()> {
        let n = (dst.len() / PAGE_SIZE) as u64;
        if dst.len() % PAGE_SIZE != 0 || n > self.pending_pages {
            return Err(StateError::Stream("RAM page buffer does not match the record".into()));
        }
        self.get(dst, "RAM pages")?;
        self.pending_pages -= n;
        Ok(())
    }

    /// Discards the pending pages.
    pub fn skip_pages(&mut self) -> Result<()> {
        let mut buf = vec![0u8; PAGE_SIZE];
        while self.pending_pages > 0 {
            self.get(&mut buf, "RAM pages")?;
            self.pending_pages -= 1;
        }
        Ok(())
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    pub fn into_inner(self) -> R {
        self.r
    }
}

fn eof(what: &str, e: std::io::Error) -> StateError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StateError::Stream(format!("stream truncated while reading {what}"))
    } else {
        StateError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.section(&Section { id: "a".into(), version: 1, data: vec![1, 2, 3] }).unwrap();
        w.ram_data(0x1000, &vec![7u8; 2 * PAGE_SIZE]).unwrap();
        w.ram_zero(0x10000, 5).unwrap();
        w.control(0x41, b"hi").unwrap();
        w.end().unwrap();
        w.into_inner()
    }

    #[test]
    fn roundtrip() {
        let buf = sample();
        let mut r = StreamReader::new(&buf[..]).unwrap();
        assert_eq!(r.next_item().unwrap(), Item::Section(Section { id: "a".into(), version: 1, data: vec![1, 2, 3] }));
        assert_eq!(r.next_item().unwrap(), Item::RamData { gpa: 0x1000, npages: 2 });
        assert!(r.next_item().is_err(), "pages must be consumed first");
        let mut pages = vec![0u8; 2 * PAGE_SIZE];
        r.read_pages_into(&mut pages).unwrap();
        assert!(pages.iter().all(|&b| b == 7));
        assert_eq!(r.next_item().unwrap(), Item::RamZero { gpa: 0x10000, npages: 5 });
        assert_eq!(r.next_item().unwrap(), Item::Control { tag: 0x41, body: b"hi".to_vec() });
        assert_eq!(r.next_item().unwrap(), Item::End);
    }

    #[test]
    fn every_flipped_byte_is_an_error() {
        let buf = sample();
        for pos in 0..buf.len() {
            let mut b = buf.clone();
            b[pos] ^= 0x10;
            let res = (|| -> Result<()> {
                let mut r = StreamReader::new(&b[..])?;
                loop {
                    match r.next_item()? {
                        Item::End => return Ok(()),
                        Item::RamData { .. } => r.skip_pages()?,
                        _ => {}
                    }
                }
            })();
            assert!(res.is_err(), "flip at {pos} accepted");
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = sample();
        for cut in 0..buf.len() {
            let res = (|| -> Result<()> {
                let mut r = StreamReader::new(&buf[..cut])?;
                loop {
                    match r.next_item()? {
                        Item::End => return Ok(()),
                        Item::RamData { .. } => r.skip_pages()?,
                        _ => {}
                    }
                }
            })();
            assert!(res.is_err(), "truncation at {cut} accepted");
        }
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = MAGIC.to_vec();
            buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            buf.extend_from_slice(&data);
            let mut r = StreamReader::new(&buf[..]).unwrap();
            for _ in 0..64 {
                match r.next_item() {
                    Ok(Item::RamData { .. }) => { if r.skip_pages().is_err() { break } }
                    Ok(Item::End) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }
}
