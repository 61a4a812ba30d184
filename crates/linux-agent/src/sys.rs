//! The few system calls the agent needs beyond std: clocks, mount/umount, filesystem freeze,
//! block device size, power-off, and reaping children when it is PID 1.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Milliseconds on `clock` (CLOCK_MONOTONIC, CLOCK_REALTIME, CLOCK_BOOTTIME).
pub fn clock_ms(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1000).wrapping_add(ts.tv_nsec as u64 / 1_000_000)
}

pub fn mono_ms() -> u64 {
    clock_ms(libc::CLOCK_MONOTONIC)
}

/// Paces a writer to `rate` MiB/s: `done` bytes since `t0` (monotonic ms). A writer more than
/// 100 ms behind its schedule (a pause, a migration, a stopped VM) starts a new schedule rather
/// than catching up in a burst. Rate 0 means as fast as it can.
pub struct Pacer {
    t0: u64,
    done: u64,
}

impl Pacer {
    pub fn new() -> Pacer {
        Pacer { t0: mono_ms(), done: 0 }
    }

    /// Starts a new schedule from now.
    pub fn restart(&mut self) {
        *self = Pacer::new();
    }

    /// Counts `bytes` written, then sleeps until they are due at `rate` MiB/s.
    pub fn wrote(&mut self, bytes: u64, rate: u64) {
        self.done += bytes;
        if rate == 0 {
            return;
        }
        let due = self.t0 + self.done * 1000 / (rate * 1024 * 1024);
        let now = mono_ms();
        if due > now {
            std::thread::sleep(std::time::Duration::from_millis(due - now));
        } else if now - due > 100 {
            (self.t0, self.done) = (now, 0);
        }
    }
}

pub fn real_ms() -> u64 {
    clock_ms(libc::CLOCK_REALTIME)
}

/// A non-zero number that differs between runs (the clocks, the pid, an address).
pub fn nonce() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    let local = 0u8;
    let n = crate::pattern::mix(
        (ts.tv_sec as u64) << 30 ^ ts.tv_nsec as u64 ^ (std::process::id() as u64) << 48 ^ (&local as *const u8 as u64),
    );
    n | 1
}

pub fn is_pid1() -> bool {
    std::process::id() == 1
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn mount(dev: &Path, dir: &Path, fstype: &str) -> io::Result<()> {
    let (d, m) = (cstr(dev)?, cstr(dir)?);
    let t = CString::new(fstype).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings; no data argument.
    check(unsafe { libc::mount(d.as_ptr(), m.as_ptr(), t.as_ptr(), libc::MS_NOATIME, std::ptr::null()) })
}

pub fn umount(dir: &Path) -> io::Result<()> {
    let m = cstr(dir)?;
    // SAFETY: valid C string.
    check(unsafe { libc::umount2(m.as_ptr(), 0) })
}

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Freezes (`true`) or thaws the filesystem mounted at `dir`: frozen, it has written its
/// journal and metadata out and takes no more writes, so an image of it checks clean.
pub fn freeze(dir: &Path, on: bool) -> io::Result<()> {
    let f = File::open(dir)?;
    let arg: libc::c_int = 0;
    // SAFETY: the fd is open; both ioctls take an int argument.
    check(unsafe { libc::ioctl(f.as_raw_fd(), if on { FIFREEZE } else { FITHAW } as _, arg) })
}

/// Size in bytes of a block device or a regular file.
pub fn size_of(f: &File) -> io::Result<u64> {
    let md = f.metadata()?;
    use std::os::unix::fs::FileTypeExt;
    if md.file_type().is_block_device() {
        let mut n: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes a u64.
        check(unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut n as *mut u64) })?;
        Ok(n)
    } else {
        Ok(md.len())
    }
}

pub fn sync_all() {
    // SAFETY: no arguments.
    unsafe { libc::sync() };
}

/// When stdin is a terminal (the serial console), stops it echoing what it receives: an echo
/// would land in the middle of an output line (a heartbeat) and break it. Line editing
/// (ICANON) and CR → NL on input stay, so a terminal user can still type commands.
pub fn console_no_echo() -> bool {
    // SAFETY: plain calls on fd 0 with a valid termios out-pointer.
    unsafe {
        if libc::isatty(0) != 1 {
            return false;
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            return false;
        }
        t.c_lflag &= !(libc::ECHO | libc::ECHOE | libc::ECHOK | libc::ECHONL | libc::ECHOCTL);
        libc::tcsetattr(0, libc::TCSANOW, &t) == 0
    }
}

/// Powers the machine off (PID 1 only); returns only on failure.
pub fn power_off() -> io::Error {
    // SAFETY: reboot with a valid command; on success it does not return.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    io::Error::last_os_error()
}

/// As PID 1, every orphan becomes our child: reap them so they do not pile up as zombies.
pub fn spawn_reaper() {
    let _ = std::thread::Builder::new().name("reaper".into()).spawn(|| loop {
        let mut status = 0;
        // SAFETY: a valid out-pointer.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r < 0 {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    });
}

/// A zeroed buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: it owns its allocation.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Option<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).ok()?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(AlignedBuf { ptr, len: len.max(4096) })
    }

    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, std::alloc::Layout::from_size_align_unchecked(self.len, 4096)) };
    }
}
