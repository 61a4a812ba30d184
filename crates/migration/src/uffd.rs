//! A small, safe wrapper over Linux userfaultfd for post-copy: register guest RAM in MISSING
//! mode, read page-fault events, and resolve them with `UFFDIO_COPY` / `UFFDIO_ZEROPAGE`.
//!
//! The descriptor comes from the `userfaultfd(2)` system call or, where that is refused, from
//! `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`). Faults raised in kernel mode — KVM reading guest
//! page tables, a `copy_from_user` in KVM's instruction emulator — are only delivered without
//! `UFFD_USER_MODE_ONLY`, which an unprivileged process may not drop while
//! `vm.unprivileged_userfaultfd` is 0: post-copy then needs root (or CAP_SYS_PTRACE) or access
//! to `/dev/userfaultfd`.
//!
//! The ioctl numbers and structure layouts are the kernel's UAPI (`linux/userfaultfd.h`),
//! written out here for x86-64.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

pub const PAGE: u64 = 4096;

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3F, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// Errors of the userfaultfd layer.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd is not available here (system call: {syscall}; /dev/userfaultfd: {dev})")]
    Unavailable { syscall: std::io::Error, dev: std::io::Error },
    #[error("userfaultfd {op} failed: {source}")]
    Op { op: &'static str, source: std::io::Error },
    #[error("userfaultfd: {0}")]
    Unsupported(String),
}

fn op(op: &'static str) -> impl FnOnce(std::io::Error) -> UffdError {
    move |source| UffdError::Op { op, source }
}

/// One page fault reported by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Faulting host address (not page aligned).
    pub addr: u64,
    pub write: bool,
    /// Thread id of the faulting thread.
    pub tid: u32,
}

/// What a resolve call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// The page was installed (and waiters woken).
    Installed,
    /// The page was already there (another resolver won the race); waiters were woken.
    AlreadyPresent,
}

/// A userfaultfd descriptor (non-blocking, close-on-exec).
pub struct Uffd {
    fd: OwnedFd,
}

fn ioctl(fd: RawFd, req: u64, arg: *mut libc::c_void) -> std::io::Result<()> {
    // SAFETY: `arg` points to the structure `req` expects, owned by the caller for the call.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd that also sees kernel-mode faults, with the API handshake done.
    pub fn new() -> Result<Uffd, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: plain system call; a non-negative result is a new descriptor we own.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if r >= 0 {
            // SAFETY: r is a fresh descriptor.
            unsafe { OwnedFd::from_raw_fd(r as RawFd) }
        } else {
            let syscall = std::io::Error::last_os_error();
            let dev = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
                Ok(f) => f,
                Err(dev) => return Err(UffdError::Unavailable { syscall, dev }),
            };
            // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags by value.
            let r = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::c_ulong, flags) };
            if r < 0 {
                return Err(UffdError::Unavailable { syscall, dev: std::io::Error::last_os_error() });
            }
            // SAFETY: r is a fresh descriptor.
            unsafe { OwnedFd::from_raw_fd(r) }
        };
        let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_THREAD_ID, ioctls: 0 };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut _ as *mut _).map_err(op("UFFDIO_API"))?;
        Ok(Uffd { fd })
    }

    /// Registers `[addr, addr+len)` (page aligned) in MISSING mode: every access to a page not
    /// present there stops the accessing thread until the page is resolved.
    pub fn register_missing(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister { range: UffdioRange { start: addr, len }, mode: UFFDIO_REGISTER_MODE_MISSING, ioctls: 0 };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg as *mut _ as *mut _).map_err(op("UFFDIO_REGISTER"))?;
        if reg.ioctls & (1 << 0x03) == 0 {
            return Err(UffdError::Unsupported("UFFDIO_COPY is not offered for this range".into()));
        }
        Ok(())
    }

    /// Ends the registration (faults are then ordinary again: missing pages read as zero).
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start: addr, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r as *mut _ as *mut _).map_err(op("UFFDIO_UNREGISTER"))
    }

    /// Wakes threads waiting on `[addr, addr+len)`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), UffdError> {
        let mut r = UffdioRange { start: addr, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r as *mut _ as *mut _).map_err(op("UFFDIO_WAKE"))
    }

    /// Atomically installs `src` (a whole number of pages) at page-aligned `dst`.
    pub fn copy(&self, dst: u64, src: &[u8]) -> Result<Resolved, UffdError> {
        if dst % PAGE != 0 || src.is_empty() || src.len() as u64 % PAGE != 0 {
            return Err(UffdError::Unsupported(format!("unaligned copy of {} bytes to {dst:#x}", src.len())));
        }
        let mut c = UffdioCopy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        match ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c as *mut _ as *mut _) {
            Ok(()) => Ok(Resolved::Installed),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // Part of the range was present: install page by page what is still missing.
                if src.len() as u64 > PAGE {
                    for (i, p) in src.chunks(PAGE as usize).enumerate() {
                        self.copy(dst + i as u64 * PAGE, p)?;
                    }
                } else {
                    self.wake(dst, PAGE)?;
                }
                Ok(Resolved::AlreadyPresent)
            }
            Err(e) => Err(UffdError::Op { op: "UFFDIO_COPY", source: e }),
        }
    }

    /// Installs zero pages over `[dst, dst+len)`.
    pub fn zero(&self, dst: u64, len: u64) -> Result<Resolved, UffdError> {
        let mut z = UffdioZeropage { range: UffdioRange { start: dst, len }, mode: 0, zeropage: 0 };
        match ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z as *mut _ as *mut _) {
            Ok(()) => Ok(Resolved::Installed),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if len > PAGE {
                    for i in 0..len / PAGE {
                        self.zero(dst + i * PAGE, PAGE)?;
                    }
                } else {
                    self.wake(dst, PAGE)?;
                }
                Ok(Resolved::AlreadyPresent)
            }
            Err(e) => Err(UffdError::Op { op: "UFFDIO_ZEROPAGE", source: e }),
        }
    }

    /// Waits up to `timeout` for the next page fault. Other events are skipped.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UffdError> {
        let mut p = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(UffdError::Op { op: "poll", source: e });
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = [0u8; 32];
        // SAFETY: reading one uffd_msg (32 bytes) into our buffer.
        let r = unsafe { libc::read(self.fd.as_raw_fd(), msg.as_mut_ptr() as *mut libc::c_void, msg.len()) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(UffdError::Op { op: "read", source: e });
        }
        if r != 32 || msg[0] != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        let word = |o: usize| u64::from_le_bytes(msg[o..o + 8].try_into().unwrap_or([0; 8]));
        let flags = word(8);
        Ok(Some(Fault {
            addr: word(16),
            write: flags & UFFD_PAGEFAULT_FLAG_WRITE != 0,
            tid: u32::from_le_bytes(msg[24..28].try_into().unwrap_or([0; 4])),
        }))
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_uapi() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    }

    /// A thread touching registered memory waits until the handler copies the page in.
    #[test]
    fn faults_are_served_by_copy() {
        let uffd = match Uffd::new() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let len = 16 * PAGE as usize;
        // SAFETY: a fresh private anonymous mapping we unmap below.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        } as u64;
        uffd.register_missing(base, len as u64).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping; the read blocks until the page is resolved.
            let a = unsafe { std::ptr::read_volatile((base + 3 * PAGE + 8) as *const u64) };
            // SAFETY: as above.
            let b = unsafe { std::ptr::read_volatile((base + 5 * PAGE) as *const u64) };
            (a, b)
        });
        let mut src = vec![0u8; PAGE as usize];
        src[8..16].copy_from_slice(&0x1122_3344u64.to_le_bytes());
        let mut served = 0;
        while served < 2 {
            if let Some(f) = uffd.next_fault(Duration::from_secs(5)).unwrap() {
                let page = f.addr & !(PAGE - 1);
                assert!(f.tid != 0);
                if page == base + 3 * PAGE {
                    assert_eq!(uffd.copy(page, &src).unwrap(), Resolved::Installed);
                } else {
                    assert_eq!(page, base + 5 * PAGE);
                    uffd.zero(page, PAGE).unwrap();
                }
                served += 1;
            } else {
                panic!("no fault reported");
            }
        }
        assert_eq!(reader.join().unwrap(), (0x1122_3344, 0));
        assert_eq!(uffd.copy(base + 3 * PAGE, &src).unwrap(), Resolved::AlreadyPresent);
        uffd.unregister(base, len as u64).unwrap();
        // SAFETY: our mapping.
        unsafe { libc::munmap(base as *mut libc::c_void, len) };
    }
}
