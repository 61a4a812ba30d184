//! One virtio-blk request: the descriptor chain turned into a byte stream the device reads
//! (header, then OUT data or discard ranges) and one it writes (IN data or the id, then the
//! status byte), validated, and executed against the backend.
//!
//! Nothing here trusts the guest: each descriptor is checked to lie in guest RAM, the chain is
//! bounded, sector ranges are checked against the capacity with overflow checks, and every
//! failure becomes a virtio status (`IOERR`/`UNSUPP`) written to the status byte when that
//! byte itself is usable.
//!
//! A request is parsed once ([`Executor::parse`]: the chain's buffers and the header, read
//! from guest memory exactly once) and executed later, possibly on another thread
//! ([`Executor::run`]). Data moves one of two ways:
//! - straight between the image file and guest memory, when the backend offers a
//!   [`ParallelIo`] handle (raw images) and accepts the buffers as they are (for `O_DIRECT`:
//!   aligned): `preadv`/`pwritev` on the guest's host addresses, no copy; pages the device
//!   read into are marked in the dirty bitmap as `write_slice` would;
//! - otherwise through a reusable bounce buffer of at most [`BOUNCE_MAX`] bytes and the
//!   backend's `read_at`/`write_at` (which take byte slices: a slice must not alias guest
//!   memory the guest can change under it, hence the copy); requests larger than the buffer
//!   are done in chunks, never with a bigger allocation.
//!
//! Every other guest-memory access goes through `vm-memory` (`read_slice` / `write_slice`),
//! so device writes land in the dirty bitmap.

use super::policy::{ErrorAction, IoErrorReport};
use super::{DiskInfo, SharedBackend, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE};
use crate::mmio::lock;
use crate::GuestMemoryMmap;
use qcow2::{IoBuf, ParallelIo};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use virtio_bindings::virtio_blk as vb;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Most descriptors accepted in one chain (direct plus indirect).
pub const MAX_DESCRIPTORS: usize = 1024;
/// Size of the bounce buffer between guest memory and the backend.
pub const BOUNCE_MAX: usize = 1 << 20;
/// Size of `struct virtio_blk_outhdr`.
const HEADER_LEN: u64 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
const RANGE_LEN: u64 = 16;

/// A request status (the last byte the device writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    fn byte(self) -> u8 {
        (match self {
            Status::Ok => vb::VIRTIO_BLK_S_OK,
            Status::IoErr => vb::VIRTIO_BLK_S_IOERR,
            Status::Unsupp => vb::VIRTIO_BLK_S_UNSUPP,
        }) as u8
    }
}

/// Why a request failed (logged; the guest only sees the status). `backend` is set when the
/// backend's I/O failed (the drive's error policy applies): (a write, out of space).
#[derive(Debug)]
struct Failure(Status, String, Option<(bool, bool)>);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.0, self.1)
    }
}

fn ioerr(msg: impl Into<String>) -> Failure {
    Failure(Status::IoErr, msg.into(), None)
}

/// A failed backend call of a read (`write` false) or a write request.
fn backend_fail(write: bool, what: &str, e: qcow2::Error) -> Failure {
    let nospace = e.is_no_space()
        || matches!(&e, qcow2::Error::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull);
    Failure(Status::IoErr, format!("{what}: {e}"), Some((write, nospace)))
}

/// What became of one request.
pub(crate) struct Outcome {
    /// Bytes written into its buffers (the used-ring length); `None`: the request was not
    /// completed (error policy `stop`) and must go back to the available ring.
    pub used_len: Option<u32>,
    /// The backend failure the drive's error policy acted on, if any.
    pub error: Option<IoErrorReport>,
}

/// One descriptor's buffer. `valid` is false when it does not lie in guest RAM.
#[derive(Debug, Clone, Copy)]
struct Seg {
    addr: GuestAddress,
    len: u32,
    valid: bool,
}

/// A list of buffers seen as one byte stream.
#[derive(Debug, Default)]
struct Stream {
    segs: Vec<Seg>,
    len: u64,
}

impl Stream {
    fn push(&mut self, s: Seg) {
        self.len += u64::from(s.len);
        self.segs.push(s);
    }

    /// Calls `f(addr, start_in_buf, n)` for each piece of `[off, off + len)`; fails on an
    /// invalid buffer or a range past the end.
    fn pieces(&self, mut off: u64, len: usize, mut f: impl FnMut(GuestAddress, usize, usize) -> bool) -> bool {
        let mut done = 0usize;
        for s in &self.segs {
            if done == len {
                break;
            }
            let slen = u64::from(s.len);
            if off >= slen {
                off -= slen;
                continue;
            }
            if !s.valid {
                return false;
            }
            let n = ((slen - off) as usize).min(len - done);
            let Some(addr) = s.addr.0.checked_add(off) else { return false };
            if !f(GuestAddress(addr), done, n) {
                return false;
            }
            done += n;
            off = 0;
        }
        done == len
    }

    /// Copies stream bytes `[off, off + buf.len())` out of guest memory.
    fn read(&self, mem: &GuestMemoryMmap, off: u64, buf: &mut [u8]) -> bool {
        self.pieces(off, buf.len(), |a, at, n| mem.read_slice(&mut buf[at..at + n], a).is_ok())
    }

    /// Copies `buf` into stream bytes `[off, off + buf.len())` in guest memory.
    fn write(&self, mem: &GuestMemoryMmap, off: u64, buf: &[u8]) -> bool {
        self.pieces(off, buf.len(), |a, at, n| mem.write_slice(&buf[at..at + n], a).is_ok())
    }
}

/// The chain split into what the device reads and what it writes.
struct Parsed {
    readable: Stream,
    writable: Stream,
    /// First structural problem found, if any.
    bad: Option<String>,
}

/// A popped request, parsed and ready to run on any thread.
pub(crate) struct Request {
    /// The chain's head descriptor (what goes into the used ring).
    pub head: u16,
    p: Parsed,
    /// The header, as read once at parse time (None: missing or short).
    hdr: Option<Header>,
}

impl Request {
    /// `Some(write)` for a data request (IN or OUT) that may run concurrently with others;
    /// None for anything that runs alone (FLUSH, DISCARD, GET_ID, malformed requests, ...).
    pub fn data_direction(&self) -> Option<bool> {
        match self.hdr {
            Some(h) if self.p.bad.is_none() && h.kind == vb::VIRTIO_BLK_T_IN => Some(false),
            Some(h) if self.p.bad.is_none() && h.kind == vb::VIRTIO_BLK_T_OUT => Some(true),
            _ => None,
        }
    }

    /// Bytes of data a data request moves (0 for any other).
    pub fn data_len(&self) -> u64 {
        match self.data_direction() {
            Some(false) => self.p.writable.len.saturating_sub(1),
            Some(true) => self.p.readable.len.saturating_sub(HEADER_LEN),
            None => 0,
        }
    }
}

fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemoryMmap) -> Parsed
where
    M: Deref<Target = GuestMemoryMmap>,
{
    let mut p = Parsed { readable: Stream::default(), writable: Stream::default(), bad: None };
    for (i, d) in chain.enumerate() {
        if i >= MAX_DESCRIPTORS {
            p.bad.get_or_insert(format!("chain longer than {MAX_DESCRIPTORS} descriptors"));
            break;
        }
        if d.len() == 0 {
            continue;
        }
        let valid = mem.check_range(d.addr(), d.len() as usize);
        if !valid {
            p.bad.get_or_insert(format!("buffer {:#x}+{:#x} is outside guest RAM", d.addr().0, d.len()));
        }
        let seg = Seg { addr: d.addr(), len: d.len(), valid };
        if d.is_write_only() {
            p.writable.push(seg);
        } else {
            if !p.writable.segs.is_empty() {
                p.bad.get_or_insert("device-readable buffer after a device-writable one".into());
            }
            p.readable.push(seg);
        }
    }
    p
}

/// The request header (`struct virtio_blk_outhdr`).
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u32,
    sector: u64,
}

/// Executes requests; owns the bounce buffer. Clones (one per I/O thread) share the backend
/// and get their own bounce buffer.
pub(crate) struct Executor {
    pub mem: GuestMemoryMmap,
    pub backend: SharedBackend,
    pub info: DiskInfo,
    /// Whether the driver accepted DISCARD / WRITE_ZEROES.
    pub discard: bool,
    pub write_zeroes: bool,
    /// The backend's concurrent I/O handle, when it has one (data then bypasses the bounce).
    pub pio: Option<Arc<dyn ParallelIo>>,
    bounce: Vec<u8>,
}

impl Clone for Executor {
    fn clone(&self) -> Self {
        Executor {
            mem: self.mem.clone(),
            backend: self.backend.clone(),
            info: self.info.clone(),
            discard: self.discard,
            write_zeroes: self.write_zeroes,
            pio: self.pio.clone(),
            bounce: Vec::new(),
        }
    }
}

impl Executor {
    pub fn new(mem: GuestMemoryMmap, backend: SharedBackend, info: DiskInfo, acked: u64) -> Self {
        Executor {
            discard: info.discard && acked & (1 << vb::VIRTIO_BLK_F_DISCARD) != 0,
            write_zeroes: info.write_zeroes && acked & (1 << vb::VIRTIO_BLK_F_WRITE_ZEROES) != 0,
            mem,
            backend,
            info,
            pio: None,
            bounce: Vec::new(),
        }
    }

    /// Takes a popped chain apart and reads its header (the only read of the header: a guest
    /// changing it later changes nothing).
    pub fn parse<M>(&self, chain: DescriptorChain<M>) -> Request
    where
        M: Deref<Target = GuestMemoryMmap>,
    {
        let head = chain.head_index();
        let p = parse(chain, &self.mem);
        let mut h = [0u8; HEADER_LEN as usize];
        let hdr = (p.readable.len >= HEADER_LEN && p.readable.read(&self.mem, 0, &mut h)).then(|| Header {
            kind: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            sector: u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
        });
        Request { head, p, hdr }
    }

    /// Executes a parsed request under the drive's error policy.
    pub fn run(&mut self, r: &Request) -> Outcome {
        let (head, p) = (r.head, &r.p);
        let mut error = None;
        let (status, written) = match self.execute(p, r.hdr) {
            Ok(n) => (Status::Ok, n),
            Err(Failure(st, msg, Some((write, nospace)))) => {
                let action = self.info.policy.action(write, nospace);
                tracing::warn!("virtio-blk: {} failed ({msg}); error action: {action}", if write { "write" } else { "read" });
                error = Some(IoErrorReport { write, action, nospace, reason: msg });
                match action {
                    ErrorAction::Stop => return Outcome { used_len: None, error },
                    ErrorAction::Ignore => (Status::Ok, 0),
                    _ => (st, 0),
                }
            }
            Err(f) => {
                tracing::debug!("virtio-blk: request at descriptor {head} failed: {f}");
                (f.0, 0)
            }
        };
        // The status byte is the last writable byte.
        let Some(status_off) = p.writable.len.checked_sub(1) else {
            tracing::debug!("virtio-blk: request at descriptor {head} has no status byte");
            return Outcome { used_len: Some(0), error };
        };
        if !p.writable.write(&self.mem, status_off, &[status.byte()]) {
            tracing::debug!("virtio-blk: status byte of request {head} is not writable");
            return Outcome { used_len: Some(0), error };
        }
        Outcome { used_len: Some(u32::try_from(written + 1).unwrap_or(u32::MAX)), error }
    }

    /// Returns the data bytes written to the guest (excluding the status byte).
    fn execute(&mut self, p: &Parsed, hdr: Option<Header>) -> Result<u64, Failure> {
        if let Some(b) = &p.bad {
            return Err(ioerr(b.clone()));
        }
        if p.writable.len == 0 {
            return Err(ioerr("no device-writable status byte"));
        }
        let Some(hdr) = hdr else {
            return Err(ioerr("request header missing or short"));
        };
        let out_len = p.readable.len - HEADER_LEN;
        let in_len = p.writable.len - 1;
        match hdr.kind {
            vb::VIRTIO_BLK_T_IN => {
                let off = self.check_range(hdr.sector, in_len)?;
                self.read_in(&p.writable, off, in_len)?;
                Ok(in_len)
            }
            vb::VIRTIO_BLK_T_OUT => {
                let off = self.check_range(hdr.sector, out_len)?;
                if self.info.read_only {
                    return Err(ioerr("write to a read-only disk"));
                }
                self.write_out(&p.readable, off, out_len)?;
                Ok(0)
            }
            vb::VIRTIO_BLK_T_FLUSH => {
                lock(&self.backend).flush().map_err(|e| backend_fail(true, "flush", e))?;
                Ok(0)
            }
            vb::VIRTIO_BLK_T_GET_ID => {
                let n = (self.info.serial.len() as u64).min(in_len) as usize;
                if !p.writable.write(&self.mem, 0, &self.info.serial[..n]) {
                    return Err(ioerr("GET_ID buffer not writable"));
                }
                Ok(n as u64)
            }
            vb::VIRTIO_BLK_T_DISCARD if self.discard => self.ranges(&p.readable, out_len, false),
            vb::VIRTIO_BLK_T_WRITE_ZEROES if self.write_zeroes => self.ranges(&p.readable, out_len, true),
            k => Err(Failure(Status::Unsupp, format!("request type {k}"), None)),
        }
    }

    /// Checks `len` bytes at `sector` lie on the disk, in whole sectors; returns the byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        if len % SECTOR_SIZE != 0 {
            return Err(ioerr(format!("data length {len} is not a multiple of {SECTOR_SIZE}")));
        }
        let off = sector.checked_mul(SECTOR_SIZE).ok_or_else(|| ioerr(format!("sector {sector} overflows")))?;
        match off.checked_add(len) {
            Some(end) if end <= self.info.capacity_bytes => Ok(off),
            _ => Err(ioerr(format!(
                "sectors {sector}+{} beyond the capacity of {} sectors",
                len / SECTOR_SIZE,
                self.info.capacity_bytes / SECTOR_SIZE
            ))),
        }
    }

    /// Disk `[off, off + len)` into the writable stream from its start.
    fn read_in(&mut self, dst: &Stream, off: u64, len: u64) -> Result<(), Failure> {
        if let (Some(pio), Some(pieces)) = (&self.pio, host_pieces(&self.mem, dst, 0, len)) {
            let bufs: Vec<IoBuf> = pieces.iter().map(|p| p.1).collect();
            // SAFETY: each buffer is a checked range of mapped guest memory (one region), which
            // stays mapped while `self.mem` holds it; the guest may change it concurrently, which
            // the kernel's copy tolerates (no Rust reference to it exists).
            match unsafe { pio.read_vectored(off, &bufs) } {
                Ok(true) => {
                    for (addr, b) in &pieces {
                        if let Ok(s) = self.mem.get_slice(*addr, b.len) {
                            s.bitmap().mark_dirty(0, b.len);
                        }
                    }
                    return Ok(());
                }
                Ok(false) => {}
                Err(e) => return Err(backend_fail(false, "read", e)),
            }
        }
        let Executor { mem, backend, bounce, .. } = self;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_MAX as u64) as usize;
            let buf = bounce_buf(bounce, n);
            lock(backend).read_at(off + done, buf).map_err(|e| backend_fail(false, "read", e))?;
            if !dst.write(mem, done, buf) {
                return Err(ioerr("data buffer not writable"));
            }
            done += n as u64;
        }
        Ok(())
    }

    /// The readable stream after the header to disk `[off, off + len)`.
    fn write_out(&mut self, src: &Stream, off: u64, len: u64) -> Result<(), Failure> {
        if let (Some(pio), Some(pieces)) = (&self.pio, host_pieces(&self.mem, src, HEADER_LEN, len)) {
            let bufs: Vec<IoBuf> = pieces.iter().map(|p| p.1).collect();
            // SAFETY: as in `read_in`; the kernel only reads the buffers.
            match unsafe { pio.write_vectored(off, &bufs) } {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(backend_fail(true, "write", e)),
            }
        }
        let Executor { mem, backend, bounce, .. } = self;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_MAX as u64) as usize;
            let buf = bounce_buf(bounce, n);
            if !src.read(mem, HEADER_LEN + done, buf) {
                return Err(ioerr("data buffer not readable"));
            }
            lock(backend).write_at(off + done, buf).map_err(|e| backend_fail(true, "write", e))?;
            done += n as u64;
        }
        Ok(())
    }

    /// DISCARD or WRITE_ZEROES: an array of `struct virtio_blk_discard_write_zeroes`.
    fn ranges(&mut self, src: &Stream, len: u64, zeroes: bool) -> Result<u64, Failure> {
        if self.info.read_only {
            return Err(ioerr("discard/write-zeroes on a read-only disk"));
        }
        if len == 0 || len % RANGE_LEN != 0 || len / RANGE_LEN > u64::from(MAX_DISCARD_SEG) {
            return Err(ioerr(format!("discard/write-zeroes payload of {len} bytes")));
        }
        let mut ranges = Vec::with_capacity((len / RANGE_LEN) as usize);
        for i in 0..len / RANGE_LEN {
            let mut r = [0u8; RANGE_LEN as usize];
            if !src.read(&self.mem, HEADER_LEN + i * RANGE_LEN, &mut r) {
                return Err(ioerr("range not readable"));
            }
            let sector = u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]);
            let num = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
            let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
            let allowed = if zeroes { vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
            if flags & !allowed != 0 {
                return Err(Failure(Status::Unsupp, format!("range flags {flags:#x}"), None));
            }
            if num > MAX_DISCARD_SECTORS {
                return Err(ioerr(format!("range of {num} sectors exceeds the advertised maximum")));
            }
            let off = self.check_range(sector, u64::from(num) * SECTOR_SIZE)?;
            ranges.push((off, u64::from(num) * SECTOR_SIZE));
        }
        let mut b = lock(&self.backend);
        for (off, n) in ranges {
            let r = if zeroes { b.write_zeroes(off, n) } else { b.discard(off, n) };
            r.map_err(|e| backend_fail(true, if zeroes { "write-zeroes" } else { "discard" }, e))?;
        }
        Ok(0)
    }
}

/// Stream bytes `[off, off + len)` as host buffers (with their guest addresses), or None when
/// a piece is not one range of one guest memory region (the caller bounces then).
fn host_pieces(mem: &GuestMemoryMmap, s: &Stream, off: u64, len: u64) -> Option<Vec<(GuestAddress, IoBuf)>> {
    let len = usize::try_from(len).ok().filter(|&l| l > 0)?;
    let mut v = Vec::with_capacity(s.segs.len().min(8));
    let ok = s.pieces(off, len, |addr, _, n| match mem.get_slice(addr, n) {
        Ok(sl) => {
            v.push((addr, IoBuf { ptr: sl.ptr_guard_mut().as_ptr(), len: n }));
            true
        }
        Err(_) => false,
    });
    ok.then_some(v)
}

/// The first `n` bytes of the bounce buffer, page-aligned, grown on first need (never past
/// [`BOUNCE_MAX`] plus a page of alignment slack).
fn bounce_buf(b: &mut Vec<u8>, n: usize) -> &mut [u8] {
    // Page-aligned, so an O_DIRECT backend (cache=none) reads and writes it without a copy.
    const ALIGN: usize = 4096;
    if b.len() < n + ALIGN {
        b.resize(n + ALIGN, 0);
    }
    let skip = b.as_ptr().align_offset(ALIGN);
    &mut b[skip..skip + n]
}
