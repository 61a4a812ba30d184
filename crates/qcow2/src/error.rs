//! Typed errors of the qcow2 crate.

use std::io;

/// Result alias used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while opening or using an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on the host file, with what we were doing.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the library was doing.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the qcow2 magic.
    #[error("not a qcow2 image")]
    NotQcow2,
    /// A feature this implementation does not support (refused, not guessed).
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// The image metadata is inconsistent or hostile.
    #[error("corrupt qcow2 image: {0}")]
    Corrupt(String),
    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A write was attempted on an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// No snapshot with that id or name.
    #[error("snapshot '{0}' not found")]
    SnapshotNotFound(String),
    /// `cache=none`/`directsync` on a file system that refuses `O_DIRECT`.
    #[error("Could not open with O_DIRECT (cache=none/directsync): {0}; the file system does not support direct I/O, use cache=writeback or cache=writethrough")]
    NoDirectIo(String),
    /// A backing file could not be opened.
    #[error("Could not open backing file '{name}' ({path}): {source}")]
    BackingOpen {
        /// The name stored in the overlay.
        name: String,
        /// The name resolved against the overlay's directory.
        path: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// An image appears twice in its own backing chain.
    #[error("backing chain loop: '{0}' is already part of this chain")]
    BackingLoop(String),
    /// The backing chain is deeper than the supported maximum.
    #[error("backing chain too deep (more than {0} images)")]
    BackingTooDeep(usize),
    /// The image is locked by another user.
    #[error("'{0}': {1}")]
    Locked(String, String),
    /// A refcount would exceed the maximum for the image's refcount width.
    #[error("refcount overflow (refcount width {0} bits is too small)")]
    RefcountOverflow(u32),
}

impl Error {
    /// True when the underlying cause is a full disk (ENOSPC/EDQUOT/EFBIG).
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG)
            ),
            _ => false,
        }
    }
}

/// Attach a context string to an `io::Result`.
pub(crate) trait IoCtx<T> {
    fn ctx(self, context: &'static str) -> Result<T>;
}

impl<T> IoCtx<T> for io::Result<T> {
    fn ctx(self, context: &'static str) -> Result<T> {
        self.map_err(|source| Error::Io { context, source })
    }
}

pub(crate) fn corrupt<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Corrupt(msg.into()))
}
