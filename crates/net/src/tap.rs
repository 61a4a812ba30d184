//! A Linux tap device for one virtio-net NIC.
//!
//! Opened through `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a vnet header
//! size of [`VNET_HDR_LEN`] (12 bytes: the virtio 1.x `virtio_net_hdr_v1`, `num_buffers`
//! included), `O_NONBLOCK` and close-on-exec. So every frame read from or written to the tap is
//! preceded by exactly the header a virtio 1.x driver uses, and the device copies bytes without
//! converting them. An existing (e.g. persistent, `ip tuntap add`) tap is attached to; a missing
//! one is created (needs `CAP_NET_ADMIN`) and disappears when the VMM exits.
//!
//! A tap someone else opened (`-netdev tap,fd=N`, how libvirt hands one over) is taken as it
//! is: it must be a tap (`TUNGETIFF` says `IFF_TAP`) opened with `IFF_VNET_HDR` (which cannot
//! be added afterwards); Godwit then sets the header size, `O_NONBLOCK` and close-on-exec on
//! it, and closes it at exit. The interface is not created or removed by Godwit.
//!
//! `script=`/`downscript=` run a program with the interface name as its only argument after
//! the tap is open / when it is closed, as QEMU does. Godwit's default is no script (QEMU's is
//! `/etc/qemu-ifup`).

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// Bytes of virtio-net header in front of each frame on the tap.
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

const TUN_PATH: &str = "/dev/net/tun";
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
// _IOW('T', n, int) / _IOR('T', n, unsigned int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;

/// Offload flags for [`Tap::set_offload`] (`TUN_F_*`).
pub mod offload {
    /// The VMM side accepts frames with a partial checksum.
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
}

/// Why a tap could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap '{0}': interface name is empty or longer than {MAX_IFNAME} bytes")]
    BadName(String),
    #[error("tap '{ifname}': permission denied opening {TUN_PATH} or attaching the interface ({source}); \
             run as root / with CAP_NET_ADMIN, or give the user a persistent tap: ip tuntap add {ifname} mode tap user USER")]
    Permission {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("tap '{ifname}': it is already in use by another process ({source})")]
    Busy {
        ifname: String,
        #[source]
        source: io::Error,
    },
    #[error("tap '{ifname}': {what}: {source}")]
    Io {
        ifname: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("tap fd={fd}: {reason}")]
    BadFd { fd: RawFd, reason: String },
    #[error("tap '{ifname}': script {path}: {reason}")]
    Script { ifname: String, path: PathBuf, reason: String },
}

/// What to open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapOptions {
    /// Interface name; empty lets the kernel pick (`tapN`).
    pub ifname: String,
    /// Run after opening, with the interface name (`script=PATH`; `None` = `script=no`).
    pub script: Option<PathBuf>,
    /// Run when the tap is closed (`downscript=PATH`).
    pub downscript: Option<PathBuf>,
    /// An open tap descriptor inherited from the parent (`fd=N`) instead of a name.
    pub fd: Option<RawFd>,
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    ifname: String,
    downscript: Option<PathBuf>,
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

fn classify(ifname: &str, what: &'static str, e: io::Error) -> TapError {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { ifname: ifname.to_string(), source: e },
        Some(libc::EBUSY) => TapError::Busy { ifname: ifname.to_string(), source: e },
        _ => TapError::Io { ifname: ifname.to_string(), what, source: e },
    }
}

fn run_script(ifname: &str, path: &PathBuf) -> Result<(), TapError> {
    let err = |reason: String| TapError::Script { ifname: ifname.to_string(), path: path.clone(), reason };
    let st = std::process::Command::new(path).arg(ifname).status().map_err(|e| err(e.to_string()))?;
    if !st.success() {
        return Err(err(format!("failed with {st}")));
    }
    Ok(())
}

impl Tap {
    /// Opens (or creates) the tap, sets the vnet header size, runs the up script; or takes
    /// over the inherited descriptor `opts.fd` (see [`Tap::from_fd`]).
    pub fn open(opts: &TapOptions) -> Result<Tap, TapError> {
        if let Some(fd) = opts.fd {
            return Tap::from_fd(fd);
        }
        let name = opts.ifname.as_str();
        if name.len() > MAX_IFNAME || name.contains(['/', ' ', '\0']) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| classify(name, "opening /dev/net/tun", e))?;
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes), which `req` is.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(classify(name, "TUNSETIFF", io::Error::last_os_error()));
        }
        let ifname = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_else(|_| name.to_string());
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
        if r < 0 {
            return Err(classify(&ifname, "TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        let mut tap = Tap { file, ifname, downscript: None };
        tap.set_offload(0)?;
        if let Some(s) = &opts.script {
            run_script(&tap.ifname, s)?;
        }
        tap.downscript = opts.downscript.clone();
        Ok(tap)
    }

    /// Takes over `fd`, a tap opened (and attached) by the parent process. It is checked
    /// before it is owned: on an error the descriptor is left open and untouched.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let bad = |reason: String| TapError::BadFd { fd, reason };
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad("not an open descriptor (was it passed to this process?)".into()));
        }
        let mut req = IfReq { name: [0; 16], flags: 0, _pad: [0; 22] };
        // SAFETY: TUNGETIFF writes a `struct ifreq` (40 bytes), which `req` is.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req as *mut IfReq) } < 0 {
            return Err(bad(format!("not a tap device ({})", io::Error::last_os_error())));
        }
        let ifname = CStr::from_bytes_until_nul(&req.name).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        if req.flags & IFF_TAP == 0 {
            return Err(bad(format!("'{ifname}' is a tun (layer 3) device, not a tap")));
        }
        if req.flags & IFF_NO_PI == 0 || req.flags & IFF_VNET_HDR == 0 {
            return Err(bad(format!(
                "tap '{ifname}' was opened without IFF_NO_PI and IFF_VNET_HDR, which Godwit's virtio-net needs"
            )));
        }
        // SAFETY: plain flag changes on a descriptor checked above.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 || libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
                return Err(classify(&ifname, "fcntl", io::Error::last_os_error()));
            }
        }
        let hdr_len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) } < 0 {
            return Err(classify(&ifname, "TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        // SAFETY: the descriptor is open, a tap, and from here on only this Tap uses it (the
        // command line handed it to Godwit for exactly this).
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let tap = Tap { file, ifname, downscript: None };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name (as the kernel gave it).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Which offloads the tap may hand us (`offload::*`; 0 = full frames with full checksums).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if r < 0 {
            return Err(classify(&self.ifname, "TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads one frame (vnet header included); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (vnet header included).
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: reads frame.len() bytes from frame.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (vnet header included) given as `header` then `body`.
    pub fn write_with_header(&self, header: &[u8; VNET_HDR_LEN], body: &[u8]) -> io::Result<usize> {
        let iov = [
            libc::iovec { iov_base: header.as_ptr() as *mut _, iov_len: header.len() },
            libc::iovec { iov_base: body.as_ptr() as *mut _, iov_len: body.len() },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Some(s) = self.downscript.take() {
            if let Err(e) = run_script(&self.ifname, &s) {
                eprintln!("godwit: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inherited_fd_must_be_an_open_tap_and_is_left_alone_otherwise() {
        let e = Tap::from_fd(1_000_000).unwrap_err().to_string();
        assert!(e.contains("fd=1000000") && e.contains("not an open descriptor"), "{e}");
        let f = File::open("/dev/null").unwrap();
        let e = Tap::from_fd(f.as_raw_fd()).unwrap_err().to_string();
        assert!(e.contains("not a tap device"), "{e}");
        // Still open: the failed take-over did not close it.
        // SAFETY: F_GETFD only reads the flags.
        assert!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) } >= 0);
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for n in ["a-name-that-is-too-long", "a/b", "a b"] {
            assert!(matches!(Tap::open(&TapOptions { ifname: n.into(), ..Default::default() }), Err(TapError::BadName(_))));
        }
    }

    #[test]
    fn permission_error_is_classified() {
        let e = classify("tap0", "TUNSETIFF", io::Error::from_raw_os_error(libc::EPERM));
        assert!(matches!(e, TapError::Permission { .. }));
        assert!(e.to_string().contains("permission denied"), "{e}");
        assert!(matches!(classify("t", "x", io::Error::from_raw_os_error(libc::EBUSY)), TapError::Busy { .. }));
    }
}
