//! The qcow2 image object: opening, creating, and the metadata primitives every other module
//! builds on (L2 table access, refcount reads/updates, cluster allocation with refcount block and
//! table growth, active L1 growth).
//!
//! Ordering rule of the incremental paths (guest writes, vmstate writes, L1/refcount growth): a
//! cluster's refcount is raised on disk before anything points to it, data is written before the
//! L2 entry, the L2 table before the L1 entry, and refcounts are dropped last. A writer killed at
//! any point therefore leaves at most leaked clusters.

use crate::backend::ImageFormat;
use crate::cache::Lru;
use crate::error::{corrupt, Error, IoCtx, Result};
use crate::header::{self, Header};
pub(crate) use crate::refcount::{rc_get, rc_set};
use crate::snapshot::SnapEntry;
use crate::storage::{FileStorage, Storage};
use std::collections::BTreeMap;
use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;

/// Offset bits of L1/L2 entries.
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount is exactly one.
pub(crate) const COPIED: u64 = 1 << 63;
/// Compressed cluster descriptor.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// Cluster reads as zeros (v3).
pub(crate) const ZERO: u64 = 1;
/// Highest host offset we will ever touch (QEMU's limit: 2^56).
pub(crate) const MAX_HOST: u64 = 1 << 56;

/// Options for opening an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open without write access; every write fails with [`Error::ReadOnly`].
    pub read_only: bool,
    /// Flush (fsync) between every dependent metadata write on the guest-write path too, so the
    /// ordering guarantee also holds across a host power loss, not only a process kill.
    /// Snapshot operations and table relocations always flush.
    pub strict_barriers: bool,
    /// How the host file is opened (QEMU's `cache=`; see [`crate::hostfile`]).
    pub cache: crate::CacheMode,
    /// Do not open the backing chain (reads of unallocated clusters then return zeros; used by
    /// `rebase -u`, `info` without the chain, and tools that only touch the top layer).
    pub no_backing: bool,
    /// Do not take the shared locks on backing files (QEMU's `force-share`).
    pub no_backing_locks: bool,
    /// How backing files are opened (default: host files, see [`crate::backing::FileOpener`]).
    pub backing_opener: Option<std::sync::Arc<dyn crate::backing::Opener>>,
}

/// Parameters for creating an image.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size, a power of two in 512..=2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64 (v2 requires 16).
    pub refcount_bits: u32,
    /// Backing file name to store (relative names are relative to the new image's directory).
    pub backing_file: Option<String>,
    /// Backing format to store in the `backing_fmt` header extension.
    pub backing_format: Option<ImageFormat>,
    /// Compression type of compressed clusters: 0 zlib, 1 zstd (v3 only).
    pub compression_type: u8,
    /// Extended L2 entries (32 subclusters per cluster; v3, clusters of 16 KiB or more).
    pub extended_l2: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
            compression_type: 0,
            extended_l2: false,
        }
    }
}

/// Kind of an L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Unalloc,
    ZeroPlain,
    ZeroAlloc(u64),
    Normal(u64),
    /// Host byte offset and length of the compressed stream.
    Compressed(u64, u64),
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub(crate) file: Box<dyn Storage>,
    pub(crate) h: Header,
    pub(crate) read_only: bool,
    pub(crate) strict: bool,
    pub(crate) cs: u64,
    pub(crate) cbits: u32,
    pub(crate) l2e: u64,
    /// Extended L2 entries: each entry is a (descriptor, subcluster bitmap) pair of words.
    pub(crate) ext: bool,
    pub(crate) rbe: u64,
    pub(crate) l1: Vec<u64>,
    pub(crate) rt: Vec<u64>,
    pub(crate) snapshots: Vec<SnapEntry>,
    pub(crate) l2_cache: Lru<Vec<u64>>,
    pub(crate) rb_cache: Lru<Vec<u8>>,
    pub(crate) comp_cache: Option<(u64, Vec<u8>)>,
    /// Packing state of compressed writes: (next free byte, end of the reserved run).
    pub(crate) comp_pack: Option<(u64, u64)>,
    pub(crate) free_hint: u64,
    pub(crate) dirty_marked: bool,
    pub(crate) closed: bool,
    /// The next layer of the backing chain, when open.
    pub(crate) backing: Option<crate::backing::Backing>,
    /// Where this image sits in its chain (path for relative backing names).
    pub(crate) chain: crate::backing::ChainCtx,
    /// The options it was opened with (to reopen the chain on refresh).
    pub(crate) opts: OpenOptions,
    /// The [`crate::BlockBackend::host_io`] handle on `file`, made on first use.
    pub(crate) host_io: Option<std::sync::Arc<dyn crate::parallel::ParallelIo>>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("version", &self.h.version)
            .field("size", &self.h.size)
            .field("cluster_size", &self.cs)
            .field("read_only", &self.read_only)
            .finish()
    }
}

pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

pub(crate) fn entries_to_bytes(e: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(e.len() * 8);
    for x in e {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v
}

pub(crate) fn bytes_to_entries(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| be64(c, 0)).collect()
}

impl Qcow2 {
    /// Open the qcow2 image at `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Qcow2> {
        let path = path.as_ref();
        let file = crate::hostfile::open_file(path, opts.read_only, opts.cache)?;
        let id = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let ctx = crate::backing::ChainCtx {
            path: Some(path.to_path_buf()),
            seen: vec![id],
        };
        Self::open_chain(file, opts, ctx)
    }

    /// Open an image on any [`Storage`] (a relative backing name is then relative to the
    /// current directory, or handled by `opts.backing_opener`).
    pub fn open_storage(file: Box<dyn Storage>, opts: &OpenOptions) -> Result<Qcow2> {
        Self::open_chain(file, opts, crate::backing::ChainCtx::default())
    }

    /// Open an image on `file` whose host path (for relative backing names) is `path`.
    pub fn open_storage_at(
        file: Box<dyn Storage>,
        path: &Path,
        opts: &OpenOptions,
    ) -> Result<Qcow2> {
        Self::open_storage_as(file, path, path, opts)
    }

    /// Like [`Qcow2::open_storage_at`], with `identity` the name loop detection knows this
    /// image by (what [`crate::backing::Opener::open`] returns for it as a backing file).
    pub fn open_storage_as(
        file: Box<dyn Storage>,
        path: &Path,
        identity: &Path,
        opts: &OpenOptions,
    ) -> Result<Qcow2> {
        let ctx = crate::backing::ChainCtx {
            path: Some(path.to_path_buf()),
            seen: vec![identity.to_path_buf()],
        };
        Self::open_chain(file, opts, ctx)
    }

    pub(crate) fn open_chain(
        file: Box<dyn Storage>,
        opts: &OpenOptions,
        chain: crate::backing::ChainCtx,
    ) -> Result<Qcow2> {
        let h = Header::read(file.as_ref())?;
        if h.incompatible & header::INCOMPAT_CORRUPT != 0 && !opts.read_only {
            return Err(Error::Corrupt(
                "image is marked corrupt; open it read-only or repair it".into(),
            ));
        }
        let cs = h.cluster_size();
        let cbits = h.cluster_bits;
        let rbits = 1u64 << h.refcount_order;
        let mut img = Qcow2 {
            file,
            read_only: opts.read_only,
            strict: opts.strict_barriers,
            cs,
            cbits,
            l2e: if h.incompatible & header::INCOMPAT_EXTL2 != 0 { cs / 16 } else { cs / 8 },
            ext: h.incompatible & header::INCOMPAT_EXTL2 != 0,
            rbe: cs * 8 / rbits,
            l1: Vec::new(),
            rt: Vec::new(),
            snapshots: Vec::new(),
            l2_cache: Lru::new(((32u64 << 20) / cs) as usize),
            rb_cache: Lru::new(((8u64 << 20) / cs) as usize),
            comp_cache: None,
            comp_pack: None,
            free_hint: 1,
            dirty_marked: false,
            host_io: None,
            closed: false,
            backing: None,
            chain,
            opts: opts.clone(),
            h,
        };
        img.open_backing_chain()?;
        img.load_tables()?;
        if !img.read_only {
            let was_dirty = img.h.incompatible & header::INCOMPAT_DIRTY != 0;
            if img.h.autoclear != 0 {
                img.write_header_u64(header::OFF_AUTOCLEAR, 0)?;
                img.h.autoclear = 0;
            }
            if was_dirty {
                // Refcounts may be stale (lazy refcounts): rebuild them before any allocation.
                img.rebuild_refcounts()?;
            }
            img.mark_dirty()?;
        }
        Ok(img)
    }

    /// Re-read all metadata from the file, dropping every cache. Used when another process may
    /// have changed the image (e.g. at a live-migration handover on shared storage).
    pub fn refresh(&mut self) -> Result<()> {
        let h = Header::read(self.file.as_ref())?;
        if h.cluster_bits != self.cbits || h.refcount_order != self.h.refcount_order {
            return corrupt("cluster size or refcount width changed under us");
        }
        let reopen = h.backing_file != self.h.backing_file || h.backing_format() != self.h.backing_format();
        self.h = h;
        if reopen {
            self.open_backing_chain()?;
        }
        self.load_tables()
    }

    /// (Re)open the backing chain named by the header (nothing with `no_backing`).
    pub(crate) fn open_backing_chain(&mut self) -> Result<()> {
        self.backing = None;
        if self.opts.no_backing {
            return Ok(());
        }
        if let Some(name) = self.h.backing_file.clone() {
            let fmt = self.h.backing_format();
            self.backing = Some(crate::backing::open_backing(
                &name,
                fmt.as_deref(),
                &self.opts,
                &self.chain,
            )?);
        }
        Ok(())
    }

    fn load_tables(&mut self) -> Result<()> {
        self.l2_cache.clear();
        self.rb_cache.clear();
        self.comp_cache = None;
        self.comp_pack = None;
        self.free_hint = 1;
        let file_len = self.file.len().ctx("querying the file size")?;
        let n = self.h.l1_size as usize;
        if self.h.l1_table_offset.saturating_add(n as u64 * 8) > file_len {
            return corrupt("active L1 table lies past the end of the file");
        }
        let rt_end = self
            .h
            .refcount_table_offset
            .saturating_add(self.h.refcount_table_clusters as u64 * self.cs);
        if rt_end > file_len.div_ceil(self.cs) * self.cs {
            return corrupt("refcount table lies past the end of the file");
        }
        let mut b = vec![0u8; n * 8];
        self.file
            .read_at(&mut b, self.h.l1_table_offset)
            .ctx("reading the L1 table")?;
        self.l1 = bytes_to_entries(&b);
        let rtb = self.h.refcount_table_clusters as u64 * self.cs;
        let mut b = vec![0u8; rtb as usize];
        self.file
            .read_at(&mut b, self.h.refcount_table_offset)
            .ctx("reading the refcount table")?;
        self.rt = bytes_to_entries(&b);
        self.snapshots = crate::snapshot::read_table(self)?;
        Ok(())
    }

    /// Create a new qcow2 image file at `path` (truncating an existing one) and open it.
    pub fn create(path: impl AsRef<Path>, opts: &CreateOptions) -> Result<Qcow2> {
        Self::create_with(path, opts, &OpenOptions::default())
    }

    /// Create like [`Qcow2::create`] and open the result with `open` (e.g. `no_backing` to
    /// create over a backing file that is not there, as `qemu-img create -u`).
    pub fn create_with(
        path: impl AsRef<Path>,
        opts: &CreateOptions,
        open: &OpenOptions,
    ) -> Result<Qcow2> {
        let path = path.as_ref();
        let f = FsOpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .ctx("creating the image file")?;
        let mut img = Self::create_on(Box::new(FileStorage::new(f)), opts)?;
        img.chain = crate::backing::ChainCtx {
            path: Some(path.to_path_buf()),
            seen: vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())],
        };
        img.opts = OpenOptions {
            read_only: false,
            ..open.clone()
        };
        img.open_backing_chain()?;
        Ok(img)
    }

    /// Format an empty [`Storage`] as qcow2 and open it read-write.
    pub fn create_on(file: Box<dyn Storage>, opts: &CreateOptions) -> Result<Qcow2> {
        let cs = opts.cluster_size;
        if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
            return Err(Error::InvalidArgument(format!(
                "cluster size {cs} must be a power of two between 512 and 2097152"
            )));
        }
        if opts.version != 2 && opts.version != 3 {
            return Err(Error::InvalidArgument(format!(
                "version {} (use 2 or 3)",
                opts.version
            )));
        }
        let rb = opts.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(Error::InvalidArgument(format!("refcount_bits {rb}")));
        }
        if opts.compression_type > header::COMPRESSION_ZSTD
            || (opts.version == 2 && opts.compression_type != 0)
        {
            return Err(Error::InvalidArgument(format!(
                "compression type {} (zlib, or zstd with compat=1.1)",
                opts.compression_type
            )));
        }
        if opts.version == 2 && rb != 16 {
            return Err(Error::InvalidArgument(
                "compat=0.10 only supports refcount_bits=16".into(),
            ));
        }
        let cbits = cs.trailing_zeros();
        if opts.extended_l2 && (opts.version < 3 || cs < 16384) {
            return Err(Error::InvalidArgument(
                "extended_l2 needs compat=1.1 and a cluster size of at least 16 KiB".into(),
            ));
        }
        let span = cs * (cs / if opts.extended_l2 { 16 } else { 8 });
        let l1_need = opts.size.div_ceil(span);
        if l1_need * 8 > header::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "image size {} too large for cluster size {cs}",
                opts.size
            )));
        }
        let mut extensions = Vec::new();
        if let Some(f) = opts.backing_format {
            extensions.push(header::Extension {
                kind: header::EXT_BACKING_FORMAT,
                data: f.to_string().into_bytes(),
            });
        }
        if let Some(b) = &opts.backing_file {
            if b.is_empty() || b.len() as u64 > header::MAX_BACKING_NAME || b.contains('\0') {
                return Err(Error::InvalidArgument(format!("backing file name '{b}'")));
            }
        }
        // QEMU writes the feature-name table only when clusters are at least 8 KiB.
        if opts.version == 3 && cs >= 8192 {
            extensions.push(header::feature_table());
        }
        let h = Header {
            version: opts.version,
            cluster_bits: cbits,
            size: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: if opts.compression_type != 0 {
                header::INCOMPAT_COMPRESSION
            } else {
                0
            } | if opts.extended_l2 {
                header::INCOMPAT_EXTL2
            } else {
                0
            },
            compatible: 0,
            autoclear: 0,
            refcount_order: rb.trailing_zeros(),
            header_length: if opts.version == 3 { 112 } else { 72 },
            extensions,
            backing_file: opts.backing_file.clone(),
            compression_type: opts.compression_type,
        };
        let hb = h.to_bytes();
        if hb.len() as u64 > cs {
            return Err(Error::InvalidArgument(
                "header does not fit in one cluster".into(),
            ));
        }
        file.set_len(0).ctx("truncating the new image")?;
        let mut c0 = vec![0u8; 3 * cs as usize];
        c0[..hb.len()].copy_from_slice(&hb);
        // Refcount table entry 0 -> block at cluster 2; block: clusters 0,1,2 used.
        c0[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
        let order = h.refcount_order;
        for i in 0..3 {
            rc_set(&mut c0[2 * cs as usize..], i, order, 1);
        }
        file.write_at(&c0, 0).ctx("writing the new image")?;
        file.sync().ctx("flushing the new image")?;
        let no_chain = OpenOptions {
            no_backing: true,
            ..Default::default()
        };
        let mut img = Self::open_storage(file, &no_chain)?;
        img.grow_l1(l1_need, true)?;
        img.write_header_u64(header::OFF_SIZE, opts.size)?;
        img.sync()?;
        img.h.size = opts.size;
        Ok(img)
    }

    // ----- small helpers -----

    /// Flush to disk if strict barriers are on (guest-write path ordering points).
    pub(crate) fn barrier(&self) -> Result<()> {
        if self.strict {
            self.file.sync().ctx("flushing")?;
        }
        Ok(())
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file.sync().ctx("flushing")
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only || self.closed {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    pub(crate) fn write_header_u64(&mut self, off: u64, v: u64) -> Result<()> {
        self.file
            .write_at(&v.to_be_bytes(), off)
            .ctx("updating the header")
    }

    fn mark_dirty(&mut self) -> Result<()> {
        if self.h.version >= 3 && self.h.incompatible & header::INCOMPAT_DIRTY == 0 {
            self.h.incompatible |= header::INCOMPAT_DIRTY;
            self.write_header_u64(header::OFF_INCOMPAT, self.h.incompatible)?;
            self.sync()?;
        }
        self.dirty_marked = true;
        Ok(())
    }

    /// Flush everything and clear the dirty bit. The image stays usable (writing sets the bit
    /// again only on the next open, so call this only when done writing); also done on drop.
    pub fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        if !self.read_only {
            self.finish_compressed()?;
            self.sync()?;
            if self.h.version >= 3 && self.h.incompatible & header::INCOMPAT_DIRTY != 0 {
                self.h.incompatible &= !header::INCOMPAT_DIRTY;
                self.write_header_u64(header::OFF_INCOMPAT, self.h.incompatible)?;
                self.sync()?;
            }
        }
        self.closed = true;
        Ok(())
    }

    /// Bytes covered by one L2 table.
    pub(crate) fn span(&self) -> u64 {
        self.cs * self.l2e
    }

    /// First L1 index of the VM-state area for a disk of `size` bytes.
    pub(crate) fn vm_state_index(&self, size: u64) -> u64 {
        size.div_ceil(self.span())
    }

    /// Guest offset of the VM state of a snapshot whose disk had `disk_size` bytes.
    pub(crate) fn vmstate_base(&self, disk_size: u64) -> Result<u64> {
        let idx = self.vm_state_index(disk_size);
        if idx > header::MAX_L1_BYTES / 8 {
            return corrupt(format!("snapshot disk size {disk_size} is absurd"));
        }
        Ok(idx * self.span())
    }

    /// Guest offset where the VM state starts.
    pub fn vmstate_offset(&self) -> u64 {
        self.vm_state_index(self.h.size) * self.span()
    }

    pub(crate) fn classify(&self, e: u64) -> Kind {
        if e & COMPRESSED != 0 {
            let x = 62 - (self.cbits - 8);
            let off = e & ((1u64 << x) - 1);
            let nsec = ((e >> x) & ((1u64 << (self.cbits - 8)) - 1)) + 1;
            let len = nsec * 512 - (off & 511);
            return Kind::Compressed(off, len);
        }
        let off = e & OFFSET_MASK;
        if self.ext {
            // Zeros are per subcluster (bitmap); the descriptor only holds the host cluster.
            return if off == 0 { Kind::Unalloc } else { Kind::Normal(off) };
        }
        if e & ZERO != 0 {
            if off != 0 {
                Kind::ZeroAlloc(off)
            } else {
                Kind::ZeroPlain
            }
        } else if off == 0 {
            Kind::Unalloc
        } else {
            Kind::Normal(off)
        }
    }

    // ----- L2 tables -----

    pub(crate) fn read_l2_raw(&self, off: u64) -> Result<Vec<u64>> {
        if off & (self.cs - 1) != 0 || off == 0 || off >= MAX_HOST {
            return corrupt(format!("L2 table offset {off:#x} invalid"));
        }
        if off >= self.file_len()? {
            return corrupt(format!(
                "L2 table at {off:#x} lies past the end of the file"
            ));
        }
        let mut b = vec![0u8; self.cs as usize];
        self.file.read_at(&mut b, off).ctx("reading an L2 table")?;
        Ok(bytes_to_entries(&b))
    }

    fn ensure_l2(&mut self, off: u64) -> Result<()> {
        if !self.l2_cache.contains(off) {
            let t = self.read_l2_raw(off)?;
            self.l2_cache.insert(off, t);
        }
        Ok(())
    }

    /// Words per L2 entry (2 with extended L2: descriptor, subcluster bitmap).
    pub(crate) fn stride(&self) -> usize {
        if self.ext {
            2
        } else {
            1
        }
    }

    /// The descriptor words of a raw L2 table (bitmaps of extended entries skipped).
    pub(crate) fn descs<'a>(&self, t: &'a [u64]) -> impl Iterator<Item = &'a u64> {
        t.iter().step_by(self.stride())
    }

    /// Copy the descriptors of `n` entries starting at `idx` of the L2 table at `off`.
    pub(crate) fn l2_entries(&mut self, off: u64, idx: u64, n: u64) -> Result<Vec<u64>> {
        self.ensure_l2(off)?;
        let st = self.stride();
        let t = self
            .l2_cache
            .get(off)
            .ok_or_else(|| Error::Corrupt("L2 cache".into()))?;
        Ok(t[idx as usize * st..(idx + n) as usize * st]
            .iter()
            .step_by(st)
            .copied()
            .collect())
    }

    /// (descriptor, subcluster bitmap) of `n` extended entries starting at `idx`.
    pub(crate) fn l2_pairs(&mut self, off: u64, idx: u64, n: u64) -> Result<Vec<(u64, u64)>> {
        self.ensure_l2(off)?;
        let t = self
            .l2_cache
            .get(off)
            .ok_or_else(|| Error::Corrupt("L2 cache".into()))?;
        Ok(t[idx as usize * 2..(idx + n) as usize * 2]
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .collect())
    }

    /// Replace extended entries (descriptor, bitmap) starting at `idx`, written through.
    pub(crate) fn set_l2_pairs(&mut self, off: u64, idx: u64, v: &[(u64, u64)]) -> Result<()> {
        let words: Vec<u64> = v.iter().flat_map(|&(a, b)| [a, b]).collect();
        self.ensure_l2(off)?;
        if let Some(t) = self.l2_cache.get(off) {
            t[idx as usize * 2..idx as usize * 2 + words.len()].copy_from_slice(&words);
        }
        self.file
            .write_at(&entries_to_bytes(&words), off + idx * 16)
            .ctx("writing an L2 table")
    }

    /// Replace the descriptors of entries starting at `idx` and write them through (extended
    /// entries keep their bitmaps).
    pub(crate) fn set_l2_entries(&mut self, off: u64, idx: u64, v: &[u64]) -> Result<()> {
        self.ensure_l2(off)?;
        if self.ext {
            if let Some(t) = self.l2_cache.get(off) {
                for (k, &x) in v.iter().enumerate() {
                    t[(idx as usize + k) * 2] = x;
                }
            }
            for (k, &x) in v.iter().enumerate() {
                self.file
                    .write_at(&x.to_be_bytes(), off + (idx + k as u64) * 16)
                    .ctx("writing an L2 table")?;
            }
            return Ok(());
        }
        if let Some(t) = self.l2_cache.get(off) {
            t[idx as usize..idx as usize + v.len()].copy_from_slice(v);
        }
        self.file
            .write_at(&entries_to_bytes(v), off + idx * 8)
            .ctx("writing an L2 table")
    }

    pub(crate) fn set_l1_entry(&mut self, idx: u64, v: u64) -> Result<()> {
        self.l1[idx as usize] = v;
        self.file
            .write_at(&v.to_be_bytes(), self.h.l1_table_offset + idx * 8)
            .ctx("writing the L1 table")
    }

    /// Grow the active L1 table to at least `min` entries (exactly `min` if `exact`, else by
    /// QEMU's 1.5x steps), relocating it.
    pub(crate) fn grow_l1(&mut self, min: u64, exact: bool) -> Result<()> {
        let old = self.l1.len() as u64;
        if min <= old {
            return Ok(());
        }
        let mut new = if exact { min } else { old.max(1) };
        while new < min {
            new = (new * 3).div_ceil(2);
        }
        if new * 8 > header::MAX_L1_BYTES {
            if min * 8 > header::MAX_L1_BYTES {
                return Err(Error::InvalidArgument(
                    "L1 table would exceed 32 MiB (image or VM state too large)".into(),
                ));
            }
            new = min;
        }
        let clusters = (new * 8).div_ceil(self.cs);
        let off = self.alloc_clusters(clusters)?;
        let mut l1 = self.l1.clone();
        l1.resize(new as usize, 0);
        self.file
            .write_at(&entries_to_bytes(&l1), off)
            .ctx("writing the L1 table")?;
        self.sync()?;
        let mut hb = Vec::with_capacity(12);
        hb.extend_from_slice(&(new as u32).to_be_bytes());
        hb.extend_from_slice(&off.to_be_bytes());
        self.file
            .write_at(&hb, header::OFF_L1)
            .ctx("updating the header")?;
        self.sync()?;
        let old_off = self.h.l1_table_offset;
        self.h.l1_size = new as u32;
        self.h.l1_table_offset = off;
        self.l1 = l1;
        if old > 0 {
            self.add_range(old_off / self.cs, (old * 8).div_ceil(self.cs), -1)?;
        }
        Ok(())
    }

    /// Drop one reference held by L2 entry `e` (collected into `d`).
    pub(crate) fn deref_entry(&self, e: u64, d: &mut BTreeMap<u64, i64>) {
        match self.classify(e) {
            Kind::Normal(o) | Kind::ZeroAlloc(o) => *d.entry(o / self.cs).or_insert(0) -= 1,
            Kind::Compressed(o, l) => {
                for c in o / self.cs..=(o + l - 1) / self.cs {
                    *d.entry(c).or_insert(0) -= 1;
                }
            }
            _ => {}
        }
    }

    // ----- info -----

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.h.size
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }
    /// qcow2 version (2 or 3).
    pub fn version(&self) -> u32 {
        self.h.version
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.h.refcount_order
    }
    /// True when the image uses extended L2 entries (subclusters).
    pub fn extended_l2(&self) -> bool {
        self.h.incompatible & header::INCOMPAT_EXTL2 != 0
    }
    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.h
    }
    /// Whether the image is open read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// Current length of the host file.
    pub fn file_len(&self) -> Result<u64> {
        self.file.len().ctx("querying the file size")
    }
    /// Flush all writes to stable storage.
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.sync()
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        let _ = self.close();
    }
}
