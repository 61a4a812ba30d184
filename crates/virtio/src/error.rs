//! Typed errors of the virtio crate: what the VMM can get back when it creates, activates,
//! pauses or reconfigures a device. Problems the *guest* causes (bad descriptors, bad sectors)
//! are never errors of this kind: they become virtio status codes in the used ring.

use std::io;

/// Errors returned to the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Only a limited number of virtio-mmio slots exist (IOAPIC pins 16..23).
    #[error("virtio-mmio slot {index} does not exist (at most {max} devices)")]
    NoSlot { index: usize, max: usize },
    /// Creating an eventfd, an epoll set or a worker thread failed.
    #[error("virtio {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A virtqueue rejected its configuration.
    #[error("virtqueue {index}: {source}")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    /// The driver configured a queue the device cannot use.
    #[error("virtqueue {index}: {reason}")]
    BadQueue { index: usize, reason: &'static str },
    /// The device configuration the VMM asked for is not usable.
    #[error("virtio-blk configuration: {0}")]
    Config(String),
    /// The network device configuration or its tap is not usable.
    #[error("virtio-net: {0}")]
    Net(String),
    /// The operation needs the device paused first (see `MmioTransport::pause`).
    #[error("the device must be paused for {0}")]
    NotPaused(&'static str),
    /// A replacement backend does not look like the disk the guest negotiated with.
    #[error("replacement disk does not match: {0}")]
    BackendMismatch(String),
    /// Flushing the backend while quiescing failed: acknowledged writes may not be durable.
    #[error("flushing the disk: {0}")]
    Flush(String),
    /// The worker thread died (it panicked); the device cannot be quiesced cleanly.
    #[error("the virtio worker thread of {0} died")]
    WorkerDied(String),
}

impl Error {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
