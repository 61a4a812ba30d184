//! The virtio-net device (virtio 1.x §5.1) on a tap: one receive and one transmit queue, served
//! by one thread per device that also sends the post-migration announcements.
//!
//! Features offered: `VERSION_1`, `RING_INDIRECT_DESC`, `RING_EVENT_IDX`, `NET_F_MAC`,
//! `NET_F_STATUS` (link always up), `NET_F_MRG_RXBUF`, and the offloads the tap does for us:
//! `NET_F_CSUM`/`NET_F_HOST_TSO4`/`NET_F_HOST_TSO6` (the guest's header goes to the tap as is)
//! and `NET_F_GUEST_CSUM`/`NET_F_GUEST_TSO4`/`NET_F_GUEST_TSO6` (enabled on the tap with
//! `TUNSETOFFLOAD` when the driver accepts them). Frames cross the device with the 12-byte
//! `virtio_net_hdr_v1` unchanged, because the tap is opened with the same header size; the
//! device only fills in `num_buffers` on receive.
//!
//! Threading: the thread lives as long as the device (it owns nothing of the guest until the
//! driver sets `DRIVER_OK`: [`VirtioDevice::activate`] hands it the queues, a reset takes them
//! back and waits until the thread let go). [`VirtioDevice::pause`] stops it touching guest
//! memory and returns once no frame is half delivered, so saved queue indices and guest RAM
//! agree; frames that arrive on the tap meanwhile stay in the tap's queue (and are dropped by
//! the kernel when it fills, as on a congested link). [`Net::announce`] works paused or not:
//! announcements go to the tap, never to the guest.
//!
//! Save/restore is the transport's section (`dev.virtio-net<slot>`): features, queues, and the
//! config space, which holds the MAC and link status, so a destination with another MAC is
//! refused.

mod worker;

use crate::device::{features, ActivateContext, VirtioDevice};
use crate::error::{Error, Result};
use crate::mmio::lock;
use ::net::{AnnounceParams, MacAddr, Tap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// virtio device id of a network card.
pub const DEVICE_ID: u32 = 1;
/// Queue size offered for both queues.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// MTU reported in the config space (informational; `NET_F_MTU` is not offered).
pub const MTU: u16 = 1500;

/// Feature bits of virtio-net (§5.1.3).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// `VIRTIO_NET_S_LINK_UP`.
const LINK_UP: u16 = 1;

/// How the VMM configures a NIC.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The guest's MAC address (config space; also the source of announcements).
    pub mac: MacAddr,
    /// Queue size offered (power of two, 2..=32768).
    pub queue_size: u16,
}

impl NetConfig {
    pub fn new(mac: MacAddr) -> Self {
        NetConfig { mac, queue_size: DEFAULT_QUEUE_SIZE }
    }
}

/// Frame counters of one NIC (since the VMM started; not part of the saved state).
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap that could not be given to the guest (no room, bad buffers).
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the guest sent that were malformed or that the tap refused.
    pub tx_dropped: AtomicU64,
    /// Announcement frames sent.
    pub announces: AtomicU64,
}

/// A snapshot of [`NetStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub announces: u64,
}

impl NetStats {
    pub fn snapshot(&self) -> NetCounters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetCounters {
            rx_frames: l(&self.rx_frames),
            rx_bytes: l(&self.rx_bytes),
            rx_dropped: l(&self.rx_dropped),
            tx_frames: l(&self.tx_frames),
            tx_bytes: l(&self.tx_bytes),
            tx_dropped: l(&self.tx_dropped),
            announces: l(&self.announces),
        }
    }
}

/// Requests from the device to its thread, and the thread's progress.
#[derive(Default)]
pub(crate) struct Ctl {
    /// No guest memory access (set by `pause`).
    pub paused: bool,
    /// The thread is working on the queues (`pause` waits for this to drop).
    pub busy: bool,
    /// The thread is gone (epoll failed); nothing is served any more.
    pub dead: bool,
    /// The thread must exit (device dropped).
    pub exit: bool,
    /// Queues handed over by `activate`, not yet taken by the thread.
    pub activation: Option<ActivateContext>,
    /// Forget the queues (reset).
    pub deactivate: bool,
    /// Requests made / requests the thread has seen (reset waits for `seen >= made`).
    pub made: u64,
    pub seen: u64,
    /// Announcement asked for.
    pub announce: Option<AnnounceParams>,
}

pub(crate) struct Shared {
    pub state: Mutex<Ctl>,
    pub cv: Condvar,
    /// Wakes the thread to look at `state`.
    pub wake: EventFd,
    pub tap: Tap,
    pub mac: MacAddr,
    pub stats: NetStats,
}

/// A virtio-net device.
pub struct Net {
    shared: Arc<Shared>,
    features: u64,
    config_space: Vec<u8>,
    queue_sizes: [u16; 2],
    thread: Option<JoinHandle<()>>,
}

impl Net {
    /// A NIC on `tap`; starts its thread.
    pub fn new(tap: Tap, config: NetConfig) -> Result<Self> {
        let qs = config.queue_size;
        if qs < 2 || !qs.is_power_of_two() {
            return Err(Error::Net(format!("queue size {qs} is not a power of two in 2..=32768")));
        }
        if config.mac.is_multicast() {
            return Err(Error::Net(format!("MAC address {} is a multicast address", config.mac)));
        }
        let features = features::VERSION_1
            | features::RING_INDIRECT_DESC
            | features::RING_EVENT_IDX
            | feature::MAC
            | feature::STATUS
            | feature::MRG_RXBUF
            | feature::CSUM
            | feature::GUEST_CSUM
            | feature::HOST_TSO4
            | feature::HOST_TSO6
            | feature::GUEST_TSO4
            | feature::GUEST_TSO6;
        let mut config_space = vec![0u8; 12];
        config_space[0..6].copy_from_slice(&config.mac.bytes());
        config_space[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        config_space[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        config_space[10..12].copy_from_slice(&MTU.to_le_bytes());
        let shared = Arc::new(Shared {
            state: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            wake: EventFd::new(EFD_NONBLOCK).map_err(Error::io("virtio-net eventfd"))?,
            tap,
            mac: config.mac,
            stats: NetStats::default(),
        });
        let w = worker::Worker::new(shared.clone())?;
        let thread = std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || w.run())
            .map_err(Error::io("spawning the virtio-net thread"))?;
        Ok(Net { shared, features, config_space, queue_sizes: [qs, qs], thread: Some(thread) })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.shared.mac
    }

    /// The tap's interface name.
    pub fn ifname(&self) -> &str {
        self.shared.tap.ifname()
    }

    /// Frame counters.
    pub fn counters(&self) -> NetCounters {
        self.shared.stats.snapshot()
    }

    /// Sends `params.rounds` announcement frames for the guest's MAC on the tap, from the
    /// device thread, on the schedule of [`AnnounceParams`]; replaces an announcement still in
    /// progress. Returns at once.
    pub fn announce(&self, params: AnnounceParams) {
        lock(&self.shared.state).announce = Some(params);
        let _ = self.shared.wake.write(1);
    }

    /// Asks the thread for something and waits until it has seen the request.
    fn request(&self, f: impl FnOnce(&mut Ctl)) {
        let mut c = lock(&self.shared.state);
        f(&mut c);
        c.made += 1;
        let want = c.made;
        let _ = self.shared.wake.write(1);
        while c.seen < want && !c.dead {
            c = self.shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn offloads_for(acked: u64) -> u32 {
        use ::net::tap::offload;
        let mut f = 0;
        if acked & feature::GUEST_CSUM != 0 {
            f |= offload::CSUM;
            if acked & feature::GUEST_TSO4 != 0 {
                f |= offload::TSO4;
            }
            if acked & feature::GUEST_TSO6 != 0 {
                f |= offload::TSO6;
            }
        }
        f
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }
    fn name(&self) -> &'static str {
        "net"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let Ok(off) = usize::try_from(offset) else { return };
        if off < self.config_space.len() {
            let n = data.len().min(self.config_space.len() - off);
            data[..n].copy_from_slice(&self.config_space[off..off + n]);
        }
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Writing the MAC is a legacy-only feature (VIRTIO_NET_F_CTRL_MAC_ADDR is not offered).
        tracing::debug!("virtio-net: config write at {offset:#x} ignored");
    }
    fn config_len(&self) -> usize {
        self.config_space.len()
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        if ctx.queues.len() != 2 || ctx.queue_evts.len() != 2 {
            return Err(Error::Net("two queues (receive, transmit) are needed".into()));
        }
        self.shared.tap.set_offload(Self::offloads_for(ctx.acked_features)).map_err(|e| Error::Net(e.to_string()))?;
        self.request(|c| {
            c.deactivate = true;
            c.activation = Some(ctx);
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.request(|c| {
            c.activation = None;
            c.deactivate = true;
        });
        if let Err(e) = self.shared.tap.set_offload(0) {
            tracing::warn!("virtio-net: {e}");
        }
    }

    fn pause(&mut self) -> Result<()> {
        let mut c = lock(&self.shared.state);
        c.paused = true;
        let _ = self.shared.wake.write(1);
        while c.busy && !c.dead {
            c = self.shared.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        if c.dead {
            return Err(Error::WorkerDied("virtio-net".into()));
        }
        Ok(())
    }

    fn resume(&mut self) {
        lock(&self.shared.state).paused = false;
        let _ = self.shared.wake.write(1);
    }

    fn is_paused(&self) -> bool {
        lock(&self.shared.state).paused
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(h) = self.thread.take() {
            lock(&self.shared.state).exit = true;
            let _ = self.shared.wake.write(1);
            let _ = h.join();
        }
    }
}
