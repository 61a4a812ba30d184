//! Host storage under an image: a positional-I/O abstraction with a real file implementation,
//! an in-memory one (tests, fuzzing) and a fault-injecting wrapper (crash tests).
//!
//! Reads past the end of the storage return zeros, as qcow2 requires (the last cluster of an
//! image file is often only partially present).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Positional byte storage an image lives on.
#[allow(clippy::len_without_is_empty)]
pub trait Storage: Send {
    /// Fill `buf` from `off`; bytes past the end read as zero.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`, extending the storage if needed.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Make previous writes durable.
    fn sync(&self) -> io::Result<()>;
    /// Deallocate a byte range (contents then read as zero). Best effort.
    fn punch_hole(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Split `[off, off+len)` into (offset, length, holds data) pieces; holes and the part past
    /// the end read as zeros. Default: all data.
    fn data_regions(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        Ok(vec![(off, len, true)])
    }
    /// The local host file underneath, if it is one (readers on other threads reopen it).
    fn host_fd(&self) -> Option<&File> {
        None
    }
}

/// A plain host file.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Wrap an open file.
    pub fn new(file: File) -> Self {
        FileStorage { file }
    }
    /// The file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for FileStorage {
    fn host_fd(&self) -> Option<&File> {
        Some(&self.file)
    }
    fn read_at(&self, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.read_at(buf, off) {
                Ok(0) => {
                    buf.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn data_regions(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        let fd = self.file.as_raw_fd();
        let flen = self.file.metadata()?.len();
        let full_end = off + len;
        // Past the end of the file a region continues the kind of the region that reaches the
        // end (what qemu-img map reports); a range starting past it is a hole.
        let end = full_end.min(flen);
        let mut v: Vec<(u64, u64, bool)> = Vec::new();
        let push = |v: &mut Vec<(u64, u64, bool)>, a: u64, b: u64, d: bool| {
            if a >= b {
                return;
            }
            match v.last_mut() {
                Some(l) if l.2 == d && l.0 + l.1 == a => l.1 += b - a,
                _ => v.push((a, b - a, d)),
            }
        };
        let mut pos = off;
        while pos < end {
            // SAFETY: lseek on a valid fd with integer arguments.
            let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    push(&mut v, pos, end, false);
                    break;
                }
                return Ok(vec![(off, len, true)]);
            }
            let data = (data as u64).min(end);
            push(&mut v, pos, data, false);
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
            if hole < 0 {
                return Ok(vec![(off, len, true)]);
            }
            let hole = (hole as u64).min(end);
            push(&mut v, data, hole, true);
            pos = hole;
        }
        if full_end > end.max(off) {
            let a = end.max(off);
            let kind = v.last().is_some_and(|l| l.2);
            push(&mut v, a, full_end, kind);
        }
        Ok(v)
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Not supported by this file system: fall back to writing zeros.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                let zeros = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.file.write_all_at(&zeros[..n], off + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            _ => Err(e),
        }
    }
}

/// In-memory storage (shared handle: clones see the same bytes).
#[derive(Debug, Clone, Default)]
pub struct MemStorage {
    data: Arc<Mutex<Vec<u8>>>,
    /// Writes beyond this length fail with ENOSPC (u64::MAX = unlimited).
    limit: Arc<AtomicU64>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> Self {
        Self::from_vec(Vec::new())
    }
    /// Storage holding `v`.
    pub fn from_vec(v: Vec<u8>) -> Self {
        MemStorage {
            data: Arc::new(Mutex::new(v)),
            limit: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
    /// A copy of the current bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().clone()
    }
    /// Make writes that would grow the storage past `limit` bytes fail with ENOSPC.
    pub fn set_space_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::SeqCst);
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        match self.data.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.lock();
        buf.fill(0);
        if off < d.len() as u64 {
            let start = off as usize;
            let n = buf.len().min(d.len() - start);
            buf[..n].copy_from_slice(&d[start..start + n]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = off
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        let mut d = self.lock();
        if end > d.len() as u64 {
            if end > self.limit.load(Ordering::SeqCst) || end > (1u64 << 40) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            d.resize(end as usize, 0);
        }
        d[off as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if len > self.limit.load(Ordering::SeqCst) || len > (1u64 << 40) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.lock().resize(len as usize, 0);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Wraps a storage and fails every write/sync after a budget of writes is used up, simulating a
/// writer that dies at that point (nothing after it reaches the disk).
pub struct FaultStorage<S: Storage> {
    inner: S,
    writes_left: Arc<AtomicU64>,
}

impl<S: Storage> FaultStorage<S> {
    /// Allow `budget` successful writes, then fail with EIO.
    pub fn new(inner: S, budget: u64) -> Self {
        FaultStorage {
            inner,
            writes_left: Arc::new(AtomicU64::new(budget)),
        }
    }
    /// Shared budget counter (remaining successful writes).
    pub fn budget(&self) -> Arc<AtomicU64> {
        self.writes_left.clone()
    }
    fn take(&self) -> io::Result<()> {
        let ok = self
            .writes_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok();
        if ok {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.take()?;
        self.inner.write_at(buf, off)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.take()?;
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        if self.writes_left.load(Ordering::SeqCst) == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync()
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.take()?;
        self.inner.punch_hole(off, len)
    }
}
