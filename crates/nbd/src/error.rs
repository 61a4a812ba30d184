//! Errors of the NBD server and client.

use std::io;

/// Everything that can go wrong speaking NBD.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed.
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    /// The peer broke the protocol (bad magic, truncated or oversized field).
    #[error("NBD protocol error: {0}")]
    Protocol(String),
    /// The server refused an option during negotiation.
    #[error("NBD server refused {option}: {message}")]
    Refused { option: &'static str, message: String },
    /// A transmission request failed on the server.
    #[error("NBD {op} at offset {offset} (+{len}) failed: {}", errno_name(*.errno))]
    Request { op: &'static str, offset: u64, len: u64, errno: u32 },
    /// A bad argument from our caller (name, URI, range).
    #[error("{0}")]
    InvalidArgument(String),
}

/// Result with this crate's error.
pub type Result<T> = std::result::Result<T, Error>;

/// Adds a context to I/O errors.
pub(crate) trait IoCtx<T> {
    fn ctx(self, context: &'static str) -> Result<T>;
}

impl<T> IoCtx<T> for io::Result<T> {
    fn ctx(self, context: &'static str) -> Result<T> {
        self.map_err(|source| Error::Io { context, source })
    }
}

/// The protocol's error numbers by name.
pub fn errno_name(e: u32) -> String {
    use crate::proto::*;
    match e {
        EPERM => "EPERM (operation not permitted)".into(),
        EIO => "EIO (input/output error)".into(),
        ENOMEM => "ENOMEM".into(),
        EINVAL => "EINVAL (invalid argument)".into(),
        ENOSPC => "ENOSPC (no space left)".into(),
        EOVERFLOW => "EOVERFLOW".into(),
        ENOTSUP => "ENOTSUP".into(),
        ESHUTDOWN => "ESHUTDOWN (server shutting down)".into(),
        other => format!("error {other}"),
    }
}
