//! # nbd — the Network Block Device protocol, for moving disks between hosts
//!
//! Storage migration without shared storage works as in QEMU: the destination exports its
//! (empty) disk over NBD, and the source's mirror job writes the guest's disk into it while
//! the guest runs. This crate is that wire protocol, synchronous and without a runtime:
//!
//! - [`NbdServer`]: a TCP listener serving named [`Export`]s of any [`qcow2::BlockBackend`]
//!   (the trait the VMM's drives use) with fixed newstyle negotiation (`NBD_OPT_GO`, `INFO`,
//!   `LIST`, `ABORT`, `EXPORT_NAME`, `STRUCTURED_REPLY`, `SET`/`LIST_META_CONTEXT` for
//!   `base:allocation`), and the commands `READ`, `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`,
//!   `BLOCK_STATUS`, `CACHE` and `DISC`. Structured replies are used once negotiated. QEMU's
//!   client (`qemu-io`, `qemu-img`, the mirror job) and libnbd (`nbdinfo`, `nbdcopy`) use it.
//! - [`NbdClient`]: connects to an export (`NBD_OPT_GO`) and reads, writes, zeroes, trims and
//!   flushes it with simple replies; it is itself a [`qcow2::BlockBackend`], so the mirror job
//!   copies into it through the same trait as into a local image.
//!
//! Everything a peer sends is bounded before anything is allocated for it
//! ([`proto::MAX_OPTION_LEN`], [`proto::MAX_PAYLOAD`], [`proto::MAX_STRING`]); malformed input
//! ends that connection with an error, never a panic. The parsers are in [`proto`] (pure, property-tested
//! and fuzzed by `fuzz/`).
//!
//! No crate on crates.io fit: `nbd` 0.3 serves a `Read + Write + Seek` with neither structured
//! replies nor block status, `tokio-nbd` needs an async runtime the VMM does not have, and
//! `libnbd` binds a C library (client only).

pub mod client;
pub mod error;
pub mod proto;
pub mod server;

pub use client::{parse_nbd_uri, NbdClient, NbdTarget};
pub use error::{Error, Result};
pub use server::{Export, NbdServer, SharedBackend};
