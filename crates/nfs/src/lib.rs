//! # nfs — disk images on an NFS server, through libnfs in user space
//!
//! `-drive file=nfs://SERVER[:PORT]/EXPORT/PATH[?version=4&nfsport=N&...]` (QEMU's syntax, plus
//! libnfs's URL options): the image is reached with libnfs's synchronous API (loaded at run
//! time, [`ffi`]), no kernel NFS client or mount needed. [`NfsStorage`] implements the qcow2
//! crate's [`qcow2::storage::Storage`], so qcow2 (with internal snapshots and VM state) and raw
//! images work on it exactly as on a local file; [`open_image`] is the NFS twin of
//! `qcow2::open`.
//!
//! Why a binding of our own: the crates.io `libnfs`/`libnfs-sys` bindings were last released
//! in 2022, are generated for libnfs 1.9 and do not build on docs.rs; the dozen calls needed
//! here are transcribed by hand in [`ffi`] and loaded with `dlopen`, so nothing in the build
//! needs libnfs.
//!
//! Backing chains (`qemu-img create -b base.qcow2 ...` on the export): relative names resolve
//! against the overlay's URL, see [`chain`].
//!
//! Failure handling (hard-mount retries with a deadline) and the single-writer NFSv4 lock are
//! described in [`storage`].

pub mod chain;
pub mod error;
pub mod ffi;
pub mod ganesha;
pub mod storage;
pub mod url;

pub use chain::NfsOpener;
pub use error::{Error, Result};
pub use storage::{NfsCounters, NfsOptions, NfsStorage, LOCK_BYTE};
pub use url::{is_nfs_url, NfsUrl, DEFAULT_HARD_TIMEOUT};

use qcow2::{BlockBackend, ImageFormat, OpenOptions, Qcow2, RawImage};

/// Errors of [`open_image`]: the NFS connection or the image format on top of it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Nfs(#[from] Error),
    #[error("{url}: {source}")]
    Image { url: String, source: qcow2::Error },
}

/// The storage options `opts` (read-only, `cache=`) and `lock` imply.
pub fn nfs_options(opts: &OpenOptions, lock: bool) -> NfsOptions {
    NfsOptions { read_only: opts.read_only, lock: lock && !opts.read_only, sync_writes: opts.cache.dsync() }
}

/// `opts` with [`NfsOpener`] as the backing-file opener (unless it names one already).
pub fn chain_options(opts: &OpenOptions) -> OpenOptions {
    let mut o = opts.clone();
    if o.backing_opener.is_none() {
        o.backing_opener = Some(std::sync::Arc::new(NfsOpener));
    }
    o
}

/// Opens the qcow2 image on `storage` (at `url`) with its backing chain, relative backing
/// names resolved against `url` (see [`chain`]).
pub fn open_qcow2(url: &NfsUrl, storage: NfsStorage, opts: &OpenOptions) -> std::result::Result<Qcow2, OpenError> {
    let at = std::path::Path::new(&url.original);
    Qcow2::open_storage_as(Box::new(storage), at, &chain::identity(url), &chain_options(opts))
        .map_err(|e| OpenError::Image { url: url.original.clone(), source: e })
}

/// Opens the image at `url` as `format` (probed from its content when `None`). A writer with
/// `lock` holds the NFSv4 single-writer lock while the backend lives.
pub fn open_image(
    url: &NfsUrl,
    format: Option<ImageFormat>,
    opts: &OpenOptions,
    lock: bool,
) -> std::result::Result<Box<dyn BlockBackend>, OpenError> {
    let s = NfsStorage::open(url, nfs_options(opts, lock))?;
    let img = |e| OpenError::Image { url: url.original.clone(), source: e };
    let fmt = match format {
        Some(f) => f,
        None => qcow2::probe_storage(&s).map_err(img)?,
    };
    Ok(match fmt {
        ImageFormat::Raw => Box::new(RawImage::on(Box::new(s), opts.read_only).map_err(img)?),
        ImageFormat::Qcow2 => Box::new(open_qcow2(url, s, opts)?),
    })
}

/// Probes the format of the image at `url`.
pub fn probe(url: &NfsUrl) -> std::result::Result<ImageFormat, OpenError> {
    let s = NfsStorage::open(url, NfsOptions { read_only: true, ..Default::default() })?;
    qcow2::probe_storage(&s).map_err(|e| OpenError::Image { url: url.original.clone(), source: e })
}
