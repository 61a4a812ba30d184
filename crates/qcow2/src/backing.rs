//! Backing chains: resolving and opening an image's backing file (qcow2 or raw, any depth up to
//! [`MAX_CHAIN_DEPTH`]), QEMU-compatible shared locks on backing files, reads that fall through
//! unallocated clusters, and the top-layer allocation query for `sync: top` mirroring.
//!
//! Resolution follows QEMU: a relative backing name is relative to the directory of the image
//! that names it (not to the current directory); an absolute name is used as is. The format
//! comes from the backing-format header extension (`backing_fmt`), else it is probed. Backing
//! images are opened read-only; each holds the locks QEMU's file driver takes for a reader that
//! refuses concurrent writers (OFD lock on byte 100 "consistent read" and byte 201 "write not
//! shared"), so a second VM over the same base is fine, while a writer of the base (Godwit's
//! `-drive` lock or QEMU's) is refused, and we refuse a base someone writes (byte 101 held).
//!
//! Loops (an image reached twice in its own chain), missing files and chains deeper than
//! [`MAX_CHAIN_DEPTH`] are clear errors.

use crate::backend::{probe_storage, BlockBackend, ImageFormat, RawImage};
use crate::error::{Error, IoCtx, Result};
use crate::image::{Kind, OpenOptions, Qcow2, OFFSET_MASK};
use crate::storage::Storage;
use std::any::Any;
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Longest backing chain opened (the top image included).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// QEMU's lock byte of the "consistent read" permission.
const LOCK_PERM_READ: u64 = 100;
/// QEMU's lock byte of the "write" permission.
const LOCK_PERM_WRITE: u64 = 101;
/// QEMU's lock byte for "write is not shared".
const LOCK_UNSHARE_WRITE: u64 = 201;

/// A backing image opened by an [`Opener`].
pub struct OpenedBacking {
    /// The image bytes.
    pub storage: Box<dyn Storage>,
    /// Identity for loop detection (canonical path for files).
    pub identity: PathBuf,
    /// Kept alive as long as the backing image is open (e.g. the lock's file handle).
    pub guard: Option<Box<dyn Any + Send>>,
}

/// Opens backing files. The default opens host files read-only and locks them shared; tests
/// and the fuzzer use an in-memory one.
pub trait Opener: Send + Sync + fmt::Debug {
    /// Open the (already resolved) backing file `path` read-only.
    fn open(&self, path: &Path, opts: &OpenOptions) -> Result<OpenedBacking>;

    /// Resolve the backing name `name` stored in the image at `overlay` (default: QEMU's rule
    /// for host files, [`resolve_backing_name`]; a network opener joins URLs instead).
    fn resolve(&self, name: &str, overlay: Option<&Path>) -> PathBuf {
        resolve_backing_name(name, overlay)
    }
}

/// The host-file opener: read-only, with QEMU's shared reader locks.
#[derive(Debug, Default)]
pub struct FileOpener;

fn ofd(file: &File, cmd: libc::c_int, kind: libc::c_int, byte: u64) -> std::io::Result<i32> {
    // SAFETY: a zeroed flock is a valid value; every field we need is set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: fcntl on a valid fd with a flock struct we own.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type as i32)
}

/// True for lock errors that mean "this file system has no locks" (QEMU then goes on).
fn no_locking(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
    )
}

/// Take QEMU's shared-reader locks on `file` (a backing image): refuse if someone writes it.
pub fn lock_backing_reader(file: &File, path: &Path) -> Result<()> {
    let busy = || {
        Error::Locked(
            path.display().to_string(),
            "Failed to get shared \"write\" lock: the image is opened for writing by another process".into(),
        )
    };
    match ofd(file, libc::F_OFD_GETLK, libc::F_WRLCK, LOCK_PERM_WRITE) {
        Ok(t) if t != libc::F_UNLCK => return Err(busy()),
        Ok(_) => {}
        Err(e) if no_locking(&e) => return Ok(()),
        Err(e) => return Err(e).ctx("testing the image lock"),
    }
    for byte in [LOCK_PERM_READ, LOCK_UNSHARE_WRITE] {
        match ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte) {
            Ok(_) => {}
            Err(e) if no_locking(&e) => return Ok(()),
            Err(_) => return Err(busy()),
        }
    }
    Ok(())
}

/// True when another process holds a backing-file (write not shared) lock on `path`.
pub fn in_use_as_backing(path: &Path) -> Result<bool> {
    let f = File::open(path).ctx("opening the image file")?;
    match ofd(&f, libc::F_OFD_GETLK, libc::F_WRLCK, LOCK_UNSHARE_WRITE) {
        Ok(t) => Ok(t != libc::F_UNLCK),
        Err(e) if no_locking(&e) => Ok(false),
        Err(e) => Err(e).ctx("testing the image lock"),
    }
}

impl Opener for FileOpener {
    fn open(&self, path: &Path, opts: &OpenOptions) -> Result<OpenedBacking> {
        if path.to_string_lossy().contains("://") {
            return Err(Error::Unsupported(format!(
                "backing file protocol of '{}'",
                path.display()
            )));
        }
        let storage = crate::hostfile::open_file(path, true, opts.cache)?;
        let lockf = File::open(path).ctx("opening the backing file")?;
        if !opts.no_backing_locks {
            lock_backing_reader(&lockf, path)?;
        }
        let identity = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(OpenedBacking {
            storage,
            identity,
            guard: Some(Box::new(lockf)),
        })
    }
}

/// An open backing image (the next layer down).
pub struct Backing {
    /// The image (qcow2 with its own backing, or raw).
    pub(crate) img: Box<dyn BlockBackend>,
    /// The name resolved against the overlay's directory.
    pub(crate) path: PathBuf,
    /// Its format.
    pub(crate) format: ImageFormat,
    _guard: Option<Box<dyn Any + Send>>,
}

/// Where an image sits: its path (for relative backing names) and the identities of the
/// images above it (loop detection).
#[derive(Debug, Clone, Default)]
pub(crate) struct ChainCtx {
    pub path: Option<PathBuf>,
    pub seen: Vec<PathBuf>,
}

/// Resolve a backing name the way QEMU does: relative to the overlay's directory.
pub fn resolve_backing_name(name: &str, overlay: Option<&Path>) -> PathBuf {
    if name.starts_with('/') || name.contains("://") {
        return PathBuf::from(name);
    }
    match overlay.and_then(Path::parent) {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

/// Open the backing image named by `name` (format `fmt` if given) below an image at `ctx`.
pub(crate) fn open_backing(
    name: &str,
    fmt: Option<&str>,
    opts: &OpenOptions,
    ctx: &ChainCtx,
) -> Result<Backing> {
    let opener: &dyn Opener = match &opts.backing_opener {
        Some(o) => o.as_ref(),
        None => &FileOpener,
    };
    let path = opener.resolve(name, ctx.path.as_deref());
    let wrap = |e: Error| Error::BackingOpen {
        name: name.to_string(),
        path: path.display().to_string(),
        source: Box::new(e),
    };
    if ctx.seen.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::BackingTooDeep(MAX_CHAIN_DEPTH));
    }
    let ro = OpenOptions {
        read_only: true,
        ..opts.clone()
    };
    let opened = opener.open(&path, &ro).map_err(wrap)?;
    if ctx.seen.contains(&opened.identity) {
        return Err(Error::BackingLoop(path.display().to_string()));
    }
    let format = match fmt {
        Some(f) => f.parse::<ImageFormat>().map_err(wrap)?,
        None => probe_storage(opened.storage.as_ref()).map_err(wrap)?,
    };
    let mut seen = ctx.seen.clone();
    seen.push(opened.identity.clone());
    let sub = ChainCtx {
        path: Some(path.clone()),
        seen,
    };
    let img: Box<dyn BlockBackend> = match format {
        ImageFormat::Raw => Box::new(RawImage::on(opened.storage, true).map_err(wrap)?),
        ImageFormat::Qcow2 => match Qcow2::open_chain(opened.storage, &ro, sub) {
            Ok(q) => Box::new(q),
            // Chain errors below keep their own (innermost) context.
            Err(e @ (Error::BackingLoop(_) | Error::BackingTooDeep(_))) => return Err(e),
            Err(e) => return Err(wrap(e)),
        },
    };
    Ok(Backing {
        img,
        path,
        format,
        _guard: opened.guard,
    })
}

impl Qcow2 {
    /// The backing file name stored in the header (as written, possibly relative).
    pub fn backing_file(&self) -> Option<&str> {
        self.h.backing_file.as_deref()
    }

    /// The backing format named in the header (`backing_fmt`), if any.
    pub fn backing_format(&self) -> Option<String> {
        self.h.backing_format()
    }

    /// The backing file's name resolved against this image's directory (QEMU's
    /// `full-backing-filename`), when a backing image is open.
    pub fn backing_path(&self) -> Option<&Path> {
        self.backing.as_ref().map(|b| b.path.as_path())
    }

    /// The open backing image (the next layer), if any.
    pub fn backing(&mut self) -> Option<&mut dyn BlockBackend> {
        match self.backing.as_mut() {
            Some(b) => Some(b.img.as_mut()),
            None => None,
        }
    }

    /// The open backing image's format.
    pub fn backing_image_format(&self) -> Option<ImageFormat> {
        self.backing.as_ref().map(|b| b.format)
    }

    /// Fill `buf` (guest bytes at `off`, all unallocated in this layer) from the backing chain:
    /// zeros without one, and zeros past the backing image's end.
    pub(crate) fn read_backing(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        let limit = self.h.size;
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.img.size().min(limit);
        let n = if off >= bsize {
            0
        } else {
            ((bsize - off) as usize).min(buf.len())
        };
        if n > 0 {
            b.img.read_at(off, &mut buf[..n])?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// Storage migration with `sync: top`: split `[off, off+len)` of the guest disk into runs
    /// `(start, length, allocated_in_top)`. A run is allocated in the top layer when this image
    /// itself holds data or zero clusters there (what must cross the wire when the destination
    /// already has the backing chain); unallocated runs read from the backing chain.
    pub fn top_allocation(&mut self, off: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        self.check_range(off, len)?;
        let cs = self.cs;
        let end = off + len;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let mut g = off;
        while g < end {
            let span = self.span();
            let l1i = g / span;
            let n = (span - g % span).min(end - g);
            let l2 = self.l1.get(l1i as usize).copied().unwrap_or(0) & OFFSET_MASK;
            let mut push = |a: u64, l: u64, al: bool| match out.last_mut() {
                Some(x) if x.2 == al && x.0 + x.1 == a => x.1 += l,
                _ => out.push((a, l, al)),
            };
            if l2 == 0 {
                push(g, n, false);
            } else if self.ext {
                let sc = self.sc_size();
                let first = (g / cs) % self.l2e;
                let cnt = (g % cs + n).div_ceil(cs);
                let pairs = self.l2_pairs(l2, first, cnt)?;
                let mut p = g;
                while p < g + n {
                    let (e, bm) = pairs[((p - (g - g % cs)) / cs) as usize];
                    let l = (sc - p % sc).min(g + n - p);
                    let k = self.sub_kind(e, bm, (p % cs) / sc)?;
                    push(p, l, k != crate::subcluster::Sub::Unalloc);
                    p += l;
                }
            } else {
                let first = (g / cs) % self.l2e;
                let cnt = (g % cs + n).div_ceil(cs);
                let ents = self.l2_entries(l2, first, cnt)?;
                let mut p = g;
                for e in ents {
                    let l = (cs - p % cs).min(g + n - p);
                    push(p, l, self.classify(e) != Kind::Unalloc);
                    p += l;
                }
            }
            g += n;
        }
        Ok(out)
    }

    /// True when all of `[off, off+len)` is allocated in the top layer (see
    /// [`Qcow2::top_allocation`]).
    pub fn is_allocated_top(&mut self, off: u64, len: u64) -> Result<bool> {
        Ok(self.top_allocation(off, len)?.iter().all(|r| r.2))
    }
}
