//! `-drive` and `-device virtio-blk-device,drive=ID`: parsing QEMU's syntax, opening raw and
//! qcow2 images, QEMU-compatible image locking, `snapshot=on` overlays, and the shared handle
//! through which savevm reaches the qcow2 image and live migration hands the image over.
//!
//! `cache=` follows QEMU (see `qcow2::hostfile`): `none`/`directsync` open the image with
//! `O_DIRECT`, `directsync`/`writethrough` with `O_DSYNC`, and `unsafe` drops the guest's
//! flush requests here, in the device's handle — the VMM's own flushes (savevm, the migration
//! handover, exit) still reach the file.

use qcow2::{BlockBackend, CacheMode, ImageFormat, OpenOptions, ParallelIo, Qcow2};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

mod gate;
pub use gate::BackendGuard;
use gate::GatedIo;

/// One `-drive`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DriveSpec {
    pub file: PathBuf,
    pub format: Option<ImageFormat>,
    pub id: Option<String>,
    pub interface: String,
    pub read_only: bool,
    pub snapshot: bool,
    pub serial: Option<String>,
    /// The format was not given (QEMU warns when it then probes raw).
    pub probed: bool,
    /// `cache=` (default writeback, as in QEMU).
    pub cache: CacheMode,
    /// `werror=` (None: QEMU's default, `enospc`).
    pub werror: Option<virtio::ErrorAction>,
    /// `rerror=` (None: QEMU's default, `report`).
    pub rerror: Option<virtio::ErrorAction>,
    /// `node-name=`: the format node's name (default `#blockN`, see `crate::storage`).
    pub node_name: Option<String>,
}

fn split(s: &str) -> Vec<String> {
    // QEMU escapes a comma inside a value as ",,".
    let mut out = vec![String::new()];
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == ',' {
            if it.peek() == Some(&',') {
                it.next();
                out.last_mut().map(|p| p.push(','));
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().map(|p| p.push(c));
        }
    }
    out
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("parameter '{key}' expects 'on' or 'off'")),
    }
}

pub fn parse_drive(spec: &str) -> Result<DriveSpec, String> {
    let mut d = DriveSpec { interface: "virtio".into(), probed: true, ..Default::default() };
    for (i, part) in split(spec).into_iter().enumerate() {
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 && !part.is_empty() => ("file".to_string(), part.clone()),
            None => return Err(format!("'{part}' is not key=value")),
        };
        match k.as_str() {
            "file" => d.file = PathBuf::from(v),
            "format" => {
                d.probed = false;
                d.format = Some(match v.as_str() {
                    "raw" => ImageFormat::Raw,
                    "qcow2" => ImageFormat::Qcow2,
                    other => return Err(format!("unsupported format '{other}' (raw or qcow2)")),
                })
            }
            "if" => match v.as_str() {
                "virtio" | "none" => d.interface = v,
                other => return Err(format!("interface '{other}' is not supported (virtio or none)")),
            },
            "id" => d.id = Some(v),
            "node-name" => d.node_name = Some(v),
            "readonly" => d.read_only = on_off("readonly", &v)?,
            "snapshot" => d.snapshot = on_off("snapshot", &v)?,
            "serial" => d.serial = Some(v),
            "cache" => {
                d.cache = v.parse().map_err(|_| {
                    format!("invalid cache mode '{v}' (writeback, none, directsync, writethrough or unsafe)")
                })?
            }
            "werror" => d.werror = Some(v.parse().map_err(|e| format!("werror: {e}"))?),
            "rerror" => {
                let a: virtio::ErrorAction = v.parse().map_err(|e| format!("rerror: {e}"))?;
                if a == virtio::ErrorAction::Enospc {
                    return Err("rerror: 'enospc' invalid error action (report, ignore or stop)".into());
                }
                d.rerror = Some(a);
            }
            "media" | "aio" | "discard" | "detect-zeroes" | "index" => {}
            other => return Err(format!("unknown drive parameter '{other}'")),
        }
    }
    if d.file.as_os_str().is_empty() {
        return Err("no file= given".into());
    }
    Ok(d)
}

/// Resolves `-drive` specs and `-device virtio-blk-device,drive=ID` into the ordered disks.
pub fn resolve(drives: &[String], devices: &[String]) -> Result<Vec<DriveSpec>, String> {
    let mut parsed = Vec::new();
    for s in drives {
        parsed.push(parse_drive(s).map_err(|e| format!("-drive {s}: {e}"))?);
    }
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (i, d) in parsed.iter().enumerate() {
        if let Some(id) = &d.id {
            if by_id.insert(id.clone(), i).is_some() {
                return Err(format!("-drive: duplicate id '{id}'"));
            }
        }
    }
    let mut out: Vec<DriveSpec> = parsed.iter().filter(|d| d.interface == "virtio").cloned().collect();
    for dev in devices {
        let parts = split(dev);
        let driver = parts.first().map(String::as_str).unwrap_or("");
        match driver {
            "virtio-blk-device" | "virtio-blk" | "virtio-blk-pci" => {
                let id = parts
                    .iter()
                    .find_map(|p| p.strip_prefix("drive="))
                    .ok_or_else(|| format!("-device {dev}: drive= is required"))?;
                let i = *by_id.get(id).ok_or_else(|| format!("-device {dev}: no drive with id '{id}'"))?;
                let mut d = parsed[i].clone();
                if let Some(s) = parts.iter().find_map(|p| p.strip_prefix("serial=")) {
                    d.serial = Some(s.to_string());
                }
                out.push(d);
            }
            "isa-debug-exit" => {} // always present at 0xf4
            "virtio-net-device" | "virtio-net" | "virtio-net-pci" => {} // crate::nics
            other => return Err(format!("-device '{other}' is not supported")),
        }
    }
    Ok(out)
}

/// QEMU's image locking: OFD locks on bytes 100+perm ("I use") and 200+perm ("I do not share"),
/// so Godwit and QEMU refuse a second writer on the same image, whichever comes first.
pub struct ImageLock {
    _file: File,
}

const PERM_CONSISTENT_READ: u64 = 0;
const PERM_WRITE: u64 = 1;
const PERM_WRITE_UNCHANGED: u64 = 2;
const PERM_RESIZE: u64 = 3;

fn ofd(file: &File, cmd: libc::c_int, kind: libc::c_short, byte: u64) -> std::io::Result<libc::c_short> {
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: fcntl with a valid fd and a flock struct we own.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type)
}

impl ImageLock {
    /// The locks for a drive: none for an image on NFS (its storage holds an NFSv4 lock).
    pub fn acquire_for(spec: &DriveSpec, write: bool) -> Result<Option<ImageLock>, String> {
        if nfs_url(spec)?.is_some() {
            return Ok(None);
        }
        ImageLock::acquire(&spec.file, write).map(Some)
    }

    /// Takes the locks for a writer (or, with `write == false`, a consistent reader).
    pub fn acquire(path: &Path, write: bool) -> Result<ImageLock, String> {
        let file = File::open(path).map_err(|e| format!("'{}': {e}", path.display()))?;
        let (uses, unshares): (&[u64], &[u64]) = if write {
            (&[PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE], &[PERM_WRITE, PERM_RESIZE])
        } else {
            (&[PERM_CONSISTENT_READ], &[PERM_WRITE])
        };
        let busy = |what: &str| {
            format!(
                "Failed to get \"{what}\" lock on '{}': is another process using the image?",
                path.display()
            )
        };
        // Someone refuses to share what we use, or uses what we refuse to share?
        for &p in uses {
            if ofd(&file, libc::F_OFD_GETLK, libc::F_WRLCK as _, 200 + p).map_err(|e| e.to_string())? != libc::F_UNLCK as libc::c_short {
                return Err(busy(if p == PERM_WRITE { "write" } else { "shared" }));
            }
        }
        for &p in unshares {
            if ofd(&file, libc::F_OFD_GETLK, libc::F_WRLCK as _, 100 + p).map_err(|e| e.to_string())? != libc::F_UNLCK as libc::c_short {
                return Err(busy(if p == PERM_WRITE { "write" } else { "resize" }));
            }
        }
        for &p in uses {
            ofd(&file, libc::F_OFD_SETLK, libc::F_RDLCK as _, 100 + p).map_err(|_| busy("shared"))?;
        }
        for &p in unshares {
            ofd(&file, libc::F_OFD_SETLK, libc::F_RDLCK as _, 200 + p).map_err(|_| busy("write"))?;
        }
        Ok(ImageLock { _file: file })
    }
}

/// An image opened for a disk, shared between the virtio-blk device (which does the guest's
/// I/O through it) and the VMM (savevm reaches the qcow2 image; migration closes and reopens
/// it at the handover). `None` inside = handed over: the guest is paused then.
#[derive(Clone)]
pub struct SharedDisk {
    pub spec: DriveSpec,
    inner: Arc<Mutex<Option<Box<dyn BlockBackend>>>>,
    /// Held shared by each of the device's concurrent I/O calls ([`GatedIo`]), which map their
    /// range under `inner`'s lock and then do the I/O without it, and exclusively with every
    /// other use of the image ([`SharedDisk::backend`]): whatever changes the image's metadata,
    /// replaces or closes it, or installs a mirror waits for the direct I/O in progress.
    gate: Arc<RwLock<()>>,
    lock: Arc<Mutex<Option<ImageLock>>>,
    size: u64,
    format: ImageFormat,
    /// A running mirror job's write hook (taken under the backend lock, after it).
    mirror: Arc<Mutex<Option<mirror::Mirror>>>,
    /// What the last mirror left: `Synced` after a ready mirror ended consistent, `Broken`
    /// once the destination's copy is known incomplete (failed, cancelled before ready, or
    /// written after the mirror ended). A migration switchover refuses a broken copy.
    mirror_mark: Arc<Mutex<MirrorMark>>,
}

/// See [`SharedDisk::check_switchover`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MirrorMark {
    #[default]
    None,
    Synced,
    Broken(String),
}

/// The drive's `nfs://` URL, when its image is on an NFS server (crate `nfs`).
fn nfs_url(spec: &DriveSpec) -> Result<Option<nfs::NfsUrl>, String> {
    match spec.file.to_str() {
        Some(s) if nfs::is_nfs_url(s) => nfs::NfsUrl::parse(s).map(Some).map_err(|e| e.to_string()),
        _ => Ok(None),
    }
}

fn open_backend(spec: &DriveSpec, read_only: bool) -> Result<Box<dyn BlockBackend>, String> {
    // Backing files may be on NFS too (relative names of an nfs:// overlay, or nfs:// names).
    let opts = nfs::chain_options(&OpenOptions { read_only, cache: spec.cache, ..Default::default() });
    let b = match nfs_url(spec)? {
        // A writer on NFS holds the NFSv4 single-writer lock inside its storage.
        Some(url) => nfs::open_image(&url, spec.format, &opts, !read_only).map_err(|e| e.to_string())?,
        None => qcow2::open(&spec.file, spec.format, &opts).map_err(|e| format!("'{}': {e}", spec.file.display()))?,
    };
    if spec.snapshot {
        return Ok(Box::new(Overlay::new(b)));
    }
    Ok(b)
}

impl SharedDisk {
    /// Opens (and locks) the image. With `deferred`, for an incoming migration, the image is
    /// only probed: it is opened for real at the handover, after the source let go of it.
    pub fn open(spec: &DriveSpec, deferred: bool) -> Result<SharedDisk, String> {
        let format = match spec.format {
            Some(f) => f,
            None => {
                let f = match nfs_url(spec)? {
                    Some(url) => nfs::probe(&url).map_err(|e| e.to_string())?,
                    None => qcow2::probe(&spec.file).map_err(|e| format!("'{}': {e}", spec.file.display()))?,
                };
                if f == ImageFormat::Raw {
                    eprintln!(
                        "godwit: warning: image format was not specified for '{}' and probing guessed raw; \
                         specify format=raw explicitly to remove this warning",
                        spec.file.display()
                    );
                }
                f
            }
        };
        let mut spec = spec.clone();
        spec.format = Some(format);
        let writes = !spec.read_only && !spec.snapshot;
        let probe = open_backend(&spec, true)?;
        let size = probe.size();
        drop(probe);
        let (inner, lock) = if deferred {
            (None, None)
        } else {
            let lock = ImageLock::acquire_for(&spec, writes)?;
            (Some(open_backend(&spec, !writes)?), lock)
        };
        Ok(SharedDisk {
            spec,
            inner: Arc::new(Mutex::new(inner)),
            gate: Arc::new(RwLock::new(())),
            lock: Arc::new(Mutex::new(lock)),
            size,
            format,
            mirror: Arc::new(Mutex::new(None)),
            mirror_mark: Arc::new(Mutex::new(MirrorMark::None)),
        })
    }

    fn writes(&self) -> bool {
        !self.spec.read_only && !self.spec.snapshot
    }

    /// The image, for anything but the device's concurrent I/O: waits for that to finish and
    /// holds it off while the guard lives.
    pub fn backend(&self) -> BackendGuard<'_> {
        let gate = self.gate.write().unwrap_or_else(|p| p.into_inner());
        BackendGuard { inner: self.locked(), _gate: gate }
    }

    /// `inner` alone (the concurrent I/O path, under the gate's shared side).
    fn locked(&self) -> MutexGuard<'_, Option<Box<dyn BlockBackend>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the qcow2 image, or explains why there is none.
    pub fn with_qcow2<R>(&self, f: impl FnOnce(&mut Qcow2) -> R) -> Result<R, String> {
        let mut g = self.backend();
        let b = g.as_mut().ok_or_else(|| format!("'{}' is not open", self.spec.file.display()))?;
        match b.as_qcow2() {
            Some(q) if !self.spec.snapshot => Ok(f(q)),
            _ => Err(format!(
                "Device '{}' is writable but does not support snapshots (format {})",
                self.spec.id.clone().unwrap_or_else(|| self.spec.file.display().to_string()),
                if self.spec.snapshot { "temporary snapshot overlay" } else { "raw" }
            )),
        }
    }

    /// Source side of a migration handover: flush, close the image cleanly (qcow2 dirty bit
    /// cleared), drop the locks. The device must be drained.
    pub fn release(&self) -> Result<(), String> {
        if !self.writes() {
            return Ok(());
        }
        let mut g = self.backend();
        if let Some(b) = g.as_mut() {
            // A failed flush or close (storage unreachable) keeps the image open and locked
            // here: the handover fails and this side goes on with it (`reacquire` is a no-op)
            // instead of losing its only handle to an image it may not be able to reopen.
            b.flush().map_err(|e| e.to_string())?;
            if let Some(q) = b.as_qcow2() {
                q.close().map_err(|e| e.to_string())?;
            }
        }
        g.take();
        drop(g);
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }

    /// Takes the image back (after a failed handover on the source, or at the handover on the
    /// destination): lock, then open with fresh metadata.
    pub fn reacquire(&self) -> Result<(), String> {
        if self.backend().is_some() {
            return Ok(());
        }
        let lock = ImageLock::acquire_for(&self.spec, self.writes())?;
        let b = open_backend(&self.spec, !self.writes())?;
        if b.size() != self.size {
            return Err(format!("'{}' changed size", self.spec.file.display()));
        }
        *self.backend() = Some(b);
        *self.lock.lock().unwrap_or_else(|p| p.into_inner()) = lock;
        Ok(())
    }

    /// Guest-visible size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The current mirror hook.
    pub fn mirror(&self) -> Option<mirror::Mirror> {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs (or, with `None`, removes) a mirror's write hook, with guest I/O held off.
    /// Installing over another mirror is refused.
    pub fn set_mirror(&self, m: Option<mirror::Mirror>) -> Result<(), String> {
        let _io = self.backend();
        let mut slot = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        if m.is_some() && slot.is_some() {
            return Err("the drive is already being mirrored by a block job".into());
        }
        if m.is_some() {
            *self.mirror_mark.lock().unwrap_or_else(|p| p.into_inner()) = MirrorMark::None;
        }
        *slot = m;
        Ok(())
    }

    /// Records how a mirror of this disk ended (see `mirror_mark`).
    pub fn set_mirror_mark(&self, mark: MirrorMark) {
        *self.mirror_mark.lock().unwrap_or_else(|p| p.into_inner()) = mark;
    }

    /// A guest write after a mirror ended consistent: the destination's copy is now stale.
    fn note_write_after_mirror(&self) {
        let mut g = self.mirror_mark.lock().unwrap_or_else(|p| p.into_inner());
        if *g == MirrorMark::Synced {
            *g = MirrorMark::Broken("the guest wrote to the disk after the mirror ended".into());
        }
    }

    /// Before a migration switchover (guest paused, disk queues drained): refuse when a
    /// storage mirror of this disk would leave the destination with an incomplete copy — a
    /// mirror still copying, or one that failed or ended before the guest stopped writing.
    pub fn check_switchover(&self) -> Result<(), String> {
        let name = self.spec.id.clone().unwrap_or_else(|| self.spec.file.display().to_string());
        if let Some(m) = self.mirror() {
            if !m.progress().ready {
                return Err(format!(
                    "drive '{name}' is being mirrored and the mirror is not ready: the destination's copy would be incomplete"
                ));
            }
        }
        match &*self.mirror_mark.lock().unwrap_or_else(|p| p.into_inner()) {
            MirrorMark::Broken(why) => Err(format!(
                "the storage mirror of drive '{name}' did not finish ({why}): the destination's copy is incomplete; start a new mirror"
            )),
            _ => Ok(()),
        }
    }

    /// `block-job-complete`: under the drive's lock, `take` hands over the mirror target, the
    /// mirror hook goes and the drive continues on the target (no guest write in between); the
    /// old image is flushed, closed and unlocked.
    pub fn pivot(&self, take: &mut dyn FnMut() -> Option<Box<dyn BlockBackend>>) -> Result<(), String> {
        let mut g = self.backend();
        let new = take();
        self.mirror.lock().unwrap_or_else(|p| p.into_inner()).take();
        let new = new.ok_or("the mirror target cannot serve as the drive")?;
        if new.size() != self.size {
            return Err("the new backend has another size".into());
        }
        if let Some(mut old) = g.replace(new) {
            old.flush().map_err(|e| e.to_string())?;
            if let Some(q) = old.as_qcow2() {
                q.close().map_err(|e| e.to_string())?;
            }
        }
        drop(g);
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        Ok(())
    }

    /// The block device's view of this disk.
    pub fn device_backend(&self) -> Box<dyn BlockBackend> {
        Box::new(DiskHandle(self.clone()))
    }
}

/// What the virtio-blk device holds: forwards to the shared image.
struct DiskHandle(SharedDisk);

fn gone() -> qcow2::Error {
    qcow2::Error::Io {
        context: "accessing a disk handed over to a migration destination",
        source: std::io::Error::other("image not open"),
    }
}

impl DiskHandle {
    /// The open image for a guest request. An image this side let go of (a migration
    /// handover that then failed, with the storage unreachable when it tried to take the image
    /// back) is reopened here, so once the storage is back the guest's retried request (error
    /// policy `stop`, then `cont`) finds its disk; the image lock (NFSv4 or OFD) refuses this
    /// if another process holds the image.
    fn io(&self) -> qcow2::Result<BackendGuard<'_>> {
        if self.0.backend().is_none() {
            self.0.reacquire().map_err(|e| qcow2::Error::Io {
                context: "reopening the disk image",
                source: std::io::Error::other(e),
            })?;
        }
        Ok(self.0.backend())
    }
}

impl BlockBackend for DiskHandle {
    fn parallel_io(&mut self) -> Option<Arc<dyn ParallelIo>> {
        if self.0.spec.snapshot {
            return None;
        }
        self.0.locked().as_mut()?.host_io()?;
        Some(Arc::new(GatedIo(self.0.clone())))
    }
    fn format(&self) -> ImageFormat {
        self.0.format
    }
    fn size(&self) -> u64 {
        self.0.size
    }
    fn is_read_only(&self) -> bool {
        !self.0.writes() && !self.0.spec.snapshot
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> qcow2::Result<()> {
        self.io()?.as_mut().ok_or_else(gone)?.read_at(off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> qcow2::Result<()> {
        let mut g = self.io()?;
        let b = g.as_mut().ok_or_else(gone)?;
        b.write_at(off, buf)?;
        match self.0.mirror() {
            Some(m) => m.on_write(&mut **b, off, mirror::WriteKind::Data(buf)),
            None => self.0.note_write_after_mirror(),
        }
        Ok(())
    }
    fn flush(&mut self) -> qcow2::Result<()> {
        if self.0.spec.cache.ignores_flush() {
            return Ok(());
        }
        match self.0.backend().as_mut() {
            Some(b) => b.flush(),
            None => Ok(()),
        }
    }
    fn discard(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        let mut g = self.io()?;
        let b = g.as_mut().ok_or_else(gone)?;
        b.discard(off, len)?;
        match self.0.mirror() {
            Some(m) => m.on_write(&mut **b, off, mirror::WriteKind::Discard(len)),
            None => self.0.note_write_after_mirror(),
        }
        Ok(())
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        let mut g = self.io()?;
        let b = g.as_mut().ok_or_else(gone)?;
        b.write_zeroes(off, len)?;
        match self.0.mirror() {
            Some(m) => m.on_write(&mut **b, off, mirror::WriteKind::Zeroes(len)),
            None => self.0.note_write_after_mirror(),
        }
        Ok(())
    }
}

/// `snapshot=on`: guest writes go to memory; the image is never written.
struct Overlay {
    base: Box<dyn BlockBackend>,
    blocks: HashMap<u64, Box<[u8]>>,
}

const OVL_BLOCK: u64 = 4096;

impl Overlay {
    fn new(base: Box<dyn BlockBackend>) -> Self {
        Overlay { base, blocks: HashMap::new() }
    }
    fn check(&self, off: u64, len: u64) -> qcow2::Result<()> {
        match off.checked_add(len) {
            Some(e) if e <= self.base.size() => Ok(()),
            _ => Err(qcow2::Error::InvalidArgument(format!("access {off}+{len} beyond the disk"))),
        }
    }
}

impl BlockBackend for Overlay {
    fn format(&self) -> ImageFormat {
        self.base.format()
    }
    fn size(&self) -> u64 {
        self.base.size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> qcow2::Result<()> {
        self.check(off, buf.len() as u64)?;
        self.base.read_at(off, buf)?;
        let mut pos = off;
        while pos < off + buf.len() as u64 {
            let blk = pos / OVL_BLOCK;
            let in_blk = pos % OVL_BLOCK;
            let n = (OVL_BLOCK - in_blk).min(off + buf.len() as u64 - pos);
            if let Some(b) = self.blocks.get(&blk) {
                let d = (pos - off) as usize;
                buf[d..d + n as usize].copy_from_slice(&b[in_blk as usize..(in_blk + n) as usize]);
            }
            pos += n;
        }
        Ok(())
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> qcow2::Result<()> {
        self.check(off, buf.len() as u64)?;
        let mut pos = off;
        while pos < off + buf.len() as u64 {
            let blk = pos / OVL_BLOCK;
            let in_blk = pos % OVL_BLOCK;
            let n = (OVL_BLOCK - in_blk).min(off + buf.len() as u64 - pos);
            if !self.blocks.contains_key(&blk) {
                let mut b = vec![0u8; OVL_BLOCK as usize].into_boxed_slice();
                let len = OVL_BLOCK.min(self.base.size() - blk * OVL_BLOCK) as usize;
                self.base.read_at(blk * OVL_BLOCK, &mut b[..len])?;
                self.blocks.insert(blk, b);
            }
            let b = self.blocks.get_mut(&blk).expect("inserted above");
            let s = (pos - off) as usize;
            b[in_blk as usize..(in_blk + n) as usize].copy_from_slice(&buf[s..s + n as usize]);
            pos += n;
        }
        Ok(())
    }
    fn flush(&mut self) -> qcow2::Result<()> {
        Ok(())
    }
    fn discard(&mut self, _off: u64, _len: u64) -> qcow2::Result<()> {
        Ok(())
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        self.check(off, len)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(zeros.len() as u64);
            self.write_at(pos, &zeros[..n as usize])?;
            pos += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_syntax() {
        let d = parse_drive("file=a,,b.img,format=qcow2,if=none,id=d0,readonly=on,cache=none").unwrap();
        assert_eq!(d.file, PathBuf::from("a,b.img"));
        assert_eq!(d.format, Some(ImageFormat::Qcow2));
        assert_eq!(d.id.as_deref(), Some("d0"));
        assert!(d.read_only && !d.probed);
        assert!(parse_drive("file=x,format=vmdk").is_err());
        assert!(parse_drive("file=x,if=ide").is_err());
        assert!(parse_drive("format=raw").is_err());
        assert!(parse_drive("file=x,bogus=1").is_err());
        let v = resolve(
            &["file=a.img".into(), "file=b.qcow2,if=none,id=d1".into()],
            &["virtio-blk-device,drive=d1".into()],
        )
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].file, PathBuf::from("b.qcow2"));
        assert!(resolve(&[], &["virtio-blk-device,drive=nope".into()]).is_err());
        assert!(resolve(&[], &["e1000".into()]).is_err());
    }

    /// A disk released for a handover that then failed reopens on the guest's next request,
    /// unless another process took the image meanwhile (the lock refuses).
    #[test]
    fn released_disk_reopens_on_guest_io_unless_taken() {
        let p = std::env::temp_dir().join(format!("reopen-{}.raw", std::process::id()));
        drop(qcow2::RawImage::create(&p, 1 << 20).unwrap());
        let spec = parse_drive(&format!("file={},format=raw", p.display())).unwrap();
        let a = SharedDisk::open(&spec, false).unwrap();
        let mut dev = a.device_backend();
        dev.write_at(0, &[1u8; 512]).unwrap();
        a.release().unwrap();
        assert!(a.backend().is_none());
        dev.write_at(512, &[2u8; 512]).unwrap();
        assert!(a.backend().is_some(), "reopened by the guest's write");
        a.release().unwrap();
        let b = SharedDisk::open(&spec, false).unwrap();
        let e = dev.write_at(0, &[3u8; 512]).unwrap_err().to_string();
        assert!(e.contains("lock"), "{e}");
        drop(b);
        let data = std::fs::read(&p).unwrap();
        assert!(data[..512].iter().all(|&x| x == 1) && data[512..1024].iter().all(|&x| x == 2));
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn error_policy_and_nfs_urls_parse() {
        let d = parse_drive("file=x,werror=stop,rerror=ignore").unwrap();
        assert_eq!((d.werror, d.rerror), (Some(virtio::ErrorAction::Stop), Some(virtio::ErrorAction::Ignore)));
        assert_eq!(parse_drive("file=x").unwrap().werror, None);
        assert!(parse_drive("file=x,werror=halt").unwrap_err().contains("invalid error action"));
        assert!(parse_drive("file=x,rerror=enospc").is_err());
        let d = parse_drive("file=nfs://h/export/d.qcow2?version=4,format=qcow2").unwrap();
        assert!(nfs_url(&d).unwrap().is_some());
        assert!(nfs_url(&parse_drive("file=nfs://h/x").unwrap()).unwrap_err().contains("invalid NFS URL"));
        assert!(nfs_url(&parse_drive("file=/a/b.qcow2").unwrap()).unwrap().is_none());
    }

    #[test]
    fn cache_modes_parse() {
        assert_eq!(parse_drive("file=x").unwrap().cache, CacheMode::Writeback);
        for (v, m) in [
            ("writeback", CacheMode::Writeback),
            ("none", CacheMode::None),
            ("directsync", CacheMode::DirectSync),
            ("writethrough", CacheMode::WriteThrough),
            ("unsafe", CacheMode::Unsafe),
        ] {
            assert_eq!(parse_drive(&format!("file=x,cache={v}")).unwrap().cache, m);
        }
        let e = parse_drive("file=x,cache=fast").unwrap_err();
        assert!(e.starts_with("invalid cache mode 'fast'") && !e.contains('\n'), "{e}");
    }

    /// A backend that counts the flushes reaching it.
    struct Counting(Arc<std::sync::atomic::AtomicU64>);

    impl BlockBackend for Counting {
        fn format(&self) -> ImageFormat {
            ImageFormat::Raw
        }
        fn size(&self) -> u64 {
            4096
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn read_at(&mut self, _off: u64, buf: &mut [u8]) -> qcow2::Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&mut self, _off: u64, _buf: &[u8]) -> qcow2::Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> qcow2::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn discard(&mut self, _off: u64, _len: u64) -> qcow2::Result<()> {
            Ok(())
        }
        fn write_zeroes(&mut self, _off: u64, _len: u64) -> qcow2::Result<()> {
            Ok(())
        }
    }

    /// cache=unsafe: the guest's flushes (through the device handle) never reach the image;
    /// the VMM's own (the migration handover) still do. Other modes pass every flush.
    #[test]
    fn unsafe_ignores_guest_flushes() {
        for (mode, guest_flushes) in [(CacheMode::Unsafe, 0), (CacheMode::Writeback, 5), (CacheMode::None, 5)] {
            let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let disk = SharedDisk {
                spec: DriveSpec { file: "counting".into(), cache: mode, ..Default::default() },
                inner: Arc::new(Mutex::new(Some(Box::new(Counting(n.clone()))))),
                gate: Arc::new(RwLock::new(())),
                lock: Arc::new(Mutex::new(None)),
                size: 4096,
                format: ImageFormat::Raw,
                mirror: Arc::new(Mutex::new(None)),
            mirror_mark: Arc::new(Mutex::new(MirrorMark::None)),
            };
            let mut dev = disk.device_backend();
            for _ in 0..5 {
                dev.write_at(0, &[1u8; 512]).unwrap();
                dev.flush().unwrap();
            }
            assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), guest_flushes, "{mode}");
            disk.release().unwrap();
            assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), guest_flushes + 1, "{mode}: handover flush");
        }
    }

    #[test]
    fn overlay_keeps_writes_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut base = qcow2::RawImage::create(dir.path().join("base.raw"), 65536).unwrap();
        base.write_at(0, &[7u8; 100]).unwrap();
        let mut o = Overlay::new(Box::new(base));
        o.write_at(50, &[9u8; 5000]).unwrap();
        let mut b = vec![0u8; 6000];
        o.read_at(0, &mut b).unwrap();
        assert_eq!(&b[..50], &[7u8; 50]);
        assert_eq!(&b[50..5050], &[9u8; 5000][..]);
        assert_eq!(b[5050], 0);
        assert!(o.write_at(65530, &[1u8; 10]).is_err());
    }
}
