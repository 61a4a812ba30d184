//! The format-independent block device interface the VMM's disk devices use, its raw-file
//! implementation, and format probing/opening by content.

use crate::error::{Error, IoCtx, Result};
use crate::header::MAGIC;
use crate::image::{OpenOptions, Qcow2};
use crate::map::{MapEntry, MapKind};
use crate::parallel::{HostFileIo, ParallelIo};
use crate::storage::{FileStorage, Storage};
use std::fmt;
use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;
use std::sync::Arc;

/// Image formats this crate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// Plain disk image.
    Raw,
    /// qcow2.
    Qcow2,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(Error::Unsupported(format!("image format '{s}'"))),
        }
    }
}

/// A virtual disk: byte-addressed I/O within `0..size()`.
pub trait BlockBackend: Send {
    /// The image format behind this backend.
    fn format(&self) -> ImageFormat;
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// True if writes are refused.
    fn is_read_only(&self) -> bool;
    /// Read `buf.len()` bytes at `off`.
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<()>;
    /// Write `buf` at `off`.
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<()>;
    /// Make completed writes durable.
    fn flush(&mut self) -> Result<()>;
    /// Hint that a range is unused; it reads as zeros afterwards for whole clusters/blocks.
    fn discard(&mut self, off: u64, len: u64) -> Result<()>;
    /// Make a range read as zeros.
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()>;
    /// This layer's own allocation map (backing files not included). The default, for
    /// formats without allocation metadata, is data everywhere at the guest offset.
    fn layer_map(&mut self) -> Result<Vec<MapEntry>> {
        let size = self.size();
        Ok(if size == 0 {
            Vec::new()
        } else {
            vec![MapEntry { start: 0, length: size, kind: MapKind::Data(0) }]
        })
    }
    /// The qcow2 image, for snapshot and VM-state operations (None for raw).
    fn as_qcow2(&mut self) -> Option<&mut Qcow2> {
        None
    }
    /// A handle for I/O that may run on several threads at once, straight into caller memory
    /// (see [`crate::parallel`]), when this backend maps guest offsets one to one onto a host
    /// file; None (the default) when every request must go through `read_at`/`write_at`.
    fn parallel_io(&mut self) -> Option<Arc<dyn ParallelIo>> {
        None
    }
    /// A concurrent I/O handle on the host file behind this backend, addressed by host file
    /// offset (see [`BlockBackend::map_direct`]); None (the default) when there is none.
    fn host_io(&mut self) -> Option<Arc<dyn ParallelIo>> {
        None
    }
    /// Where guest bytes `[off, off + len)` lie in the [`BlockBackend::host_io`] file, when they
    /// can be read there directly (with `write`: overwritten in place, no metadata change):
    /// (host offset, length) runs covering the range in order. None (the default): the range
    /// must go through `read_at`/`write_at` (unallocated, compressed, zero or shared clusters,
    /// a backing file, a read-only image). The answer holds until the image's metadata
    /// changes: the caller keeps others off the image's `&mut self` calls until its direct I/O
    /// is done.
    fn map_direct(&mut self, _off: u64, _len: u64, _write: bool) -> Option<Vec<(u64, u64)>> {
        None
    }
}

fn check_range(off: u64, len: u64, size: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(e) if e <= size => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "access {off}+{len} beyond the disk size {size}"
        ))),
    }
}

impl BlockBackend for Qcow2 {
    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }
    fn size(&self) -> u64 {
        self.h.size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.read_active(off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        self.check_range(off, buf.len() as u64)?;
        self.write_active(off, buf)
    }
    fn flush(&mut self) -> Result<()> {
        Qcow2::flush(self)
    }
    fn discard(&mut self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        self.discard_active(off, len, false)
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        self.discard_active(off, len, true)
    }
    fn as_qcow2(&mut self) -> Option<&mut Qcow2> {
        Some(self)
    }
    fn host_io(&mut self) -> Option<Arc<dyn ParallelIo>> {
        if self.host_io.is_none() {
            let f = self.file.host_fd()?;
            // Host offsets of mapped clusters lie inside the file: no size limit of its own.
            let io = HostFileIo::new(f, u64::MAX, self.read_only).ok()?;
            self.host_io = Some(Arc::new(io));
        }
        self.host_io.clone()
    }
    fn map_direct(&mut self, off: u64, len: u64, write: bool) -> Option<Vec<(u64, u64)>> {
        self.check_range(off, len).ok()?;
        self.map_active(off, len, write).ok().flatten()
    }
}

/// A raw disk image file.
pub struct RawImage {
    file: Box<dyn Storage>,
    size: u64,
    read_only: bool,
    /// The [`BlockBackend::parallel_io`] handle, made on first use (None: not made yet).
    parallel: Option<Arc<dyn ParallelIo>>,
}

impl RawImage {
    /// Open a raw image.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<RawImage> {
        Self::open_with(path, &OpenOptions { read_only, ..Default::default() })
    }
    /// Open a raw image with the host-file options of `opts` (read-only, cache mode).
    pub fn open_with(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<RawImage> {
        let file = crate::hostfile::open_file(path.as_ref(), opts.read_only, opts.cache)?;
        Self::on(file, opts.read_only)
    }
    /// Use any storage as a raw disk.
    pub fn on(file: Box<dyn Storage>, read_only: bool) -> Result<RawImage> {
        let size = file.len().ctx("querying the image size")?;
        Ok(RawImage {
            file,
            size,
            read_only,
            parallel: None,
        })
    }
    /// Create (or truncate) a raw image of `size` bytes.
    pub fn create(path: impl AsRef<Path>, size: u64) -> Result<RawImage> {
        let f = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path.as_ref())
            .ctx("creating the image file")?;
        f.set_len(size).ctx("sizing the image file")?;
        Self::on(Box::new(FileStorage::new(f)), false)
    }
    /// Change the size (truncate or extend with zeros).
    pub fn resize(&mut self, size: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.file.set_len(size).ctx("resizing the image")?;
        self.size = size;
        self.parallel = None;
        Ok(())
    }
}

impl BlockBackend for RawImage {
    fn host_io(&mut self) -> Option<Arc<dyn ParallelIo>> {
        self.parallel_io()
    }
    fn map_direct(&mut self, off: u64, len: u64, write: bool) -> Option<Vec<(u64, u64)>> {
        if write && self.read_only {
            return None;
        }
        check_range(off, len, self.size).ok()?;
        Some(vec![(off, len)])
    }
    fn parallel_io(&mut self) -> Option<Arc<dyn ParallelIo>> {
        if self.parallel.is_none() {
            let f = self.file.host_fd()?;
            // A descriptor that cannot be duplicated: every request takes the serialized path.
            let io = HostFileIo::new(f, self.size, self.read_only).ok()?;
            self.parallel = Some(Arc::new(io));
        }
        self.parallel.clone()
    }
    fn layer_map(&mut self) -> Result<Vec<MapEntry>> {
        let regions = self
            .file
            .data_regions(0, self.size)
            .ctx("mapping the raw image")?;
        Ok(regions
            .into_iter()
            .filter(|r| r.1 > 0)
            .map(|(o, l, data)| MapEntry {
                start: o,
                length: l,
                kind: if data { MapKind::Data(o) } else { MapKind::Zero(Some(o)) },
            })
            .collect())
    }
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        check_range(off, buf.len() as u64, self.size)?;
        self.file.read_at(buf, off).ctx("reading the raw image")
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(off, buf.len() as u64, self.size)?;
        self.file.write_at(buf, off).ctx("writing the raw image")
    }
    fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync().ctx("flushing the raw image")
    }
    fn discard(&mut self, off: u64, len: u64) -> Result<()> {
        self.write_zeroes(off, len)
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        check_range(off, len, self.size)?;
        self.file
            .punch_hole(off, len)
            .ctx("discarding in the raw image")
    }
}

/// Detect the format of the image at `path` from its content (anything that is not qcow2 is
/// raw).
pub fn probe(path: impl AsRef<Path>) -> Result<ImageFormat> {
    let f = FsOpenOptions::new()
        .read(true)
        .open(path.as_ref())
        .ctx("opening the image file")?;
    let s = FileStorage::new(f);
    probe_storage(&s)
}

/// Detect the format of a storage's content.
pub fn probe_storage(s: &dyn Storage) -> Result<ImageFormat> {
    let mut m = [0u8; 4];
    s.read_at(&mut m, 0).ctx("reading the image")?;
    Ok(if u32::from_be_bytes(m) == MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Open an image of format `format` (probed from the content when None).
pub fn open(
    path: impl AsRef<Path>,
    format: Option<ImageFormat>,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockBackend>> {
    let fmt = match format {
        Some(f) => f,
        None => probe(path.as_ref())?,
    };
    Ok(match fmt {
        ImageFormat::Raw => Box::new(RawImage::open_with(path, opts)?),
        ImageFormat::Qcow2 => Box::new(Qcow2::open(path, opts)?),
    })
}
