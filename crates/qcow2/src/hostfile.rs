//! How an image's host file is opened: QEMU's cache modes, and [`DirectFileStorage`], the
//! `O_DIRECT` storage behind `cache=none` and `cache=directsync`.
//!
//! | mode | host page cache | every write durable on completion | flush |
//! |---|---|---|---|
//! | `writeback` (default) | used | no | `fdatasync` |
//! | `none` | bypassed (`O_DIRECT`) | no (the device's own cache may hold it) | `fdatasync` |
//! | `directsync` | bypassed (`O_DIRECT`) | yes (`O_DSYNC`) | `fdatasync` |
//! | `writethrough` | used | yes (`O_DSYNC`) | `fdatasync` |
//! | `unsafe` | used | no | the guest's flushes are ignored (the VMM's own still sync) |
//!
//! `O_DIRECT` needs the file offset, the length and the memory address of every transfer
//! aligned: the offset/length alignment is the file system's (`statx` `STATX_DIOALIGN`, 4 KiB
//! when the kernel does not say), the memory alignment likewise. Aligned requests go straight
//! to the file; any other request (qcow2 header and table updates, odd guest buffers) is
//! bounced through an aligned buffer, whole blocks read-modify-written, so callers never see
//! the constraint. A bounced write that would leave the file longer than before (a partial
//! last block) is trimmed back to the length the caller's write implies. A file system that
//! refuses `O_DIRECT` (tmpfs on older kernels, some FUSE) gives [`Error::NoDirectIo`] at open
//! time, as QEMU refuses "Could not open ...: Invalid argument".

use crate::error::{Error, IoCtx, Result};
use crate::storage::{FileStorage, Storage};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

/// QEMU's `-drive cache=` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Host page cache, flush = fdatasync (QEMU's default).
    #[default]
    Writeback,
    /// `O_DIRECT`, flush = fdatasync.
    None,
    /// `O_DIRECT` + `O_DSYNC`.
    DirectSync,
    /// Host page cache + `O_DSYNC`.
    WriteThrough,
    /// Host page cache; the guest's flushes are ignored.
    Unsafe,
}

impl CacheMode {
    /// The host page cache is bypassed (`O_DIRECT`).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }
    /// Every write is durable when it completes (`O_DSYNC`).
    pub fn dsync(self) -> bool {
        matches!(self, CacheMode::DirectSync | CacheMode::WriteThrough)
    }
    /// The guest's flush requests are not passed to the host file.
    pub fn ignores_flush(self) -> bool {
        self == CacheMode::Unsafe
    }
    /// The mode's name on QEMU's command line.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
            CacheMode::DirectSync => "directsync",
            CacheMode::WriteThrough => "writethrough",
            CacheMode::Unsafe => "unsafe",
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "writeback" => CacheMode::Writeback,
            "none" => CacheMode::None,
            "directsync" => CacheMode::DirectSync,
            "writethrough" => CacheMode::WriteThrough,
            "unsafe" => CacheMode::Unsafe,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "invalid cache mode '{s}' (writeback, none, directsync, writethrough or unsafe)"
                )))
            }
        })
    }
}

/// Opens an image's host file for `cache` (read-only or read-write).
pub fn open_file(path: &Path, read_only: bool, cache: CacheMode) -> Result<Box<dyn Storage>> {
    let mut o = FsOpenOptions::new();
    o.read(true).write(!read_only);
    let mut flags = 0;
    if cache.direct() {
        flags |= libc::O_DIRECT;
    }
    if cache.dsync() && !read_only {
        flags |= libc::O_DSYNC;
    }
    o.custom_flags(flags);
    let f = match o.open(path) {
        Ok(f) => f,
        Err(e) if cache.direct() && e.raw_os_error() == Some(libc::EINVAL) => {
            return Err(Error::NoDirectIo(format!("{e}")));
        }
        Err(e) => return Err(e).ctx("opening the image file"),
    };
    if !cache.direct() {
        return Ok(Box::new(FileStorage::new(f)));
    }
    Ok(Box::new(DirectFileStorage::new(f)?))
}

/// A page-aligned heap buffer.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain owned memory; access goes through `&mut self`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len, align).expect("valid bounce layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }
    fn slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.layout.size());
        // SAFETY: ptr owns layout.size() initialised bytes; the borrow is tied to &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// Bounce buffer size: requests larger than this are bounced in pieces.
const BOUNCE: usize = 1 << 20;
/// Used when the kernel does not report the direct-I/O alignment: right for any device with
/// logical blocks up to 4 KiB.
const DEFAULT_ALIGN: u64 = 4096;

/// The direct-I/O alignment of an open file: (offset and length, memory), or an error when
/// the file system says it does not do direct I/O at all.
pub(crate) fn dio_alignment(f: &File) -> Result<(u64, usize)> {
    // SAFETY: statx on a valid fd with AT_EMPTY_PATH and an empty path; `st` is ours.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok((DEFAULT_ALIGN, DEFAULT_ALIGN as usize));
    }
    if st.stx_dio_offset_align == 0 {
        return Err(Error::NoDirectIo(
            "the file system reports no direct I/O support".into(),
        ));
    }
    let off = u64::from(st.stx_dio_offset_align).max(512);
    let mem = (st.stx_dio_mem_align as usize).max(1);
    if !off.is_power_of_two() || !mem.is_power_of_two() || off > 1 << 20 || mem > 1 << 20 {
        return Ok((DEFAULT_ALIGN, DEFAULT_ALIGN as usize));
    }
    Ok((off, mem))
}

/// A host file opened with `O_DIRECT`; see the module documentation.
pub struct DirectFileStorage {
    inner: FileStorage,
    align: u64,
    mem_align: usize,
    bounce: Mutex<AlignedBuf>,
}

impl fmt::Debug for DirectFileStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectFileStorage")
            .field("align", &self.align)
            .field("mem_align", &self.mem_align)
            .finish()
    }
}

impl DirectFileStorage {
    /// Wraps a file opened with `O_DIRECT`.
    pub fn new(file: File) -> Result<DirectFileStorage> {
        let (align, mem_align) = dio_alignment(&file)?;
        Ok(DirectFileStorage {
            inner: FileStorage::new(file),
            align,
            mem_align,
            bounce: Mutex::new(AlignedBuf::new(BOUNCE, (align as usize).max(4096))),
        })
    }

    /// (offset/length alignment, memory alignment) in use.
    pub fn alignment(&self) -> (u64, usize) {
        (self.align, self.mem_align)
    }

    fn file(&self) -> &File {
        self.inner.file()
    }

    fn is_aligned(&self, p: *const u8, len: usize, off: u64) -> bool {
        off % self.align == 0 && len as u64 % self.align == 0 && (p as usize) % self.mem_align == 0
    }

    /// Aligned read; a short read is the end of the file: the rest reads as zeros.
    fn read_direct(&self, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file().read_at(buf, off) {
                Ok(0) => break,
                Ok(n) if n < buf.len() && (n as u64) % self.align != 0 => {
                    buf = &mut buf[n..];
                    break;
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.fill(0);
        Ok(())
    }

    /// Aligned write of all of `buf`.
    fn write_direct(&self, mut buf: &[u8], mut off: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file().write_at(buf, off) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) if (n as u64) % self.align != 0 => {
                    // A partial block (the file system ran out of space mid-request).
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "short direct write"));
                }
                Ok(n) => {
                    buf = &buf[n..];
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn bounce(&self) -> std::sync::MutexGuard<'_, AlignedBuf> {
        self.bounce.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_bounced(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let a = self.align;
        let end = off + buf.len() as u64;
        let mut b = self.bounce();
        let mut pos = off;
        while pos < end {
            let lo = pos - pos % a;
            let hi = (lo + BOUNCE as u64).min(end.div_ceil(a) * a);
            let chunk = b.slice((hi - lo) as usize);
            self.read_direct(chunk, lo)?;
            let n = (hi.min(end) - pos) as usize;
            let d = (pos - off) as usize;
            buf[d..d + n].copy_from_slice(&chunk[(pos - lo) as usize..(pos - lo) as usize + n]);
            pos += n as u64;
        }
        Ok(())
    }

    fn write_bounced(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let a = self.align;
        let end = off + buf.len() as u64;
        let old_len = if end % a != 0 { Some(self.inner.len()?) } else { None };
        let mut b = self.bounce();
        let mut pos = off;
        while pos < end {
            let lo = pos - pos % a;
            let hi = (lo + BOUNCE as u64).min(end.div_ceil(a) * a);
            let chunk = b.slice((hi - lo) as usize);
            // Whole blocks around the data: read the partly covered first and last ones.
            if pos > lo {
                self.read_direct(&mut chunk[..a as usize], lo)?;
            }
            if end < hi && (hi - a > lo || pos == lo) {
                let t = (hi - a - lo) as usize;
                self.read_direct(&mut chunk[t..], hi - a)?;
            }
            let n = (hi.min(end) - pos) as usize;
            let d = (pos - off) as usize;
            chunk[(pos - lo) as usize..(pos - lo) as usize + n].copy_from_slice(&buf[d..d + n]);
            self.write_direct(chunk, lo)?;
            pos += n as u64;
        }
        if let Some(old) = old_len {
            let want = old.max(end);
            if self.inner.len()? > want {
                self.inner.set_len(want)?;
            }
        }
        Ok(())
    }
}

impl Storage for DirectFileStorage {
    fn host_fd(&self) -> Option<&File> {
        Some(self.file())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.is_aligned(buf.as_ptr(), buf.len(), off) {
            self.read_direct(buf, off)
        } else {
            self.read_bounced(buf, off)
        }
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        off.checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if self.is_aligned(buf.as_ptr(), buf.len(), off) {
            self.write_direct(buf, off)
        } else {
            self.write_bounced(buf, off)
        }
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn data_regions(&self, off: u64, len: u64) -> io::Result<Vec<(u64, u64, bool)>> {
        self.inner.data_regions(off, len)
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid fd with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file().as_raw_fd(),
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
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                let zeros = vec![0u8; len.min(BOUNCE as u64) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeros.len() as u64) as usize;
                    self.write_at(&zeros[..n], off + done)?;
                    done += n as u64;
                }
                Ok(())
            }
            _ => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        // Not /tmp: it may be a tmpfs without O_DIRECT; the target dir's file system is real.
        let dir = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::env::current_dir().unwrap().join("target"));
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("hostfile-{}-{name}", std::process::id()))
    }

    fn direct(path: &Path) -> Option<DirectFileStorage> {
        let f = FsOpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        DirectFileStorage::new(f).ok()
    }

    #[test]
    fn cache_mode_names() {
        for m in ["writeback", "none", "directsync", "writethrough", "unsafe"] {
            assert_eq!(m.parse::<CacheMode>().unwrap().name(), m);
        }
        assert!("bogus".parse::<CacheMode>().is_err());
        assert!(CacheMode::None.direct() && !CacheMode::None.dsync());
        assert!(CacheMode::DirectSync.direct() && CacheMode::DirectSync.dsync());
        assert!(!CacheMode::WriteThrough.direct() && CacheMode::WriteThrough.dsync());
        assert!(CacheMode::Unsafe.ignores_flush() && !CacheMode::Writeback.ignores_flush());
    }

    /// Unaligned and aligned reads and writes through O_DIRECT match a plain model, and a
    /// partial tail block does not grow the file.
    #[test]
    fn unaligned_io_matches_model() {
        let p = tmp("model");
        let size = 3 * 65536 + 1000; // not a multiple of any block size
        std::fs::write(&p, vec![0u8; size]).unwrap();
        let Some(s) = direct(&p) else {
            eprintln!("skipping: the target directory's file system refuses O_DIRECT");
            return;
        };
        let mut model = vec![0u8; size];
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..300 {
            let len = (rnd() % 20000) as usize + 1;
            let off = (rnd() % (size - len) as u64) as usize;
            let (off, len) = if i % 3 == 0 { (off & !4095, (len + 4095) & !4095) } else { (off, len) };
            let len = len.min(size - off);
            if rnd() % 2 == 0 {
                let data: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
                s.write_at(&data, off as u64).unwrap();
                model[off..off + len].copy_from_slice(&data);
            } else {
                let mut b = vec![0u8; len];
                s.read_at(&mut b, off as u64).unwrap();
                assert_eq!(b, &model[off..off + len], "read {off}+{len}");
            }
        }
        // Aligned buffer fast path.
        let mut ab = AlignedBuf::new(8192, 4096);
        ab.slice(8192).fill(0xab);
        s.write_at(ab.slice(8192), 65536).unwrap();
        model[65536..65536 + 8192].fill(0xab);
        let mut rb = AlignedBuf::new(8192, 4096);
        s.read_at(rb.slice(8192), 65536).unwrap();
        assert!(rb.slice(8192).iter().all(|&b| b == 0xab));
        // The tail block, partly past the end of the file: the file keeps its length.
        s.write_at(&[7u8; 10], size as u64 - 10).unwrap();
        model[size - 10..].fill(7);
        assert_eq!(s.len().unwrap(), size as u64);
        // Extending writes (as qcow2 allocation does) end exactly where they should.
        s.write_at(&[9u8; 100], size as u64 + 50).unwrap();
        assert_eq!(s.len().unwrap(), size as u64 + 150);
        let mut b = vec![1u8; 150];
        s.read_at(&mut b, size as u64).unwrap();
        assert!(b[..50].iter().all(|&v| v == 0) && b[50..].iter().all(|&v| v == 9));
        drop(s);
        let on_disk = std::fs::read(&p).unwrap();
        assert_eq!(&on_disk[..size], &model[..]);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn open_file_modes() {
        let p = tmp("modes");
        std::fs::write(&p, vec![5u8; 8192]).unwrap();
        for m in [CacheMode::Writeback, CacheMode::None, CacheMode::DirectSync, CacheMode::WriteThrough, CacheMode::Unsafe] {
            match open_file(&p, false, m) {
                Ok(s) => {
                    s.write_at(&[m as u8; 3], 4097).unwrap();
                    let mut b = [0u8; 5];
                    s.read_at(&mut b, 4096).unwrap();
                    assert_eq!(b, [5, m as u8, m as u8, m as u8, 5]);
                }
                Err(Error::NoDirectIo(_)) if m.direct() => {}
                Err(e) => panic!("{m}: {e}"),
            }
        }
        let _ = std::fs::remove_file(&p);
    }

    /// A qcow2 image written through O_DIRECT (512-byte clusters put tables and refcount blocks
    /// at offsets that are not 4 KiB aligned) reads back the same through the page cache and
    /// checks clean.
    #[test]
    fn qcow2_over_o_direct() {
        use crate::{BlockBackend, CreateOptions, OpenOptions, Qcow2};
        for cs in [512u64, 65536] {
            let p = tmp(&format!("q{cs}"));
            let size = 8 << 20;
            drop(Qcow2::create(&p, &CreateOptions { size, cluster_size: cs, ..Default::default() }).unwrap());
            let opts = OpenOptions { cache: CacheMode::None, ..Default::default() };
            let mut q = match Qcow2::open(&p, &opts) {
                Ok(q) => q,
                Err(Error::NoDirectIo(_)) => return eprintln!("skipping: no O_DIRECT here"),
                Err(e) => panic!("{e}"),
            };
            let mut model = vec![0u8; size as usize];
            let mut x = cs;
            for i in 0..200u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let len = 512 * (1 + (x >> 33) % 24) as usize;
                let off = (512 * ((x >> 13) % (size / 512 - 24))) as usize;
                let data = vec![(i as u8) | 1; len];
                q.write_at(off as u64, &data).unwrap();
                model[off..off + len].copy_from_slice(&data);
            }
            BlockBackend::flush(&mut q).unwrap();
            q.close().unwrap();
            drop(q);
            let mut r = Qcow2::open(&p, &OpenOptions { read_only: true, ..Default::default() }).unwrap();
            let rep = r.check().unwrap();
            assert_eq!((rep.corruptions, rep.leaks), (0, 0), "cluster size {cs}");
            let mut back = vec![0u8; size as usize];
            r.read_at(0, &mut back).unwrap();
            assert!(back == model, "cluster size {cs}: data differs");
            let _ = std::fs::remove_file(&p);
        }
    }
}
