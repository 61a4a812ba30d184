//! # qcow2 — QEMU-compatible qcow2 images with internal snapshots and VM state
//!
//! A synchronous library for the qcow2 format as QEMU writes it (versions 2 and 3, cluster
//! sizes 512 B – 2 MiB, refcount widths 1–64 bits, zero clusters, zlib- and zstd-compressed
//! clusters, extended L2 entries with subclusters, backing chains) with internal snapshots and
//! the VM-state area used by `savevm`/`loadvm`. Images it writes pass `qemu-img check` and
//! list identically in `qemu-img snapshot -l`.
//!
//! Refused with [`Error::Unsupported`]: encryption, external data files, writing
//! zlib-compressed clusters (zstd only; QEMU's 4 KiB deflate window is not available from
//! flate2's default backend), backing files reached through a protocol (`nfs://` names need an
//! [`backing::Opener`]). Images with the dirty bit (lazy refcounts) get their refcounts rebuilt
//! when opened read-write; images marked corrupt open read-only only.
//!
//! ## Disks
//! [`open`] probes the format by content and returns a [`BlockBackend`] (qcow2 or raw); the
//! VMM's block device only uses that trait. [`BlockBackend::as_qcow2`] reaches the snapshot API.
//! [`Qcow2::refresh`] re-reads all metadata (live-migration handover on shared storage: the
//! source flushes and stops writing, the destination refreshes or opens anew).
//!
//! ## Backing chains
//! An image with a backing file opens its chain (any depth up to
//! [`backing::MAX_CHAIN_DEPTH`], qcow2 or raw layers; relative names resolve against the
//! directory of the image naming them; `backing_fmt` or probing picks the format). Backing
//! images are read-only and hold QEMU's shared locks ("consistent read", "write not shared"),
//! so a second VM over the same base works while a writer of the base is refused — and we
//! refuse a base someone is writing. Unallocated clusters read through to the backing image
//! (zeros past its end); partial writes copy the rest of the cluster (or subcluster) up into the
//! top layer. Loops, missing files and absurd depths are [`Error::BackingLoop`],
//! [`Error::BackingOpen`] and [`Error::BackingTooDeep`]. Internal snapshots and the VM state
//! live in the top image. [`Qcow2::chain_map`] is `qemu-img map` with layer depths;
//! [`Qcow2::commit_to_backing`], [`Qcow2::rebase`] and [`Qcow2::set_backing`] are `qemu-img
//! commit` / `rebase` / `rebase -u`. [`OpenOptions::no_backing`] opens the top layer alone.
//!
//! ## Copying only the top layer (`sync: top`, `--copy-storage-inc`)
//! [`Qcow2::top_allocation`]`(off, len)` splits a guest range into runs
//! `(start, length, allocated_in_top)`: a run is allocated in the top layer when this image
//! itself holds data or zeros for it (normal, zero, compressed clusters; with extended L2,
//! per subcluster), i.e. exactly what must be copied when the destination already has the
//! backing chain; the other runs read from the backing files. [`Qcow2::is_allocated_top`] is
//! the yes/no form for one range.
//!
//! ## savevm / loadvm
//! Follows QEMU's order:
//! ```no_run
//! # use qcow2::*;
//! # fn f(img: &mut Qcow2, state: &[u8]) -> Result<()> {
//! // savevm: stream the state into the active layer's VM-state area ...
//! let mut w = img.vmstate_writer()?;          // empties the area first
//! w.write_all_bytes(state)?;                  // or std::io::Write; large buffers
//! let vm_state_size = w.finish()?;
//! // ... then take the snapshot (atomically replaces a same-named one) and drop the state
//! // from the active layer.
//! let mut s = NewSnapshot::new("vm-20250101000000");
//! s.vm_state_size = vm_state_size;
//! s.vm_clock_ns = 2_233_000_000;
//! img.create_snapshot(&s)?;
//! // loadvm: revert the disk, then stream the state back.
//! img.goto_snapshot("vm-20250101000000")?;
//! let mut r = img.vmstate_reader("vm-20250101000000")?;   // std::io::Read
//! # let _ = r.len(); Ok(()) }
//! ```
//! `snapshots()` lists, `delete_snapshot(name)` deletes. Every snapshot-table change (create,
//! goto, delete, refcount rebuild) is one atomic commit (new metadata in free space, then a
//! single header write), so a crash or a full disk (ENOSPC) leaves the previous image and its
//! snapshots intact. Guest and VM-state writes order refcount → data → L2 → L1 and release old
//! clusters last, so a crash leaves at most leaked clusters.

mod backend;
pub mod backing;
mod cache;
mod chain;
mod check;
mod cluster;
mod commit;
mod compress;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod header;
pub mod hostfile;
mod image;
mod map;
pub mod parallel;
mod refcount;
mod snapshot;
mod subcluster;
pub mod storage;
mod vmstate;
mod vmstate_map;

pub use backend::{open, probe, probe_storage, BlockBackend, ImageFormat, RawImage};
pub use chain::ChainExtent;
pub use check::{CheckReport, RepairMode};
pub use error::{Error, Result};
pub use hostfile::CacheMode;
pub use image::{CreateOptions, OpenOptions, Qcow2};
pub use map::{MapEntry, MapKind};
pub use parallel::{split_bufs, HostFileIo, IoBuf, ParallelIo};
pub use snapshot::{NewSnapshot, SnapshotInfo, SnapshotSelector};
pub use vmstate::{VmStateReader, VmStateWriter, VMSTATE_CHUNK};
pub use vmstate_map::VmStateFileMap;
