//! Concurrent I/O straight between a disk image's host file and caller memory: what a device
//! with several requests in flight uses instead of the `&mut self` [`BlockBackend`] calls,
//! which serialize every request behind one lock and one bounce buffer.
//!
//! Only formats whose guest offsets map one to one onto a host file offer it (raw images on a
//! local file: [`BlockBackend::parallel_io`]); qcow2 metadata updates need the image's own
//! locking and stay on the serialized path. A handle never fails over silently: a request it
//! cannot do as given (an `O_DIRECT` file and a buffer, offset or length off its alignment, a
//! range past the end) is answered `Ok(false)`, and the caller does it through the backend.
//!
//! [`HostFileIo`] is the implementation over a host file: `preadv`/`pwritev` on a duplicate of
//! the image's descriptor (same open file description, so the same `O_DIRECT`/`O_DSYNC`
//! flags), which any number of threads may use at once.

use crate::error::{Error, Result};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// One caller buffer of a vectored transfer: a host address and a length.
#[derive(Debug, Clone, Copy)]
pub struct IoBuf {
    /// Start of the buffer in this process's memory.
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a plain address and length; whoever dereferences it (the `unsafe` calls of
// `ParallelIo`) vouches for the memory behind it.
unsafe impl Send for IoBuf {}

/// Positional I/O that several threads may run at once (see the module documentation).
pub trait ParallelIo: Send + Sync {
    /// (offset and length alignment, memory alignment) every transfer must meet; (1, 1) when
    /// any will do.
    fn alignment(&self) -> (u64, usize);

    /// Fills `bufs`, in order, from disk bytes starting at `off`. `Ok(false)`: not done (see the
    /// module documentation); nothing was read.
    ///
    /// # Safety
    /// Every buffer must be valid for writes of its length for the duration of the call.
    unsafe fn read_vectored(&self, off: u64, bufs: &[IoBuf]) -> Result<bool>;

    /// Writes `bufs`, in order, to disk bytes starting at `off`. `Ok(false)`: not done; nothing
    /// was written.
    ///
    /// # Safety
    /// Every buffer must be valid for reads of its length for the duration of the call.
    unsafe fn write_vectored(&self, off: u64, bufs: &[IoBuf]) -> Result<bool>;
}

/// Splits `bufs` (a transfer of the runs' total length) into one buffer list per run, in
/// order: `(run start, its buffers)`. None when the lengths differ.
pub fn split_bufs(bufs: &[IoBuf], runs: &[(u64, u64)]) -> Option<Vec<(u64, Vec<IoBuf>)>> {
    let total: u64 = bufs.iter().map(|b| b.len as u64).sum();
    if runs.iter().map(|r| r.1).sum::<u64>() != total {
        return None;
    }
    let mut out = Vec::with_capacity(runs.len());
    let (mut i, mut used) = (0usize, 0usize);
    for &(start, len) in runs {
        let mut left = len as usize;
        let mut v = Vec::new();
        while left > 0 {
            let b = bufs.get(i)?;
            let n = (b.len - used).min(left);
            v.push(IoBuf { ptr: b.ptr.wrapping_add(used), len: n });
            left -= n;
            used += n;
            if used == b.len {
                i += 1;
                used = 0;
            }
        }
        out.push((start, v));
    }
    Some(out)
}

/// Most buffers in one system call (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// [`ParallelIo`] over a host file (see the module documentation).
#[derive(Debug)]
pub struct HostFileIo {
    file: File,
    size: u64,
    read_only: bool,
    align: u64,
    mem_align: usize,
}

impl HostFileIo {
    /// A handle on a duplicate of `file`, for guest offsets `0..size`. The alignment is that
    /// of `O_DIRECT` when the file was opened with it, none otherwise.
    pub fn new(file: &File, size: u64, read_only: bool) -> Result<HostFileIo> {
        let ctx = |source| Error::Io { context: "duplicating the image file descriptor", source };
        let file = file.try_clone().map_err(ctx)?;
        // SAFETY: F_GETFL on a valid descriptor.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(ctx(io::Error::last_os_error()));
        }
        let (align, mem_align) = if flags & libc::O_DIRECT != 0 {
            crate::hostfile::dio_alignment(&file)?
        } else {
            (1, 1)
        };
        Ok(HostFileIo { file, size, read_only, align, mem_align })
    }

    /// Whether a transfer of `bufs` at `off` lies on the disk and meets the alignment.
    fn fits(&self, off: u64, bufs: &[IoBuf]) -> Option<usize> {
        if bufs.is_empty() || bufs.len() > IOV_MAX || off % self.align != 0 {
            return None;
        }
        let mut total = 0usize;
        for b in bufs {
            if b.len == 0 || b.len as u64 % self.align != 0 || b.ptr as usize % self.mem_align != 0 {
                return None;
            }
            total = total.checked_add(b.len)?;
        }
        match off.checked_add(total as u64) {
            Some(end) if end <= self.size => Some(total),
            _ => None,
        }
    }

    /// Runs `preadv`/`pwritev` until all `total` bytes moved, resuming after a short transfer.
    ///
    /// # Safety
    /// As [`ParallelIo::read_vectored`] / [`ParallelIo::write_vectored`].
    unsafe fn transfer(&self, write: bool, mut off: u64, bufs: &[IoBuf], total: usize) -> io::Result<()> {
        let mut iov: Vec<libc::iovec> =
            bufs.iter().map(|b| libc::iovec { iov_base: b.ptr.cast(), iov_len: b.len }).collect();
        let mut first = 0usize;
        let mut left = total;
        while left > 0 {
            let (p, n) = (iov[first..].as_ptr(), (iov.len() - first) as libc::c_int);
            // SAFETY: the iovecs describe caller memory valid for the access (this function's
            // contract); the descriptor is ours.
            let r = unsafe {
                if write {
                    libc::pwritev(self.file.as_raw_fd(), p, n, off as libc::off_t)
                } else {
                    libc::preadv(self.file.as_raw_fd(), p, n, off as libc::off_t)
                }
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(if write {
                    io::Error::from(io::ErrorKind::WriteZero)
                } else {
                    io::Error::from(io::ErrorKind::UnexpectedEof)
                });
            }
            let mut done = r as usize;
            left -= done;
            off += done as u64;
            // Skip what moved; a partly moved buffer resumes in the middle.
            while done > 0 {
                let v = &mut iov[first];
                if done >= v.iov_len {
                    done -= v.iov_len;
                    first += 1;
                } else {
                    v.iov_base = v.iov_base.cast::<u8>().wrapping_add(done).cast();
                    v.iov_len -= done;
                    done = 0;
                }
            }
        }
        Ok(())
    }
}

impl ParallelIo for HostFileIo {
    fn alignment(&self) -> (u64, usize) {
        (self.align, self.mem_align)
    }

    unsafe fn read_vectored(&self, off: u64, bufs: &[IoBuf]) -> Result<bool> {
        let Some(total) = self.fits(off, bufs) else { return Ok(false) };
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer(false, off, bufs, total) }
            .map_err(|source| Error::Io { context: "reading the raw image", source })?;
        Ok(true)
    }

    unsafe fn write_vectored(&self, off: u64, bufs: &[IoBuf]) -> Result<bool> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let Some(total) = self.fits(off, bufs) else { return Ok(false) };
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer(true, off, bufs, total) }
            .map_err(|source| Error::Io { context: "writing the raw image", source })?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn buf(v: &mut [u8]) -> IoBuf {
        IoBuf { ptr: v.as_mut_ptr(), len: v.len() }
    }

    #[test]
    fn vectored_io_on_a_plain_file() {
        let dir = std::env::var_os("CARGO_TARGET_TMPDIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("parallel-{}.raw", std::process::id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(8192).unwrap();
        let io = HostFileIo::new(&f, 8192, false).unwrap();
        assert_eq!(io.alignment(), (1, 1));
        let (mut a, mut b) = (vec![1u8; 100], vec![2u8; 412]);
        // SAFETY: the vectors outlive the calls.
        assert!(unsafe { io.write_vectored(1000, &[buf(&mut a), buf(&mut b)]) }.unwrap());
        let mut back = vec![0u8; 512];
        f.read_exact_at(&mut back, 1000).unwrap();
        assert_eq!(&back[..100], &a[..]);
        assert_eq!(&back[100..], &b[..]);
        let (mut c, mut d) = (vec![0u8; 300], vec![0u8; 212]);
        assert!(unsafe { io.read_vectored(1000, &[buf(&mut c), buf(&mut d)]) }.unwrap());
        assert_eq!([c, d].concat(), back);
        // Past the end, or nothing at all: not done here.
        let mut e = vec![0u8; 512];
        assert!(!unsafe { io.read_vectored(8000, &[buf(&mut e)]) }.unwrap());
        assert!(!unsafe { io.read_vectored(0, &[]) }.unwrap());
        let ro = HostFileIo::new(&f, 8192, true).unwrap();
        assert!(matches!(unsafe { ro.write_vectored(0, &[buf(&mut e)]) }, Err(Error::ReadOnly)));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn buffers_split_across_runs() {
        let mut m = vec![0u8; 100];
        let p = m.as_mut_ptr();
        let bufs = [IoBuf { ptr: p, len: 30 }, IoBuf { ptr: p.wrapping_add(50), len: 50 }];
        let s = split_bufs(&bufs, &[(1000, 10), (5000, 60), (9000, 10)]).unwrap();
        let lens: Vec<Vec<(usize, usize)>> = s
            .iter()
            .map(|(_, v)| v.iter().map(|b| (b.ptr as usize - p as usize, b.len)).collect())
            .collect();
        assert_eq!(lens, vec![vec![(0, 10)], vec![(10, 20), (50, 40)], vec![(90, 10)]]);
        assert_eq!(s.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1000, 5000, 9000]);
        assert!(split_bufs(&bufs, &[(0, 79)]).is_none());
    }
}
