//! virtio-net against a real tap, driven by a mock driver that programs the registers and rings
//! itself. Each test runs in a thread with its own network namespace (nothing on the host
//! changes): the kernel side of the tap is an `AF_PACKET` socket. Needs root (CAP_NET_ADMIN):
//! fails with a clear message otherwise.

use devices::bus::BusDevice;
use net::{AnnounceParams, MacAddr, Tap, TapOptions};
use std::io;
use std::time::{Duration, Instant};
use virtio::device::status;
use virtio::mmio::reg;
use virtio::net::feature;
use virtio::{GuestMemoryMmap, MmioTransport, Net, NetConfig};
use vm_memory::{Bytes, GuestAddress};
use vmstate::Stateful;

const RAM: u64 = 4 << 20;
const Q: u16 = 16;
const HDR: usize = 12;
const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
/// (desc, avail, used) per queue.
const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x2000, 0x3000), (0x4000, 0x5000, 0x6000)];
const RX_BUFS: u64 = 0x10000;
const TX_BUFS: u64 = 0x80000;

fn require_root() {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CAP_NET_ADMIN) for a network namespace and a tap device");
    }
}

fn in_netns(f: impl FnOnce() + Send + 'static) {
    require_root();
    std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", io::Error::last_os_error());
        // No IPv6 chatter (router solicitations, MLD) from the kernel side: only our frames.
        for k in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{k}/disable_ipv6"), "1");
        }
        f()
    })
    .join()
    .unwrap();
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Brings the interface up; returns an `AF_PACKET` socket bound to it (non-blocking).
fn kernel_side(ifname: &str) -> i32 {
    // SAFETY: plain socket calls with zeroed, correctly sized structures.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, b) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
            *d = b as libc::c_char;
        }
        assert!(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) >= 0);
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        assert!(libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req) >= 0);
        assert!(libc::ioctl(s, libc::SIOCGIFINDEX, &mut req) >= 0);
        let idx = req.ifr_ifru.ifru_ifindex;
        libc::close(s);
        let p = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, (libc::ETH_P_ALL as u16).to_be() as i32);
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sa.sll_ifindex = idx;
        assert!(libc::bind(p, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32) >= 0);
        p
    }
}

fn send(sock: i32, frame: &[u8]) {
    // SAFETY: sends frame.len() bytes from frame.
    let n = unsafe { libc::send(sock, frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(n as usize, frame.len(), "send: {}", io::Error::last_os_error());
}

/// Frames seen on the socket with EtherType `ty` (waits up to `d`).
fn recv_type(sock: i32, ty: [u8; 2], d: Duration) -> Vec<Vec<u8>> {
    let end = Instant::now() + d;
    let mut out = Vec::new();
    let mut b = vec![0u8; 70000];
    while Instant::now() < end {
        // SAFETY: receives into b.
        let n = unsafe { libc::recv(sock, b.as_mut_ptr().cast(), b.len(), 0) };
        if n < 0 {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let f = &b[..n as usize];
        if f.len() >= 14 && f[12..14] == ty {
            out.push(f.to_vec());
        }
    }
    out
}

fn frame(len: usize, tag: u8) -> Vec<u8> {
    let mut f = MAC.bytes().to_vec();
    f.extend([0x02, 0, 0, 0, 0, 9, 0x88, 0xb5]);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_add(tag)));
    f
}

struct Drv {
    mem: GuestMemoryMmap,
    dev: MmioTransport<Net>,
    avail: [u16; 2],
    used_seen: [u16; 2],
}

impl Drv {
    fn new(ifname: &str, want: u64) -> Drv {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let tap = Tap::open(&TapOptions { ifname: ifname.into(), ..Default::default() }).expect("tap");
        let net = Net::new(tap, NetConfig::new(MAC)).expect("net device");
        let dev = MmioTransport::new(0, net, mem.clone()).unwrap();
        let mut d = Drv { mem, dev, avail: [0; 2], used_seen: [0; 2] };
        d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        d.w(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.r(reg::DEVICE_ID), 1);
        d.w(reg::DRIVER_FEATURES_SEL, 0);
        d.w(reg::DRIVER_FEATURES, want as u32);
        d.w(reg::DRIVER_FEATURES_SEL, 1);
        d.w(reg::DRIVER_FEATURES, (want >> 32) as u32);
        d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(d.r(reg::STATUS) & status::FEATURES_OK, 0);
        for (q, &(desc, avail, used)) in RINGS.iter().enumerate() {
            d.w(reg::QUEUE_SEL, q as u32);
            d.w(reg::QUEUE_NUM, Q as u32);
            d.w(reg::QUEUE_DESC_LOW, desc as u32);
            d.w(reg::QUEUE_DRIVER_LOW, avail as u32);
            d.w(reg::QUEUE_DEVICE_LOW, used as u32);
            d.w(reg::QUEUE_READY, 1);
        }
        d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert_ne!(d.r(reg::STATUS) & status::DRIVER_OK, 0);
        d
    }
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.dev.write(off, &v.to_le_bytes());
    }
    /// Queues a one-descriptor buffer `i` on queue `q`.
    fn post(&mut self, q: usize, i: u16, addr: u64, len: u32, write: bool) {
        let (desc, avail, _) = RINGS[q];
        let a = desc + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(a)).unwrap();
        self.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(if write { 2u16 } else { 0 }, GuestAddress(a + 12)).unwrap();
        let slot = avail + 4 + 2 * u64::from(self.avail[q] % Q);
        self.mem.write_obj(i, GuestAddress(slot)).unwrap();
        self.avail[q] = self.avail[q].wrapping_add(1);
        self.mem.write_obj(self.avail[q], GuestAddress(avail + 2)).unwrap();
    }
    fn kick(&mut self, q: u32) {
        self.w(reg::QUEUE_NOTIFY, q);
    }
    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(GuestAddress(RINGS[q].2 + 2)).unwrap()
    }
    /// Used entries (id, len) of queue q beyond those seen.
    fn take_used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        while self.used_seen[q] != self.used_idx(q) {
            let e = RINGS[q].2 + 4 + 8 * u64::from(self.used_seen[q] % Q);
            out.push((self.mem.read_obj(GuestAddress(e)).unwrap(), self.mem.read_obj(GuestAddress(e + 4)).unwrap()));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

const BASIC: u64 = 1 << 32 | feature::MAC | feature::STATUS;

#[test]
fn config_space_holds_mac_and_link_up() {
    in_netns(|| {
        let mut d = Drv::new("gwcfg0", BASIC);
        let mut cfg = [0u8; 8];
        d.dev.read(reg::CONFIG, &mut cfg);
        assert_eq!(&cfg[..6], &MAC.bytes());
        assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1, "link up");
    });
}

#[test]
fn receive_transmit_and_mergeable_buffers() {
    in_netns(|| {
        let mut d = Drv::new("gwrx0", BASIC | feature::MRG_RXBUF);
        let sock = kernel_side("gwrx0");
        // Mergeable: a 1500-byte frame over 1024-byte buffers takes two of them.
        for i in 0..4u16 {
            d.post(0, i, RX_BUFS + u64::from(i) * 0x1000, 1024, true);
        }
        d.kick(0);
        let f = frame(1500, 7);
        send(sock, &f);
        wait("two receive buffers used", || d.used_idx(0) == 2);
        let used = d.take_used(0);
        assert_eq!(used, vec![(0, 1024), (1, (HDR + 1500 - 1024) as u32)]);
        let mut got = d.read(RX_BUFS, 1024);
        got.extend(d.read(RX_BUFS + 0x1000, HDR + 1500 - 1024));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
        assert_eq!(&got[HDR..], &f[..]);

        // Transmit: header + frame in one descriptor reaches the kernel side.
        let out = {
            let mut o = vec![0x02, 0, 0, 0, 0, 9];
            o.extend(MAC.bytes());
            o.extend([0x88, 0xb6]);
            o.extend([0x5a; 100]);
            o
        };
        let mut buf = vec![0u8; HDR];
        buf.extend(&out);
        d.mem.write_slice(&buf, GuestAddress(TX_BUFS)).unwrap();
        d.post(1, 0, TX_BUFS, buf.len() as u32, false);
        d.kick(1);
        let seen = recv_type(sock, [0x88, 0xb6], Duration::from_millis(500));
        assert_eq!(seen, vec![out]);
        assert_eq!(d.take_used(1), vec![(0, 0)]);
        let c = d.dev.device().counters();
        assert_eq!((c.rx_frames, c.tx_frames), (1, 1));
    });
}

#[test]
fn frames_wait_for_buffers_and_for_resume() {
    in_netns(|| {
        let mut d = Drv::new("gwpause0", BASIC);
        let sock = kernel_side("gwpause0");
        // No buffers yet: the frame waits in the device / tap, nothing is lost.
        send(sock, &frame(200, 1));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(d.used_idx(0), 0);
        d.post(0, 0, RX_BUFS, 2048, true);
        d.kick(0);
        wait("the waiting frame", || d.used_idx(0) == 1);
        assert_eq!(d.take_used(0), vec![(0, (HDR + 200) as u32)]);
        // Paused: no guest memory is written, however long we wait.
        d.dev.pause().unwrap();
        d.post(0, 1, RX_BUFS + 0x1000, 2048, true);
        d.kick(0);
        send(sock, &frame(300, 2));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(d.used_idx(0), 1, "a paused device delivered a frame");
        let dirty_before = d.read(RX_BUFS + 0x1000, 16);
        assert_eq!(dirty_before, vec![0; 16]);
        d.dev.resume();
        wait("delivery after resume", || d.used_idx(0) == 2);
        assert_eq!(d.read(RX_BUFS + 0x1000 + HDR as u64, 300), frame(300, 2));
    });
}

#[test]
fn announcements_follow_the_schedule() {
    in_netns(|| {
        let d = Drv::new("gwann0", BASIC);
        let sock = kernel_side("gwann0");
        let t0 = Instant::now();
        d.dev.device().announce(AnnounceParams { rounds: 3, initial_ms: 20, max_ms: 100, step_ms: 30 });
        let seen = recv_type(sock, [0x80, 0x35], Duration::from_millis(400));
        assert_eq!(seen.len(), 3, "three RARP frames");
        assert!(t0.elapsed() >= Duration::from_millis(70));
        assert!(seen.iter().all(|f| f[..60] == net::rarp_frame(MAC)[..]));
        assert_eq!(d.dev.device().counters().announces, 3);
        // Zero rounds: nothing.
        d.dev.device().announce(AnnounceParams { rounds: 0, ..Default::default() });
        assert!(recv_type(sock, [0x80, 0x35], Duration::from_millis(100)).is_empty());
    });
}

#[test]
fn state_round_trip_and_mac_mismatch() {
    in_netns(|| {
        let mut d = Drv::new("gwst0", BASIC | feature::MRG_RXBUF);
        d.post(0, 0, RX_BUFS, 2048, true);
        d.dev.pause().unwrap();
        let s = d.dev.save_state().unwrap();
        assert_eq!(s.id, "dev.virtio-net0");
        // A destination with the same MAC takes it and serves the ring it describes.
        let mem = d.mem.clone();
        let tap = Tap::open(&TapOptions { ifname: "gwst1".into(), ..Default::default() }).unwrap();
        let mut dst = MmioTransport::new(0, Net::new(tap, NetConfig::new(MAC)).unwrap(), mem.clone()).unwrap();
        dst.restore_state(&s).unwrap();
        assert!(dst.is_activated());
        assert_eq!(dst.acked_features() & feature::MRG_RXBUF, feature::MRG_RXBUF);
        let sock = kernel_side("gwst1");
        send(sock, &frame(100, 3));
        wait("delivery on the destination", || d.used_idx(0) == 1);
        // Another MAC: refused, nothing changes.
        let tap = Tap::open(&TapOptions { ifname: "gwst2".into(), ..Default::default() }).unwrap();
        let other = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let mut bad = MmioTransport::new(0, Net::new(tap, NetConfig::new(other)).unwrap(), mem).unwrap();
        let e = bad.restore_state(&s).unwrap_err().to_string();
        assert!(e.contains("configuration differs"), "{e}");
        assert!(!bad.is_activated());
    });
}

#[test]
fn malformed_chains_never_break_the_device() {
    in_netns(|| {
        let mut d = Drv::new("gwbad0", BASIC);
        let sock = kernel_side("gwbad0");
        // Transmit: outside RAM, write-only, shorter than a header: dropped, still returned.
        d.post(1, 0, RAM + 0x1000, 100, false);
        d.post(1, 1, TX_BUFS, 100, true);
        d.post(1, 2, TX_BUFS, 4, false);
        d.kick(1);
        wait("bad transmit chains returned", || d.used_idx(1) == 3);
        assert_eq!(d.dev.device().counters().tx_dropped, 3);
        // Receive buffer outside guest RAM: the frame is dropped; the device keeps working.
        d.post(0, 0, RAM - 8, 2048, true);
        d.kick(0);
        send(sock, &frame(100, 4));
        wait("the bad receive buffer returned", || d.used_idx(0) == 1);
        d.post(0, 1, RX_BUFS, 2048, true);
        d.kick(0);
        send(sock, &frame(100, 5));
        wait("a good delivery", || d.used_idx(0) == 2);
        assert_eq!(d.read(RX_BUFS + HDR as u64, 100), frame(100, 5));
    });
}
