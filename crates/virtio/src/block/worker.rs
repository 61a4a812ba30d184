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
//! Pause protocol (with [`super::Control`]): the worker marks itself `busy` before touching a
//! queue and checks `paused` before popping each chain, so `pause()` — which sets `paused` and
//! waits for `busy` to drop — returns only once no request is in flight and nothing more will
//! be popped. A kick that arrives while paused is remembered and served after `resume()`.

use super::request::Executor;
use super::{Control, DiskInfo, SharedBackend};
use crate::device::{irq, ActivateContext, Interrupt};
use crate::error::{Error, Result};
use crate::mmio::lock;
use crate::GuestMemoryMmap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// epoll token of the control eventfd (queue tokens are their index).
const WAKE_TOKEN: u64 = u64::MAX;
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
        Ok(Worker {
            exec: Executor::new(ctx.mem.clone(), backend, info, ctx.acked_features),
            mem: ctx.mem,
            broken: vec![false; ctx.queues.len()],
            queues: ctx.queues,
            queue_evts: ctx.queue_evts,
            interrupt: ctx.interrupt,
            ctl,
            epoll,
            poll: POLL_MIN,
        })
    }

    fn paused(&self) -> bool {
        lock(&self.ctl.state).paused
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

    fn process_queue(&mut self, i: usize) -> bool {
        if self.broken[i] {
            return true;
        }
        let queue = self.queues[i].clone();
        if !lock(&queue).ready() {
            return true;
        }
        let mem = &self.mem;
        let mut unsignalled = 0u32;
        let mut complete = true;
        let mut rechecked = false;
        if let Err(e) = lock(&queue).disable_notification(mem) {
            tracing::warn!("virtio-blk: queue {i}: disabling notifications: {e}");
        }
        loop {
            if self.paused() {
                complete = false;
                break;
            }
            let next = {
                let mut q = lock(&queue);
                match q.iter(mem) {
                    Ok(mut it) => Ok(it.next()),
                    Err(e) => Err(e),
                }
            };
            match next {
                Ok(Some(chain)) => {
                    rechecked = false;
                    let head = chain.head_index();
                    let out = self.exec.handle(chain);
                    let Some(len) = out.used_len else {
                        // Error policy `stop`: the request goes back to the available ring
                        // (it was the last one popped) and the worker takes no more until
                        // resumed; then it runs again.
                        {
                            let mut q = lock(&queue);
                            let n = q.next_avail().wrapping_sub(1);
                            q.set_next_avail(n);
                        }
                        {
                            let mut c = lock(&self.ctl.state);
                            c.paused = true;
                            c.io_error = true;
                        }
                        if let (Some(h), Some(e)) = (&self.exec.info.policy.hook, &out.error) {
                            (h.0)(e);
                        }
                        complete = false;
                        break;
                    };
                    if let (Some(h), Some(e)) = (&self.exec.info.policy.hook, &out.error) {
                        (h.0)(e);
                    }
                    match lock(&queue).add_used(mem, head, len) {
                        Ok(()) => unsignalled += 1,
                        Err(e) => tracing::warn!("virtio-blk: queue {i}: descriptor {head} not returned: {e}"),
                    }
                    // In a long batch, let the driver see completions before the batch ends.
                    if unsignalled >= SIGNAL_EVERY {
                        unsignalled = 0;
                        if self.needs_interrupt(&queue) {
                            self.interrupt.trigger(irq::VRING);
                        }
                    }
                }
                Ok(None) if rechecked => {
                    // The ring claims more entries but yields none: it is inconsistent.
                    tracing::warn!("virtio-blk: queue {i}: available ring inconsistent; ignoring it until reset");
                    self.broken[i] = true;
                    break;
                }
                Ok(None) => {
                    if poll_for_more(mem, &self.ctl, &mut self.poll, &queue) {
                        continue;
                    }
                    // Re-enable notifications, then look again: the driver may have added a
                    // request between our last look and the re-enable.
                    // Bind the result first: a guard in the `match` scrutinee would live
                    // through the arms, and the `Ok(true)` arm locks the queue again.
                    let more = lock(&queue).enable_notification(mem);
                    match more {
                        Ok(true) => {
                            rechecked = true;
                            let _ = lock(&queue).disable_notification(mem);
                            continue;
                        }
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!("virtio-blk: queue {i}: enabling notifications: {e}");
                            break;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("virtio-blk: queue {i} is broken ({e}); ignoring it until reset");
                    self.broken[i] = true;
                    break;
                }
            }
        }
        if unsignalled > 0 && self.needs_interrupt(&queue) {
            self.interrupt.trigger(irq::VRING);
        }
        complete
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
