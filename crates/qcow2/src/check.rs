//! Consistency check in the spirit of `qemu-img check`: rebuild every refcount from the
//! metadata graph, compare with the on-disk refcounts, verify the COPIED flags of the active
//! tables and entry sanity; optional repair through a full refcount rebuild.

use crate::commit::Counter;
use crate::error::Result;
use crate::image::{rc_get, Kind, Qcow2, COMPRESSED, COPIED, OFFSET_MASK};
use crate::snapshot::table_bytes;

/// What to repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters.
    Leaks,
    /// Leaks and refcount errors (and COPIED flags).
    All,
}

/// Result of a check, with the numbers `qemu-img check` prints.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Corruptions (on-disk refcount too low, bad flags, bad offsets).
    pub corruptions: u64,
    /// Leaked clusters (on-disk refcount too high).
    pub leaks: u64,
    /// Errors that prevented checking parts of the image.
    pub check_errors: u64,
    /// Leaks repaired (when repairing).
    pub leaks_fixed: u64,
    /// Corruptions repaired (when repairing).
    pub corruptions_fixed: u64,
    /// One line per finding, in qemu-img's wording.
    pub messages: Vec<String>,
    /// Allocated guest clusters of the active layer.
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated clusters not following their predecessor on the host.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// End of the used part of the file.
    pub image_end_offset: u64,
}

impl CheckReport {
    /// True when neither corruptions, leaks nor check errors were found.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0
    }
}

impl Qcow2 {
    /// Check the image (read-only).
    pub fn check(&mut self) -> Result<CheckReport> {
        let mut r = CheckReport::default();
        let cs = self.cs;
        let file_len = self.file_len()?;
        // QEMU tolerates references up to one cluster past the end of the file.
        let mut cnt = Counter::new(file_len.div_ceil(cs) + 1);
        let err = |r: &mut CheckReport, m: String| {
            r.corruptions += 1;
            r.messages.push(m);
        };
        let _ = cnt.add(0, "header");
        let l1len = self.l1.len() as u64 * 8;
        if let Err(e) = cnt.add_bytes(self, self.h.l1_table_offset, l1len, "L1 table") {
            err(&mut r, format!("ERROR {e}"));
        }
        let active = self.l1.clone();
        self.count_checked(&mut cnt, &active, &mut r, true);
        for s in self.snapshots.clone() {
            match self.snapshot_l1(&s) {
                Ok(l1) => {
                    if let Err(e) =
                        cnt.add_bytes(self, s.l1_offset, l1.len() as u64 * 8, "snapshot L1 table")
                    {
                        err(&mut r, format!("ERROR {e}"));
                    }
                    self.count_checked(&mut cnt, &l1, &mut r, false);
                }
                Err(e) => err(&mut r, format!("ERROR snapshot {}: {e}", s.info().id)),
            }
        }
        if !self.snapshots.is_empty() {
            let len = table_bytes(&self.snapshots).len() as u64;
            if let Err(e) = cnt.add_bytes(self, self.h.snapshots_offset, len, "snapshot table") {
                err(&mut r, format!("ERROR {e}"));
            }
        }
        let rtlen = self.h.refcount_table_clusters as u64 * cs;
        if let Err(e) = cnt.add_bytes(self, self.h.refcount_table_offset, rtlen, "refcount table") {
            err(&mut r, format!("ERROR {e}"));
        }
        let mut blocks = Vec::new();
        for (i, &e) in self.rt.clone().iter().enumerate() {
            let off = e & !0x1ff;
            if e & 0x1ff != 0 {
                err(
                    &mut r,
                    format!("ERROR reserved bits set in refcount table entry {i}"),
                );
            }
            if off == 0 {
                continue;
            }
            if off & (cs - 1) != 0 {
                err(&mut r, format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                continue;
            }
            if cnt.add(off / cs, "refcount block").is_err() {
                err(&mut r, format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            blocks.push((i as u64, off));
        }
        let order = self.h.refcount_order;
        for &(i, off) in &blocks {
            if cnt.get(off / cs) != 1 {
                err(
                    &mut r,
                    format!("ERROR refcount block {i} refcount={}", cnt.get(off / cs)),
                );
            }
        }
        // Compare with the on-disk refcounts over the file (and whatever is referenced past
        // it), as qemu-img does: stale refcounts beyond that are ignored.
        let n = (file_len.div_ceil(cs)).max(cnt.refs.len() as u64);
        let mut end = 0u64;
        let mut c = 0u64;
        while c < n {
            let idx = c / self.rbe;
            let stop = ((idx + 1) * self.rbe).min(n);
            let blk = match self.rb_offset(idx) {
                Some(off) if off & (cs - 1) == 0 && off < file_len => {
                    let mut b = vec![0u8; cs as usize];
                    self.file
                        .read_at(&mut b, off)
                        .map_err(|source| crate::Error::Io {
                            context: "reading a refcount block",
                            source,
                        })?;
                    Some(b)
                }
                _ => None,
            };
            while c < stop {
                let disk = blk.as_ref().map_or(0, |b| rc_get(b, c % self.rbe, order));
                let calc = cnt.get(c);
                if disk != 0 || calc != 0 {
                    end = end.max(c + 1);
                }
                if disk > calc {
                    r.leaks += 1;
                    r.messages.push(format!(
                        "Leaked cluster {c} refcount={disk} reference={calc}"
                    ));
                } else if disk < calc {
                    err(
                        &mut r,
                        format!("ERROR cluster {c} refcount={disk} reference={calc}"),
                    );
                }
                c += 1;
            }
        }
        self.check_copied(&mut r)?;
        r.image_end_offset = end * cs;
        r.total_clusters = self.h.size.div_ceil(cs);
        Ok(r)
    }

    /// Count one L1 table for `check`, reporting instead of failing.
    fn count_checked(&mut self, cnt: &mut Counter, l1: &[u64], r: &mut CheckReport, active: bool) {
        let cs = self.cs;
        for (i, &e) in l1.iter().enumerate() {
            // qemu-img counts fragmentation per L2 table.
            let mut next_contig = 0u64;
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if e & 0x7f00_0000_0000_01ff != 0 {
                r.corruptions += 1;
                r.messages
                    .push(format!("ERROR reserved bits set in L1 entry {i}: {e:#x}"));
            }
            if cnt.add(off / cs, "L2 table").is_err() {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR l2_offset={off:x}: L2 table is outside the image"
                ));
                continue;
            }
            let t = match cnt.l2(self, off) {
                Ok(t) => t,
                Err(e) => {
                    r.check_errors += 1;
                    r.messages.push(format!("ERROR reading L2 table: {e}"));
                    continue;
                }
            };
            for &x in self.descs(&t) {
                match self.classify(x) {
                    Kind::Compressed(o, l) => {
                        if x & COPIED != 0 {
                            r.corruptions += 1;
                            r.messages.push(format!(
                                "ERROR: coffset={o:#x}: copied flag must never be set for compressed clusters"
                            ));
                        }
                        if cnt.add_bytes(self, o, l, "compressed data").is_err() {
                            r.corruptions += 1;
                            r.messages
                                .push(format!("ERROR compressed cluster {o:#x} outside image"));
                        }
                        if active {
                            // Compressed clusters count as fragmented, as in qemu-img.
                            r.allocated_clusters += 1;
                            r.compressed_clusters += 1;
                            r.fragmented_clusters += 1;
                        }
                    }
                    Kind::Normal(o) | Kind::ZeroAlloc(o) => {
                        if x & 0x3f00_0000_0000_01fe != 0 {
                            r.corruptions += 1;
                            r.messages
                                .push(format!("ERROR reserved bits set in L2 entry {x:#x}"));
                        }
                        if cnt.add(o / cs, "data cluster").is_err() {
                            r.corruptions += 1;
                            r.messages
                                .push(format!("ERROR offset={o:x}: Cluster is outside the image"));
                        }
                        if active {
                            r.allocated_clusters += 1;
                            if next_contig != 0 && o != next_contig {
                                r.fragmented_clusters += 1;
                            }
                            next_contig = o + cs;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Verify the COPIED flags of the active L1 and its L2 tables against the on-disk refcounts.
    fn check_copied(&mut self, r: &mut CheckReport) -> Result<()> {
        let cs = self.cs;
        for (i, &e) in self.l1.clone().iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 || off & (cs - 1) != 0 {
                continue;
            }
            let rc = self.refcount(off / cs)?;
            if (rc == 1) != (e & COPIED != 0) {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}"
                ));
            }
            let Ok(t) = self.read_l2_raw(off) else {
                continue;
            };
            for &x in self.descs(&t) {
                if x & COMPRESSED != 0 {
                    continue;
                }
                if let Kind::Normal(o) | Kind::ZeroAlloc(o) = self.classify(x) {
                    let rc = self.refcount(o / cs)?;
                    if (rc == 1) != (x & COPIED != 0) {
                        r.corruptions += 1;
                        r.messages.push(format!(
                            "ERROR OFLAG_COPIED data cluster: l2_entry={x:x} refcount={rc}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Check, then repair what `mode` allows by rebuilding the refcount structures, and check
    /// again. Returns (report before, report after).
    pub fn repair(&mut self, mode: RepairMode) -> Result<(CheckReport, CheckReport)> {
        let before = self.check()?;
        if before.is_clean()
            || (mode == RepairMode::Leaks && (before.corruptions > 0 || before.leaks == 0))
        {
            let after = before.clone();
            return Ok((before, after));
        }
        self.rebuild_refcounts()?;
        let mut after = self.check()?;
        after.leaks_fixed = before.leaks.saturating_sub(after.leaks);
        after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
        Ok((before, after))
    }
}
