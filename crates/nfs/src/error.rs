//! Errors of the NFS backend.

use thiserror::Error;

/// Why an `nfs://` image could not be used.
#[derive(Debug, Error)]
pub enum Error {
    /// The URL is not one this backend takes.
    #[error("invalid NFS URL '{url}': {why}")]
    Url { url: String, why: String },
    /// libnfs could not be loaded.
    #[error("nfs:// needs libnfs at run time (Debian package libnfs13, from libnfs-dev or libnfs-utils): {0}")]
    NoLibnfs(String),
    /// A libnfs call failed.
    #[error("{what} {url}: {msg}")]
    Nfs { what: &'static str, url: String, msg: String, errno: i32 },
    /// Another client holds the image's writer lock.
    #[error("Failed to get \"write\" lock on '{0}': is another process using the image? (an NFSv4 lock held by another client)")]
    Locked(String),
}

impl Error {
    /// The errno this error stands for (what the block layer reports).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Url { .. } => libc::EINVAL,
            Error::NoLibnfs(_) => libc::ENOSYS,
            Error::Nfs { errno, .. } => *errno,
            Error::Locked(_) => libc::EAGAIN,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> std::io::Error {
        // Out of space keeps its errno: the block layer's `enospc` policy looks for it.
        if matches!(e.errno(), libc::ENOSPC | libc::EDQUOT | libc::EFBIG) {
            return std::io::Error::from_raw_os_error(e.errno());
        }
        std::io::Error::new(std::io::Error::from_raw_os_error(e.errno()).kind(), e.to_string())
    }
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
