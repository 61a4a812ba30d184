//! Internal snapshots: the on-disk snapshot table (parse/serialise, unknown extra data kept) and
//! the public snapshot operations (list, create, goto/apply, delete).
//!
//! Every operation that changes the snapshot table is done by [`Qcow2::commit`]: the new tables
//! are written to free space and switched in with one header write, so a crash leaves either the
//! old or the new image, never a mix.

use crate::commit::{Plan, Slot};
use crate::error::{corrupt, Error, IoCtx, Result};
use crate::image::{be64, bytes_to_entries, Qcow2, OFFSET_MASK};
use std::time::{SystemTime, UNIX_EPOCH};

/// Largest snapshot table QEMU accepts.
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One snapshot table entry as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapEntry {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: Vec<u8>,
    pub name: Vec<u8>,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_ns: u64,
    pub vm_state_size: u64,
    pub disk_size: u64,
    pub icount: u64,
    /// Extra data beyond the 24 bytes we know, preserved verbatim.
    pub extra_tail: Vec<u8>,
}

/// A snapshot as reported to callers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Numeric id as text ("1", "2", ...).
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Wall-clock creation time, seconds since the Unix epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// Guest virtual clock at snapshot time, in nanoseconds.
    pub vm_clock_ns: u64,
    /// Bytes of VM state saved with the snapshot (0 = disk-only snapshot).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    /// Record/replay instruction count (None when not recorded, stored as -1).
    pub icount: Option<u64>,
}

/// Parameters of a snapshot to create.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    /// Name (tag).
    pub name: String,
    /// Bytes of VM state previously written with the vmstate writer (0 = disk-only).
    pub vm_state_size: u64,
    /// Guest virtual clock in nanoseconds.
    pub vm_clock_ns: u64,
    /// Creation time (QEMU stores microsecond precision).
    pub date: SystemTime,
    /// Instruction count: QEMU's savevm stores None (-1), `qemu-img snapshot -c` stores Some(0).
    pub icount: Option<u64>,
    /// Atomically replace every existing snapshot with this name (savevm semantics). When false,
    /// duplicates are allowed (`qemu-img snapshot -c` semantics).
    pub replace: bool,
}

impl NewSnapshot {
    /// A snapshot named `name`, dated now, with savevm defaults (replace, icount none).
    pub fn new(name: &str) -> Self {
        NewSnapshot {
            name: name.to_string(),
            vm_state_size: 0,
            vm_clock_ns: 0,
            date: SystemTime::now(),
            icount: None,
            replace: true,
        }
    }
}

impl SnapEntry {
    pub(crate) fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: String::from_utf8_lossy(&self.id).into_owned(),
            name: String::from_utf8_lossy(&self.name).into_owned(),
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_ns: self.vm_clock_ns,
            vm_state_size: self.vm_state_size,
            disk_size: self.disk_size,
            icount: (self.icount != u64::MAX).then_some(self.icount),
        }
    }
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Parse the snapshot table of `img`.
pub(crate) fn read_table(img: &Qcow2) -> Result<Vec<SnapEntry>> {
    let n = img.h.nb_snapshots;
    let file_len = img.file.len().ctx("querying the file size")?;
    let mut v = Vec::new();
    let mut pos = img.h.snapshots_offset;
    let start = pos;
    for _ in 0..n {
        pos = (pos + 7) & !7;
        if pos - start > MAX_TABLE_BYTES {
            return corrupt("snapshot table larger than 64 MiB");
        }
        let mut h = [0u8; 40];
        img.file
            .read_at(&mut h, pos)
            .ctx("reading the snapshot table")?;
        let id_len = u16::from_be_bytes([h[12], h[13]]) as usize;
        let name_len = u16::from_be_bytes([h[14], h[15]]) as usize;
        let extra_len = be32(&h, 36) as usize;
        if extra_len > 1024 {
            return corrupt(format!("snapshot extra data too large ({extra_len} bytes)"));
        }
        if pos.saturating_add(40 + (extra_len + id_len + name_len) as u64) > file_len {
            return corrupt("snapshot table lies past the end of the file");
        }
        let mut rest = vec![0u8; extra_len + id_len + name_len];
        img.file
            .read_at(&mut rest, pos + 40)
            .ctx("reading the snapshot table")?;
        let extra = &rest[..extra_len];
        let vm32 = be32(&h, 32) as u64;
        let e = SnapEntry {
            l1_offset: be64(&h, 0),
            l1_size: be32(&h, 8),
            date_sec: be32(&h, 16),
            date_nsec: be32(&h, 20),
            vm_clock_ns: be64(&h, 24),
            vm_state_size: if extra_len >= 8 { be64(extra, 0) } else { vm32 },
            disk_size: if extra_len >= 16 {
                be64(extra, 8)
            } else {
                img.h.size
            },
            icount: if extra_len >= 24 {
                be64(extra, 16)
            } else {
                u64::MAX
            },
            extra_tail: if extra_len > 24 {
                extra[24..].to_vec()
            } else {
                Vec::new()
            },
            id: rest[extra_len..extra_len + id_len].to_vec(),
            name: rest[extra_len + id_len..].to_vec(),
        };
        pos += 40 + rest.len() as u64;
        v.push(e);
    }
    Ok(v)
}

/// Serialise a snapshot table.
pub(crate) fn table_bytes(s: &[SnapEntry]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, e) in s.iter().enumerate() {
        if i > 0 {
            while v.len() % 8 != 0 {
                v.push(0);
            }
        }
        let extra_len = 24 + e.extra_tail.len();
        v.extend_from_slice(&e.l1_offset.to_be_bytes());
        v.extend_from_slice(&e.l1_size.to_be_bytes());
        v.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
        v.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        v.extend_from_slice(&e.date_sec.to_be_bytes());
        v.extend_from_slice(&e.date_nsec.to_be_bytes());
        v.extend_from_slice(&e.vm_clock_ns.to_be_bytes());
        let vm32 = if e.vm_state_size > u32::MAX as u64 {
            0
        } else {
            e.vm_state_size as u32
        };
        v.extend_from_slice(&vm32.to_be_bytes());
        v.extend_from_slice(&(extra_len as u32).to_be_bytes());
        v.extend_from_slice(&e.vm_state_size.to_be_bytes());
        v.extend_from_slice(&e.disk_size.to_be_bytes());
        v.extend_from_slice(&e.icount.to_be_bytes());
        v.extend_from_slice(&e.extra_tail);
        v.extend_from_slice(&e.id);
        v.extend_from_slice(&e.name);
    }
    v
}

/// Which snapshot a command means, as qemu-img's options say it: a bare key (`-l X`,
/// `snapshot -a X`) is an id first, then a name; `snapshot.id=` matches ids only,
/// `snapshot.name=` names only, and both together must both match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSelector<'a> {
    IdOrName(&'a str),
    Id(&'a str),
    Name(&'a str),
    IdAndName(&'a str, &'a str),
}

impl Qcow2 {
    /// All snapshots, in table order.
    pub fn snapshots(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(|s| s.info()).collect()
    }

    /// Index of a snapshot: exact id match first, then the first name match (QEMU's goto).
    pub(crate) fn find_id_or_name(&self, key: &str) -> Option<usize> {
        let k = key.as_bytes();
        self.snapshots
            .iter()
            .position(|s| s.id == k)
            .or_else(|| self.snapshots.iter().position(|s| s.name == k))
    }

    /// Find a snapshot by id, then by name.
    pub fn find_snapshot(&self, key: &str) -> Option<SnapshotInfo> {
        self.find_id_or_name(key).map(|i| self.snapshots[i].info())
    }

    /// The snapshot a selector means (see [`SnapshotSelector`]).
    pub fn select_snapshot(&self, sel: &SnapshotSelector) -> Option<SnapshotInfo> {
        let pos = |f: &dyn Fn(&SnapEntry) -> bool| self.snapshots.iter().position(f);
        let i = match sel {
            SnapshotSelector::IdOrName(k) => self.find_id_or_name(k),
            SnapshotSelector::Id(id) => pos(&|s| s.id == id.as_bytes()),
            SnapshotSelector::Name(n) => pos(&|s| s.name == n.as_bytes()),
            SnapshotSelector::IdAndName(id, n) => pos(&|s| s.id == id.as_bytes() && s.name == n.as_bytes()),
        }?;
        Some(self.snapshots[i].info())
    }

    /// Read a snapshot's L1 table (validated).
    pub(crate) fn snapshot_l1(&self, s: &SnapEntry) -> Result<Vec<u64>> {
        if s.l1_offset & (self.cs - 1) != 0 || (s.l1_size > 0 && s.l1_offset == 0) {
            return corrupt("snapshot L1 table offset invalid");
        }
        if s.l1_size as u64 * 8 > crate::header::MAX_L1_BYTES {
            return corrupt("snapshot L1 table too large");
        }
        if s.l1_offset.saturating_add(s.l1_size as u64 * 8) > self.file_len()? {
            return corrupt("snapshot L1 table lies past the end of the file");
        }
        let mut b = vec![0u8; s.l1_size as usize * 8];
        self.file
            .read_at(&mut b, s.l1_offset)
            .ctx("reading a snapshot L1 table")?;
        Ok(bytes_to_entries(&b))
    }

    fn active_slots(&self) -> Vec<Slot> {
        self.l1
            .iter()
            .map(|&e| match e & OFFSET_MASK {
                0 => Slot::Empty,
                o => Slot::Existing(o),
            })
            .collect()
    }

    /// Take a snapshot of the active layer. If `s.vm_state_size > 0` the snapshot keeps the VM
    /// state previously written with [`Qcow2::save_vmstate`] / [`Qcow2::vmstate_writer`]; the
    /// active layer's VM-state area is then emptied (as QEMU does). With `s.replace`, snapshots
    /// with the same name are removed in the same atomic step, so an older snapshot is only gone
    /// once the new one is safely on disk.
    pub fn create_snapshot(&mut self, s: &NewSnapshot) -> Result<SnapshotInfo> {
        self.check_writable()?;
        if s.name.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument("snapshot name too long".into()));
        }
        if s.name.is_empty() {
            return Err(Error::InvalidArgument(
                "snapshot name must not be empty".into(),
            ));
        }
        let mut snaps: Vec<SnapEntry> = self.snapshots.clone();
        if s.replace {
            snaps.retain(|e| e.name != s.name.as_bytes());
        }
        if snaps.len() >= 65536 {
            return Err(Error::InvalidArgument("too many snapshots (65536)".into()));
        }
        let id = snaps
            .iter()
            .filter_map(|e| std::str::from_utf8(&e.id).ok()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let since = s.date.duration_since(UNIX_EPOCH).unwrap_or_default();
        let vsi = self.vm_state_index(self.h.size) as usize;
        let mut l1 = self.l1.clone();
        if s.vm_state_size == 0 {
            for e in l1.iter_mut().skip(vsi) {
                *e = 0;
            }
        }
        let entry = SnapEntry {
            l1_offset: 0,
            l1_size: l1.len() as u32,
            id: id.to_string().into_bytes(),
            name: s.name.as_bytes().to_vec(),
            date_sec: since.as_secs() as u32,
            date_nsec: since.subsec_micros() * 1000,
            vm_clock_ns: s.vm_clock_ns,
            vm_state_size: s.vm_state_size,
            disk_size: self.h.size,
            icount: s.icount.unwrap_or(u64::MAX),
            extra_tail: Vec::new(),
        };
        let info = entry.info();
        let mut plan_snaps: Vec<(SnapEntry, Option<Vec<u64>>)> =
            snaps.into_iter().map(|e| (e, None)).collect();
        plan_snaps.push((entry, Some(l1)));
        // The active layer keeps its own copies of the L2 tables (flags recomputed), and drops
        // the VM-state area.
        let mut active = Vec::with_capacity(self.l1.len());
        for (i, &e) in self.l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 || i >= vsi {
                active.push(Slot::Empty);
            } else {
                active.push(Slot::New(self.read_l2_raw(off)?));
            }
        }
        self.commit(Plan {
            size: self.h.size,
            active,
            snaps: plan_snaps,
        })?;
        Ok(info)
    }

    /// Revert the active layer to snapshot `key` (id, then name). The disk size reverts to the
    /// snapshot's. The snapshot itself is kept.
    pub fn goto_snapshot(&mut self, key: &str) -> Result<SnapshotInfo> {
        self.check_writable()?;
        let i = self
            .find_id_or_name(key)
            .ok_or_else(|| Error::SnapshotNotFound(key.into()))?;
        let s = self.snapshots[i].clone();
        let sl1 = self.snapshot_l1(&s)?;
        let size = s.disk_size;
        let span = self.span();
        let need = size.div_ceil(span);
        if need * 8 > crate::header::MAX_L1_BYTES {
            return corrupt("snapshot disk size too large");
        }
        let len = (self.l1.len() as u64).max(sl1.len() as u64).max(need) as usize;
        let mut active = Vec::with_capacity(len);
        for idx in 0..len {
            let e = if (idx as u64) < need {
                sl1.get(idx).copied().unwrap_or(0)
            } else {
                0
            };
            let off = e & OFFSET_MASK;
            if off == 0 {
                active.push(Slot::Empty);
            } else {
                active.push(Slot::New(self.read_l2_raw(off)?));
            }
        }
        let snaps = self.snapshots.iter().cloned().map(|e| (e, None)).collect();
        self.commit(Plan {
            size,
            active,
            snaps,
        })?;
        Ok(s.info())
    }

    /// Delete snapshot `key` (by name, then by id), freeing what only it referenced.
    pub fn delete_snapshot(&mut self, key: &str) -> Result<SnapshotInfo> {
        let k = key.as_bytes();
        let i = self
            .snapshots
            .iter()
            .position(|s| s.name == k)
            .or_else(|| self.snapshots.iter().position(|s| s.id == k))
            .ok_or_else(|| Error::SnapshotNotFound(key.into()))?;
        self.delete_snapshot_at(i)
    }

    /// Delete the snapshot whose id is exactly `id`.
    pub fn delete_snapshot_id(&mut self, id: &str) -> Result<SnapshotInfo> {
        let i = self
            .snapshots
            .iter()
            .position(|s| s.id == id.as_bytes())
            .ok_or_else(|| Error::SnapshotNotFound(id.into()))?;
        self.delete_snapshot_at(i)
    }

    fn delete_snapshot_at(&mut self, i: usize) -> Result<SnapshotInfo> {
        self.check_writable()?;
        let info = self.snapshots[i].info();
        let mut snaps: Vec<(SnapEntry, Option<Vec<u64>>)> =
            self.snapshots.iter().cloned().map(|e| (e, None)).collect();
        snaps.remove(i);
        let active = self.active_slots();
        self.commit(Plan {
            size: self.h.size,
            active,
            snaps,
        })?;
        Ok(info)
    }

    /// Recompute every refcount from the metadata graph and switch to freshly written refcount
    /// structures (repairs leaks and stale or too-low refcounts; fixes COPIED flags).
    pub fn rebuild_refcounts(&mut self) -> Result<()> {
        self.check_writable()?;
        let active = self.active_slots();
        let snaps = self.snapshots.iter().cloned().map(|e| (e, None)).collect();
        self.commit(Plan {
            size: self.h.size,
            active,
            snaps,
        })
    }
}
