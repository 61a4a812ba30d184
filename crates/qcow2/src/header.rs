//! The qcow2 header (cluster 0): parsing with validation, serialisation for new images, and the
//! byte offsets of fields that are updated in place.

use crate::error::{corrupt, Error, IoCtx, Result};
use crate::storage::Storage;

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Image marked corrupt by QEMU.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// External data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Non-zlib compression type.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Extended L2 entries.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compression type byte: zlib (deflate).
pub const COMPRESSION_ZLIB: u8 = 0;
/// Compression type byte: zstd.
pub const COMPRESSION_ZSTD: u8 = 1;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u64 = 1023;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types we know by name.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_BE77;

/// Offsets of fields updated in place.
pub const OFF_SIZE: u64 = 24;
/// l1_size (then l1_table_offset).
pub const OFF_L1: u64 = 36;
/// refcount_table_offset (then refcount_table_clusters).
pub const OFF_REFTABLE: u64 = 48;
/// nb_snapshots (then snapshots_offset).
pub const OFF_SNAPSHOTS: u64 = 60;
/// incompatible_features.
pub const OFF_INCOMPAT: u64 = 72;
/// autoclear_features.
pub const OFF_AUTOCLEAR: u64 = 88;

/// Largest active L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// One header extension record, kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type magic.
    pub kind: u32,
    /// Payload (without padding).
    pub data: Vec<u8>,
}

/// Parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (v3), 72 for v2.
    pub header_length: u32,
    /// Extensions in file order, unknown ones included.
    pub extensions: Vec<Extension>,
    /// Backing file name as stored (relative names are relative to the image's directory).
    pub backing_file: Option<String>,
    /// Compression type (v3 header byte 104): 0 zlib, 1 zstd.
    pub compression_type: u8,
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Read and validate the header of `file`. Features this crate refuses are reported as
    /// [`Error::Unsupported`]; the dirty and corrupt bits are left to the caller.
    pub fn read(file: &dyn Storage) -> Result<Header> {
        let mut b = [0u8; 104];
        file.read_at(&mut b, 0).ctx("reading the header")?;
        if be32(&b, 0) != MAGIC {
            return Err(Error::NotQcow2);
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!("qcow2 version {version}")));
        }
        let min_len = if version == 2 { 72 } else { 104 };
        if file.len().ctx("querying the file size")? < min_len {
            return corrupt("file too short for a qcow2 header (truncated image)");
        }
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return corrupt(format!("cluster_bits {cluster_bits} out of range 9..21"));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(&b, 24),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            extensions: Vec::new(),
            backing_file: None,
            compression_type: 0,
        };
        let backing_off = be64(&b, 8);
        let backing_len = be32(&b, 16) as u64;
        match be32(&b, 32) {
            0 => {}
            1 => return Err(Error::Unsupported("AES encryption".into())),
            2 => return Err(Error::Unsupported("LUKS encryption".into())),
            m => return Err(Error::Unsupported(format!("encryption method {m}"))),
        }
        if version == 3 {
            h.incompatible = be64(&b, 72);
            h.compatible = be64(&b, 80);
            h.autoclear = be64(&b, 88);
            h.refcount_order = be32(&b, 96);
            h.header_length = be32(&b, 100);
            if h.header_length < 104 || h.header_length % 8 != 0 || h.header_length as u64 > cs {
                return corrupt(format!("invalid header length {}", h.header_length));
            }
            if h.refcount_order > 6 {
                return corrupt(format!("refcount_order {} > 6", h.refcount_order));
            }
            if h.header_length > 104 {
                let mut ct = [0u8; 1];
                file.read_at(&mut ct, 104).ctx("reading the header")?;
                if ct[0] > COMPRESSION_ZSTD {
                    return Err(Error::Unsupported(format!(
                        "compression type {} (zlib and zstd are supported)",
                        ct[0]
                    )));
                }
                h.compression_type = ct[0];
            }
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if h.incompatible & !known != 0 {
            return Err(Error::Unsupported(format!(
                "unknown incompatible feature bits {:#x}",
                h.incompatible & !known
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::Unsupported("external data file".into()));
        }
        if (h.incompatible & INCOMPAT_COMPRESSION != 0) != (h.compression_type != 0) {
            return corrupt(format!(
                "compression type {} does not match the compression type (zstd) feature bit",
                h.compression_type
            ));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 && cluster_bits < 14 {
            return corrupt(format!(
                "extended L2 entries need clusters of at least 16 KiB (cluster_bits {cluster_bits})"
            ));
        }
        // Alignment and size checks.
        let mask = cs - 1;
        if h.l1_table_offset & mask != 0 || h.refcount_table_offset & mask != 0 {
            return corrupt("L1 or refcount table offset not cluster aligned");
        }
        if h.l1_size as u64 * 8 > MAX_L1_BYTES {
            return corrupt(format!("active L1 table too large ({} entries)", h.l1_size));
        }
        if h.refcount_table_clusters as u64 * cs > MAX_REFTABLE_BYTES.max(cs) {
            return corrupt("refcount table too large");
        }
        if h.refcount_table_offset == 0 || h.refcount_table_clusters == 0 {
            return corrupt("no refcount table");
        }
        if h.nb_snapshots > 65536 {
            return corrupt(format!("too many snapshots ({})", h.nb_snapshots));
        }
        if h.nb_snapshots > 0 && (h.snapshots_offset == 0 || h.snapshots_offset & mask != 0) {
            return corrupt("snapshot table offset invalid");
        }
        let entry = if h.incompatible & INCOMPAT_EXTL2 != 0 { 16 } else { 8 };
        let span = cs * (cs / entry);
        let need = h.size.div_ceil(span);
        if need > h.l1_size as u64 {
            return corrupt(format!(
                "L1 table too small for the disk size ({} < {need})",
                h.l1_size
            ));
        }
        if h.l1_size > 0 && h.l1_table_offset == 0 {
            return corrupt("L1 table offset is zero");
        }
        // Extensions live in the rest of cluster 0.
        let start = h.header_length as u64;
        let ext_len = cs.saturating_sub(start);
        let mut e = vec![0u8; ext_len as usize];
        file.read_at(&mut e, start)
            .ctx("reading header extensions")?;
        let mut p = 0usize;
        while p + 8 <= e.len() {
            let kind = be32(&e, p);
            let len = be32(&e, p + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_end = p + 8 + len;
            if data_end > e.len() {
                return corrupt("header extension runs past the first cluster");
            }
            match kind {
                EXT_DATA_FILE => return Err(Error::Unsupported("external data file".into())),
                EXT_CRYPTO => return Err(Error::Unsupported("encryption".into())),
                _ => {}
            }
            h.extensions.push(Extension {
                kind,
                data: e[p + 8..data_end].to_vec(),
            });
            p = (data_end + 7) & !7;
        }
        if backing_off != 0 || backing_len != 0 {
            if backing_len == 0 || backing_len > MAX_BACKING_NAME {
                return corrupt(format!("backing file name length {backing_len} invalid"));
            }
            match backing_off.checked_add(backing_len) {
                Some(end) if backing_off >= 72 && end <= cs => {}
                _ => return corrupt("backing file name does not lie in the first cluster"),
            }
            let mut name = vec![0u8; backing_len as usize];
            file.read_at(&mut name, backing_off)
                .ctx("reading the backing file name")?;
            let name = String::from_utf8(name)
                .map_err(|_| Error::Unsupported("backing file name is not UTF-8".into()))?;
            if name.contains('\0') {
                return corrupt("backing file name contains a NUL byte");
            }
            h.backing_file = Some(name);
        }
        Ok(h)
    }

    /// The backing format named by the backing-format header extension, if any.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    /// Serialise the whole header (with extensions and end marker) for a new image.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(512);
        v.extend_from_slice(&MAGIC.to_be_bytes());
        v.extend_from_slice(&self.version.to_be_bytes());
        // Backing name offset and length: patched below once the extensions are laid out.
        v.extend_from_slice(&0u64.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&self.cluster_bits.to_be_bytes());
        v.extend_from_slice(&self.size.to_be_bytes());
        v.extend_from_slice(&0u32.to_be_bytes());
        v.extend_from_slice(&self.l1_size.to_be_bytes());
        v.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        v.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        v.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        v.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        v.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            v.extend_from_slice(&self.incompatible.to_be_bytes());
            v.extend_from_slice(&self.compatible.to_be_bytes());
            v.extend_from_slice(&self.autoclear.to_be_bytes());
            v.extend_from_slice(&self.refcount_order.to_be_bytes());
            v.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                v.push(self.compression_type);
            }
            v.resize(self.header_length as usize, 0);
        }
        for e in &self.extensions {
            v.extend_from_slice(&e.kind.to_be_bytes());
            v.extend_from_slice(&(e.data.len() as u32).to_be_bytes());
            v.extend_from_slice(&e.data);
            while v.len() % 8 != 0 {
                v.push(0);
            }
        }
        v.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = v.len() as u64;
            v[8..16].copy_from_slice(&off.to_be_bytes());
            v[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            v.extend_from_slice(name.as_bytes());
        }
        v
    }
}

/// The feature-name table QEMU writes into v3 images.
pub fn feature_table() -> Extension {
    let names: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut data = Vec::with_capacity(48 * names.len());
    for (kind, bit, name) in names {
        let mut e = [0u8; 48];
        e[0] = kind;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&e);
    }
    Extension {
        kind: EXT_FEATURE_TABLE,
        data,
    }
}
