//! multifd: guest RAM over N extra connections (`migrate_set_capability multifd on`,
//! `multifd-channels N`), each served by its own thread on both sides, optionally compressed
//! (`multifd-compression zlib|zstd`). The main connection keeps the protocol's state and
//! ordering; the channel format and how rounds stay whole are documented in `protocol.rs`.
//!
//! Source: the migration thread cuts each round's dirty pages into packets of up to
//! [`PACKET_PAGES`] pages and hands them round-robin to the channel threads through bounded
//! queues; each thread copies the pages, finds the zero ones, compresses the rest and writes
//! the packet. At a round's end every thread writes `SYNC(round)` and reports its counters;
//! only then does the main connection send `ROUND_END`.
//!
//! Destination: one thread per channel checks, decompresses and installs packets straight
//! into guest RAM and records the last round it saw `SYNC` for; the main thread acknowledges a
//! round (and restores the machine state after the switchover) only when every channel has
//! synced it. A failed channel makes its thread record why and end the main connection's reads,
//! so the migration fails at once with that reason.

use crate::protocol::MAX_PACKET_HDR;
use crate::stats::Compression;
use crate::transport::{Channel, Limited};
use crate::{MigrationError, RamRegion, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use vmstate::ram::{is_zero_page, RamStats};
use vmstate::stream::PAGE_SIZE;

/// Most pages in one packet (512 KiB of data before compression).
pub const PACKET_PAGES: usize = 128;
/// The first bytes of every multifd connection.
pub const CHANNEL_MAGIC: &[u8; 8] = b"GODWITMF";
pub const CHANNEL_VERSION: u32 = 1;
const KIND_PAGES: u8 = 1;
const KIND_SYNC: u8 = 2;
const KIND_FIN: u8 = 3;
/// Largest payload accepted: a packet's pages, plus what a compressor may add to random data.
const MAX_PAYLOAD: usize = PACKET_PAGES * PAGE_SIZE + 64 * 1024;

/// `MULTIFD_SETUP` body (main connection, source → destination).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub channels: u8,
    /// 0 none, 1 zlib, 2 zstd.
    pub compression: u8,
    /// Random; every channel's header repeats it.
    pub session: u64,
}

/// Header of a `PAGES` packet.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Packet {
    pub round: u32,
    /// Guest-physical addresses of the data pages, in payload order.
    pub data: Vec<u64>,
    /// Pages that are all zero now (dirty rounds only).
    pub zero: Vec<u64>,
    pub payload_len: u32,
}

pub fn codec_id(c: Compression) -> u8 {
    match c {
        Compression::None => 0,
        Compression::Zlib => 1,
        Compression::Zstd => 2,
    }
}

/// A random session id (from the kernel's generator; a clock mix if that fails).
pub fn session_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom into a buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    if n == 8 {
        u64::from_le_bytes(b)
    } else {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        t ^ (std::process::id() as u64) << 32
    }
}

/// Channel header: magic, version, session, index.
pub fn channel_header(session: u64, index: u8) -> Vec<u8> {
    let mut h = CHANNEL_MAGIC.to_vec();
    h.extend_from_slice(&CHANNEL_VERSION.to_le_bytes());
    h.extend_from_slice(&session.to_le_bytes());
    h.push(index);
    h
}

/// Reads and checks a channel header; returns the channel index.
pub fn read_channel_header(r: &mut dyn Read, session: u64, channels: u8) -> Result<u8> {
    let mut h = [0u8; 21];
    r.read_exact(&mut h)?;
    if &h[..8] != CHANNEL_MAGIC {
        return Err(MigrationError::Protocol("not a multifd channel (bad magic)".into()));
    }
    let v = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if v != CHANNEL_VERSION {
        return Err(MigrationError::Incompatible(format!("multifd channel version {v}, this destination speaks {CHANNEL_VERSION}")));
    }
    let s = u64::from_le_bytes(h[12..20].try_into().unwrap_or([0; 8]));
    if s != session {
        return Err(MigrationError::Protocol("multifd channel of another migration session".into()));
    }
    if h[20] >= channels {
        return Err(MigrationError::Protocol(format!("multifd channel index {} out of range", h[20])));
    }
    Ok(h[20])
}

// ---------------------------------------------------------------------------------------------
// Source side.

enum Job {
    /// (host address, guest-physical address, pages) runs, at most PACKET_PAGES pages in all.
    Pages { round: u32, runs: Vec<(u64, u64, usize)>, record_zero: bool },
    Sync(u32),
    Fin,
}

/// What a channel thread reports at a `SYNC`.
type Synced = std::result::Result<(u32, RamStats), String>;

/// Counters shared by the channel threads.
#[derive(Default)]
pub struct Counters {
    /// Bytes written on all channels.
    pub bytes: AtomicU64,
    /// Data-page bytes before and after compression.
    pub raw: AtomicU64,
    pub packed: AtomicU64,
}

/// The source's channel threads.
pub struct Sender {
    txs: Vec<SyncSender<Job>>,
    done: Receiver<(usize, Synced)>,
    threads: Vec<JoinHandle<()>>,
    chans: Vec<Box<dyn Channel>>,
    pub counters: Arc<Counters>,
    /// Bytes per second per channel (0 = unlimited), read before each packet.
    pub limit: Arc<AtomicU64>,
    next: usize,
    batch: Vec<(u64, u64, usize)>,
    batch_pages: usize,
}

struct Encoder {
    codec: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zlib_level: u32,
}

impl Encoder {
    fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) -> std::result::Result<(), String> {
        out.clear();
        match self.codec {
            Compression::None => out.extend_from_slice(data),
            Compression::Zstd => {
                let c = self.zstd.as_mut().ok_or("zstd compressor missing")?;
                out.reserve(zstd::zstd_safe::compress_bound(data.len()));
                c.compress_to_buffer(data, out).map_err(|e| format!("zstd: {e}"))?;
            }
            Compression::Zlib => {
                let mut z = flate2::Compress::new(flate2::Compression::new(self.zlib_level), true);
                out.reserve(data.len() + data.len() / 100 + 1024);
                loop {
                    let st = z.compress_vec(data, out, flate2::FlushCompress::Finish).map_err(|e| format!("zlib: {e}"))?;
                    if st == flate2::Status::StreamEnd {
                        break;
                    }
                    out.reserve(64 * 1024);
                }
            }
        }
        Ok(())
    }
}

/// Compresses `data` (whole pages) as a channel thread would; returns (output bytes, seconds
/// spent). For the forecast's compression ratio and per-thread speed.
pub fn compress_probe(codec: Compression, zstd_level: u8, zlib_level: u8, data: &[u8]) -> Result<(usize, f64)> {
    let zstd = match codec {
        Compression::Zstd => Some(zstd::bulk::Compressor::new(zstd_level as i32).map_err(MigrationError::Io)?),
        _ => None,
    };
    let mut enc = Encoder { codec, zstd, zlib_level: zlib_level as u32 };
    let mut out = Vec::new();
    let t = std::time::Instant::now();
    let mut total = 0;
    for packet in data.chunks(PACKET_PAGES * PAGE_SIZE) {
        enc.encode(packet, &mut out).map_err(MigrationError::Protocol)?;
        total += out.len();
    }
    Ok((total, t.elapsed().as_secs_f64()))
}

impl Sender {
    /// Starts one thread per connected channel (headers already written).
    pub fn start(chans: Vec<Box<dyn Channel>>, codec: Compression, zstd_level: u8, zlib_level: u8, limit: u64) -> Result<Sender> {
        let counters = Arc::new(Counters::default());
        let limit = Arc::new(AtomicU64::new(limit));
        let (done_tx, done) = std::sync::mpsc::channel();
        let mut txs = Vec::new();
        let mut threads = Vec::new();
        let mut keep = Vec::new();
        for (i, chan) in chans.into_iter().enumerate() {
            keep.push(chan.try_clone_box()?);
            let (tx, rx) = sync_channel::<Job>(4);
            txs.push(tx);
            let zstd = match codec {
                Compression::Zstd => Some(zstd::bulk::Compressor::new(zstd_level as i32).map_err(MigrationError::Io)?),
                _ => None,
            };
            let mut enc = Encoder { codec, zstd, zlib_level: zlib_level as u32 };
            let (c, l, d) = (counters.clone(), limit.clone(), done_tx.clone());
            let w = BufWriter::with_capacity(1 << 20, Limited::new(chan, l.load(Ordering::Relaxed)));
            threads.push(
                std::thread::Builder::new()
                    .name(format!("multifd-send-{i}"))
                    .spawn(move || send_thread(i, rx, w, &mut enc, &c, &l, &d))?,
            );
        }
        Ok(Sender { txs, done, threads, chans: keep, counters, limit, next: 0, batch: Vec::new(), batch_pages: 0 })
    }

    fn dispatch(&mut self, job: Job) -> Result<()> {
        let i = self.next % self.txs.len();
        self.next += 1;
        self.txs[i].send(job).map_err(|_| self.failure())
    }

    /// The reason a channel thread stopped (waits briefly for it to say).
    fn failure(&self) -> MigrationError {
        while let Ok((i, r)) = self.done.recv_timeout(std::time::Duration::from_secs(2)) {
            if let Err(e) = r {
                return MigrationError::Protocol(format!("multifd channel {i}: {e}"));
            }
        }
        MigrationError::Protocol("a multifd channel stopped".into())
    }

    /// Queues `n` pages of `r` from page index `first` (split into packets as needed).
    pub fn queue(&mut self, r: &RamRegion, first: usize, n: usize, round: u32, record_zero: bool) -> Result<()> {
        let mut done = 0;
        while done < n {
            let take = (n - done).min(PACKET_PAGES - self.batch_pages);
            let p = first + done;
            self.batch.push((r.host + (p * PAGE_SIZE) as u64, r.gpa + (p * PAGE_SIZE) as u64, take));
            self.batch_pages += take;
            done += take;
            if self.batch_pages == PACKET_PAGES {
                self.flush_batch(round, record_zero)?;
            }
        }
        Ok(())
    }

    fn flush_batch(&mut self, round: u32, record_zero: bool) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let runs = std::mem::take(&mut self.batch);
        self.batch_pages = 0;
        self.dispatch(Job::Pages { round, runs, record_zero })
    }

    /// Ends `round` on every channel and waits until each has written it; returns the
    /// counters of the pages sent in it.
    pub fn sync(&mut self, round: u32, record_zero: bool) -> Result<RamStats> {
        self.flush_batch(round, record_zero)?;
        for tx in &self.txs {
            tx.send(Job::Sync(round)).map_err(|_| self.failure())?;
        }
        let mut st = RamStats::default();
        for _ in 0..self.txs.len() {
            match self.done.recv() {
                Ok((_, Ok((r, s)))) if r == round => st.add(s),
                Ok((i, Ok((r, _)))) => return Err(MigrationError::Protocol(format!("multifd channel {i} synced round {r}, expected {round}"))),
                Ok((i, Err(e))) => return Err(MigrationError::Protocol(format!("multifd channel {i}: {e}"))),
                Err(_) => return Err(MigrationError::Protocol("multifd channels stopped".into())),
            }
        }
        Ok(st)
    }

    /// Ends every channel cleanly and joins the threads.
    pub fn finish(mut self) {
        for tx in &self.txs {
            let _ = tx.send(Job::Fin);
        }
        self.txs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        // A failed migration: cut the channels so no thread stays blocked on a dead link.
        if !self.txs.is_empty() {
            for c in &self.chans {
                c.shutdown();
            }
            self.txs.clear();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

type ChanWriter = BufWriter<Limited<Box<dyn Channel>>>;

fn send_thread(
    idx: usize,
    rx: Receiver<Job>,
    mut w: ChanWriter,
    enc: &mut Encoder,
    c: &Counters,
    limit: &AtomicU64,
    done: &std::sync::mpsc::Sender<(usize, Synced)>,
) {
    let mut st = RamStats::default();
    let mut data = Vec::with_capacity(PACKET_PAGES * PAGE_SIZE);
    let mut payload = Vec::with_capacity(PACKET_PAGES * PAGE_SIZE + 4096);
    let mut frame = Vec::with_capacity(64 * 1024);
    let mut run = || -> std::result::Result<bool, String> {
        let job = match rx.recv() {
            Ok(j) => j,
            Err(_) => return Ok(false),
        };
        w.get_mut().limit = limit.load(Ordering::Relaxed);
        match job {
            Job::Pages { round, runs, record_zero } => {
                let mut pk = Packet { round, ..Default::default() };
                data.clear();
                for (host, gpa, n) in runs {
                    for k in 0..n {
                        // SAFETY: the run lies inside a RAM region's host mapping, which
                        // outlives the migration; the guest may be writing it (dirty tracking
                        // sends such pages again), and the copy is what is checked and sent.
                        let page = unsafe { std::slice::from_raw_parts((host + (k * PAGE_SIZE) as u64) as *const u8, PAGE_SIZE) };
                        let at = data.len();
                        data.extend_from_slice(page);
                        let a = gpa + (k * PAGE_SIZE) as u64;
                        if is_zero_page(&data[at..]) {
                            data.truncate(at);
                            st.zero_pages += 1;
                            if record_zero {
                                pk.zero.push(a);
                            }
                        } else {
                            st.data_pages += 1;
                            pk.data.push(a);
                        }
                    }
                }
                if pk.data.is_empty() && pk.zero.is_empty() {
                    return Ok(true);
                }
                if pk.data.is_empty() {
                    payload.clear();
                } else {
                    enc.encode(&data, &mut payload)?;
                }
                c.raw.fetch_add(data.len() as u64, Ordering::Relaxed);
                c.packed.fetch_add(payload.len() as u64, Ordering::Relaxed);
                pk.payload_len = payload.len() as u32;
                let hdr = postcard::to_stdvec(&pk).map_err(|e| e.to_string())?;
                frame.clear();
                frame.push(KIND_PAGES);
                frame.extend_from_slice(&(hdr.len() as u32).to_le_bytes());
                frame.extend_from_slice(&hdr);
                let mut crc = crc32fast::Hasher::new();
                crc.update(&hdr);
                crc.update(&payload);
                w.write_all(&frame).map_err(|e| e.to_string())?;
                w.write_all(&payload).map_err(|e| e.to_string())?;
                w.write_all(&crc.finalize().to_le_bytes()).map_err(|e| e.to_string())?;
                c.bytes.fetch_add((frame.len() + payload.len() + 4) as u64, Ordering::Relaxed);
                Ok(true)
            }
            Job::Sync(round) => {
                let mut f = vec![KIND_SYNC];
                f.extend_from_slice(&round.to_le_bytes());
                w.write_all(&f).and_then(|_| w.flush()).map_err(|e| e.to_string())?;
                c.bytes.fetch_add(5, Ordering::Relaxed);
                let _ = done.send((idx, Ok((round, std::mem::take(&mut st)))));
                Ok(true)
            }
            Job::Fin => {
                let _ = w.write_all(&[KIND_FIN]).and_then(|_| w.flush());
                Ok(false)
            }
        }
    };
    loop {
        match run() {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::warn!("multifd channel {idx}: {e}");
                let _ = done.send((idx, Err(e)));
                w.get_ref().get_ref().shutdown();
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Destination side.

#[derive(Default)]
struct RecvState {
    /// Last round each channel synced (None: none yet).
    synced: Vec<Option<u32>>,
    finished: usize,
    error: Option<String>,
}

/// The destination's channel threads.
pub struct Receivers {
    st: Arc<(Mutex<RecvState>, Condvar)>,
    chans: Vec<Box<dyn Channel>>,
    threads: Vec<JoinHandle<()>>,
    pub pages: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
}

impl Receivers {
    /// Starts one thread per channel (headers already checked, in index order). `main` is
    /// the main connection, whose reads a failing channel ends.
    pub fn start(chans: Vec<Box<dyn Channel>>, codec: u8, regions: Vec<RamRegion>, main: Box<dyn Channel>) -> Result<Receivers> {
        if codec > 2 {
            return Err(MigrationError::Incompatible(format!("unknown multifd compression {codec}")));
        }
        let n = chans.len();
        let st = Arc::new((Mutex::new(RecvState { synced: vec![None; n], ..Default::default() }), Condvar::new()));
        let pages = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let mut keep = Vec::new();
        for (i, chan) in chans.into_iter().enumerate() {
            keep.push(chan.try_clone_box()?);
            let (st, regions, pages, bytes, main) = (st.clone(), regions.clone(), pages.clone(), bytes.clone(), main.try_clone_box()?);
            threads.push(std::thread::Builder::new().name(format!("multifd-recv-{i}")).spawn(move || {
                let mut r = std::io::BufReader::with_capacity(crate::transport::RECV_BUF, chan);
                let res = recv_loop(i, &mut r, codec, &regions, &st, &pages, &bytes);
                let (m, cv) = &*st;
                let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                match res {
                    Ok(()) => g.finished += 1,
                    Err(e) => {
                        if g.error.is_none() {
                            g.error = Some(format!("multifd channel {i}: {e}"));
                        }
                        // Wake the main thread if it is blocked on its own connection.
                        main.shutdown_read();
                    }
                }
                cv.notify_all();
            })?);
        }
        Ok(Receivers { st, chans: keep, threads, pages, bytes })
    }

    /// A channel's failure, if any.
    pub fn error(&self) -> Option<String> {
        self.st.0.lock().unwrap_or_else(|p| p.into_inner()).error.clone()
    }

    /// Waits until every channel has synced `round`.
    pub fn wait_round(&self, round: u32) -> Result<()> {
        let (m, cv) = &*self.st;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = &g.error {
                return Err(MigrationError::Protocol(e.clone()));
            }
            if g.synced.iter().all(|s| s.is_some_and(|r| r >= round)) {
                return Ok(());
            }
            if g.finished > 0 {
                return Err(MigrationError::Protocol(format!("a multifd channel ended before round {round}")));
            }
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Receivers {
    fn drop(&mut self) {
        for c in &self.chans {
            c.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn find(regions: &[RamRegion], gpa: u64) -> std::result::Result<*mut u8, String> {
    regions
        .iter()
        .find(|r| gpa % PAGE_SIZE as u64 == 0 && gpa >= r.gpa && gpa.checked_add(PAGE_SIZE as u64).is_some_and(|e| e <= r.gpa + r.size))
        .map(|r| (r.host + (gpa - r.gpa)) as *mut u8)
        .ok_or_else(|| format!("page {gpa:#x} is outside guest RAM"))
}

fn recv_loop(
    idx: usize,
    r: &mut dyn Read,
    codec: u8,
    regions: &[RamRegion],
    st: &(Mutex<RecvState>, Condvar),
    pages: &AtomicU64,
    bytes: &AtomicU64,
) -> std::result::Result<(), String> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "the connection closed".to_string(),
        _ => format!("connection: {e}"),
    };
    let mut zstd = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
    let mut payload = vec![0u8; MAX_PAYLOAD];
    let mut data = vec![0u8; PACKET_PAGES * PAGE_SIZE];
    loop {
        let mut kind = [0u8; 1];
        r.read_exact(&mut kind).map_err(io)?;
        match kind[0] {
            KIND_PAGES => {
                let mut l = [0u8; 4];
                r.read_exact(&mut l).map_err(io)?;
                let hl = u32::from_le_bytes(l) as usize;
                if hl > MAX_PACKET_HDR {
                    return Err(format!("packet header of {hl} bytes is too long"));
                }
                let mut hdr = vec![0u8; hl];
                r.read_exact(&mut hdr).map_err(io)?;
                let pk: Packet = postcard::from_bytes(&hdr).map_err(|e| format!("malformed packet header: {e}"))?;
                let pl = pk.payload_len as usize;
                if pk.data.len() + pk.zero.len() > PACKET_PAGES || pl > MAX_PAYLOAD {
                    return Err("packet too large".into());
                }
                r.read_exact(&mut payload[..pl]).map_err(io)?;
                let mut crc = [0u8; 4];
                r.read_exact(&mut crc).map_err(io)?;
                let mut h = crc32fast::Hasher::new();
                h.update(&hdr);
                h.update(&payload[..pl]);
                if h.finalize() != u32::from_le_bytes(crc) {
                    return Err("packet checksum mismatch: corrupted".into());
                }
                let want = pk.data.len() * PAGE_SIZE;
                let out = &mut data[..want];
                match codec {
                    _ if want == 0 => {}
                    0 if pl == want => out.copy_from_slice(&payload[..pl]),
                    0 => return Err(format!("packet carries {pl} bytes for {want}")),
                    1 => {
                        let mut z = flate2::Decompress::new(true);
                        let s = z.decompress(&payload[..pl], out, flate2::FlushDecompress::Finish).map_err(|e| format!("zlib: {e}"))?;
                        if s != flate2::Status::StreamEnd || z.total_out() as usize != want {
                            return Err("zlib packet does not decompress to its pages".into());
                        }
                    }
                    _ => {
                        let n = zstd.decompress_to_buffer(&payload[..pl], out).map_err(|e| format!("zstd: {e}"))?;
                        if n != want {
                            return Err("zstd packet does not decompress to its pages".into());
                        }
                    }
                }
                // Every address is checked before any page is written.
                let dst: Vec<*mut u8> = pk.data.iter().map(|&g| find(regions, g)).collect::<std::result::Result<_, _>>()?;
                let zero: Vec<*mut u8> = pk.zero.iter().map(|&g| find(regions, g)).collect::<std::result::Result<_, _>>()?;
                for (k, p) in dst.into_iter().enumerate() {
                    // SAFETY: p is a checked page of guest RAM; the guest does not run on the
                    // destination yet, and within a round each page is sent once.
                    unsafe { std::ptr::copy_nonoverlapping(data[k * PAGE_SIZE..].as_ptr(), p, PAGE_SIZE) };
                }
                for p in zero {
                    // SAFETY: as above; dropping private anonymous pages makes them read zero.
                    if unsafe { libc::madvise(p as *mut _, PAGE_SIZE, libc::MADV_DONTNEED) } != 0 {
                        return Err(format!("madvise: {}", std::io::Error::last_os_error()));
                    }
                }
                pages.fetch_add((pk.data.len() + pk.zero.len()) as u64, Ordering::Relaxed);
                bytes.fetch_add((9 + hl + pl) as u64, Ordering::Relaxed);
            }
            KIND_SYNC => {
                let mut b = [0u8; 4];
                r.read_exact(&mut b).map_err(io)?;
                let round = u32::from_le_bytes(b);
                let (m, cv) = st;
                let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
                if g.synced[idx].is_some_and(|s| round < s) {
                    return Err(format!("SYNC {round} after a later round"));
                }
                g.synced[idx] = Some(round);
                cv.notify_all();
            }
            KIND_FIN => return Ok(()),
            k => return Err(format!("unknown packet kind {k}")),
        }
    }
}

/// Feeds `data` to a destination channel (compression `codec`) as if it came from the
/// network, into a 64-page scratch RAM region at guest address 0x10000; returns the pages
/// installed (for the fuzz target and property tests: any input must end in `Ok` or an error,
/// never a panic or a write outside the region).
#[doc(hidden)]
pub fn fuzz_channel(codec: u8, data: &[u8]) -> std::result::Result<u64, String> {
    const PAGES: usize = 64;
    let len = PAGES * PAGE_SIZE;
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    let regions = [RamRegion { gpa: 0x10000, size: len as u64, host: p as u64 }];
    let st = (Mutex::new(RecvState { synced: vec![None], ..Default::default() }), Condvar::new());
    let (pages, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut r = data;
    let res = recv_loop(0, &mut r, codec % 3, &regions, &st, &pages, &bytes);
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(p, len) };
    res.map(|()| pages.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_roundtrip() {
        let mut data = vec![0u8; 8 * PAGE_SIZE];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 7 % 13) as u8;
        }
        for codec in [Compression::None, Compression::Zlib, Compression::Zstd] {
            let zstd = (codec == Compression::Zstd).then(|| zstd::bulk::Compressor::new(1).unwrap());
            let mut e = Encoder { codec, zstd, zlib_level: 1 };
            let mut out = Vec::new();
            e.encode(&data, &mut out).unwrap();
            if codec != Compression::None {
                assert!(out.len() < data.len() / 4, "{codec:?} {}", out.len());
            }
        }
    }

    /// Page-aligned anonymous memory posing as a RAM region.
    fn region(pages: usize, gpa: u64) -> RamRegion {
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping, leaked for the test's lifetime.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        RamRegion { gpa, size: len as u64, host: p as u64 }
    }

    fn pair() -> (Box<dyn Channel>, Box<dyn Channel>) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (Box::new(a), Box::new(b))
    }

    #[test]
    fn pages_cross_channels_compressed_and_whole() {
        const N: usize = 600;
        let (src, dst) = (region(N, 0x10_0000), region(N, 0x10_0000));
        // SAFETY: the test's own mappings.
        let s = unsafe { std::slice::from_raw_parts_mut(src.host as *mut u8, N * PAGE_SIZE) };
        for (i, b) in s.iter_mut().enumerate() {
            // Every third page stays zero; the rest hold a compressible pattern.
            *b = if (i / PAGE_SIZE) % 3 == 0 { 0 } else { (i / 7 % 5 + i / PAGE_SIZE) as u8 };
        }
        let d = unsafe { std::slice::from_raw_parts_mut(dst.host as *mut u8, N * PAGE_SIZE) };
        d.fill(0xAA); // stale contents the zero pages of a dirty round must clear
        for codec in [Compression::None, Compression::Zlib, Compression::Zstd] {
            let (mut tx, mut rx, mut mains) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..3 {
                let (a, b) = pair();
                tx.push(a);
                rx.push(b);
            }
            let (m, keep) = pair();
            mains.push(keep);
            let recv = Receivers::start(rx, codec_id(codec), vec![dst], m).unwrap();
            let mut snd = Sender::start(tx, codec, 3, 6, 0).unwrap();
            snd.queue(&src, 0, 250, 0, true).unwrap();
            snd.queue(&src, 250, N - 250, 0, true).unwrap();
            let st = snd.sync(0, true).unwrap();
            assert_eq!(st.zero_pages, N.div_ceil(3) as u64);
            assert_eq!(st.data_pages + st.zero_pages, N as u64);
            recv.wait_round(0).unwrap();
            assert!(s == &d[..], "{codec:?}: destination differs");
            if codec != Compression::None {
                let c = &snd.counters;
                assert!(c.packed.load(Ordering::Relaxed) * 4 < c.raw.load(Ordering::Relaxed), "{codec:?} did not compress");
            }
            snd.finish();
            d.fill(0xAA);
        }
    }

    #[test]
    fn a_corrupted_packet_fails_its_channel_and_wakes_the_main_reader() {
        let dst = region(4, 0);
        let (mut a, b) = pair();
        let (m, _main_peer) = pair();
        let mut main_reader = m.try_clone_box().unwrap();
        let recv = Receivers::start(vec![b], 0, vec![dst], m).unwrap();
        let pk = Packet { round: 0, data: vec![0], zero: vec![], payload_len: PAGE_SIZE as u32 };
        let hdr = postcard::to_stdvec(&pk).unwrap();
        let payload = vec![7u8; PAGE_SIZE];
        let mut h = crc32fast::Hasher::new();
        h.update(&hdr);
        h.update(&payload);
        let mut f = vec![KIND_PAGES];
        f.extend_from_slice(&(hdr.len() as u32).to_le_bytes());
        f.extend_from_slice(&hdr);
        f.extend_from_slice(&payload);
        f.extend_from_slice(&(h.finalize() ^ 1).to_le_bytes());
        a.write_all(&f).unwrap();
        let e = recv.wait_round(0).unwrap_err().to_string();
        assert!(e.contains("multifd channel 0") && e.contains("checksum"), "{e}");
        // The page was not written.
        assert_eq!(unsafe { *(dst.host as *const u8) }, 0);
        // The main connection's reader sees its end instead of blocking on a live peer.
        let mut buf = [0u8; 8];
        assert_eq!(main_reader.read(&mut buf).unwrap(), 0);
    }

    /// A valid stream: one PAGES packet (a data page and a zero page), then FIN.
    fn valid_stream() -> Vec<u8> {
        let payload = vec![1u8; PAGE_SIZE];
        let pk = Packet { round: 0, data: vec![0x10000 + 5 * PAGE_SIZE as u64], zero: vec![0x10000], payload_len: PAGE_SIZE as u32 };
        let hdr = postcard::to_stdvec(&pk).unwrap();
        let mut f = vec![KIND_PAGES];
        f.extend_from_slice(&(hdr.len() as u32).to_le_bytes());
        f.extend_from_slice(&hdr);
        f.extend_from_slice(&payload);
        let mut h = crc32fast::Hasher::new();
        h.update(&hdr);
        h.update(&payload);
        f.extend_from_slice(&h.finalize().to_le_bytes());
        f.push(KIND_FIN);
        f
    }

    #[test]
    fn the_valid_stream_installs_its_pages() {
        assert_eq!(fuzz_channel(0, &valid_stream()), Ok(2));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_channel_bytes_never_panic(codec in 0u8..3, data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            let _ = fuzz_channel(codec, &data);
        }

        /// One flipped bit anywhere is refused (the checksum, the sizes, the addresses); the
        /// only way through is the kind byte becoming FIN, and then nothing is installed.
        #[test]
        fn a_flipped_bit_is_refused(flip in 0usize..5000, bit in 0u8..8) {
            let mut f = valid_stream();
            let i = flip % f.len();
            f[i] ^= 1 << bit;
            // Either refused, or (the kind byte turned into FIN) nothing installed.
            match fuzz_channel(0, &f) {
                Err(_) | Ok(0) => {}
                Ok(n) => proptest::prop_assert!(false, "byte {i} bit {bit}: {n} pages installed from a corrupted stream"),
            }
        }
    }

    #[test]
    fn channel_headers_are_checked() {
        let h = channel_header(7, 1);
        assert_eq!(read_channel_header(&mut &h[..], 7, 2).unwrap(), 1);
        assert!(read_channel_header(&mut &h[..], 8, 2).is_err());
        assert!(read_channel_header(&mut &h[..], 7, 1).is_err());
        let mut bad = h.clone();
        bad[0] = b'X';
        assert!(read_channel_header(&mut &bad[..], 7, 2).is_err());
    }
}
