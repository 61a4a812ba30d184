//! The migration-transport parameters (`tls-*`, `multifd-*`) between the monitor's
//! `MigrationParameters` and the engine's `Params`.

use migration::stats::{Compression, Params};
use monitor::error::CommandError;
use monitor::migration::{CapabilityStatus, MigrationCapability, MigrationParameters, MultifdCompression};

/// Refuses a capability set that would turn on both `multifd` and `postcopy-ram` (QEMU 7.2
/// refuses it with this message).
pub fn check_caps(now: &Params, caps: &[CapabilityStatus]) -> Result<(), CommandError> {
    let after = |c: MigrationCapability, cur: bool| caps.iter().rev().find(|s| s.capability == c).map_or(cur, |s| s.state);
    if after(MigrationCapability::Multifd, now.multifd) && after(MigrationCapability::PostcopyRam, now.postcopy) {
        return Err(CommandError::generic("Postcopy is not yet compatible with multifd"));
    }
    Ok(())
}

/// Copies the transport parameters present in a set request.
pub fn set(params: &mut Params, p: &MigrationParameters) {
    if let Some(v) = p.multifd_channels {
        params.multifd_channels = v.clamp(1, 255) as u8;
    }
    if let Some(v) = p.multifd_compression {
        params.multifd_compression = match v {
            MultifdCompression::None => Compression::None,
            MultifdCompression::Zlib => Compression::Zlib,
            MultifdCompression::Zstd => Compression::Zstd,
        };
    }
    if let Some(v) = p.multifd_zlib_level {
        params.multifd_zlib_level = v.min(9) as u8;
    }
    if let Some(v) = p.multifd_zstd_level {
        params.multifd_zstd_level = v.min(20) as u8;
    }
    if let Some(v) = &p.tls_creds {
        params.tls_creds = v.clone();
    }
    if let Some(v) = &p.tls_hostname {
        params.tls_hostname = v.clone();
    }
    if let Some(v) = &p.tls_authz {
        params.tls_authz = v.clone();
    }
}

/// The engine's compression as the monitor names it.
pub fn compression_out(c: Compression) -> MultifdCompression {
    match c {
        Compression::None => MultifdCompression::None,
        Compression::Zlib => MultifdCompression::Zlib,
        Compression::Zstd => MultifdCompression::Zstd,
    }
}
