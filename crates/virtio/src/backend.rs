//! The disk interface the virtio-blk device drives, and an in-memory disk.
//!
//! The device uses the `qcow2` crate's [`BlockBackend`] (byte-addressed I/O within
//! `0..size()`), so its raw and qcow2 images plug in directly (`qcow2::open` returns one).
//! Backend errors are only logged; the guest gets `VIRTIO_BLK_S_IOERR`.
//!
//! [`MemDisk`] keeps the disk in a `Vec<u8>`: used by the tests and handy for a VMM test that
//! needs a disk without a file.

pub use qcow2::{BlockBackend, Error as BackendError, ImageFormat};
use std::sync::{Arc, Mutex};

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
}

#[derive(Debug, Default)]
struct MemDiskInner {
    data: Vec<u8>,
    stats: MemDiskStats,
    fail: bool,
}

/// A disk in host memory. Clones share the same bytes (a test keeps one clone to look at the
/// disk while the device owns another).
#[derive(Debug, Clone)]
pub struct MemDisk {
    inner: Arc<Mutex<MemDiskInner>>,
    read_only: bool,
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_bytes(vec![0; size])
    }

    /// A disk holding `data`.
    pub fn from_bytes(data: Vec<u8>) -> Self {
        MemDisk { inner: Arc::new(Mutex::new(MemDiskInner { data, ..Default::default() })), read_only: false }
    }

    /// A read-only view sharing the same bytes.
    pub fn read_only(&self) -> Self {
        MemDisk { inner: self.inner.clone(), read_only: true }
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
        if g.fail {
            return Err(injected());
        }
        buf.copy_from_slice(&g.data[r]);
        g.stats.reads += 1;
        Ok(())
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> BackendResult<()> {
        let r = self.range(off, buf.len() as u64)?;
        let mut g = self.writable()?;
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
        Ok(())
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
