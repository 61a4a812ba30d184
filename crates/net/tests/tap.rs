//! The tap backend against the real kernel: in a private network namespace (this test's thread
//! only, so nothing on the host changes), a tap is created and brought up; a frame sent from
//! the kernel side (an `AF_PACKET` socket on the interface) is read from the tap with its
//! 12-byte vnet header, and a frame written to the tap (header + announcement) arrives on the
//! socket. Needs root (CAP_NET_ADMIN): fails with a clear message otherwise.

use net::{rarp_frame, MacAddr, Tap, TapError, TapOptions, VNET_HDR_LEN};
use std::io;
use std::time::{Duration, Instant};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (CAP_NET_ADMIN) to create a network namespace and a tap device");
    }
}

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", io::Error::last_os_error());
}

/// Brings `ifname` up and returns its index.
fn up(ifname: &str) -> i32 {
    // SAFETY: plain socket/ioctl calls on a zeroed `ifreq` holding the name.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        check(s, "socket");
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, b) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
            *d = b as libc::c_char;
        }
        check(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req), "SIOCGIFFLAGS");
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        check(libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req), "SIOCSIFFLAGS");
        check(libc::ioctl(s, libc::SIOCGIFINDEX, &mut req), "SIOCGIFINDEX");
        libc::close(s);
        req.ifr_ifru.ifru_ifindex
    }
}

fn packet_socket(ifindex: i32) -> i32 {
    // SAFETY: socket + bind with a zeroed sockaddr_ll.
    unsafe {
        let s = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, (libc::ETH_P_ALL as u16).to_be() as i32);
        check(s, "AF_PACKET socket");
        let mut sa: libc::sockaddr_ll = std::mem::zeroed();
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sa.sll_ifindex = ifindex;
        check(libc::bind(s, &sa as *const _ as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_ll>() as u32), "bind");
        s
    }
}

fn wait_read(mut f: impl FnMut(&mut [u8]) -> io::Result<usize>, pred: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let end = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    loop {
        match f(&mut buf) {
            Ok(n) if pred(&buf[..n]) => return buf[..n].to_vec(),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("read: {e}"),
        }
        assert!(Instant::now() < end, "no matching frame within 5 s");
    }
}

#[test]
fn frames_cross_the_tap_with_a_vnet_header() {
    require_root();
    std::thread::spawn(|| {
        // SAFETY: unshare only affects this thread's network namespace.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) }, "unshare(CLONE_NEWNET)");
        let tap = Tap::open(&TapOptions { ifname: "gwtest0".into(), ..Default::default() }).expect("open tap");
        assert_eq!(tap.ifname(), "gwtest0");
        let idx = up("gwtest0");
        let sock = packet_socket(idx);

        // Kernel -> tap: a frame sent on the interface is read with a zeroed vnet header.
        let mut frame = vec![0xff; 6];
        frame.extend([0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        frame.extend(b"godwit tap test payload, long enough for a minimum frame");
        // SAFETY: sends frame.len() bytes from frame.
        let n = unsafe { libc::send(sock, frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n as usize, frame.len(), "send: {}", io::Error::last_os_error());
        let got = wait_read(|b| tap.read(b), |b| b.len() > VNET_HDR_LEN && b[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == [0x88, 0xb5]);
        assert_eq!(&got[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN], "header: no offloads were enabled");
        assert_eq!(&got[VNET_HDR_LEN..], &frame[..]);

        // Tap -> kernel: an announcement written with a header arrives on the interface.
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let rarp = rarp_frame(mac);
        assert_eq!(tap.write_with_header(&[0; VNET_HDR_LEN], &rarp).unwrap(), VNET_HDR_LEN + rarp.len());
        let seen = wait_read(
            // SAFETY: receives into b.
            |b| {
                let n = unsafe { libc::recv(sock, b.as_mut_ptr().cast(), b.len(), 0) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            },
            |b| b.len() >= 14 && b[12..14] == [0x80, 0x35],
        );
        assert_eq!(&seen[..60], &rarp[..]);
        // SAFETY: closing our own socket.
        unsafe { libc::close(sock) };

        // A second open of a tap in use is a clear "busy" error.
        match Tap::open(&TapOptions { ifname: "gwtest0".into(), ..Default::default() }) {
            Err(e @ TapError::Busy { .. }) => assert!(e.to_string().contains("already in use"), "{e}"),
            other => panic!("expected a busy error, got {other:?}"),
        }
    })
    .join()
    .unwrap();
}

#[test]
fn an_unprivileged_open_is_a_permission_error() {
    require_root();
    std::thread::spawn(|| {
        // Drop CAP_NET_ADMIN in this thread only (capset on the calling thread).
        #[repr(C)]
        struct Hdr {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let hdr = Hdr { version: 0x2008_0522, pid: 0 };
        let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
        // SAFETY: capset with a v3 header and two data words.
        check(unsafe { libc::syscall(libc::SYS_capset, &hdr, data.as_ptr()) } as i32, "capset");
        match Tap::open(&TapOptions { ifname: "gwnoperm0".into(), ..Default::default() }) {
            Err(e @ TapError::Permission { .. }) => {
                let m = e.to_string();
                assert!(m.contains("permission denied") && m.contains("gwnoperm0"), "{m}");
            }
            other => panic!("expected a permission error, got {other:?}"),
        }
    })
    .join()
    .unwrap();
}
