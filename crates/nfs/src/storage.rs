//! [`NfsStorage`]: an image file on an NFS server, as the positional [`Storage`] the qcow2 and
//! raw images sit on.
//!
//! ## Failures: a hard mount with a deadline
//! Every operation that fails on something that can be transient (the connection dropped, the
//! server restarted, an RPC timed out, a stale handle, `EIO`) throws the libnfs context away,
//! waits (50 ms, doubling up to 1 s), connects, mounts and opens the file again — and retakes
//! the writer lock — and repeats the operation, like a `hard` NFS mount, until the URL's
//! `hard-timeout` has passed; then the operation fails and the drive's error policy
//! (`werror`/`rerror`) decides what the guest sees. Answers that retrying cannot change
//! (`ENOSPC`, `EDQUOT`, `EFBIG`, `EROFS`, `EACCES`, `EPERM`, `EINVAL`, `ENOENT`) fail at once.
//! Writes are positional, so repeating one after a reconnect is harmless.
//!
//! Each `NfsStorage` is its own NFSv4 client: a client name unique to the process and the
//! storage, and a new verifier on every connection, so that after a reconnect the server
//! treats the old session as that of a rebooted client and drops its open and lock state at
//! once instead of waiting for the lease to expire.
//!
//! ## One writer across hosts
//! A writer (see [`NfsOptions::lock`]) takes an NFSv4 byte-range write lock on byte
//! [`LOCK_BYTE`] of the image (far past any data, so it never covers guest I/O) right after
//! opening. Another client's attempt is refused by the server ([`Error::Locked`]); the lock
//! goes with the file's close, or with the lease when a client dies without closing. The lock
//! lives on an NFSv4 connection of its own (a second client name), whatever version the data
//! goes over: libnfs 4.0 cannot encode an NFSv4 WRITE of 4 KiB or more, so `version=4` data
//! moves in 3.5 KiB writes and the default NFSv3 (what QEMU's driver speaks) is much faster.
//!
//! Caching: none. libnfs's page cache and read-ahead stay off unless the URL asks for them,
//! so a migration destination that opens the image reads what the source last wrote.

use crate::error::{Error, Result};
use crate::ffi::{self, Lib, Nfs4Flock, NfsContext, NfsFh, NfsStat64};
use crate::url::NfsUrl;
use qcow2::storage::Storage;
use std::ffi::{c_void, CStr, CString};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The byte a writer locks (NFSv4 lock offsets are 64-bit; qcow2 data ends below 2^56).
pub const LOCK_BYTE: u64 = 1 << 62;
/// Longest wait for one RPC before it counts as failed (and the operation retries).
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest piece of one read or write call (libnfs splits further by the server's maximum).
const MAX_IO: u64 = 1 << 20;
/// Largest NFSv4 write libnfs 4.0 can encode (its v4 WRITE fails from about 3.9 KiB).
const V4_WRITE_CHUNK: u64 = 3584;

/// How an image on NFS is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct NfsOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Take the single-writer lock (NFSv4).
    pub lock: bool,
    /// Every write is stable on the server when it completes (`O_SYNC`: QEMU's
    /// `cache=writethrough`/`directsync`).
    pub sync_writes: bool,
}

/// What the storage has been through (for `info block` and the logs).
#[derive(Debug, Default)]
pub struct NfsCounters {
    /// Connections made (the first included).
    pub connects: AtomicU64,
    /// Operations that failed once and were retried.
    pub retries: AtomicU64,
    /// Operations that failed after retrying until the deadline.
    pub failures: AtomicU64,
}

/// A libnfs context with the image open in it.
struct Ctx {
    lib: &'static Lib,
    ctx: *mut NfsContext,
    fh: *mut NfsFh,
    /// Close the file (and so drop its lock) on drop; false once the connection failed.
    healthy: bool,
}

// SAFETY: a libnfs context is used by one thread at a time (the storage's mutex).
unsafe impl Send for Ctx {}

impl Ctx {
    fn error(&self) -> String {
        // SAFETY: ctx is live; the string is copied before the next call.
        let p = unsafe { (self.lib.get_error)(self.ctx) };
        if p.is_null() {
            return "unknown error".into();
        }
        // SAFETY: non-null, NUL-terminated.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if !self.healthy {
            // A failed sync call can leave its RPC queued with a callback pointing into the
            // stack frame of that call; nfs_destroy_context would run it and write into
            // whatever lives there now (seen: a crash after the server died). So a broken
            // context is never touched again: its socket is closed and the rest is leaked
            // (a few KiB per failed connection attempt).
            // SAFETY: reading the fd of a live context; closing it only affects that context.
            let fd = unsafe { (self.lib.get_fd)(self.ctx) };
            if fd >= 0 {
                // SAFETY: the fd belongs to this context, which is never used again.
                unsafe { libc::close(fd) };
            }
            return;
        }
        // SAFETY: fh belongs to ctx; both are released exactly once here.
        unsafe {
            if !self.fh.is_null() {
                (self.lib.close)(self.ctx, self.fh);
            }
            (self.lib.destroy_context)(self.ctx);
        }
    }
}

/// One connection: the data context and, for a locked writer, the NFSv4 context that holds
/// the lock (libnfs 4.0 writes only a few KiB per NFSv4 call, so the data may go over v3).
struct Conn {
    data: Ctx,
    lock: Option<Ctx>,
    /// Largest write per call.
    write_chunk: u64,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // NFSv4 refuses to CLOSE a file with locks held (NFS4ERR_LOCKS_HELD): unlock first.
        if let Some(l) = self.lock.as_mut().filter(|l| l.healthy) {
            let mut fl = lock_range(libc::F_UNLCK);
            // SAFETY: live context and handle; fl is ours for the call.
            let r = unsafe { (l.lib.fcntl)(l.ctx, l.fh, ffi::NFS4_F_SETLK, &mut fl as *mut Nfs4Flock as *mut c_void) };
            if r != 0 {
                tracing::warn!("releasing the NFS image lock: {}", l.error());
            }
        }
    }
}

/// The writer lock's range, as `kind` (`F_WRLCK` / `F_UNLCK`).
fn lock_range(kind: libc::c_int) -> Nfs4Flock {
    Nfs4Flock { l_type: kind, l_whence: libc::SEEK_SET, l_pid: std::process::id(), l_start: LOCK_BYTE, l_len: 1 }
}

impl Conn {
    fn error(&self) -> String {
        self.data.error()
    }
    fn mark_broken(&mut self) {
        self.data.healthy = false;
        if let Some(l) = self.lock.as_mut() {
            l.healthy = false;
        }
    }
}

/// A libnfs failure: errno (positive) and message.
struct Fail(i32, String);

/// Answers a retry cannot change.
fn is_final(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG | libc::EROFS | libc::EACCES | libc::EPERM | libc::EINVAL | libc::ENOENT
    )
}

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(0);

/// An image file on an NFS server.
pub struct NfsStorage {
    url: NfsUrl,
    opts: NfsOptions,
    conn: Mutex<Option<Conn>>,
    client_name: CString,
    lock_name: CString,
    verifier: AtomicU64,
    counters: NfsCounters,
}

impl std::fmt::Debug for NfsStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NfsStorage").field("url", &self.url.original).field("opts", &self.opts).finish()
    }
}

fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most b.len() bytes into our buffer.
    let r = unsafe { libc::gethostname(b.as_mut_ptr() as *mut libc::c_char, b.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

impl NfsStorage {
    /// Connects and opens the image at `url` (which must exist).
    pub fn open(url: &NfsUrl, opts: NfsOptions) -> Result<NfsStorage> {
        ffi::lib().map_err(Error::NoLibnfs)?;
        let n = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
        let name = format!("godwit-{}-{}-{}", hostname(), std::process::id(), n);
        let s = NfsStorage {
            url: url.clone(),
            opts,
            conn: Mutex::new(None),
            client_name: CString::new(name.clone()).map_err(|_| Error::Url { url: url.original.clone(), why: "NUL".into() })?,
            lock_name: CString::new(name + "-lock").map_err(|_| Error::Url { url: url.original.clone(), why: "NUL".into() })?,
            verifier: AtomicU64::new(0),
            counters: NfsCounters::default(),
        };
        // The first connection fails at once: a wrong URL or a held lock is the user's to fix.
        let c = s.connect(false).map_err(|f| s.fail("opening", f))?;
        *s.lock_conn() = Some(c);
        Ok(s)
    }

    /// The URL.
    pub fn url(&self) -> &NfsUrl {
        &self.url
    }

    /// Connections, retries, failures so far.
    pub fn counters(&self) -> &NfsCounters {
        &self.counters
    }

    fn fail(&self, what: &'static str, f: Fail) -> Error {
        if f.0 == libc::EAGAIN && f.1.contains("lock") {
            return Error::Locked(self.url.original.clone());
        }
        Error::Nfs { what, url: self.url.original.clone(), msg: f.1, errno: f.0 }
    }

    fn lock_conn(&self) -> MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection: the data context, then (a locked writer) the lock context.
    fn connect(&self, reconnect: bool) -> std::result::Result<Conn, Fail> {
        let flags = if self.opts.read_only {
            libc::O_RDONLY
        } else if self.opts.sync_writes {
            libc::O_RDWR | libc::O_SYNC
        } else {
            libc::O_RDWR
        };
        let data = self.open_ctx(&self.url.for_libnfs, flags, &self.client_name)?;
        // libnfs 4.0 reports no maximum for NFSv4 and cannot encode a WRITE of 4 KiB or more.
        // SAFETY: live context.
        let wmax = unsafe { (data.lib.get_writemax)(data.ctx) };
        let write_chunk = if self.url.version >= 4 && wmax == 0 { V4_WRITE_CHUNK } else { wmax.clamp(4096, MAX_IO) };
        let lock = if self.opts.lock && !self.opts.read_only {
            let l = self.open_ctx(&self.url.lock_url(), libc::O_RDWR, &self.lock_name)?;
            let mut fl = lock_range(libc::F_WRLCK);
            // SAFETY: ctx and fh live; fl is ours for the call.
            let r = unsafe { (l.lib.fcntl)(l.ctx, l.fh, ffi::NFS4_F_SETLK, &mut fl as *mut Nfs4Flock as *mut c_void) };
            if r != 0 {
                let msg = l.error();
                if -r == libc::EAGAIN || -r == libc::EACCES || msg.contains("DENIED") {
                    return Err(Fail(libc::EAGAIN, format!("lock denied: {msg}")));
                }
                return Err(Fail(-r, format!("lock: {msg}")));
            }
            Some(l)
        } else {
            None
        };
        self.counters.connects.fetch_add(1, Ordering::Relaxed);
        if reconnect {
            tracing::warn!("{}: reconnected", self.url);
        }
        Ok(Conn { data, lock, write_chunk })
    }

    /// A context with the file of `url` open: mount, open.
    fn open_ctx(&self, url: &str, flags: i32, name: &CString) -> std::result::Result<Ctx, Fail> {
        let lib = ffi::lib().map_err(|e| Fail(libc::ENOSYS, e))?;
        // SAFETY: plain constructor; null on allocation failure.
        let ctx = unsafe { (lib.init_context)() };
        if ctx.is_null() {
            return Err(Fail(libc::ENOMEM, "nfs_init_context failed".into()));
        }
        let mut c = Ctx { lib, ctx, fh: std::ptr::null_mut(), healthy: false };
        let v = self.verifier.fetch_add(1, Ordering::Relaxed);
        // A verifier unique to this process and connection (libnfs copies 8 bytes).
        let ver = CString::new(format!("{:08x}", ((std::process::id() as u64) << 16 ^ v) & 0xffff_ffff))
            .map_err(|_| Fail(libc::EINVAL, "verifier".into()))?;
        let timeout = RPC_TIMEOUT.min(self.url.hard_timeout).as_secs().max(1) as i32 * 1000;
        let url = CString::new(url).map_err(|_| Fail(libc::EINVAL, "NUL in URL".into()))?;
        // SAFETY: ctx is live; the strings outlive the calls (libnfs copies them).
        unsafe {
            (lib.set_client_name)(ctx, name.as_ptr());
            (lib.set_verifier)(ctx, ver.as_ptr());
            (lib.set_autoreconnect)(ctx, 0);
            (lib.set_timeout)(ctx, timeout);
        }
        // SAFETY: as above; the parsed URL is freed below.
        let u = unsafe { (lib.parse_url_full)(ctx, url.as_ptr()) };
        if u.is_null() {
            return Err(Fail(libc::EINVAL, c.error()));
        }
        struct UrlGuard(&'static Lib, *mut ffi::NfsUrlC);
        impl Drop for UrlGuard {
            fn drop(&mut self) {
                // SAFETY: returned by nfs_parse_url_full, freed once.
                unsafe { (self.0.destroy_url)(self.1) }
            }
        }
        let _g = UrlGuard(lib, u);
        // SAFETY: u is a valid nfs_url whose strings libnfs allocated.
        let (server, path, file) = unsafe { ((*u).server, (*u).path, (*u).file) };
        if server.is_null() || path.is_null() || file.is_null() {
            return Err(Fail(libc::EINVAL, "libnfs could not split the URL into server, export and file".into()));
        }
        // SAFETY: ctx live, strings valid.
        let r = unsafe { (lib.mount)(ctx, server, path) };
        if r != 0 {
            return Err(Fail(-r, format!("mount: {}", c.error())));
        }
        let mut fh = std::ptr::null_mut();
        // SAFETY: ctx live, file valid, fh written on success.
        let r = unsafe { (lib.open)(ctx, file, flags, &mut fh) };
        if r != 0 || fh.is_null() {
            return Err(Fail(-r, format!("open: {}", c.error())));
        }
        c.fh = fh;
        c.healthy = true;
        Ok(c)
    }

    /// Runs `f` on a healthy connection, reconnecting and retrying transient failures until
    /// the hard timeout.
    fn run<T>(&self, what: &'static str, mut f: impl FnMut(&Conn) -> std::result::Result<T, Fail>) -> io::Result<T> {
        let deadline = Instant::now() + self.url.hard_timeout;
        let mut g = self.lock_conn();
        let mut delay = Duration::from_millis(50);
        let mut retried = false;
        loop {
            let attempt = match g.as_ref() {
                Some(c) => f(c),
                None => match self.connect(true) {
                    Ok(c) => {
                        let r = f(&c);
                        *g = Some(c);
                        r
                    }
                    Err(e) => Err(e),
                },
            };
            let e = match attempt {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if is_final(e.0) {
                return Err(self.fail(what, e).into());
            }
            // Drop the connection without a close: it is broken.
            if let Some(mut c) = g.take() {
                c.mark_broken();
            }
            if !retried {
                retried = true;
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{}: {what} failed ({}); retrying for up to {:?}", self.url, e.1, self.url.hard_timeout);
            }
            let now = Instant::now();
            if now >= deadline {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                let msg = format!("{} (gave up after {:?})", e.1, self.url.hard_timeout);
                return Err(self.fail(what, Fail(libc::EIO, msg)).into());
            }
            std::thread::sleep(delay.min(deadline - now));
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

impl Storage for NfsStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.run("reading", |c| {
            let mut done = 0usize;
            while done < buf.len() {
                let n = ((buf.len() - done) as u64).min(MAX_IO);
                let p = buf[done..].as_mut_ptr() as *mut c_void;
                // SAFETY: p points at n writable bytes of buf.
                let r = unsafe { (c.data.lib.pread)(c.data.ctx, c.data.fh, off + done as u64, n, p) };
                if r < 0 {
                    return Err(Fail(-r, c.error()));
                }
                if r == 0 {
                    buf[done..].fill(0);
                    break;
                }
                done += (r as usize).min(n as usize);
            }
            Ok(())
        })
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.opts.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        off.checked_add(buf.len() as u64).ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        self.run("writing", |c| {
            let mut done = 0usize;
            while done < buf.len() {
                let n = ((buf.len() - done) as u64).min(c.write_chunk);
                let p = buf[done..].as_ptr() as *const c_void;
                // SAFETY: p points at n readable bytes of buf.
                let r = unsafe { (c.data.lib.pwrite)(c.data.ctx, c.data.fh, off + done as u64, n, p) };
                if r < 0 {
                    return Err(Fail(-r, c.error()));
                }
                if r == 0 {
                    return Err(Fail(libc::EIO, "the server wrote nothing".into()));
                }
                done += (r as usize).min(n as usize);
            }
            Ok(())
        })
    }
    fn len(&self) -> io::Result<u64> {
        self.run("querying the size of", |c| {
            let mut st = NfsStat64::default();
            // SAFETY: st is ours.
            let r = unsafe { (c.data.lib.fstat64)(c.data.ctx, c.data.fh, &mut st) };
            if r < 0 {
                return Err(Fail(-r, c.error()));
            }
            Ok(st.size)
        })
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.opts.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.run("truncating", |c| {
            // SAFETY: live context and handle.
            let r = unsafe { (c.data.lib.ftruncate)(c.data.ctx, c.data.fh, len) };
            if r < 0 {
                return Err(Fail(-r, c.error()));
            }
            Ok(())
        })
    }
    fn sync(&self) -> io::Result<()> {
        if self.opts.read_only {
            return Ok(());
        }
        self.run("flushing", |c| {
            // SAFETY: live context and handle.
            let r = unsafe { (c.data.lib.fsync)(c.data.ctx, c.data.fh) };
            if r < 0 {
                return Err(Fail(-r, c.error()));
            }
            Ok(())
        })
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        // libnfs 4 has no DEALLOCATE: write zeros (the range then reads as zeros, as promised).
        let zeros = vec![0u8; len.min(MAX_IO) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_IO) as usize;
            self.write_at(&zeros[..n], off + done)?;
            done += n as u64;
        }
        Ok(())
    }
}
