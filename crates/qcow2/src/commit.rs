//! Atomic metadata commits (shadow paging). A [`Plan`] describes the whole new metadata graph:
//! disk size, active L1 slots (existing L2 tables or new table contents), and the snapshot list
//! (with new L1 copies where needed). `commit` recounts every reference from scratch, places the
//! new L1/L2 tables, snapshot table, refcount blocks and refcount table in clusters that are free
//! both before and after, writes and flushes them, then switches the image over with a single
//! 48-byte header write (size, L1, refcount table, snapshot table). A crash before that write
//! leaves the old image untouched; after it, the new one is complete. Old metadata simply becomes
//! free space.

use crate::error::{corrupt, Error, IoCtx, Result};
use crate::header::{self, OFF_SIZE};
use crate::image::{entries_to_bytes, rc_set, Kind, Qcow2, COPIED, OFFSET_MASK};
use crate::snapshot::{table_bytes, SnapEntry};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// One active L1 slot in a plan.
pub(crate) enum Slot {
    Empty,
    /// Keep pointing at this existing L2 table (copied if its flags must change).
    Existing(u64),
    /// Write this table content to a new cluster (flags are recomputed).
    New(Vec<u64>),
}

/// The complete new metadata graph.
pub(crate) struct Plan {
    pub size: u64,
    pub active: Vec<Slot>,
    /// Snapshots in table order; `Some(l1)` means "write this L1 copy to a new place".
    pub snaps: Vec<(SnapEntry, Option<Vec<u64>>)>,
}

/// Reference counting over a bounded cluster range.
pub(crate) struct Counter {
    pub refs: Vec<u64>,
    pub limit: u64,
    l2s: HashMap<u64, Rc<Vec<u64>>>,
}

impl Counter {
    pub(crate) fn new(limit: u64) -> Self {
        Counter {
            refs: Vec::new(),
            limit,
            l2s: HashMap::new(),
        }
    }
    pub(crate) fn add(&mut self, c: u64, what: &str) -> Result<()> {
        if c >= self.limit {
            return corrupt(format!(
                "{what} at cluster {c} lies past the end of the file"
            ));
        }
        if c as usize >= self.refs.len() {
            self.refs.resize(c as usize + 1, 0);
        }
        self.refs[c as usize] = self.refs[c as usize].saturating_add(1);
        Ok(())
    }
    pub(crate) fn get(&self, c: u64) -> u64 {
        self.refs.get(c as usize).copied().unwrap_or(0)
    }
    pub(crate) fn add_bytes(&mut self, img: &Qcow2, off: u64, len: u64, what: &str) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        for c in off / img.cs..=(off + len - 1) / img.cs {
            self.add(c, what)?;
        }
        Ok(())
    }
    pub(crate) fn l2(&mut self, img: &Qcow2, off: u64) -> Result<Rc<Vec<u64>>> {
        if let Some(t) = self.l2s.get(&off) {
            return Ok(t.clone());
        }
        let t = Rc::new(img.read_l2_raw(off)?);
        self.l2s.insert(off, t.clone());
        Ok(t)
    }
    /// Count the data clusters referenced by L2 table content `t`.
    pub(crate) fn count_l2_data(&mut self, img: &Qcow2, t: &[u64]) -> Result<()> {
        for &e in img.descs(t) {
            match img.classify(e) {
                Kind::Normal(o) | Kind::ZeroAlloc(o) => self.add(o / img.cs, "data cluster")?,
                Kind::Compressed(o, l) => self.add_bytes(img, o, l, "compressed data")?,
                _ => {}
            }
        }
        Ok(())
    }
    /// Count an L1 table's L2 tables and everything below them.
    pub(crate) fn count_l1(&mut self, img: &Qcow2, l1: &[u64]) -> Result<()> {
        for &e in l1 {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off & (img.cs - 1) != 0 {
                return corrupt(format!("L2 table offset {off:#x} not cluster aligned"));
            }
            self.add(off / img.cs, "L2 table")?;
            let t = self.l2(img, off)?;
            self.count_l2_data(img, &t)?;
        }
        Ok(())
    }
}

impl Qcow2 {
    /// Clusters the current (old) metadata uses: on-disk refcounts, plus the old tables
    /// explicitly in case the refcounts are stale.
    /// Only clusters below `limit` are considered: past the end of the file nothing live can
    /// be stored, whatever stale refcounts say.
    fn old_view(&mut self, limit: u64) -> Result<Vec<bool>> {
        let mut used: Vec<bool> = Vec::new();
        let mark = |used: &mut Vec<bool>, c: u64| {
            if c >= limit {
                return;
            }
            if c as usize >= used.len() {
                used.resize(c as usize + 1, false);
            }
            used[c as usize] = true;
        };
        let order = self.h.refcount_order;
        for idx in 0..(self.rt.len() as u64).min(limit.div_ceil(self.rbe)) {
            let Some(off) = self.rb_offset(idx) else {
                continue;
            };
            if off & (self.cs - 1) != 0 || off / self.cs >= crate::image::MAX_HOST / self.cs {
                return corrupt("refcount block offset invalid");
            }
            mark(&mut used, off / self.cs);
            let mut b = vec![0u8; self.cs as usize];
            self.file
                .read_at(&mut b, off)
                .ctx("reading a refcount block")?;
            for i in 0..self.rbe {
                if crate::image::rc_get(&b, i, order) != 0 {
                    mark(&mut used, idx * self.rbe + i);
                }
            }
        }
        let cs = self.cs;
        let rt0 = self.h.refcount_table_offset / cs;
        for c in rt0..rt0 + self.h.refcount_table_clusters as u64 {
            mark(&mut used, c);
        }
        let l10 = self.h.l1_table_offset / cs;
        for c in l10..l10 + (self.h.l1_size as u64 * 8).div_ceil(cs) {
            mark(&mut used, c);
        }
        if self.h.nb_snapshots > 0 {
            let len = table_bytes(&self.snapshots).len() as u64;
            let s0 = self.h.snapshots_offset / cs;
            for c in s0..s0 + len.div_ceil(cs) {
                mark(&mut used, c);
            }
        }
        Ok(used)
    }

    /// Write out `plan` atomically (see the module docs).
    pub(crate) fn commit(&mut self, plan: Plan) -> Result<()> {
        self.check_writable()?;
        let cs = self.cs;
        let file_clusters = self.file_len()?.div_ceil(cs);
        let old = self.old_view(file_clusters + 1)?;
        let mut cnt = Counter::new(file_clusters + 1);
        cnt.add(0, "header")?;
        // Existing snapshot L1 tables and what they reach.
        let mut snap_l1s: Vec<Vec<u64>> = Vec::with_capacity(plan.snaps.len());
        for (e, new_l1) in &plan.snaps {
            let l1 = match new_l1 {
                Some(l1) => l1.clone(),
                None => {
                    let l1 = self.snapshot_l1(e)?;
                    cnt.add_bytes(self, e.l1_offset, l1.len() as u64 * 8, "snapshot L1 table")?;
                    l1
                }
            };
            cnt.count_l1(self, &l1)?;
            snap_l1s.push(l1);
        }
        // Active layer.
        let mut slots = plan.active;
        for s in &slots {
            match s {
                Slot::Empty => {}
                Slot::Existing(off) => {
                    cnt.add(off / cs, "L2 table")?;
                    let t = cnt.l2(self, *off)?;
                    cnt.count_l2_data(self, &t)?;
                }
                Slot::New(t) => cnt.count_l2_data(self, t)?,
            }
        }
        // Fix COPIED flags of the active tables; tables whose flags change become new copies.
        let flag = |cnt: &Counter, img: &Qcow2, e: u64| -> u64 {
            match img.classify(e) {
                Kind::Normal(o) | Kind::ZeroAlloc(o) => {
                    if cnt.get(o / img.cs) == 1 {
                        e | COPIED
                    } else {
                        e & !COPIED
                    }
                }
                Kind::Compressed(..) => e & !COPIED,
                _ => e,
            }
        };
        for s in slots.iter_mut() {
            match s {
                Slot::Existing(off) => {
                    let t = cnt.l2(self, *off)?;
                    let st = self.stride();
                    let fixed: Vec<u64> = t
                        .iter()
                        .enumerate()
                        .map(|(i, &e)| if i % st == 0 { flag(&cnt, self, e) } else { e })
                        .collect();
                    if fixed[..] != t[..] {
                        let c = *off / cs;
                        cnt.refs[c as usize] -= 1;
                        *s = Slot::New(fixed);
                    }
                }
                Slot::New(t) => {
                    for e in t.iter_mut().step_by(self.stride()) {
                        *e = flag(&cnt, self, *e);
                    }
                }
                Slot::Empty => {}
            }
        }
        // Placement: clusters free in both the old and the new view.
        let mut alloc = Placer {
            cursor: 1,
            old: &old,
            cbits: self.cbits,
        };
        let mut new_l2_at: Vec<Option<u64>> = Vec::with_capacity(slots.len());
        for s in &slots {
            new_l2_at.push(match s {
                Slot::New(_) => Some(alloc.run(&mut cnt, 1)?),
                _ => None,
            });
        }
        let l1_len = slots.len() as u64;
        if l1_len * 8 > header::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(
                "L1 table would exceed 32 MiB".into(),
            ));
        }
        let l1_off = if l1_len > 0 {
            alloc.run(&mut cnt, (l1_len * 8).div_ceil(cs))?
        } else {
            0
        };
        let mut snaps: Vec<SnapEntry> = Vec::with_capacity(plan.snaps.len());
        let mut snap_l1_writes: Vec<(u64, Vec<u64>)> = Vec::new();
        for (i, (e, new_l1)) in plan.snaps.into_iter().enumerate() {
            let mut e = e;
            if new_l1.is_some() {
                let l1 = std::mem::take(&mut snap_l1s[i]);
                let off = if l1.is_empty() {
                    0
                } else {
                    alloc.run(&mut cnt, (l1.len() as u64 * 8).div_ceil(cs))?
                };
                e.l1_offset = off;
                e.l1_size = l1.len() as u32;
                snap_l1_writes.push((off, l1));
            }
            snaps.push(e);
        }
        let stable = table_bytes(&snaps);
        if stable.len() as u64 > 64 << 20 {
            return Err(Error::InvalidArgument(
                "snapshot table would exceed 64 MiB".into(),
            ));
        }
        let snap_off = if snaps.is_empty() {
            0
        } else {
            alloc.run(&mut cnt, (stable.len() as u64).div_ceil(cs))?
        };
        // Refcount structures (fixpoint: blocks and table describe themselves).
        let mut blocks: BTreeMap<u64, u64> = BTreeMap::new();
        let mut table: (u64, u64) = (0, 0);
        loop {
            let mut changed = false;
            let needed: Vec<u64> = needed_blocks(&cnt.refs, self.rbe);
            for idx in needed {
                if let std::collections::btree_map::Entry::Vacant(v) = blocks.entry(idx) {
                    v.insert(alloc.run(&mut cnt, 1)?);
                    changed = true;
                }
            }
            let entries = blocks.keys().next_back().map_or(1, |k| k + 1);
            let t = (entries * 8).div_ceil(cs);
            if t > table.1 {
                if table.1 > 0 {
                    for c in table.0 / cs..table.0 / cs + table.1 {
                        cnt.refs[c as usize] -= 1;
                    }
                }
                table = (alloc.run(&mut cnt, t)?, t);
                changed = true;
            }
            if !changed {
                break;
            }
        }
        if table.1 * cs > header::MAX_REFTABLE_BYTES.max(cs) {
            return Err(Error::InvalidArgument(
                "refcount table would exceed 8 MiB".into(),
            ));
        }
        let order = self.h.refcount_order;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << order)) - 1
        };
        if let Some(c) = cnt.refs.iter().position(|&r| r > max) {
            let _ = c;
            return Err(Error::RefcountOverflow(1 << order));
        }
        // Final active L1.
        let mut l1 = Vec::with_capacity(slots.len());
        for (i, s) in slots.iter().enumerate() {
            l1.push(match s {
                Slot::Empty => 0,
                Slot::Existing(off) => {
                    if cnt.get(off / cs) == 1 {
                        off | COPIED
                    } else {
                        *off
                    }
                }
                Slot::New(_) => new_l2_at[i].unwrap_or(0) | COPIED,
            });
        }
        // Write everything to the free space, then flush.
        for (i, s) in slots.iter().enumerate() {
            if let (Slot::New(t), Some(off)) = (s, new_l2_at[i]) {
                self.file
                    .write_at(&entries_to_bytes(t), off)
                    .ctx("writing an L2 table")?;
            }
        }
        if l1_len > 0 {
            self.file
                .write_at(&entries_to_bytes(&l1), l1_off)
                .ctx("writing the L1 table")?;
        }
        for (off, t) in &snap_l1_writes {
            if !t.is_empty() {
                self.file
                    .write_at(&entries_to_bytes(t), *off)
                    .ctx("writing a snapshot L1")?;
            }
        }
        if !snaps.is_empty() {
            self.file
                .write_at(&stable, snap_off)
                .ctx("writing the snapshot table")?;
        }
        let mut rt = vec![0u64; (table.1 * cs / 8) as usize];
        for (&idx, &c) in &blocks {
            let mut b = vec![0u8; cs as usize];
            let base = idx * self.rbe;
            for i in 0..self.rbe {
                let r = cnt.get(base + i);
                if r != 0 {
                    rc_set(&mut b, i, order, r);
                }
            }
            self.file.write_at(&b, c).ctx("writing a refcount block")?;
            rt[idx as usize] = c;
        }
        self.file
            .write_at(&entries_to_bytes(&rt), table.0)
            .ctx("writing the refcount table")?;
        self.sync()?;
        // The switch: one write of header bytes 24..72.
        let mut hb = Vec::with_capacity(48);
        hb.extend_from_slice(&plan.size.to_be_bytes());
        hb.extend_from_slice(&0u32.to_be_bytes());
        hb.extend_from_slice(&(l1_len as u32).to_be_bytes());
        hb.extend_from_slice(&l1_off.to_be_bytes());
        hb.extend_from_slice(&table.0.to_be_bytes());
        hb.extend_from_slice(&(table.1 as u32).to_be_bytes());
        hb.extend_from_slice(&(snaps.len() as u32).to_be_bytes());
        hb.extend_from_slice(&snap_off.to_be_bytes());
        self.file
            .write_at(&hb, OFF_SIZE)
            .ctx("updating the header")?;
        self.sync()?;
        self.h.size = plan.size;
        self.h.l1_size = l1_len as u32;
        self.h.l1_table_offset = l1_off;
        self.h.refcount_table_offset = table.0;
        self.h.refcount_table_clusters = table.1 as u32;
        self.h.nb_snapshots = snaps.len() as u32;
        self.h.snapshots_offset = snap_off;
        self.l1 = l1;
        self.rt = rt;
        self.snapshots = snaps;
        self.l2_cache.clear();
        self.rb_cache.clear();
        self.comp_cache = None;
        self.free_hint = 1;
        Ok(())
    }
}

fn needed_blocks(refs: &[u64], rbe: u64) -> Vec<u64> {
    refs.chunks(rbe as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&r| r != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

struct Placer<'a> {
    cursor: u64,
    old: &'a [bool],
    cbits: u32,
}

impl Placer<'_> {
    fn free(&self, cnt: &Counter, c: u64) -> bool {
        cnt.get(c) == 0 && !self.old.get(c as usize).copied().unwrap_or(false)
    }
    /// Find `n` contiguous free clusters, mark them referenced once, return the host offset.
    fn run(&mut self, cnt: &mut Counter, n: u64) -> Result<u64> {
        let mut start = self.cursor;
        let mut c = start;
        while c - start < n {
            if !self.free(cnt, c) {
                start = c + 1;
            }
            c += 1;
        }
        if start == self.cursor {
            self.cursor = start + n;
        }
        let need_limit = start + n + 1;
        if need_limit > cnt.limit {
            cnt.limit = need_limit;
        }
        for x in start..start + n {
            cnt.add(x, "new metadata")?;
        }
        Ok(start << self.cbits)
    }
}
