//! The source side of a live migration: pre-copy rounds while the guest runs, then a short
//! pause for the last dirty pages and the machine state. Any failure before the destination
//! reports the guest running puts everything back: dirty logging off, disks re-locked, guest
//! resumed, status `failed` (or `cancelled`) with the reason.

use crate::protocol::{self, Hello, Reply, RoundEnd, PROTOCOL_VERSION, TAG_HELLO, TAG_ROUND_END, TAG_SWITCHOVER};
use crate::ram::{count, populated_pages, send_marked};
use crate::stats::{Params, Round, Stats, Status};
use crate::transport::{connect_secure, Channel, Limited, SpinReader, Uri};
use crate::{MigratableVm, MigrationError, Result};
use std::io::BufWriter;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmstate::stream::{StreamWriter, PAGE_SIZE};

/// What the monitor shares with a running migration.
#[derive(Default)]
pub struct Shared {
    pub stats: Mutex<Stats>,
    pub params: Mutex<Params>,
    pub cancel: AtomicBool,
    /// `migrate_start_postcopy` was issued (see `crate::postcopy`).
    pub postcopy_start: AtomicBool,
    /// Post-copy recovery: the URI `migrate -r` / `migrate_recover` gave, for the waiting side.
    pub recover: Mutex<Option<String>>,
    pub recover_cv: std::sync::Condvar,
    /// `migrate-continue` was issued while the migration waits in `pre-switchover`.
    pub switchover_continue: AtomicBool,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Arc::new(Shared::default())
    }
    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub(crate) fn update(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut self.stats.lock().unwrap_or_else(|p| p.into_inner()))
    }
    pub fn params(&self) -> Params {
        self.params.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Notifications for the monitor (QMP `MIGRATION` and `MIGRATION_PASS` events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Status(Status),
    Pass(u64),
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bandwidth assumed before any round moved enough data to measure it.
const DEFAULT_BANDWIDTH: f64 = 100e6;

pub(crate) type Writer = StreamWriter<BufWriter<Limited<Box<dyn Channel>>>>;

/// Runs a migration to `uri`. Returns when it completed (guest running on the destination,
/// source paused) or failed (source running again).
pub fn migrate(vm: &dyn MigratableVm, uri: &Uri, shared: &Shared, events: &dyn Fn(Event)) -> Result<()> {
    let params = shared.params();
    let total: u64 = vm.ram_regions().iter().map(|r| r.size).sum();
    shared.cancel.store(false, Ordering::SeqCst);
    shared.switchover_continue.store(false, Ordering::SeqCst);
    shared.update(|s| {
        *s = Stats {
            status: Status::Setup,
            total,
            remaining: total,
            downtime_limit_ms: params.downtime_limit_ms,
            max_bandwidth: params.max_bandwidth,
            started: Some(Instant::now()),
            ..Default::default()
        }
    });
    events(Event::Status(Status::Setup));
    let t0 = Instant::now();
    let tls = match crate::tls::source_setup(&params) {
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string();
            shared.update(|s| {
                s.status = Status::Failed;
                s.error = Some(msg);
            });
            events(Event::Status(Status::Failed));
            return Err(e);
        }
    };
    let mut run = Run { vm, shared, events, params, t0, paused: false, logging: false, tls, state_sent: false };
    match run.go(uri) {
        Ok(()) => Ok(()),
        Err(e) => {
            let cancelled = matches!(e, MigrationError::Cancelled);
            let msg = run.roll_back(&e);
            let status = if cancelled { Status::Cancelled } else { Status::Failed };
            shared.update(|s| {
                s.status = status;
                s.error = (!cancelled).then_some(msg);
                s.total_time_ms = t0.elapsed().as_millis() as u64;
            });
            events(Event::Status(status));
            Err(e)
        }
    }
}

struct Run<'a> {
    vm: &'a dyn MigratableVm,
    shared: &'a Shared,
    events: &'a dyn Fn(Event),
    params: Params,
    t0: Instant,
    paused: bool,
    logging: bool,
    tls: Option<crate::tls::TlsSetup>,
    /// The final state (end marker included) was handed to the link: from here the
    /// destination may run the guest, so only its explicit refusal lets the source resume.
    state_sent: bool,
}

impl Run<'_> {
    fn cancelled(&self) -> bool {
        self.shared.cancel.load(Ordering::SeqCst)
    }

    fn go(&mut self, uri: &Uri) -> Result<()> {
        let chan = connect_secure(uri, self.tls.as_ref())?;
        let mut replies = SpinReader::new(chan.try_clone_box()?, Some(REPLY_TIMEOUT))?;
        let out = BufWriter::with_capacity(1 << 20, Limited::new(chan, self.params.max_bandwidth));
        let mut w: Writer = StreamWriter::new(out)?;

        let regions = self.vm.ram_regions();
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            config: self.vm.config_summary(),
            ram: regions.iter().map(|r| (r.gpa, r.size)).collect(),
        };
        w.control(TAG_HELLO, &protocol::encode(&hello)?)?;
        w.flush()?;
        // Dirty logging starts while the destination checks HELLO and clears its RAM (both
        // cost time that grows with guest size; overlapped, not added). A refusal turns it off
        // again in `roll_back`.
        self.vm.set_dirty_logging(true).map_err(MigrationError::Vm)?;
        self.logging = true;
        // Anything dirtied before logging started is covered by round 0 reading it later.
        let _ = self.vm.take_dirty().map_err(MigrationError::Vm)?;
        match protocol::read_reply(&mut replies)? {
            Reply::Ready => {}
            Reply::Error(e) => return Err(MigrationError::Refused(e)),
            other => return Err(MigrationError::Protocol(format!("expected READY, got {other:?}"))),
        }

        let mut mf = if self.params.multifd { Some(self.open_multifd(uri, &mut w, &mut replies)?) } else { None };
        self.shared.update(|s| {
            s.status = Status::Active;
            s.setup_time_ms = self.t0.elapsed().as_millis() as u64;
        });
        (self.events)(Event::Status(Status::Active));

        // Round 0: every populated page; zero pages are skipped (the destination starts zeroed).
        let marks: Vec<Vec<u64>> = regions.iter().map(populated_pages).collect();
        let mut bandwidth = DEFAULT_BANDWIDTH;
        let mut last_harvest = Instant::now();
        // A round cut short by `migrate_start_postcopy` leaves its pages to the next harvest.
        let mut carry = (!self.round(&mut w, &mut mf, &mut replies, 0, &marks, false, &mut bandwidth)?).then(|| marks.clone());
        // Pages never touched are zero pages too (QEMU's "duplicate"); they were not even read.
        let untouched: u64 = regions.iter().zip(&marks).map(|(r, m)| r.size / PAGE_SIZE as u64 - count(m)).sum();
        self.shared.update(|s| s.duplicate += untouched);

        let mut round = 1u32;
        let mut outrun = 0u32;
        let mut prev_dirty: Option<u64> = None;
        let mut throttle = 0u8;
        let pending = loop {
            if self.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            let mut dirty = self.vm.take_dirty().map_err(MigrationError::Vm)?;
            crate::postcopy::merge(&mut dirty, carry.take());
            let n: u64 = dirty.iter().map(|b| count(b)).sum();
            let since = last_harvest.elapsed().as_secs_f64().max(1e-6);
            last_harvest = Instant::now();
            let remaining = n * PAGE_SIZE as u64;
            let expected_ms = remaining as f64 / bandwidth * 1000.0;
            self.shared.update(|s| {
                s.dirty_sync_count += 1;
                s.dirty_pages_rate = (n as f64 / since) as u64;
                s.remaining = remaining;
                s.expected_downtime_ms = expected_ms.ceil() as u64;
            });
            (self.events)(Event::Pass(self.shared.stats().dirty_sync_count));
            // QEMU stops as soon as the rest fits the limit. Godwit keeps going while each
            // round still shrinks the dirty set by a quarter, down to a quarter of the limit:
            // a few more short rounds for a much shorter pause.
            let limit = self.params.downtime_limit_ms as f64;
            // After the first pass nothing says yet whether rounds shrink: assume they do.
            let shrinking = prev_dirty.is_none_or(|p| (n as f64) < 0.75 * p as f64);
            if expected_ms <= limit && (expected_ms <= limit / 4.0 || !shrinking || round > 30) {
                break dirty;
            }
            prev_dirty = Some(n);
            if crate::postcopy::should_start(self.shared, &self.params, round) {
                let run = crate::postcopy::SourceRun { vm: self.vm, shared: self.shared, events: self.events, params: &self.params, t0: self.t0, tls: self.tls.as_ref() };
                return run.go(&mut self.paused, &mut self.logging, w, replies, dirty);
            }
            // Auto-converge: when the guest dirties more than half of what the link carried in
            // the same time, twice in a row, hold its vCPUs back a step more.
            if self.params.auto_converge {
                let dirty_bps = remaining as f64 / since;
                outrun = if dirty_bps > 0.5 * bandwidth { outrun + 1 } else { 0 };
                if outrun >= 2 {
                    outrun = 0;
                    throttle = if throttle == 0 {
                        self.params.throttle_initial
                    } else {
                        throttle.saturating_add(self.params.throttle_increment)
                    }
                    .min(self.params.throttle_max);
                    self.vm.set_throttle(throttle);
                    self.shared.update(|s| s.cpu_throttle_percentage = throttle as u64);
                    tracing::info!("auto-converge: vCPUs throttled to {throttle}%");
                }
            }
            if !self.round(&mut w, &mut mf, &mut replies, round, &dirty, true, &mut bandwidth)? {
                carry = Some(dirty);
            }
            round += 1;
        };
        self.switchover(&mut w, &mut mf, &mut replies, pending, round)?;
        if let Some(m) = mf {
            m.finish();
        }
        Ok(())
    }

    /// multifd: announces the channels, connects them (secured as the main one) and waits
    /// until the destination has them all.
    fn open_multifd(&self, uri: &Uri, w: &mut Writer, replies: &mut SpinReader) -> Result<crate::multifd::Sender> {
        use crate::multifd::{channel_header, codec_id, session_id, Setup};
        if self.params.postcopy {
            return Err(MigrationError::Vm("Postcopy is not yet compatible with multifd".into()));
        }
        let n = self.params.multifd_channels.max(1);
        let setup = Setup { channels: n, compression: codec_id(self.params.multifd_compression), session: session_id() };
        w.control(crate::protocol::TAG_MULTIFD_SETUP, &protocol::encode(&setup)?)?;
        w.flush()?;
        let mut chans = Vec::new();
        for i in 0..n {
            let mut c = connect_secure(uri, self.tls.as_ref())?;
            std::io::Write::write_all(&mut c, &channel_header(setup.session, i))?;
            chans.push(c);
        }
        match protocol::read_reply(replies)? {
            Reply::MultifdReady => {}
            Reply::Error(e) => return Err(MigrationError::Refused(e)),
            other => return Err(MigrationError::Protocol(format!("expected MULTIFD_READY, got {other:?}"))),
        }
        let p = &self.params;
        tracing::info!("multifd: {n} channels, compression {}", p.multifd_compression.as_str());
        crate::multifd::Sender::start(chans, p.multifd_compression, p.multifd_zstd_level, p.multifd_zlib_level, p.max_bandwidth / n as u64)
    }

    /// Sends the marked pages of every region: on the multifd channels (then syncs them for
    /// `round`) or on the main stream.
    fn send_pages(&self, w: &mut Writer, mf: &mut Option<crate::multifd::Sender>, round: u32, marks: &[Vec<u64>], record_zero: bool, stop: &dyn Fn() -> bool) -> Result<(vmstate::ram::RamStats, bool)> {
        let regions = self.vm.ram_regions();
        let mut st = vmstate::ram::RamStats::default();
        match mf {
            Some(m) => {
                for (r, bits) in regions.iter().zip(marks) {
                    let npages = (r.size / PAGE_SIZE as u64) as usize;
                    for (first, n) in crate::ram::runs(bits, npages, crate::multifd::PACKET_PAGES) {
                        if stop() {
                            return Ok((st, false));
                        }
                        m.queue(r, first, n, round, record_zero)?;
                    }
                }
                st = m.sync(round, record_zero)?;
                let c = &m.counters;
                let (b, i, o) = (c.bytes.load(Ordering::Relaxed), c.raw.load(Ordering::Relaxed), c.packed.load(Ordering::Relaxed));
                self.shared.update(|s| {
                    s.multifd_bytes = b;
                    s.compress_in = i;
                    s.compress_out = o;
                });
            }
            None => {
                for (r, bits) in regions.iter().zip(marks) {
                    let (s, complete) = send_marked(w, r, bits, record_zero, stop)?;
                    st.add(s);
                    if !complete {
                        return Ok((st, false));
                    }
                }
            }
        }
        Ok((st, true))
    }

    /// Bytes sent so far on every connection.
    fn sent(&self, w: &Writer, mf: &Option<crate::multifd::Sender>) -> u64 {
        w.bytes_written() + mf.as_ref().map_or(0, |m| m.counters.bytes.load(Ordering::Relaxed))
    }

    /// Sends one round of marked pages and closes it with ROUND_END.
    /// Returns false when `migrate_start_postcopy` cut it short.
    #[allow(clippy::too_many_arguments)]
    fn round(&self, w: &mut Writer, mf: &mut Option<crate::multifd::Sender>, replies: &mut SpinReader, round: u32, marks: &[Vec<u64>], record_zero: bool, bw: &mut f64) -> Result<bool> {
        let start = Instant::now();
        let before = self.sent(w, mf);
        let stop = || self.cancelled() || crate::postcopy::requested(self.shared, &self.params);
        let (st, complete) = self.send_pages(w, mf, round, marks, record_zero, &stop)?;
        if !complete {
            if self.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            return Ok(false);
        }
        let pages = st.data_pages + st.zero_pages;
        let body = protocol::with_crc(protocol::encode(&RoundEnd { round, pages })?, w.crc_so_far());
        w.control(TAG_ROUND_END, &body)?;
        w.flush()?;
        // The round ends when the destination has it (see ROUND_ACK in protocol.rs).
        match protocol::read_reply(replies)? {
            Reply::RoundAck(n) if n == round => {}
            Reply::Error(e) => return Err(MigrationError::Refused(e)),
            other => return Err(MigrationError::Protocol(format!("expected ROUND_ACK {round}, got {other:?}"))),
        }
        let bytes = self.sent(w, mf) - before;
        let elapsed = start.elapsed().as_secs_f64().max(1e-6);
        if bytes >= 2 << 20 {
            *bw = bytes as f64 / elapsed;
        }
        if self.params.max_bandwidth > 0 {
            *bw = bw.min(self.params.max_bandwidth as f64);
        }
        let rec = Round {
            round,
            dirty_pages: marks.iter().map(|b| count(b)).sum(),
            data_pages: st.data_pages,
            zero_pages: st.zero_pages,
            bytes,
            elapsed_ms: elapsed * 1000.0,
            at_ms: self.t0.elapsed().as_secs_f64() * 1000.0,
            bandwidth_bps: bytes as f64 / elapsed,
        };
        let sent = self.sent(w, mf);
        self.shared.update(|s| {
            s.transferred = sent;
            s.duplicate += st.zero_pages;
            s.normal += st.data_pages;
            s.normal_bytes += st.data_pages * PAGE_SIZE as u64;
            let t = self.t0.elapsed().as_secs_f64().max(1e-6);
            s.mbps = s.transferred as f64 * 8.0 / 1e6 / t;
            s.pages_per_second = ((s.normal + s.duplicate) as f64 / t) as u64;
            s.total_time_ms = (t * 1000.0) as u64;
            s.rounds.push(rec);
        });
        Ok(true)
    }

    /// `pause-before-switchover`: with the guest paused, report `pre-switchover` and wait for
    /// `migrate-continue` (or a cancel, which rolls back and resumes the source).
    fn wait_for_continue(&self) -> Result<()> {
        self.shared.update(|s| s.status = Status::PreSwitchover);
        (self.events)(Event::Status(Status::PreSwitchover));
        loop {
            if self.shared.switchover_continue.swap(false, Ordering::SeqCst) {
                return Ok(());
            }
            if self.cancelled() {
                return Err(MigrationError::Cancelled);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn switchover(&mut self, w: &mut Writer, mf: &mut Option<crate::multifd::Sender>, replies: &mut SpinReader, mut pending: Vec<Vec<u64>>, final_round: u32) -> Result<()> {
        let t_pause;
        if self.params.pause_before_switchover {
            // QEMU's order: the guest stops (STOP event), then `pre-switchover`, then `device`.
            self.vm.set_throttle(0);
            t_pause = Instant::now();
            self.vm.pause();
            self.paused = true;
            self.wait_for_continue()?;
            self.shared.update(|s| s.status = Status::Device);
            (self.events)(Event::Status(Status::Device));
        } else {
            self.shared.update(|s| s.status = Status::Device);
            (self.events)(Event::Status(Status::Device));
            self.vm.set_throttle(0);
            t_pause = Instant::now();
            self.vm.pause();
            self.paused = true;
        }
        let t_paused = t_pause.elapsed();
        // The guest is paused: `max-bandwidth` paced the live phase, the rest goes out at link
        // speed (the downtime only gets shorter than the one predicted at the capped rate).
        w.get_mut().get_mut().limit = 0;
        if let Some(m) = mf {
            m.limit.store(0, Ordering::Relaxed);
        }
        self.vm.before_switchover().map_err(MigrationError::Vm)?;
        let t_handover = t_pause.elapsed();
        let last = self.vm.take_dirty().map_err(MigrationError::Vm)?;
        let t_harvest = t_pause.elapsed();
        for (p, l) in pending.iter_mut().zip(&last) {
            for (a, b) in p.iter_mut().zip(l) {
                *a |= *b;
            }
        }
        w.control(TAG_SWITCHOVER, &[])?;
        if mf.is_some() {
            // The destination gets ready while the last pages travel on the channels.
            w.flush()?;
        }
        let (st, _) = self.send_pages(w, mf, final_round, &pending, true, &|| false)?;
        if mf.is_some() {
            w.control(crate::protocol::TAG_MULTIFD_SYNC, &protocol::encode(&final_round)?)?;
        }
        let t_ram = t_pause.elapsed();
        for s in self.vm.save_state().map_err(MigrationError::Vm)? {
            w.section(&s)?;
        }
        // Block (do not spin) for RUNNING: the destination needs the CPU to restore the state
        // when both share a host, and a spinning source measured 1-2 ms worse there.
        replies.set_spin(Duration::ZERO);
        w.end()?;
        self.state_sent = true;
        let t_sent = t_pause.elapsed();
        let running = match protocol::read_reply(replies)? {
            Reply::Running(r) => r,
            Reply::Error(e) => return Err(MigrationError::Refused(e)),
            other => return Err(MigrationError::Protocol(format!("expected RUNNING, got {other:?}"))),
        };
        let downtime = t_pause.elapsed().as_secs_f64() * 1000.0;
        let sent = self.sent(w, mf);
        self.shared.update(|s| s.cpu_throttle_percentage = 0);
        tracing::info!(
            "switchover: paused {:?}, disks handed over {:?}, dirty log harvested {:?}, last RAM ({} pages) sent {:?}, state sent {:?}, guest running {:.3} ms",
            t_paused, t_handover, t_harvest, st.data_pages + st.zero_pages, t_ram, t_sent, downtime
        );
        self.vm.migration_completed();
        self.shared.update(|s| {
            s.status = Status::Completed;
            s.downtime_ms = downtime;
            s.dest_switchover_ms = running.switchover_us as f64 / 1000.0;
            s.transferred = sent;
            s.remaining = 0;
            s.duplicate += st.zero_pages;
            s.normal += st.data_pages;
            s.normal_bytes += st.data_pages * PAGE_SIZE as u64;
            s.total_time_ms = self.t0.elapsed().as_millis() as u64;
            let t = self.t0.elapsed().as_secs_f64().max(1e-6);
            s.mbps = s.transferred as f64 * 8.0 / 1e6 / t;
        });
        (self.events)(Event::Status(Status::Completed));
        // Source-side cleanup once the guest runs on the destination (KVM walks every slot to
        // restore huge mappings: not part of the migration's time, as in QEMU).
        self.logging = false;
        let _ = self.vm.set_dirty_logging(false);
        Ok(())
    }

    /// Undoes what the failed attempt changed; returns the message to report.
    fn roll_back(&mut self, e: &MigrationError) -> String {
        let mut msg = e.to_string();
        self.vm.set_throttle(0);
        self.shared.update(|s| s.cpu_throttle_percentage = 0);
        if self.logging {
            let _ = self.vm.set_dirty_logging(false);
        }
        if self.paused && self.state_sent && !matches!(e, MigrationError::Refused(_)) {
            // The fence: the whole final state left, and no answer says the destination
            // failed. It may be running the guest now, disk or no disk; resuming here could run
            // it twice. Stay paused and say so: `cont` is the operator's call once the
            // destination is known not to run.
            msg = format!(
                "{msg}; the final state was sent but the destination did not confirm: the source stays paused \
                 so the guest cannot run twice ('cont' resumes it here if the destination is not running)"
            );
        } else if self.paused {
            match self.vm.after_failed_switchover() {
                Ok(()) => self.vm.resume(),
                Err(lock) => {
                    // The destination may already run the guest: never let two copies write
                    // the shared disk. The source stays paused.
                    msg = format!("{msg}; source NOT resumed, its disk could not be taken back ({lock})");
                }
            }
        }
        tracing::warn!("migration failed: {msg}");
        msg
    }
}
