//! The disk interface the virtio-blk device drives, and an in-memory disk.
//!
//! The device uses the `qcow2` crate's [`BlockBackend`] (byte-addressed I/O within
//! `0..size()`), so its raw and qcow2 images plug in directly (`qcow2::open` returns one).
//! Backend errors are only logged; the guest gets `VIRTIO_BLK_S_IOERR`.
//!
//! [`MemDisk`] keeps the disk in a `Vec<u8>`: used by the tests and handy for a VMM test that
//! needs a disk without a file. [`MemDisk::with_parallel_io`] gives it a [`ParallelIo`] handle
//! whose calls take a chosen time each, so tests can have requests finish out of order.

pub use qcow2::{BlockBackend, Error as BackendError, ImageFormat, IoBuf, ParallelIo};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type BackendResult<T> = qcow2::Result<T>;

fn injected() -> BackendError {
    BackendError::Io { context: "using the in-memory disk", source: std::io::Error::other("injected failure") }
}

/// What a [`MemDisk`] has seen, for tests: how many flushes, discards and write-zeroes calls.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemDiskStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    /// Reads and writes done through the [`ParallelIo`] handle.
    pub parallel_reads: u64,
    pub parallel_writes: u64,
    /// Most [`ParallelIo`] calls seen running at once.
    pub max_concurrent: u64,
    /// Writes (both ways) completed when the last flush ran.
    pub writes_at_last_flush: u64,
}

#[derive(Debug, Default)]
struct MemDiskInner {
    data: Vec<u8>,
    stats: MemDiskStats,
    fail: bool,
    /// Reads and writes touching `[start, end)` fail.
    fail_range: Option<(u64, u64)>,
}

impl MemDiskInner {
    fn fails(&self, off: u64, len: u64) -> bool {
        self.fail || self.fail_range.is_some_and(|(s, e)| off < e && off.saturating_add(len) > s)
    }
}

/// How long each [`ParallelIo`] call of a [`MemDisk`] takes: `f(offset, write)`.
pub type IoDelay = fn(u64, bool) -> Duration;

/// A disk in host memory. Clones share the same bytes (a test keeps one clone to look at the
/// disk while the device owns another).
#[derive(Debug, Clone)]
pub struct MemDisk {
    inner: Arc<Mutex<MemDiskInner>>,
    read_only: bool,
    parallel: Option<Arc<MemParallel>>,
}

/// The [`ParallelIo`] handle of a [`MemDisk`].
#[derive(Debug)]
struct MemParallel {
    inner: Arc<Mutex<MemDiskInner>>,
    read_only: bool,
    delay: IoDelay,
    active: AtomicUsize,
}

impl MemParallel {
    fn io(&self, off: u64, bufs: &[IoBuf], write: bool) -> BackendResult<bool> {
        if write && self.read_only {
            return Err(BackendError::ReadOnly);
        }
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        std::thread::sleep((self.delay)(off, write));
        let r = (|| {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.stats.max_concurrent = g.stats.max_concurrent.max(now as u64);
            let total: usize = bufs.iter().map(|b| b.len).sum();
            if g.fails(off, total as u64) {
                return Err(injected());
            }
            let Some(end) = off.checked_add(total as u64).filter(|&e| e <= g.data.len() as u64) else {
                return Ok(false);
            };
            let mut at = off as usize;
            for b in bufs {
                // SAFETY: the caller vouches for the buffers (ParallelIo's contract); the disk
                // bytes are in range (checked above) and do not overlap caller memory.
                unsafe {
                    if write {
                        std::ptr::copy_nonoverlapping(b.ptr, g.data.as_mut_ptr().add(at), b.len);
                    } else {
                        std::ptr::copy_nonoverlapping(g.data.as_ptr().add(at), b.ptr, b.len);
                    }
                }
                at += b.len;
            }
            debug_assert_eq!(at as u64, end);
            if write {
                g.stats.parallel_writes += 1;
            } else {
                g.stats.parallel_reads += 1;
            }
            Ok(true)
        })();
        self.active.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

impl ParallelIo for MemParallel {
    fn alignment(&self) -> (u64, usize) {
        (1, 1)
    }
    unsafe fn read_vectored(&self, off: u64, bufs: &[IoBuf]) -> BackendResult<bool> {
        self.io(off, bufs, false)
    }
    unsafe fn write_vectored(&self, off: u64, bufs: &[IoBuf]) -> BackendResult<bool> {
        self.io(off, bufs, true)
    }
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_bytes(vec![0; size])
    }

    /// A disk holding `data`.
    pub fn from_bytes(data: Vec<u8>) -> Self {
        MemDisk {
            inner: Arc::new(Mutex::new(MemDiskInner { data, ..Default::default() })),
            read_only: false,
            parallel: None,
        }
    }

    /// A read-only view sharing the same bytes.
    pub fn read_only(&self) -> Self {
        let parallel = self.parallel.as_ref().map(|p| {
            Arc::new(MemParallel { inner: self.inner.clone(), read_only: true, delay: p.delay, active: AtomicUsize::new(0) })
        });
        MemDisk { inner: self.inner.clone(), read_only: true, parallel }
    }

    /// The same disk with a [`ParallelIo`] handle (as a raw image file has) whose every call
    /// first sleeps `delay(offset, write)`.
    pub fn with_parallel_io(mut self, delay: IoDelay) -> Self {
        self.parallel = Some(Arc::new(MemParallel {
            inner: self.inner.clone(),
            read_only: self.read_only,
            delay,
            active: AtomicUsize::new(0),
        }));
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemDiskInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the disk's bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().data.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> MemDiskStats {
        self.lock().stats
    }

    /// Makes every later I/O call fail (to test error paths).
    pub fn set_failing(&self, fail: bool) {
        self.lock().fail = fail;
    }

    /// Makes later reads and writes touching bytes `[start, end)` fail (None: none).
    pub fn set_failing_range(&self, range: Option<(u64, u64)>) {
        self.lock().fail_range = range;
    }

    fn range(&self, off: u64, len: u64) -> BackendResult<std::ops::Range<usize>> {
        let size = self.size();
        match off.checked_add(len) {
            Some(end) if end <= size => Ok(off as usize..end as usize),
            _ => Err(BackendError::InvalidArgument(format!("access {off}+{len} beyond the disk size {size}"))),
        }
    }

    fn writable(&self) -> BackendResult<std::sync::MutexGuard<'_, MemDiskInner>> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        let g = self.lock();
        if g.fail {
            return Err(injected());
        }
        Ok(g)
    }
}

impl BlockBackend for MemDisk {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
    fn size(&self) -> u64 {
        self.lock().data.len() as u64
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> BackendResult<()> {
        let r = self.range(off, buf.len() as u64)?;
        let mut g = self.lock();
        if g.fails(off, buf.len() as u64) {
            return Err(injected());
        }
        buf.copy_from_slice(&g.data[r]);
        g.stats.reads += 1;
        Ok(())
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> BackendResult<()> {
        let r = self.range(off, buf.len() as u64)?;
        let mut g = self.writable()?;
        if g.fails(off, buf.len() as u64) {
            return Err(injected());
        }
        g.data[r].copy_from_slice(buf);
        g.stats.writes += 1;
        Ok(())
    }
    fn flush(&mut self) -> BackendResult<()> {
        let mut g = self.lock();
        if g.fail {
            return Err(injected());
        }
        g.stats.flushes += 1;
        g.stats.writes_at_last_flush = g.stats.writes + g.stats.parallel_writes;
        Ok(())
    }
    fn parallel_io(&mut self) -> Option<Arc<dyn ParallelIo>> {
        self.parallel.clone().map(|p| p as Arc<dyn ParallelIo>)
    }
    fn discard(&mut self, off: u64, len: u64) -> BackendResult<()> {
        let r = self.range(off, len)?;
        let mut g = self.writable()?;
        g.data[r].fill(0);
        g.stats.discards += 1;
        Ok(())
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> BackendResult<()> {
        let r = self.range(off, len)?;
        let mut g = self.writable()?;
        g.data[r].fill(0);
        g.stats.write_zeroes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memdisk_io_bounds_and_read_only() {
        let mut d = MemDisk::new(4096);
        d.write_at(512, b"abc").unwrap();
        let mut b = [0u8; 3];
        d.read_at(512, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert!(d.read_at(4095, &mut b).is_err());
        assert!(d.write_at(u64::MAX, b"x").is_err());
        let mut ro = d.read_only();
        assert!(ro.is_read_only());
        assert!(ro.write_at(0, b"x").is_err());
        ro.read_at(512, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        d.write_zeroes(512, 3).unwrap();
        assert_eq!(&d.contents()[512..515], &[0, 0, 0]);
        assert_eq!(d.stats().write_zeroes, 1);
    }
}
