//! Post-copy, destination side (the source side and the overall picture are in
//! [`crate::postcopy`], the wire records in [`crate::protocol`]).
//!
//! On the first `POSTCOPY_DISCARD` the receiver hands its stream over here. The discarded
//! pages are dropped from guest RAM (`MADV_DONTNEED`), all guest RAM is registered with
//! userfaultfd in MISSING mode, the machine state is restored and the guest resumes. From then
//! on every guest RAM page the destination does not have is installed atomically with
//! `UFFDIO_COPY` (never written in place: a thread touching it would fault):
//! - a **fault handler thread** reads the faults — from vCPU threads, from KVM's own accesses
//!   (page walks, async page-fault workers) and from device threads — and answers each at once
//!   if it can (a page never listed reads as zero) or asks the source for it (`REQUEST`, a
//!   16-page block) and lets the faulting thread wait;
//! - the **stream thread** (the caller's) installs every page that arrives, requested or
//!   background, which also wakes whoever waited for it.
//!
//! When every listed page is in, RAM is unregistered and the source is told `COMPLETE`. If
//! the connection fails first, the guest keeps running (a thread touching a missing page
//! waits), the status becomes `postcopy-paused`, and `migrate_recover URI` makes this side
//! listen again; the source's `POSTCOPY_RESUME` stream is answered with the pages still
//! missing and the outstanding requests are repeated.

use crate::protocol::{self, Missing, Reply, Request, Running, Runs, MAX_RUNS_PER_FRAME, TAG_POSTCOPY_DISCARD, TAG_POSTCOPY_RESUME, TAG_POSTCOPY_RUN};
use crate::receiver::IncomingStats;
use crate::sender::Shared;
use crate::stats::Status;
use crate::transport::{Channel, Listener, SpinReader, Uri};
use crate::uffd::{Uffd, PAGE};
use crate::{MigratableVm, MigrationError, RamRegion, Result};
use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vmstate::stream::{Item, StreamReader};
use vmstate::Section;

/// Pages read from the stream at a time.
const CHUNK_PAGES: usize = 256;
/// Pages asked for per fault: the faulting page's aligned block (guests touch neighbours).
const REQUEST_BLOCK: u64 = 16;

pub(crate) type Stream = StreamReader<BufReader<SpinReader>>;

static INCOMING: OnceLock<Arc<Shared>> = OnceLock::new();

/// Gives the destination's post-copy a place to report its status (`info migrate`) and to
/// receive `migrate_recover URI`. Call once, before the incoming migration starts.
pub fn attach_incoming(shared: Arc<Shared>) {
    let _ = INCOMING.set(shared);
}

fn incoming_shared() -> Option<&'static Arc<Shared>> {
    INCOMING.get()
}

fn set_status(s: Status) {
    if let Some(sh) = incoming_shared() {
        sh.update(|st| {
            st.status = s;
            if st.started.is_none() {
                st.started = Some(Instant::now());
            }
        });
    }
}

/// Guest pages as one index space over all regions, with atomic per-page bits.
struct Pages {
    regions: Vec<RamRegion>,
    /// First page index of each region.
    base: Vec<usize>,
    /// Listed by the source: must come from it.
    needed: Vec<AtomicU64>,
    /// Installed.
    received: Vec<AtomicU64>,
    /// Asked for (and not yet received).
    requested: Vec<AtomicU64>,
}

fn bit(v: &[AtomicU64], i: usize) -> bool {
    v[i / 64].load(Ordering::SeqCst) >> (i % 64) & 1 == 1
}

/// Sets bit `i`; returns whether it was already set.
fn set(v: &[AtomicU64], i: usize) -> bool {
    v[i / 64].fetch_or(1 << (i % 64), Ordering::SeqCst) >> (i % 64) & 1 == 1
}

impl Pages {
    fn new(regions: Vec<RamRegion>) -> Pages {
        let mut base = Vec::new();
        let mut n = 0usize;
        for r in &regions {
            base.push(n);
            n += (r.size / PAGE) as usize;
        }
        let words = || (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Pages { regions, base, needed: words(), received: words(), requested: words() }
    }

    /// Page index of a guest-physical range of `n` pages inside one region.
    fn index_gpa(&self, gpa: u64, n: u64) -> Option<usize> {
        let end = gpa.checked_add(n.checked_mul(PAGE)?)?;
        self.regions
            .iter()
            .zip(&self.base)
            .find(|(r, _)| gpa % PAGE == 0 && gpa >= r.gpa && end <= r.gpa + r.size)
            .map(|(r, b)| b + ((gpa - r.gpa) / PAGE) as usize)
    }

    /// (page index, gpa, region) of a host address inside guest RAM.
    fn index_host(&self, host: u64) -> Option<(usize, u64, &RamRegion)> {
        self.regions
            .iter()
            .zip(&self.base)
            .find(|(r, _)| host >= r.host && host < r.host + r.size)
            .map(|(r, b)| {
                let off = (host - r.host) & !(PAGE - 1);
                (b + (off / PAGE) as usize, r.gpa + off, r)
            })
    }

    fn host_of(&self, i: usize) -> u64 {
        let k = self.base.iter().rposition(|&b| b <= i).unwrap_or(0);
        self.regions[k].host + (i - self.base[k]) as u64 * PAGE
    }

    fn gpa_of(&self, i: usize) -> u64 {
        let k = self.base.iter().rposition(|&b| b <= i).unwrap_or(0);
        self.regions[k].gpa + (i - self.base[k]) as u64 * PAGE
    }

    /// Number of guest pages.
    fn count(&self) -> usize {
        self.base.last().map_or(0, |b| b + self.regions.last().map_or(0, |r| (r.size / PAGE) as usize))
    }

    /// Pages listed but not installed, as runs.
    fn missing(&self) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u32)> = Vec::new();
        for i in 0..self.count() {
            if bit(&self.needed, i) && !bit(&self.received, i) {
                let gpa = self.gpa_of(i);
                match out.last_mut() {
                    Some((g, c)) if *g + *c as u64 * PAGE == gpa && *c < u32::MAX => *c += 1,
                    _ => out.push((gpa, 1)),
                }
            }
        }
        out
    }

    fn outstanding(&self) -> usize {
        self.needed
            .iter()
            .zip(&self.received)
            .map(|(n, r)| (n.load(Ordering::SeqCst) & !r.load(Ordering::SeqCst)).count_ones() as usize)
            .sum()
    }
}

/// The return channel, shared by the stream thread and the fault handler; `None` while the
/// link is down.
type BackChan = Arc<Mutex<Option<Box<dyn Channel>>>>;

fn send(back: &BackChan, r: &Reply) -> bool {
    let mut g = back.lock().unwrap_or_else(|p| p.into_inner());
    let Some(c) = g.as_mut() else { return false };
    if protocol::write_reply(c, r).is_err() {
        c.shutdown();
        *g = None;
        return false;
    }
    true
}

/// Counters the handler keeps.
#[derive(Default)]
struct Counters {
    faults: AtomicU64,
    requests: AtomicU64,
    zero_filled: AtomicU64,
}

fn handler(uffd: Arc<Uffd>, pages: Arc<Pages>, back: BackChan, stop: Arc<AtomicBool>, c: Arc<Counters>) {
    while !stop.load(Ordering::SeqCst) {
        let f = match uffd.next_fault(Duration::from_millis(50)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!("post-copy fault handler: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Some((i, gpa, r)) = pages.index_host(f.addr) else { continue };
        c.faults.fetch_add(1, Ordering::Relaxed);
        let host = r.host + (gpa - r.gpa);
        if !bit(&pages.needed, i) {
            // Never listed: the page is zero (or arrived in pre-copy and is present).
            if let Err(e) = uffd.zero(host, PAGE) {
                tracing::error!("post-copy: zero page at {gpa:#x}: {e}");
            }
            c.zero_filled.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if bit(&pages.received, i) {
            let _ = uffd.wake(host, PAGE);
            continue;
        }
        if set(&pages.requested, i) {
            continue; // already asked; the faulting thread waits for it
        }
        let block = gpa & !(REQUEST_BLOCK * PAGE - 1);
        let first = block.max(r.gpa);
        let n = ((first + REQUEST_BLOCK * PAGE).min(r.gpa + r.size) - first) / PAGE;
        // The whole block is on its way: its other pages need no request of their own.
        let i0 = i - ((gpa - first) / PAGE) as usize;
        for k in i0..i0 + n as usize {
            set(&pages.requested, k);
        }
        if send(&back, &Reply::Request(Request { gpa: first, npages: n as u32 })) {
            c.requests.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Continues an incoming migration that switched to post-copy. `body` is the first
/// `POSTCOPY_DISCARD` record's; `r` the stream; `back` the return channel.
pub(crate) fn destination(
    vm: &dyn MigratableVm,
    mut r: Stream,
    back: &mut dyn Channel,
    body: Vec<u8>,
    mut st: IncomingStats,
    t0: Instant,
) -> Result<IncomingStats> {
    let pages = Arc::new(Pages::new(vm.ram_regions()));
    let mut sections: Vec<Section> = Vec::new();
    let discard = |body: &[u8]| -> Result<()> {
        let runs: Runs = protocol::decode(body)?;
        for (gpa, n) in runs.runs {
            let i = pages.index_gpa(gpa, n as u64).ok_or_else(|| MigrationError::Protocol(format!("discard of {gpa:#x}+{n} pages is outside guest RAM")))?;
            for k in i..i + n as usize {
                set(&pages.needed, k);
            }
            // SAFETY: the range was checked to be inside guest RAM; the guest is not running.
            let rc = unsafe { libc::madvise(pages.host_of(i) as *mut libc::c_void, n as usize * PAGE as usize, libc::MADV_DONTNEED) };
            if rc != 0 {
                return Err(MigrationError::Io(std::io::Error::last_os_error()));
            }
        }
        Ok(())
    };
    discard(&body)?;
    loop {
        match r.next_item()? {
            Item::Control { tag: TAG_POSTCOPY_DISCARD, body } => discard(&body)?,
            Item::Section(s) => {
                if sections.len() >= 4096 {
                    return Err(MigrationError::Protocol("too many state sections".into()));
                }
                sections.push(s);
            }
            Item::Control { tag: TAG_POSTCOPY_RUN, body } => {
                // Nothing runs on pages the checksum has not vouched for.
                protocol::check_crc(&body, r.crc_before_last_item(), "POSTCOPY_RUN")?;
                break;
            }
            other => return Err(MigrationError::Protocol(format!("unexpected {other:?} while switching to post-copy"))),
        }
    }
    let switch_at = Instant::now();
    let npages = pages.outstanding();
    vm.check_state(&sections).map_err(MigrationError::Vm)?;
    let uffd = Arc::new(Uffd::new().map_err(|e| MigrationError::Vm(format!("post-copy needs userfaultfd: {e}")))?);
    for reg in &pages.regions {
        uffd.register_missing(reg.host, reg.size).map_err(|e| MigrationError::Vm(format!("post-copy: {e}")))?;
    }
    let back: BackChan = Arc::new(Mutex::new(Some(back.try_clone_box()?)));
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let h = {
        let (u, p, b, s, c) = (uffd.clone(), pages.clone(), back.clone(), stop.clone(), counters.clone());
        std::thread::Builder::new().name("postcopy-faults".into()).spawn(move || handler(u, p, b, s, c))?
    };
    let result = run_guest_and_fill(vm, &mut r, &pages, &uffd, &back, sections, &mut st, switch_at, npages);
    stop.store(true, Ordering::SeqCst);
    let _ = h.join();
    result?;
    for reg in &pages.regions {
        let _ = uffd.unregister(reg.host, reg.size);
    }
    send(&back, &Reply::Complete);
    set_status(Status::Completed);
    st.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let c = &counters;
    tracing::info!(
        "post-copy complete: {npages} pages were missing at the switch; {} faults, {} requests, {} zero pages filled",
        c.faults.load(Ordering::Relaxed),
        c.requests.load(Ordering::Relaxed),
        c.zero_filled.load(Ordering::Relaxed)
    );
    eprintln!(
        "godwit: post-copy: {npages} pages missing at the switch, {} guest faults, {} page requests, {} zero pages",
        c.faults.load(Ordering::Relaxed),
        c.requests.load(Ordering::Relaxed),
        c.zero_filled.load(Ordering::Relaxed)
    );
    if let Some(sh) = incoming_shared() {
        sh.update(|s| s.postcopy_requests = c.requests.load(Ordering::Relaxed));
    }
    Ok(st)
}

#[allow(clippy::too_many_arguments)]
fn run_guest_and_fill(
    vm: &dyn MigratableVm,
    r: &mut Stream,
    pages: &Pages,
    uffd: &Uffd,
    back: &BackChan,
    sections: Vec<Section>,
    st: &mut IncomingStats,
    switch_at: Instant,
    npages: usize,
) -> Result<()> {
    let t_restore = Instant::now();
    vm.restore_state(&sections).map_err(MigrationError::Vm)?;
    st.restore_ms = t_restore.elapsed().as_secs_f64() * 1000.0;
    vm.before_resume_incoming().map_err(MigrationError::Vm)?;
    vm.resume_incoming();
    st.switchover_ms = switch_at.elapsed().as_secs_f64() * 1000.0;
    set_status(Status::PostcopyActive);
    let running = Running { switchover_us: (st.switchover_ms * 1000.0) as u64, restore_us: (st.restore_ms * 1000.0) as u64 };
    send(back, &Reply::Running(running));
    tracing::info!("post-copy: guest running, {npages} pages still on the source");
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let item = match r.next_item() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("post-copy stream failed ({e}); paused until migrate_recover URI");
                st.bytes += r.bytes_read();
                *r = recover(pages, back)?;
                continue;
            }
        };
        match item {
            Item::RamData { gpa, npages } => {
                let i = pages.index_gpa(gpa, npages as u64).ok_or_else(|| MigrationError::Protocol(format!("RAM record {gpa:#x}+{npages} is outside guest RAM")))?;
                // Piecewise, so a large record never needs a large buffer.
                let mut done = 0usize;
                let mut failed = None;
                while done < npages as usize {
                    let n = (npages as usize - done).min(CHUNK_PAGES);
                    buf.resize(n * PAGE as usize, 0);
                    if let Err(e) = r.read_some_pages_into(&mut buf) {
                        failed = Some(e);
                        break;
                    }
                    for k in 0..n {
                        install(pages, uffd, i + done + k, Some(&buf[k * PAGE as usize..(k + 1) * PAGE as usize]))?;
                    }
                    done += n;
                }
                if let Some(e) = failed {
                    tracing::warn!("post-copy stream failed ({e}); paused until migrate_recover URI");
                    st.bytes += r.bytes_read();
                    *r = recover(pages, back)?;
                    continue;
                }
                st.pages += npages as u64;
            }
            Item::RamZero { gpa, npages } => {
                let i = pages.index_gpa(gpa, npages as u64).ok_or_else(|| MigrationError::Protocol(format!("RAM record {gpa:#x}+{npages} is outside guest RAM")))?;
                for k in 0..npages as usize {
                    install(pages, uffd, i + k, None)?;
                }
                st.pages += npages as u64;
            }
            Item::End => {
                let left = pages.outstanding();
                if left == 0 {
                    st.bytes += r.bytes_read();
                    return Ok(());
                }
                return Err(MigrationError::Protocol(format!("post-copy stream ended with {left} pages still missing")));
            }
            other => return Err(MigrationError::Protocol(format!("unexpected {other:?} during post-copy"))),
        }
    }
}

/// Installs page `i` (data, or zero) unless it is already there.
fn install(pages: &Pages, uffd: &Uffd, i: usize, data: Option<&[u8]>) -> Result<()> {
    if !bit(&pages.needed, i) {
        return Err(MigrationError::Protocol(format!("page {:#x} was not listed for post-copy", pages.gpa_of(i))));
    }
    if bit(&pages.received, i) {
        return Ok(());
    }
    let host = pages.host_of(i);
    let r = match data {
        Some(d) => uffd.copy(host, d),
        None => uffd.zero(host, PAGE),
    };
    r.map_err(|e| MigrationError::Vm(format!("post-copy: installing {:#x}: {e}", pages.gpa_of(i))))?;
    set(&pages.received, i);
    Ok(())
}

/// Waits for `migrate_recover URI`, accepts the source's new stream and tells it what is
/// still missing. Returns the new stream; the return channel is replaced.
fn recover(pages: &Pages, back: &BackChan) -> Result<Stream> {
    if let Some(c) = back.lock().unwrap_or_else(|p| p.into_inner()).take() {
        c.shutdown();
    }
    let Some(shared) = incoming_shared() else {
        return Err(MigrationError::Protocol("post-copy link failed and this VMM cannot recover it".into()));
    };
    set_status(Status::PostcopyPaused);
    loop {
        let uri = shared.wait_recover();
        set_status(Status::PostcopyRecover);
        match accept_resume(&uri, pages) {
            Ok((stream, chan)) => {
                *back.lock().unwrap_or_else(|p| p.into_inner()) = Some(chan);
                // Repeat what the guest still waits for.
                let mut again = 0;
                for i in 0..pages.count() {
                    if bit(&pages.requested, i) && !bit(&pages.received, i) {
                        send(back, &Reply::Request(Request { gpa: pages.gpa_of(i), npages: 1 }));
                        again += 1;
                    }
                }
                shared.update(|s| s.postcopy_recoveries += 1);
                set_status(Status::PostcopyActive);
                tracing::info!("post-copy resumed over {uri} ({again} requests repeated)");
                return Ok(stream);
            }
            Err(e) => {
                tracing::warn!("post-copy recovery over {uri} failed: {e}");
                set_status(Status::PostcopyPaused);
            }
        }
    }
}

fn accept_resume(uri: &str, pages: &Pages) -> Result<(Stream, Box<dyn Channel>)> {
    let listener = Listener::bind(&Uri::parse(uri)?)?;
    eprintln!("godwit: waiting for the source to resume post-copy on {uri}");
    // The recovery connection is secured as the first one was (same parameters).
    let chan = listener.accept_until_secure(
        &|| incoming_shared().map_or(Ok(None), |s| crate::tls::destination_setup(&s.params())),
        &|_| {},
    )?;
    let mut back = chan.try_clone_box()?;
    let spin = SpinReader::new(chan, None)?;
    let mut r = StreamReader::new(BufReader::with_capacity(crate::transport::RECV_BUF, spin))?;
    match r.next_item()? {
        Item::Control { tag: TAG_POSTCOPY_RESUME, .. } => {}
        other => return Err(MigrationError::Protocol(format!("expected POSTCOPY_RESUME, got {other:?}"))),
    }
    let missing = pages.missing();
    let mut chunks = missing.chunks(MAX_RUNS_PER_FRAME).peekable();
    if chunks.peek().is_none() {
        protocol::write_reply(&mut back, &Reply::Missing(Missing { runs: Vec::new(), last: true }))?;
    }
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        protocol::write_reply(&mut back, &Reply::Missing(Missing { runs: c.to_vec(), last }))?;
    }
    Ok((r, back))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_index_space_spans_regions() {
        let p = Pages::new(vec![
            RamRegion { gpa: 0, size: 100 * PAGE, host: 0x10_0000_0000 },
            RamRegion { gpa: 1 << 32, size: 10 * PAGE, host: 0x20_0000_0000 },
        ]);
        assert_eq!(p.count(), 110);
        assert_eq!(p.index_gpa(1 << 32, 2), Some(100));
        assert_eq!(p.index_gpa(99 * PAGE, 2), None, "straddles a region end");
        assert_eq!(p.index_gpa(7, 1), None);
        assert_eq!(p.index_gpa(u64::MAX - PAGE + 1, 2), None);
        assert_eq!(p.index_host(0x20_0000_0000 + 3 * PAGE + 5).map(|(i, g, _)| (i, g)), Some((103, (1 << 32) + 3 * PAGE)));
        assert_eq!(p.host_of(103), 0x20_0000_0000 + 3 * PAGE);
        for i in [4, 5, 6, 99, 100, 109] {
            set(&p.needed, i);
        }
        set(&p.received, 5);
        assert_eq!(p.outstanding(), 5);
        assert_eq!(p.missing(), vec![(4 * PAGE, 1), (6 * PAGE, 1), (99 * PAGE, 1), (1 << 32, 1), ((1 << 32) + 9 * PAGE, 1)]);
        assert!(set(&p.received, 5), "second set reports the bit was there");
    }
}
