//! The virtio-net thread: one epoll set over the tap (edge-triggered), the two queue
//! notification eventfds and the control eventfd; receive (tap → guest), transmit (guest →
//! tap) and the announcement timer.
//!
//! Receive: a frame is read from the tap into a local buffer (vnet header first), then placed in
//! as many receive chains as it needs (one without `MRG_RXBUF`): the chains are popped and
//! measured first, and if the ring runs short they are pushed back and the frame waits (in the
//! local buffer, not in guest RAM) until the driver adds buffers and kicks. Only then are bytes
//! written and `num_buffers` set, so a frame is either wholly delivered or not at all.
//!
//! Transmit: each chain's readable descriptors are gathered (at most one vnet header plus a
//! 64 KiB frame; write-only descriptors, overlong or too short chains are dropped and still
//! returned to the driver) and written to the tap. A write the tap refuses drops the frame.
//!
//! Pause protocol (with [`super::Ctl`]): `busy` is set under the lock only while not paused,
//! and the work loops check `paused` before every frame, so `pause()` returns once nothing more
//! touches guest memory. The guest is never trusted: descriptor addresses are checked by
//! `vm-memory`, chain lengths are bounded by `virtio-queue`, and a queue whose rings prove
//! inconsistent is ignored until the next reset.

use super::{feature, Shared};
use crate::device::{irq, ActivateContext};
use crate::error::{Error, Result};
use crate::mmio::lock;
use ::net::{rarp_frame, AnnounceSchedule, VNET_HDR_LEN};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

const RX: usize = 0;
const TX: usize = 1;
const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_WAKE: u64 = 2;
const TOKEN_TAP: u64 = 3;
/// Largest frame plus header either way (a 64 KiB GSO frame with its Ethernet header).
const MAX_FRAME: usize = VNET_HDR_LEN + 65536 + 14;
/// Frames handled per batch before looking at control requests again.
const BATCH: usize = 64;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFF: usize = 10;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

type Chain<'a> = DescriptorChain<&'a crate::GuestMemoryMmap>;

/// The queues while the driver has the device running.
struct Active {
    ctx: ActivateContext,
    mrg: bool,
    broken: [bool; 2],
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    epoll: Epoll,
    active: Option<Active>,
    /// The tap may have frames queued (an edge was seen and no EAGAIN since).
    tap_readable: bool,
    /// A frame read from the tap waiting for receive buffers: its length in `rx_buf`.
    pending: Option<usize>,
    /// The receive ring had no room; wait for a receive kick.
    rx_starved: bool,
    /// The driver kicked the transmit queue.
    tx_kicked: bool,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    announce: Option<AnnounceSchedule>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Result<Self> {
        let epoll = Epoll::new().map_err(Error::io("epoll_create"))?;
        epoll
            .ctl(ControlOperation::Add, shared.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_WAKE))
            .map_err(Error::io("epoll_ctl"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                shared.tap.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_TAP),
            )
            .map_err(Error::io("epoll_ctl"))?;
        Ok(Worker {
            shared,
            epoll,
            active: None,
            tap_readable: true,
            pending: None,
            rx_starved: false,
            tx_kicked: false,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: Vec::with_capacity(MAX_FRAME),
            announce: None,
        })
    }

    fn set_queue_events(&self, ctx: &ActivateContext, add: bool) {
        for (i, e) in ctx.queue_evts.iter().enumerate() {
            let op = if add { ControlOperation::Add } else { ControlOperation::Delete };
            if let Err(e) = self.epoll.ctl(op, e.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64)) {
                tracing::warn!("virtio-net: epoll_ctl on queue {i}: {e}");
            }
        }
    }

    /// Applies control requests; returns false when the thread must exit.
    fn control(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut c = lock(&shared.state);
        if c.exit {
            return false;
        }
        if c.deactivate {
            c.deactivate = false;
            if let Some(a) = self.active.take() {
                self.set_queue_events(&a.ctx, false);
            }
            self.pending = None;
            self.rx_starved = false;
            self.tx_kicked = false;
        }
        if let Some(ctx) = c.activation.take() {
            self.set_queue_events(&ctx, true);
            let mrg = ctx.acked_features & feature::MRG_RXBUF != 0;
            self.active = Some(Active { ctx, mrg, broken: [false; 2] });
            // Serve what the driver queued before (activation, restore).
            self.tx_kicked = true;
            self.tap_readable = true;
        }
        if let Some(p) = c.announce.take() {
            self.announce = AnnounceSchedule::start(p, Instant::now());
        }
        if c.seen != c.made {
            c.seen = c.made;
            shared.cv.notify_all();
        }
        let work = self.active.is_some() && (self.tx_kicked || (!self.rx_starved && (self.tap_readable || self.pending.is_some())));
        c.busy = work && !c.paused;
        if !c.busy {
            shared.cv.notify_all();
        }
        true
    }

    pub fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            if !self.control() {
                return;
            }
            self.announce_due();
            if lock(&self.shared.state).busy {
                let (tx_done, rx_done) = (self.process_tx(), self.process_rx());
                let mut c = lock(&self.shared.state);
                c.busy = false;
                self.shared.cv.notify_all();
                drop(c);
                if !(tx_done && rx_done) {
                    continue; // more to do (or paused meanwhile: control() sees it)
                }
            }
            let timeout = match &self.announce {
                Some(s) => {
                    let left = s.deadline().saturating_duration_since(Instant::now());
                    i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(if left.is_zero() { 0 } else { 1 })
                }
                None => -1,
            };
            // Work left over (starved ring, paused) waits for an event.
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("virtio-net thread: epoll_wait failed: {e}; stopping");
                    let mut c = lock(&self.shared.state);
                    c.dead = true;
                    self.shared.cv.notify_all();
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_WAKE => {
                        let _ = self.shared.wake.read();
                    }
                    TOKEN_TAP => self.tap_readable = true,
                    TOKEN_RXQ | TOKEN_TXQ => {
                        let i = ev.data() as usize;
                        if let Some(a) = &self.active {
                            let _ = a.ctx.queue_evts[i].read();
                        }
                        if i == RX {
                            self.rx_starved = false;
                        } else {
                            self.tx_kicked = true;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn announce_due(&mut self) {
        let now = Instant::now();
        let Some(s) = self.announce.as_mut() else { return };
        if !s.due(now) {
            return;
        }
        let frame = rarp_frame(self.shared.mac);
        match self.shared.tap.write_with_header(&[0; VNET_HDR_LEN], &frame) {
            Ok(_) => {
                self.shared.stats.announces.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("virtio-net {}: announcement not sent: {e}", self.shared.tap.ifname()),
        }
        if !s.sent(now) {
            tracing::info!("virtio-net {}: announced {} ({} rounds)", self.shared.tap.ifname(), self.shared.mac, s.rounds_sent());
            self.announce = None;
        }
    }

    /// Transmits what the driver queued. Returns false if a pause or the batch limit stopped it.
    fn process_tx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else { return true };
        if !self.tx_kicked || a.broken[TX] {
            self.tx_kicked = false;
            return true;
        }
        let mem = a.ctx.mem.clone();
        let queue = a.ctx.queues[TX].clone();
        if !lock(&queue).ready() {
            self.tx_kicked = false;
            return true;
        }
        let _ = lock(&queue).disable_notification(&mem);
        let mut used = 0;
        let mut done = true;
        let mut rechecked = false;
        loop {
            if used >= BATCH || lock(&self.shared.state).paused {
                done = false;
                break;
            }
            let next = {
                let mut q = lock(&queue);
                q.iter(&mem).map(|mut it| it.next())
            };
            match next {
                Ok(Some(chain)) => {
                    rechecked = false;
                    let head = chain.head_index();
                    gather(chain, &mut self.tx_buf);
                    if self.tx_buf.len() > VNET_HDR_LEN {
                        match self.shared.tap.write(&self.tx_buf) {
                            Ok(_) => {
                                self.shared.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                                self.shared.stats.tx_bytes.fetch_add((self.tx_buf.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::debug!("virtio-net: tap write: {e}");
                                self.shared.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else {
                        self.shared.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Err(e) = lock(&queue).add_used(&mem, head, 0) {
                        tracing::warn!("virtio-net: tx descriptor {head} not returned: {e}");
                    }
                    used += 1;
                }
                Ok(None) if rechecked => {
                    tracing::warn!("virtio-net: transmit ring inconsistent; ignoring it until reset");
                    a.broken[TX] = true;
                    break;
                }
                // The guard must not live through the arms (`Ok(true)` locks again).
                Ok(None) => match { let more = lock(&queue).enable_notification(&mem); more } {
                    Ok(true) => {
                        rechecked = true;
                        let _ = lock(&queue).disable_notification(&mem);
                    }
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!("virtio-net: transmit queue: {e}");
                        break;
                    }
                },
                Err(e) => {
                    tracing::warn!("virtio-net: transmit queue broken ({e}); ignoring it until reset");
                    a.broken[TX] = true;
                    break;
                }
            }
        }
        if done {
            self.tx_kicked = false;
        }
        if used > 0 && needs_interrupt(&a.ctx, &queue) {
            a.ctx.interrupt.trigger(irq::VRING);
        }
        done
    }

    /// Moves frames from the tap to the guest. Returns false if a pause or the batch limit
    /// stopped it.
    fn process_rx(&mut self) -> bool {
        let Some(a) = self.active.as_mut() else { return true };
        if a.broken[RX] || !lock(&a.ctx.queues[RX]).ready() {
            // No receive ring: frames pile up in the tap (the kernel drops them when full).
            self.rx_starved = true;
            return true;
        }
        let queue = a.ctx.queues[RX].clone();
        let mut delivered = 0;
        let mut done = true;
        while !self.rx_starved {
            if delivered >= BATCH || lock(&self.shared.state).paused {
                done = false;
                break;
            }
            let len = match self.pending.take() {
                Some(n) => n,
                None if !self.tap_readable => break,
                None => match self.shared.tap.read(&mut self.rx_buf) {
                    Ok(n) if n > VNET_HDR_LEN => n,
                    Ok(_) => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.tap_readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!("virtio-net {}: tap read: {e}", self.shared.tap.ifname());
                        self.tap_readable = false;
                        break;
                    }
                },
            };
            match deliver(a, &queue, &mut self.rx_buf[..len]) {
                Delivery::Done => {
                    delivered += 1;
                    self.shared.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.shared.stats.rx_bytes.fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                }
                Delivery::NoRoom => {
                    self.pending = Some(len);
                    // Ask for a kick when buffers come; if some came meanwhile, go on.
                    match lock(&queue).enable_notification(&a.ctx.mem) {
                        Ok(true) => {}
                        Ok(false) => self.rx_starved = true,
                        Err(_) => self.rx_starved = true,
                    }
                }
                Delivery::Dropped => {
                    self.shared.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Delivery::Broken => {
                    self.shared.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    a.broken[RX] = true;
                    self.rx_starved = true;
                    break;
                }
            }
            if delivered > 0 && delivered % 16 == 0 && needs_interrupt(&a.ctx, &queue) {
                a.ctx.interrupt.trigger(irq::VRING);
            }
        }
        if delivered > 0 && needs_interrupt(&a.ctx, &queue) {
            a.ctx.interrupt.trigger(irq::VRING);
        }
        done
    }
}

enum Delivery {
    Done,
    /// Not enough receive buffers: nothing was consumed.
    NoRoom,
    /// The frame cannot be delivered (too big for the buffers without `MRG_RXBUF`, or the
    /// buffers are unusable); the frame is dropped.
    Dropped,
    /// The ring itself is inconsistent.
    Broken,
}

/// Total writable bytes of a chain; 0 if it has a readable descriptor (not a receive buffer).
fn writable_len(chain: &Chain<'_>) -> usize {
    let mut total = 0usize;
    for d in chain.clone() {
        if !d.is_write_only() {
            return 0;
        }
        total = total.saturating_add(d.len() as usize);
    }
    total
}

/// Places one frame (header included) in the receive ring.
fn deliver(a: &mut Active, queue: &Mutex<Queue>, frame: &mut [u8]) -> Delivery {
    let mem = &a.ctx.mem;
    let mut q = lock(queue);
    // Pop and measure chains until the frame fits.
    let mut chains: Vec<(Chain<'_>, usize)> = Vec::new();
    let mut room = 0usize;
    while room < frame.len() {
        let next = match q.iter(mem) {
            Ok(mut it) => it.next(),
            Err(_) => {
                for _ in 0..chains.len() {
                    q.go_to_previous_position();
                }
                return Delivery::Broken;
            }
        };
        let Some(chain) = next else {
            for _ in 0..chains.len() {
                q.go_to_previous_position();
            }
            return Delivery::NoRoom;
        };
        let cap = writable_len(&chain);
        if cap < VNET_HDR_LEN {
            // Not a receive buffer (readable descriptors, or no room for a header): the driver
            // is broken; the queue is ignored until it resets the device.
            tracing::warn!("virtio-net: receive chain {} is not a receive buffer", chain.head_index());
            return Delivery::Broken;
        }
        room += cap;
        chains.push((chain, cap));
        if !a.mrg && room < frame.len() {
            // One buffer per frame and this one is too small: drop the frame, return the buffer.
            let (chain, _) = chains.pop().expect("just pushed");
            let _ = q.add_used(mem, chain.head_index(), 0);
            return Delivery::Dropped;
        }
    }
    let n = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    frame[NUM_BUFFERS_OFF..NUM_BUFFERS_OFF + 2].copy_from_slice(&n.to_le_bytes());
    let mut off = 0usize;
    let mut ok = true;
    for (chain, _) in chains {
        let head = chain.head_index();
        let start = off;
        for d in chain {
            if off >= frame.len() {
                break;
            }
            let take = (d.len() as usize).min(frame.len() - off);
            if mem.write_slice(&frame[off..off + take], d.addr()).is_err() {
                ok = false;
                break;
            }
            off += take;
        }
        let len = u32::try_from(off - start).unwrap_or(0);
        if let Err(e) = q.add_used(mem, head, len) {
            tracing::warn!("virtio-net: rx descriptor {head} not returned: {e}");
        }
        if !ok {
            break;
        }
    }
    if ok {
        Delivery::Done
    } else {
        tracing::debug!("virtio-net: receive buffer outside guest RAM; frame dropped");
        Delivery::Dropped
    }
}

/// Gathers a transmit chain into `out`; leaves `out` empty if the chain is not a valid frame.
fn gather(chain: Chain<'_>, out: &mut Vec<u8>) {
    out.clear();
    let mem = chain.memory();
    for d in chain.clone() {
        let len = d.len() as usize;
        if d.is_write_only() || out.len() + len > MAX_FRAME {
            out.clear();
            return;
        }
        let start = out.len();
        out.resize(start + len, 0);
        if mem.read_slice(&mut out[start..], d.addr()).is_err() {
            out.clear();
            return;
        }
    }
}

/// Whether the driver wants an interrupt now: `EVENT_IDX` when negotiated, otherwise the
/// available ring's `NO_INTERRUPT` flag.
fn needs_interrupt(ctx: &ActivateContext, queue: &Mutex<Queue>) -> bool {
    let mut q = lock(queue);
    let wanted = q.needs_notification(&ctx.mem).unwrap_or(true);
    if q.event_idx_enabled() || !wanted {
        return wanted;
    }
    let flags: u16 = ctx.mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
    u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0
}
