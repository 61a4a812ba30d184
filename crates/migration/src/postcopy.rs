//! Post-copy, source side (the destination side is [`crate::postcopy_dest`]; the wire records
//! are documented in [`crate::protocol`]).
//!
//! With the `postcopy-ram` capability on, `migrate_start_postcopy` (or `strategy auto` when
//! the forecast says pre-copy cannot converge) makes the pre-copy loop hand over here after
//! its current round: the guest is paused, the pages dirtied since they were sent are listed
//! to the destination (`POSTCOPY_DISCARD`), the machine state follows and the destination
//! runs the guest at once. From then on the source serves the destination's page requests
//! first and streams every other listed page in the background, and keeps its copy until the
//! destination says it has them all (`COMPLETE`).
//!
//! Failure handling: before the destination reports the guest running, anything that fails
//! rolls back as in pre-copy (the guest resumes here). After that the guest lives on the
//! destination and its missing pages only here, so a broken link never fails the migration:
//! the source goes to `postcopy-paused` and waits for `migrate -r URI`, then reconnects,
//! learns which pages the destination still lacks and streams those.

use crate::protocol::{self, Missing, Reply, Request, Runs, MAX_RUNS_PER_FRAME, TAG_POSTCOPY_DISCARD, TAG_POSTCOPY_RESUME, TAG_POSTCOPY_RUN};
use crate::ram::{count, runs};
use crate::sender::{Event, Shared, Writer};
use crate::stats::{Params, Status};
use crate::transport::{connect_secure, Channel, Limited, SpinReader, Uri};
use crate::{MigratableVm, MigrationError, RamRegion, Result};
use std::collections::VecDeque;
use std::io::BufWriter;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vmstate::ram::encode_range;
use vmstate::stream::{StreamWriter, PAGE_SIZE};

/// Pages sent per background record: small, so a requested page never waits long behind one.
const BACKGROUND_PAGES: usize = 16;
/// How long the source waits for the destination's answers while (re)connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source waits for the destination to report the guest running.
const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `migrate -r` keeps trying to reach a destination that is not listening yet.
const RECONNECT_FOR: Duration = Duration::from_secs(10);

impl Shared {
    /// `migrate_start_postcopy`: switch the running migration to post-copy after its current
    /// round. Needs the `postcopy-ram` capability.
    pub fn start_postcopy(&self) -> std::result::Result<(), String> {
        if !self.params().postcopy {
            return Err("Enable postcopy with migrate_set_capability before the start of migration".into());
        }
        match self.stats().status {
            Status::Setup | Status::Active => {
                self.postcopy_start.store(true, Ordering::SeqCst);
                Ok(())
            }
            s if s.is_running() => Err(format!("post-copy cannot start in state {}", s.as_str())),
            _ => Err("No migration in progress".into()),
        }
    }

    /// `migrate -r URI` (source) / `migrate_recover URI` (destination): continue a paused
    /// post-copy migration over a new connection.
    pub fn recover(&self, uri: &str) -> std::result::Result<(), String> {
        Uri::parse(uri).map_err(|e| e.to_string())?;
        let st = self.stats().status;
        if st != Status::PostcopyPaused {
            return Err(format!("Migrate recover can only be run when postcopy is paused (state is {})", st.as_str()));
        }
        *self.recover.lock().unwrap_or_else(|p| p.into_inner()) = Some(uri.to_string());
        self.recover_cv.notify_all();
        Ok(())
    }

    /// Waits for a recovery URI (the status is `postcopy-paused`).
    pub(crate) fn wait_recover(&self) -> String {
        let mut g = self.recover.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(u) = g.take() {
                return u;
            }
            g = self.recover_cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn set_status(&self, s: Status, events: &dyn Fn(Event)) {
        self.update(|st| st.status = s);
        events(Event::Status(s));
    }
}

/// Whether the pre-copy loop should hand over to post-copy now (after round `round`).
pub(crate) fn should_start(shared: &Shared, params: &Params, round: u32) -> bool {
    params.postcopy && (shared.postcopy_start.load(Ordering::SeqCst) || (params.postcopy_auto_start && round >= 1))
}

/// Whether the operator asked for post-copy (a pre-copy round in progress stops early).
pub(crate) fn requested(shared: &Shared, params: &Params) -> bool {
    params.postcopy && shared.postcopy_start.load(Ordering::SeqCst)
}

/// ORs the pages of a round cut short into the next harvest.
pub(crate) fn merge(dirty: &mut [Vec<u64>], carry: Option<Vec<Vec<u64>>>) {
    for (d, c) in dirty.iter_mut().zip(carry.iter().flatten()) {
        for (a, b) in d.iter_mut().zip(c) {
            *a |= *b;
        }
    }
}

/// What the return path (destination → source) reported.
#[derive(Default)]
struct BackState {
    requests: VecDeque<Request>,
    running: Option<(protocol::Running, Instant)>,
    complete: bool,
    error: Option<String>,
    broken: bool,
}

#[derive(Default)]
struct Back {
    st: Mutex<BackState>,
    cv: Condvar,
}

impl Back {
    fn lock(&self) -> std::sync::MutexGuard<'_, BackState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reads the destination's frames until the connection ends.
fn spawn_return_path(chan: Box<dyn Channel>) -> Result<Arc<Back>> {
    let back = Arc::new(Back::default());
    let b = back.clone();
    let mut reader = SpinReader::new(chan, None)?;
    std::thread::Builder::new()
        .name("postcopy-return".into())
        .spawn(move || loop {
            let r = protocol::read_reply(&mut reader);
            let mut s = b.lock();
            let end = match r {
                Ok(Reply::Request(q)) => {
                    s.requests.push_back(q);
                    false
                }
                Ok(Reply::Running(x)) => {
                    s.running = Some((x, Instant::now()));
                    false
                }
                Ok(Reply::Complete) => {
                    s.complete = true;
                    true
                }
                Ok(Reply::Error(e)) => {
                    s.error = Some(e);
                    true
                }
                Ok(other) => {
                    s.error = Some(format!("unexpected reply {other:?} during post-copy"));
                    true
                }
                Err(e) => {
                    tracing::debug!("post-copy return path ended: {e}");
                    s.broken = true;
                    true
                }
            };
            b.cv.notify_all();
            if end {
                return;
            }
        })?;
    Ok(back)
}

/// One connection to the destination.
struct Link {
    w: Writer,
    back: Arc<Back>,
    ctl: Box<dyn Channel>,
}

impl Drop for Link {
    fn drop(&mut self) {
        // Ends the return-path thread of a broken link.
        self.ctl.shutdown();
    }
}

/// Bytes sent up to the switch, and on finished post-copy links.
struct Bytes {
    before_switch: u64,
    done: u64,
}

/// How serving one link ended.
enum Served {
    Complete,
    Broken(String),
}

/// The source's post-copy phase.
pub(crate) struct SourceRun<'a> {
    pub vm: &'a dyn MigratableVm,
    pub shared: &'a Shared,
    pub events: &'a dyn Fn(Event),
    pub params: &'a Params,
    pub t0: Instant,
    /// Recovery connections are secured as the first one was.
    pub tls: Option<&'a crate::tls::TlsSetup>,
}

impl SourceRun<'_> {
    /// Pauses the guest, hands the destination its state and the list of pages to fetch, then
    /// serves pages until the destination has them all. `paused`/`logging` tell the caller's
    /// roll-back what to undo if this fails before the guest runs on the destination.
    pub(crate) fn go(
        &self,
        paused: &mut bool,
        logging: &mut bool,
        mut w: Writer,
        replies: SpinReader,
        pending: Vec<Vec<u64>>,
    ) -> Result<()> {
        drop(replies);
        self.shared.set_status(Status::Device, self.events);
        self.vm.set_throttle(0);
        self.shared.update(|s| s.cpu_throttle_percentage = 0);
        let t_pause = Instant::now();
        self.vm.pause();
        *paused = true;
        self.vm.before_switchover().map_err(MigrationError::Vm)?;
        let last = self.vm.take_dirty().map_err(MigrationError::Vm)?;
        let _ = self.vm.set_dirty_logging(false);
        *logging = false;
        let regions = self.vm.ram_regions();
        let mut unsent: Vec<Vec<u64>> = pending;
        for (p, l) in unsent.iter_mut().zip(&last) {
            for (a, b) in p.iter_mut().zip(l) {
                *a |= *b;
            }
        }
        let list = to_runs(&regions, &unsent);
        for chunk in list.chunks(MAX_RUNS_PER_FRAME) {
            w.control(TAG_POSTCOPY_DISCARD, &protocol::encode(&Runs { runs: chunk.to_vec() })?)?;
        }
        for s in self.vm.save_state().map_err(MigrationError::Vm)? {
            w.section(&s)?;
        }
        let crc = w.crc_so_far();
        w.control(TAG_POSTCOPY_RUN, &crc.to_le_bytes())?;
        w.flush()?;
        // From now on the guest waits on the link: `max-postcopy-bandwidth`, not `max-bandwidth`.
        w.get_mut().get_mut().limit = self.params.max_postcopy_bandwidth;
        let npages: u64 = unsent.iter().map(|b| count(b)).sum();
        let sent_before = w.bytes_written();
        self.shared.update(|s| {
            s.postcopy_pages = npages;
            s.remaining = npages * PAGE_SIZE as u64;
        });
        tracing::info!("post-copy: guest paused, {npages} pages left to move, state sent in {:?}", t_pause.elapsed());
        let ctl = w.get_mut().get_ref().get_ref().try_clone_box()?;
        let back = spawn_return_path(ctl.try_clone_box()?)?;
        let mut link = Some((Link { w, back, ctl }, sent_before));
        let mut ran = false;
        let mut acc = Bytes { before_switch: sent_before, done: 0 };
        loop {
            if link.is_none() {
                let (l, missing) = self.reconnect(&regions)?;
                unsent = missing;
                link = Some((l, 0));
            }
            let Some((l, base)) = link.as_mut() else { continue };
            let outcome = self.serve(l, *base, &mut acc, &regions, &mut unsent, &mut ran, t_pause);
            acc.done += l.w.bytes_written().saturating_sub(*base);
            let why = match outcome {
                Ok(Served::Complete) => break,
                Ok(Served::Broken(why)) => why,
                Err(e) if ran => e.to_string(),
                Err(e) => return Err(e),
            };
            if !ran {
                return Err(MigrationError::Protocol(format!("link failed before the guest ran on the destination: {why}")));
            }
            tracing::warn!("post-copy link failed ({why}); paused until migrate -r URI");
            link = None;
            self.shared.update(|s| s.error = Some(format!("post-copy link failed: {why}")));
            self.shared.set_status(Status::PostcopyPaused, self.events);
        }
        self.vm.migration_completed();
        self.shared.update(|s| {
            s.status = Status::Completed;
            s.error = None;
            s.remaining = 0;
            s.postcopy_bytes = acc.done;
            s.transferred = acc.before_switch + acc.done;
            s.total_time_ms = self.t0.elapsed().as_millis() as u64;
            let t = self.t0.elapsed().as_secs_f64().max(1e-6);
            s.mbps = s.transferred as f64 * 8.0 / 1e6 / t;
        });
        (self.events)(Event::Status(Status::Completed));
        let s = self.shared.stats();
        tracing::info!(
            "post-copy complete: downtime {:.2} ms, {} pages moved after the switch, {} requested by the destination, total {} ms",
            s.downtime_ms, npages, s.postcopy_requests, s.total_time_ms
        );
        Ok(())
    }

    /// Sends requested pages first, the rest in the background, `END` when all are out, and
    /// waits for `COMPLETE`. Returns `Broken` when the link fails.
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &self,
        l: &mut Link,
        base: u64,
        acc: &mut Bytes,
        regions: &[RamRegion],
        unsent: &mut [Vec<u64>],
        ran: &mut bool,
        t_pause: Instant,
    ) -> Result<Served> {
        let mut cursor = (0usize, 0usize);
        let mut end_sent = false;
        loop {
            let requests: Vec<Request> = {
                let mut b = l.back.lock();
                if let Some((r, at)) = b.running.take() {
                    *ran = true;
                    let downtime = at.duration_since(t_pause).as_secs_f64() * 1000.0;
                    self.shared.update(|s| {
                        s.downtime_ms = downtime;
                        s.dest_switchover_ms = r.switchover_us as f64 / 1000.0;
                    });
                    tracing::info!("post-copy: guest running on the destination, downtime {downtime:.2} ms");
                    self.shared.set_status(Status::PostcopyActive, self.events);
                }
                if let Some(e) = b.error.take() {
                    return Err(MigrationError::Refused(e));
                }
                if b.complete {
                    return Ok(Served::Complete);
                }
                if b.broken {
                    return Ok(Served::Broken("the destination closed the connection".into()));
                }
                if !*ran && t_pause.elapsed() > RUNNING_TIMEOUT {
                    return Err(MigrationError::Protocol(format!("the destination did not run the guest within {RUNNING_TIMEOUT:?}")));
                }
                if end_sent {
                    let _ = l.back.cv.wait_timeout(b, Duration::from_millis(100));
                    continue;
                }
                b.requests.drain(..).collect()
            };
            let r = (|| -> Result<()> {
                if !requests.is_empty() {
                    self.shared.update(|s| s.postcopy_requests += requests.len() as u64);
                    for q in &requests {
                        send_range(&mut l.w, regions, unsent, q.gpa, q.npages as usize)?;
                    }
                    l.w.flush()?;
                }
                match next_unsent(regions, unsent, &mut cursor) {
                    Some((ri, first)) => {
                        let r = &regions[ri];
                        let gpa = r.gpa + (first * PAGE_SIZE) as u64;
                        send_range(&mut l.w, regions, unsent, gpa, BACKGROUND_PAGES)?;
                        l.w.flush()?;
                    }
                    None => {
                        l.w.end()?;
                        end_sent = true;
                    }
                }
                Ok(())
            })();
            let left: u64 = unsent.iter().map(|b| count(b)).sum();
            let now = acc.done + l.w.bytes_written().saturating_sub(base);
            self.shared.update(|s| {
                s.remaining = left * PAGE_SIZE as u64;
                s.postcopy_bytes = now;
                s.transferred = acc.before_switch + now;
            });
            if let Err(e) = r {
                return Ok(Served::Broken(e.to_string()));
            }
        }
    }

    /// Waits for `migrate -r URI`, connects, and learns which pages the destination lacks.
    fn reconnect(&self, regions: &[RamRegion]) -> Result<(Link, Vec<Vec<u64>>)> {
        loop {
            let uri = self.shared.wait_recover();
            self.shared.set_status(Status::PostcopyRecover, self.events);
            match self.try_reconnect(&uri, regions) {
                Ok(x) => {
                    self.shared.update(|s| s.postcopy_recoveries += 1);
                    self.shared.set_status(Status::PostcopyActive, self.events);
                    tracing::info!("post-copy resumed over {uri}");
                    return Ok(x);
                }
                Err(e) => {
                    tracing::warn!("post-copy recovery over {uri} failed: {e}");
                    self.shared.update(|s| s.error = Some(format!("recovery over {uri} failed: {e}")));
                    self.shared.set_status(Status::PostcopyPaused, self.events);
                }
            }
        }
    }

    fn try_reconnect(&self, uri: &str, regions: &[RamRegion]) -> Result<(Link, Vec<Vec<u64>>)> {
        let parsed = Uri::parse(uri)?;
        let start = Instant::now();
        let chan = loop {
            match connect_secure(&parsed, self.tls) {
                Ok(c) => break c,
                Err(e) if start.elapsed() < RECONNECT_FOR => {
                    tracing::debug!("post-copy reconnect: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        };
        let ctl = chan.try_clone_box()?;
        let mut hs = SpinReader::new(chan.try_clone_box()?, Some(HANDSHAKE_TIMEOUT))?;
        let mut w: Writer = StreamWriter::new(BufWriter::with_capacity(1 << 20, Limited::new(chan, self.params.max_postcopy_bandwidth)))?;
        w.control(TAG_POSTCOPY_RESUME, &[])?;
        w.flush()?;
        let mut missing: Vec<Vec<u64>> = regions.iter().map(|r| vec![0u64; ((r.size / PAGE_SIZE as u64) as usize).div_ceil(64)]).collect();
        let mut n = 0u64;
        loop {
            match protocol::read_reply(&mut hs)? {
                Reply::Missing(Missing { runs, last }) => {
                    for (gpa, np) in runs {
                        n += mark(regions, &mut missing, gpa, np as u64)?;
                    }
                    if last {
                        break;
                    }
                }
                Reply::Error(e) => return Err(MigrationError::Refused(e)),
                other => return Err(MigrationError::Protocol(format!("expected MISSING, got {other:?}"))),
            }
        }
        tracing::info!("post-copy recovery: the destination still lacks {n} pages");
        let back = spawn_return_path(ctl.try_clone_box()?)?;
        Ok((Link { w, back, ctl }, missing))
    }
}

/// The set bits of per-region bitmaps as (gpa, count) runs.
pub(crate) fn to_runs(regions: &[RamRegion], bits: &[Vec<u64>]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for (r, b) in regions.iter().zip(bits) {
        let npages = (r.size / PAGE_SIZE as u64) as usize;
        for (first, n) in runs(b, npages, 1 << 20) {
            out.push((r.gpa + (first * PAGE_SIZE) as u64, n as u32));
        }
    }
    out
}

/// Marks `npages` pages from `gpa` in per-region bitmaps; returns how many; refuses ranges
/// outside guest RAM.
pub(crate) fn mark(regions: &[RamRegion], bits: &mut [Vec<u64>], gpa: u64, npages: u64) -> Result<u64> {
    let end = npages.checked_mul(PAGE_SIZE as u64).and_then(|l| gpa.checked_add(l));
    let (ri, r) = regions
        .iter()
        .enumerate()
        .find(|(_, r)| gpa % PAGE_SIZE as u64 == 0 && gpa >= r.gpa && end.is_some_and(|e| e <= r.gpa + r.size))
        .ok_or_else(|| MigrationError::Protocol(format!("page run {gpa:#x}+{npages} is outside guest RAM")))?;
    let first = ((gpa - r.gpa) / PAGE_SIZE as u64) as usize;
    for p in first..first + npages as usize {
        bits[ri][p / 64] |= 1 << (p % 64);
    }
    Ok(npages)
}

/// The first unsent page at or after `cursor` (region index, page index), advancing it.
fn next_unsent(regions: &[RamRegion], unsent: &[Vec<u64>], cursor: &mut (usize, usize)) -> Option<(usize, usize)> {
    while cursor.0 < regions.len() {
        let npages = (regions[cursor.0].size / PAGE_SIZE as u64) as usize;
        if let Some(p) = crate::ram::next_set(&unsent[cursor.0], cursor.1, npages) {
            cursor.1 = p;
            return Some((cursor.0, p));
        }
        *cursor = (cursor.0 + 1, 0);
    }
    None
}

/// Sends the still-unsent pages among `npages` pages from `gpa` (clipped to its region) and
/// marks them sent. Ranges outside RAM are ignored (a confused destination cannot crash us).
fn send_range(w: &mut Writer, regions: &[RamRegion], unsent: &mut [Vec<u64>], gpa: u64, npages: usize) -> Result<()> {
    let Some((ri, r)) = regions.iter().enumerate().find(|(_, r)| gpa >= r.gpa && gpa < r.gpa + r.size) else {
        tracing::debug!("post-copy: request for {gpa:#x} outside guest RAM ignored");
        return Ok(());
    };
    let total = (r.size / PAGE_SIZE as u64) as usize;
    let first = ((gpa - r.gpa) / PAGE_SIZE as u64) as usize;
    let last = (first + npages.min(1 << 16)).min(total);
    let bits = &mut unsent[ri];
    let mut p = first;
    while p < last {
        if bits[p / 64] >> (p % 64) & 1 == 0 {
            p += 1;
            continue;
        }
        let mut q = p;
        while q < last && bits[q / 64] >> (q % 64) & 1 == 1 {
            bits[q / 64] &= !(1 << (q % 64));
            q += 1;
        }
        // SAFETY: the run lies inside the region's host mapping; the guest is paused here, so
        // the bytes are final.
        let mem = unsafe { std::slice::from_raw_parts((r.host + (p * PAGE_SIZE) as u64) as *const u8, (q - p) * PAGE_SIZE) };
        encode_range(w, r.gpa + (p * PAGE_SIZE) as u64, mem, true)?;
        p = q;
    }
    Ok(())
}

/// Forecast for post-copy after one full pre-copy pass: the pass moves every populated page,
/// the guest then stops only for the state, and what it dirtied during the pass (at most its
/// populated pages) follows at link speed while it runs on the destination.
pub fn predict(s: &crate::forecast::Sample, bandwidth: f64) -> crate::forecast::Prediction {
    let page = PAGE_SIZE as f64;
    let pass_s = s.data_pages as f64 * page / bandwidth.max(1.0);
    let rate = s.rate_pages_s;
    let after = (rate * pass_s).min(s.working_set.unwrap_or(s.populated_pages.max(s.dirty_pages)) as f64);
    let down_s = 0.005;
    let total_s = pass_s + down_s + after * page / bandwidth.max(1.0);
    crate::forecast::Prediction { converges: true, rounds: 1, total_ms: total_s * 1e3, downtime_ms: down_s * 1e3, throttle: 0 }
}

/// Whether this host can run the destination side of post-copy (userfaultfd with kernel
/// faults); the same kind of host is assumed at the other end.
pub fn available() -> bool {
    crate::uffd::Uffd::new().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<RamRegion> {
        vec![RamRegion { gpa: 0, size: 200 * 4096, host: 0 }, RamRegion { gpa: 1 << 32, size: 70 * 4096, host: 0 }]
    }

    #[test]
    fn runs_marks_and_cursor_agree() {
        let rs = regions();
        let mut bits: Vec<Vec<u64>> = rs.iter().map(|r| vec![0u64; ((r.size / 4096) as usize).div_ceil(64)]).collect();
        assert_eq!(mark(&rs, &mut bits, 3 * 4096, 2).unwrap(), 2);
        assert_eq!(mark(&rs, &mut bits, 130 * 4096, 1).unwrap(), 1);
        assert_eq!(mark(&rs, &mut bits, (1 << 32) + 69 * 4096, 1).unwrap(), 1);
        // Outside RAM, straddling a region's end, unaligned, overflowing: refused.
        assert!(mark(&rs, &mut bits, 199 * 4096, 2).is_err());
        assert!(mark(&rs, &mut bits, 300 * 4096, 1).is_err());
        assert!(mark(&rs, &mut bits, 5, 1).is_err());
        assert!(mark(&rs, &mut bits, u64::MAX - 4095, 2).is_err());
        assert_eq!(to_runs(&rs, &bits), vec![(3 * 4096, 2), (130 * 4096, 1), ((1 << 32) + 69 * 4096, 1)]);
        let mut cur = (0, 0);
        assert_eq!(next_unsent(&rs, &bits, &mut cur), Some((0, 3)));
        cur.1 = 5;
        assert_eq!(next_unsent(&rs, &bits, &mut cur), Some((0, 130)));
        cur.1 = 131;
        assert_eq!(next_unsent(&rs, &bits, &mut cur), Some((1, 69)));
        cur.1 = 70;
        assert_eq!(next_unsent(&rs, &bits, &mut cur), None);
    }

    #[test]
    fn postcopy_forecast_is_one_pass_plus_the_rest() {
        let s = crate::forecast::Sample::simple(1.0, 25_600, 25_600, 65_536);
        let p = predict(&s, 100e6);
        assert!(p.converges && p.downtime_ms < 10.0);
        // One pass of 100 MiB at 100 MB/s, then at most the populated pages again.
        assert!(p.total_ms > 1000.0 && p.total_ms < 2200.0, "{p:?}");
    }
}
