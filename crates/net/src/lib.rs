//! # net — Godwit's host side of guest networking
//!
//! - [`tap`]: a Linux tap device opened through `/dev/net/tun` with `IFF_TAP | IFF_NO_PI |
//!   IFF_VNET_HDR`, non-blocking, with the 12-byte virtio 1.x net header on every frame (so a
//!   virtio-net device passes guest frames through without reformatting them), offload
//!   control, and the optional `script=`/`downscript=` hooks of QEMU's `-netdev tap`.
//! - [`mac`]: MAC addresses (parsing `52:54:00:12:34:56`, QEMU's default scheme).
//! - [`announce`]: the frames a destination sends after a live migration or a `loadvm` so that
//!   switches and bridges learn the guest's new port (RARP, as QEMU's `announce-self`), and the
//!   round schedule (`announce-rounds`, `-initial`, `-max`, `-step`).
//!
//! Everything here is independent of KVM and of virtio; `crates/virtio` builds the device on
//! top of it.

pub mod announce;
pub mod mac;
pub mod tap;

pub use announce::{rarp_frame, AnnounceParams, AnnounceSchedule};
pub use mac::{MacAddr, MacParseError};
pub use tap::{Tap, TapError, TapOptions, VNET_HDR_LEN};
