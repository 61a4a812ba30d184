//! The virtio-blk worker thread: waits (epoll) on the queue's notification eventfd and the
//! control eventfd, pops descriptor chains, executes them and publishes completions in the used
//! ring, raising the interrupt as the driver's notification suppression (`EVENT_IDX` or
//! `NO_INTERRUPT`) allows.
//!
//! When the ring runs empty the worker first watches the available index for a short window
//! before re-enabling notifications and sleeping in epoll: a driver that submits its next
//! request as soon as it sees the last one complete (a polled or latency-bound guest) is then
//! served without a thread wakeup, whose cost on a busy host dominates small requests. The
//! window adapts, between 0 and [`POLL_MAX`]: a watch that finds nothing halves it (on a host
//! where the worker and the vCPU share a core, spinning only delays the vCPU), a request that
//! arrives soon after the worker went to sleep doubles it.
//!
//! Several requests in flight: when the backend offers a concurrent I/O handle
//! ([`qcow2::ParallelIo`]: raw images; through the VMM's drives also the allocated clusters of
//! qcow2 images) and the driver has more than one request outstanding, data requests
//! (IN/OUT) go to the device's I/O threads ([`super::pool`]), up to [`MAX_IN_FLIGHT`] at a time,
//! and are published to the used ring as they finish, in any order (virtio allows it), the
//! driver signalled once per batch of completions. Everything else runs here, alone, after the
//! requests in flight finished: FLUSH (so it covers every write completed before it),
//! DISCARD, WRITE_ZEROES, GET_ID, malformed requests. A lone request (nothing in flight, nothing
//! behind it) also runs here, saving the thread handoff at queue depth 1; so does every request
//! of a backend without the handle, one at a time, as before; and so do small data requests
//! through the host page cache while they hit it (below [`HANDOFF_MIN_CACHED`], see
//! [`CACHED_SLOW`]: a hit costs less than a thread handoff), which still go straight to guest
//! memory.
//!
//! Error policy `stop` with requests in flight: a finished request is published only when no
//! earlier-popped request that could still stop the device is unfinished (for QEMU's default
//! `werror=enospc`, writes are published in pop order, reads freely). When one stops it, the
//! worker takes no new requests, lets the others finish, and puts the failed request and
//! everything popped after it (none of it published) back in the available ring by rewinding
//! its index — exactly once, as with one request at a time: they run again on resume, or after
//! a save and restore.
//!
//! Pause protocol (with [`super::Control`]): the worker marks itself `busy` before touching a
//! queue and checks `paused` before popping each chain; with requests in flight it stays busy
//! until all finished and were published, so `pause()` — which sets `paused` and waits for
//! `busy` to drop — returns only once no request is in flight and nothing more will be popped.
//! A kick that arrives while paused is remembered and served after `resume()`.

use super::pool::{Job, Pool};
use super::request::{Executor, Outcome, Request};
use super::{Control, DiskInfo, SharedBackend};
use crate::device::{irq, ActivateContext, Interrupt};
use crate::error::{Error, Result};
use crate::mmio::lock;
use crate::GuestMemoryMmap;
use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// epoll token of the control eventfd (queue tokens are their index).
const WAKE_TOKEN: u64 = u64::MAX;
/// epoll token of the I/O threads' completion eventfd.
const DONE_TOKEN: u64 = u64::MAX - 1;
/// Most data requests in flight per device.
pub const MAX_IN_FLIGHT: usize = super::pool::MAX_THREADS;
/// Through the host page cache, data requests shorter than this run here one after another
/// even when several are available, as long as they are page-cache hits (see
/// [`CACHED_SLOW`]): a hit costs less than handing it to another thread and being woken with
/// its completion. Longer ones (copies worth spreading over cores), misses, and every request
/// of an `O_DIRECT` image (each waits for the device) overlap on the I/O threads.
pub const HANDOFF_MIN_CACHED: u64 = 128 << 10;
/// Small page-cache requests go to the I/O threads while their moving-average execution time
/// is above the first bound (misses: the disk is read), and come back once it fell below the
/// second (hits again).
pub const CACHED_SLOW: (Duration, Duration) = (Duration::from_micros(40), Duration::from_micros(15));
/// Completions after which a long batch signals the driver without waiting for its end.
const SIGNAL_EVERY: u32 = 16;
/// The longest an empty ring is watched for a new request before the worker sleeps.
pub const POLL_MAX: Duration = Duration::from_micros(64);
/// The window a short sleep restarts polling with.
const POLL_MIN: Duration = Duration::from_micros(4);
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`: the driver does not want interrupts (without `EVENT_IDX`).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

pub(crate) struct Worker {
    mem: GuestMemoryMmap,
    queues: Vec<Arc<Mutex<Queue>>>,
    /// Set once a queue's rings proved unusable; it is ignored until the device is reset.
    broken: Vec<bool>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    ctl: Arc<Control>,
    exec: Executor,
    epoll: Epoll,
    /// The current polling window (see the module documentation).
    poll: Duration,
    /// Small requests through the page cache: recent execution time (moving average, ns) and
    /// whether they go to the I/O threads (see [`CACHED_SLOW`]).
    cached_ns: u64,
    cached_slow: bool,
    /// The I/O threads (None: they could not be set up; everything runs here).
    pool: Option<Pool>,
    /// Requests handed to the I/O threads and not yet published, in pop order.
    window: VecDeque<Slot>,
    next_seq: u64,
    /// A request in the window stopped the device (error policy `stop`).
    failed: bool,
}

/// A request handed to the I/O threads, until it is published.
struct Slot {
    seq: u64,
    head: u16,
    /// Its position in the available ring (`next_avail` when it was popped).
    pos: u16,
    /// A failure of it may stop the device: later requests are not published before it.
    may_stop: bool,
    /// Its outcome, once finished.
    out: Option<Outcome>,
}

/// Marks the worker dead if it unwinds, so `pause()` does not wait forever.
struct DeathGuard<'a>(&'a Control);

impl Drop for DeathGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut c = lock(&self.0.state);
            c.dead = true;
            c.busy = false;
            self.0.cv.notify_all();
        }
    }
}

impl Worker {
    pub fn new(ctx: ActivateContext, backend: SharedBackend, info: DiskInfo, ctl: Arc<Control>) -> Result<Self> {
        let epoll = Epoll::new().map_err(Error::io("epoll_create"))?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
                .map_err(Error::io("epoll_ctl"))
        };
        add(ctl.wake.as_raw_fd(), WAKE_TOKEN)?;
        for (i, e) in ctx.queue_evts.iter().enumerate() {
            add(e.as_raw_fd(), i as u64)?;
        }
        let exec = Executor::new(ctx.mem.clone(), backend, info, ctx.acked_features);
        let pool = match Pool::new(exec.clone()) {
            Ok(p) => {
                add(p.done_evt().as_raw_fd(), DONE_TOKEN)?;
                Some(p)
            }
            Err(e) => {
                tracing::warn!("virtio-blk: no I/O threads ({e}); requests run one at a time");
                None
            }
        };
        Ok(Worker {
            exec,
            pool,
            window: VecDeque::new(),
            next_seq: 0,
            failed: false,
            mem: ctx.mem,
            broken: vec![false; ctx.queues.len()],
            queues: ctx.queues,
            queue_evts: ctx.queue_evts,
            interrupt: ctx.interrupt,
            ctl,
            epoll,
            poll: POLL_MIN,
            cached_ns: 0,
            cached_slow: false,
        })
    }

    pub fn run(mut self) {
        let ctl = self.ctl.clone();
        let _guard = DeathGuard(&ctl);
        // Serve whatever the driver queued before activation (or before a restore).
        let mut kicked = true;
        let mut events = vec![EpollEvent::default(); self.queue_evts.len() + 1];
        loop {
            let busy = {
                let mut c = lock(&ctl.state);
                if c.stop {
                    break;
                }
                c.busy = kicked && !c.paused;
                if !c.busy {
                    ctl.cv.notify_all();
                }
                c.busy
            };
            if busy {
                kicked = !self.process_all();
                let mut c = lock(&ctl.state);
                c.busy = false;
                ctl.cv.notify_all();
                continue;
            }
            let slept = Instant::now();
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-blk worker: epoll_wait failed: {e}; stopping");
                    let mut c = lock(&ctl.state);
                    c.dead = true;
                    ctl.cv.notify_all();
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    WAKE_TOKEN => {
                        let _ = ctl.wake.read();
                    }
                    DONE_TOKEN => {
                        // A late wakeup for completions already collected.
                        if let Some(p) = &self.pool {
                            let _ = p.done_evt().read();
                        }
                    }
                    i => {
                        if let Some(e) = self.queue_evts.get(i as usize) {
                            let _ = e.read();
                            kicked = true;
                            // A request soon after giving up: a longer watch would have caught it.
                            if slept.elapsed() < POLL_MAX {
                                self.poll = (self.poll * 2).clamp(POLL_MIN, POLL_MAX);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Serves every queue until its ring is empty. Returns false if a pause interrupted it
    /// (there may be more to do after resume).
    fn process_all(&mut self) -> bool {
        for i in 0..self.queues.len() {
            if !self.process_queue(i) {
                return false;
            }
        }
        true
    }

    /// Whether the worker must stop taking requests: a pause, a stop, or a request that
    /// stopped the device (error policy `stop`).
    fn halted(&self) -> bool {
        let c = lock(&self.ctl.state);
        c.paused || c.stop || self.failed
    }

    fn process_queue(&mut self, i: usize) -> bool {
        if self.broken[i] {
            return true;
        }
        let queue = self.queues[i].clone();
        if !lock(&queue).ready() {
            return true;
        }
        // The backend's concurrent I/O handle for this batch: with one, data requests go to
        // the I/O threads (and straight into guest memory); without, they run here, one at a
        // time, through the bounce buffer.
        let pio = match self.pool {
            Some(_) => lock(&self.exec.backend).parallel_io(),
            None => None,
        };
        self.exec.pio = pio.clone();
        // An `O_DIRECT` image: every request waits for the device.
        let direct = pio.as_ref().is_some_and(|p| p.alignment() != (1, 1));
        let mut unsignalled = 0u32;
        let mut rechecked = false;
        let mut stopping = false;
        if let Err(e) = lock(&queue).disable_notification(&self.mem) {
            tracing::warn!("virtio-blk: queue {i}: disabling notifications: {e}");
        }
        loop {
            if !self.window.is_empty() {
                self.reap(&queue, &mut unsignalled);
                if self.failed && self.window.iter().all(|s| s.out.is_some()) {
                    self.stop_on_failure(&queue);
                    return false;
                }
            }
            if stopping || self.halted() {
                if self.window.is_empty() {
                    break;
                }
                self.wait_events();
                continue;
            }
            if self.window.len() >= MAX_IN_FLIGHT {
                self.wait_events();
                continue;
            }
            let next = {
                let mut q = lock(&queue);
                let pos = q.next_avail();
                match q.iter(&self.mem) {
                    Ok(mut it) => Ok(it.next().map(|c| (pos, self.exec.parse(c)))),
                    Err(e) => Err(e),
                }
            };
            match next {
                Ok(Some((pos, req))) => {
                    rechecked = false;
                    let parallel = pio.is_some()
                        && (direct || self.cached_slow || req.data_len() >= HANDOFF_MIN_CACHED)
                        && (!self.window.is_empty() || more_available(&self.mem, &queue));
                    let req = match req.data_direction() {
                        Some(write) if parallel => match self.dispatch(pos, write, req, &pio, direct) {
                            Ok(()) => continue,
                            Err(req) => req,
                        },
                        _ => req,
                    };
                    // Runs here, alone: after everything in flight (a FLUSH covers every write
                    // completed before it, DISCARD and WRITE_ZEROES are not reordered with
                    // writes).
                    while !self.window.is_empty() {
                        self.wait_events();
                        self.reap(&queue, &mut unsignalled);
                        if self.failed && self.window.iter().all(|s| s.out.is_some()) {
                            // This request was popped after the failed one: it is taken again
                            // with it after resume.
                            self.stop_on_failure(&queue);
                            return false;
                        }
                    }
                    if !self.run_inline(&queue, pos, req, &mut unsignalled) {
                        return false;
                    }
                }
                Ok(None) if rechecked => {
                    // The ring claims more entries but yields none: it is inconsistent.
                    tracing::warn!("virtio-blk: queue {i}: available ring inconsistent; ignoring it until reset");
                    self.broken[i] = true;
                    stopping = true;
                }
                Ok(None) => {
                    if self.window.is_empty() && poll_for_more(&self.mem, &self.ctl, &mut self.poll, &queue) {
                        continue;
                    }
                    // Re-enable notifications, then look again: the driver may have added a
                    // request between our last look and the re-enable.
                    // Bind the result first: a guard in the `match` scrutinee would live
                    // through the arms, and the `Ok(true)` arm locks the queue again.
                    let more = lock(&queue).enable_notification(&self.mem);
                    match more {
                        Ok(true) => {
                            rechecked = true;
                            let _ = lock(&queue).disable_notification(&self.mem);
                            continue;
                        }
                        Ok(false) if self.window.is_empty() => break,
                        Ok(false) => {
                            // Requests in flight: wait for one to finish or for a new one.
                            self.wait_events();
                            let _ = lock(&queue).disable_notification(&self.mem);
                        }
                        Err(e) => {
                            tracing::warn!("virtio-blk: queue {i}: enabling notifications: {e}");
                            stopping = true;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("virtio-blk: queue {i} is broken ({e}); ignoring it until reset");
                    self.broken[i] = true;
                    stopping = true;
                }
            }
        }
        if unsignalled > 0 && self.needs_interrupt(&queue) {
            self.interrupt.trigger(irq::VRING);
        }
        !self.halted()
    }

    /// Adds an execution time of a small page-cache request to the moving average behind
    /// [`CACHED_SLOW`].
    fn note_cached(&mut self, took: Duration) {
        let t = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).min(1 << 40);
        self.cached_ns = (self.cached_ns * 7 + t) / 8;
        let (up, down) = (CACHED_SLOW.0.as_nanos() as u64, CACHED_SLOW.1.as_nanos() as u64);
        if self.cached_ns > up {
            self.cached_slow = true;
        } else if self.cached_ns < down {
            self.cached_slow = false;
        }
    }

    /// Hands a data request to the I/O threads; gives it back if no thread can run it.
    fn dispatch(
        &mut self,
        pos: u16,
        write: bool,
        req: Request,
        pio: &Option<Arc<dyn qcow2::ParallelIo>>,
        direct: bool,
    ) -> std::result::Result<(), Request> {
        let timed = !direct && req.data_len() < HANDOFF_MIN_CACHED;
        let Some(pool) = self.pool.as_mut() else { return Err(req) };
        let policy = &self.exec.info.policy;
        let may_stop = if write { policy.werror.may_stop() } else { policy.rerror.may_stop() };
        let seq = self.next_seq;
        let head = req.head;
        match pool.submit(Job { seq, req, pio: pio.clone(), timed }) {
            Ok(()) => {
                self.next_seq += 1;
                self.window.push_back(Slot { seq, head, pos, may_stop, out: None });
                Ok(())
            }
            Err(job) => Err(job.req),
        }
    }

    /// Runs one request on this thread and publishes it. False when it stopped the device
    /// (error policy `stop`): it went back to the available ring.
    fn run_inline(&mut self, queue: &Mutex<Queue>, pos: u16, req: Request, unsignalled: &mut u32) -> bool {
        let head = req.head;
        let timed = self.exec.pio.is_some() && req.data_direction().is_some() && req.data_len() < HANDOFF_MIN_CACHED;
        let started = Instant::now();
        let out = self.exec.run(&req);
        if timed {
            self.note_cached(started.elapsed());
        }
        let Some(len) = out.used_len else {
            // Error policy `stop`: the request goes back to the available ring (it was the
            // last one popped) and the worker takes no more until resumed; then it runs again.
            lock(queue).set_next_avail(pos);
            {
                let mut c = lock(&self.ctl.state);
                c.paused = true;
                c.io_error = true;
            }
            if let (Some(h), Some(e)) = (&self.exec.info.policy.hook, &out.error) {
                (h.0)(e);
            }
            return false;
        };
        if let (Some(h), Some(e)) = (&self.exec.info.policy.hook, &out.error) {
            (h.0)(e);
        }
        match lock(queue).add_used(&self.mem, head, len) {
            Ok(()) => *unsignalled += 1,
            Err(e) => tracing::warn!("virtio-blk: descriptor {head} not returned: {e}"),
        }
        // In a long batch, let the driver see completions before the batch ends.
        if *unsignalled >= SIGNAL_EVERY {
            *unsignalled = 0;
            if self.needs_interrupt(queue) {
                self.interrupt.trigger(irq::VRING);
            }
        }
        true
    }

    /// Blocks until an I/O thread finished a request, the driver notified, or the device's
    /// control changed. Only called with requests in flight, so it always returns.
    fn wait_events(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        let n = match self.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(e) => {
                // Not expected; do not spin at full speed while it lasts.
                tracing::warn!("virtio-blk worker: epoll_wait failed: {e}");
                std::thread::sleep(Duration::from_millis(1));
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                WAKE_TOKEN => {
                    let _ = self.ctl.wake.read();
                }
                DONE_TOKEN => {} // read by `reap`
                i => {
                    if let Some(e) = self.queue_evts.get(i as usize) {
                        let _ = e.read();
                    }
                }
            }
        }
    }

    /// Collects finished requests and publishes those whose turn it is: in pop order, a
    /// finished request waits only while an earlier one that may stop the device (error policy
    /// `stop`/`enospc` for its direction) is unfinished or did stop it, so a stop can always
    /// take back everything from the failed request on (see [`Self::stop_on_failure`]).
    /// Signals the driver once for what it published.
    fn reap(&mut self, queue: &Mutex<Queue>, unsignalled: &mut u32) {
        let Some(pool) = &self.pool else { return };
        for d in pool.take_done() {
            if let Some(s) = self.window.iter_mut().find(|s| s.seq == d.seq) {
                s.out = Some(d.out);
                if let Some(t) = d.took {
                    self.note_cached(t);
                }
            }
        }
        let mut blocked = false;
        let mut k = 0;
        while k < self.window.len() {
            let s = &self.window[k];
            match &s.out {
                None => {
                    blocked |= s.may_stop;
                    k += 1;
                }
                Some(o) if o.used_len.is_none() => {
                    self.failed = true;
                    blocked = true;
                    k += 1;
                }
                Some(_) if blocked => k += 1,
                Some(_) => {
                    let Some(Slot { head, out: Some(o), .. }) = self.window.remove(k) else { continue };
                    if let (Some(h), Some(e)) = (&self.exec.info.policy.hook, &o.error) {
                        (h.0)(e);
                    }
                    let len = o.used_len.unwrap_or(0);
                    match lock(queue).add_used(&self.mem, head, len) {
                        Ok(()) => *unsignalled += 1,
                        Err(e) => tracing::warn!("virtio-blk: descriptor {head} not returned: {e}"),
                    }
                }
            }
        }
        if *unsignalled > 0 {
            *unsignalled = 0;
            if self.needs_interrupt(queue) {
                self.interrupt.trigger(irq::VRING);
            }
        }
    }

    /// A request failed under error policy `stop` and nothing is in flight any more: the
    /// first failed request and everything popped after it (none of it published, see
    /// [`Self::reap`]) go back to the available ring, to run again after resume — or after a
    /// save and restore, as the ring is part of the saved state. The device stops taking
    /// requests until resumed.
    fn stop_on_failure(&mut self, queue: &Mutex<Queue>) {
        let Some(first) = self.window.front() else { return };
        lock(queue).set_next_avail(first.pos);
        let error = first.out.as_ref().and_then(|o| o.error.clone());
        self.window.clear();
        self.failed = false;
        {
            let mut c = lock(&self.ctl.state);
            c.paused = true;
            c.io_error = true;
        }
        if let (Some(h), Some(e)) = (&self.exec.info.policy.hook, &error) {
            (h.0)(e);
        }
    }

    /// Whether the driver wants an interrupt for what was just used: `EVENT_IDX` when
    /// negotiated, otherwise the available ring's `NO_INTERRUPT` flag.
    fn needs_interrupt(&self, queue: &Mutex<Queue>) -> bool {
        let mut q = lock(queue);
        let wanted = q.needs_notification(&self.mem).unwrap_or(true);
        if q.event_idx_enabled() || !wanted {
            return wanted;
        }
        let flags: u16 = self.mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
        u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
    }
}

/// Whether the driver has made requests available beyond those popped.
fn more_available(mem: &GuestMemoryMmap, queue: &Mutex<Queue>) -> bool {
    let q = lock(queue);
    matches!(q.avail_idx(mem, std::sync::atomic::Ordering::Acquire), Ok(idx) if idx.0 != q.next_avail())
}

/// Watches the available index for up to the polling window; true when the driver has made
/// a new request available. A watch that finds nothing halves the window.
fn poll_for_more(mem: &GuestMemoryMmap, ctl: &Control, poll: &mut Duration, queue: &Mutex<Queue>) -> bool {
    if poll.is_zero() {
        return false;
    }
    let end = Instant::now() + *poll;
    loop {
        {
            let q = lock(queue);
            match q.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
                Ok(idx) if idx.0 != q.next_avail() => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        if Instant::now() >= end || lock(&ctl.state).paused {
            *poll /= 2;
            if *poll < POLL_MIN {
                *poll = Duration::ZERO;
            }
            return false;
        }
        std::hint::spin_loop();
    }
}
