//! # mirror — copying a running guest's disk to another host
//!
//! The source half of storage migration without shared storage (QEMU's `drive-mirror` /
//! `blockdev-mirror` with `sync: full`, `top` or `none`, see [`SyncMode`]): a [`Mirror`] copies a drive into a [`MirrorTarget`]
//! (an [`nbd::NbdClient`] connected to the destination's export, or any block backend) while
//! the guest keeps running.
//!
//! 1. The drive calls [`Mirror::on_write`] after every guest write, under the drive's own
//!    lock; while the bulk copy runs that only records the range in a [`DirtyBitmap`].
//! 2. The first pass copies what the source's allocation map says is data (a qcow2 image's
//!    allocated clusters) and sends the rest as zero requests (`NBD_CMD_WRITE_ZEROES`: no
//!    payload). Each following pass copies the chunks dirtied meanwhile.
//! 3. When a pass leaves at most [`READY_DIRTY_BYTES`] dirty, the job copies that rest with
//!    guest I/O held off (the drive's lock), then switches the mirror to **write-through**:
//!    from then on every guest write reaches the target before it completes, so source and
//!    target stay identical and the job is *ready*. A live migration started now needs no
//!    extra disk step at the switchover: once the vCPUs and disk queues are paused, the
//!    target already holds every write.
//! 4. `cancel` of a ready job (QEMU's "done, target consistent") or `complete` ends it after a
//!    target flush; `complete` also lets the caller pivot the drive onto the target. A target
//!    error ends the job with that error and detaches the mirror: the guest runs on with its
//!    source disk, untouched.

mod bitmap;
mod job;
mod target;

pub use bitmap::DirtyBitmap;
pub use job::{JobEnd, Mirror, MirrorError, Progress, SourceDisk, SyncMode, WriteKind, READY_DIRTY_BYTES};
pub use target::{BackendTarget, MirrorTarget, NbdTarget};
