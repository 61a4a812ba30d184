//! Refcounts: reading and updating refcount entries of every width (1–64 bits), and cluster
//! allocation (first fit from a moving hint) with creation of missing refcount blocks and
//! relocation of a full refcount table. Refcounts are raised on disk before the caller writes
//! anything that points at the new clusters.

use crate::error::{corrupt, Error, IoCtx, Result};
use crate::header;
use crate::image::{be64, entries_to_bytes, Qcow2, MAX_HOST};
use std::collections::BTreeMap;

/// Read entry `i` of a refcount block.
pub(crate) fn rc_get(b: &[u8], i: u64, order: u32) -> u64 {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            ((b[bit / 8] >> (bit % 8)) & ((1u8 << bits) - 1)) as u64
        }
        3 => b[i] as u64,
        4 => u16::from_be_bytes([b[2 * i], b[2 * i + 1]]) as u64,
        5 => u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as u64,
        _ => be64(b, 8 * i),
    }
}

/// Write entry `i` of a refcount block; returns the byte range touched.
pub(crate) fn rc_set(b: &mut [u8], i: u64, order: u32, v: u64) -> (usize, usize) {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = i * bits;
            let mask = ((1u8 << bits) - 1) << (bit % 8);
            let byte = &mut b[bit / 8];
            *byte = (*byte & !mask) | (((v as u8) << (bit % 8)) & mask);
            (bit / 8, bit / 8 + 1)
        }
        3 => {
            b[i] = v as u8;
            (i, i + 1)
        }
        4 => {
            b[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes());
            (2 * i, 2 * i + 2)
        }
        5 => {
            b[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes());
            (4 * i, 4 * i + 4)
        }
        _ => {
            b[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes());
            (8 * i, 8 * i + 8)
        }
    }
}

impl Qcow2 {
    fn load_rb(&mut self, off: u64) -> Result<()> {
        if !self.rb_cache.contains(off) {
            if off & (self.cs - 1) != 0 || off >= MAX_HOST {
                return corrupt(format!("refcount block offset {off:#x} invalid"));
            }
            let mut b = vec![0u8; self.cs as usize];
            self.file
                .read_at(&mut b, off)
                .ctx("reading a refcount block")?;
            self.rb_cache.insert(off, b);
        }
        Ok(())
    }

    pub(crate) fn rb_offset(&self, idx: u64) -> Option<u64> {
        let e = *self.rt.get(idx as usize)?;
        let off = e & !0x1ff;
        (off != 0).then_some(off)
    }

    /// On-disk refcount of host cluster `c`.
    pub(crate) fn refcount(&mut self, c: u64) -> Result<u64> {
        let Some(off) = self.rb_offset(c / self.rbe) else {
            return Ok(0);
        };
        self.load_rb(off)?;
        let order = self.h.refcount_order;
        let b = self
            .rb_cache
            .get(off)
            .ok_or_else(|| Error::Corrupt("rb cache".into()))?;
        Ok(rc_get(b, c % self.rbe, order))
    }

    /// Apply refcount changes (cluster -> delta), in cluster order, writing each touched block
    /// range once. Blocks must exist for increments (see `alloc_clusters`).
    pub(crate) fn apply_deltas(&mut self, deltas: &BTreeMap<u64, i64>) -> Result<()> {
        let order = self.h.refcount_order;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u64 << order)) - 1
        };
        let mut it = deltas.iter().filter(|(_, d)| **d != 0).peekable();
        while let Some((&c, _)) = it.peek() {
            let idx = c / self.rbe;
            let Some(off) = self.rb_offset(idx) else {
                return corrupt(format!("refcount block missing for cluster {c}"));
            };
            self.load_rb(off)?;
            let mut lo = usize::MAX;
            let mut hi = 0;
            let mut freed = Vec::new();
            {
                let b = self
                    .rb_cache
                    .get(off)
                    .ok_or_else(|| Error::Corrupt("rb".into()))?;
                while let Some((&c2, &d)) = it.peek() {
                    if c2 / self.rbe != idx {
                        break;
                    }
                    it.next();
                    let i = c2 % self.rbe;
                    let old = rc_get(b, i, order);
                    let new = if d >= 0 {
                        match old.checked_add(d as u64) {
                            Some(v) if v <= max => v,
                            _ => return Err(Error::RefcountOverflow(1 << order)),
                        }
                    } else {
                        match old.checked_sub(d.unsigned_abs()) {
                            Some(v) => v,
                            None => {
                                return corrupt(format!(
                                    "refcount of cluster {c2} would drop below zero"
                                ))
                            }
                        }
                    };
                    let (a, z) = rc_set(b, i, order, new);
                    lo = lo.min(a);
                    hi = hi.max(z);
                    if new == 0 {
                        freed.push(c2);
                    }
                }
            }
            if lo < hi {
                let b = self
                    .rb_cache
                    .get(off)
                    .ok_or_else(|| Error::Corrupt("rb".into()))?;
                let piece = b[lo..hi].to_vec();
                self.file
                    .write_at(&piece, off + lo as u64)
                    .ctx("writing a refcount block")?;
            }
            for c2 in freed {
                let o = c2 * self.cs;
                self.l2_cache.remove(o);
                self.rb_cache.remove(o);
                if self
                    .comp_cache
                    .as_ref()
                    .is_some_and(|(k, _)| k / self.cs == c2)
                {
                    self.comp_cache = None;
                }
                self.free_hint = self.free_hint.min(c2.max(1));
            }
        }
        Ok(())
    }

    pub(crate) fn add_range(&mut self, c: u64, n: u64, d: i64) -> Result<()> {
        let m: BTreeMap<u64, i64> = (c..c + n).map(|x| (x, d)).collect();
        self.apply_deltas(&m)
    }

    /// Allocate `n` contiguous clusters (refcount raised to 1 on disk); returns the host offset.
    /// Missing refcount blocks for the run are created right behind it.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Error::InvalidArgument("zero-length allocation".into()));
        }
        let mut extra = 0u64;
        loop {
            let start = self.find_free_run(n + extra)?;
            let end = start + n + extra;
            let first = start / self.rbe;
            let last = (end - 1) / self.rbe;
            if last >= self.rt.len() as u64 {
                self.grow_reftable(last)?;
                continue;
            }
            let missing: Vec<u64> = (first..=last)
                .filter(|&i| self.rb_offset(i).is_none())
                .collect();
            if missing.len() as u64 > extra {
                extra = missing.len() as u64;
                continue;
            }
            if !missing.is_empty() {
                self.create_refblocks(&missing, start + n)?;
            }
            self.add_range(start, n, 1)?;
            self.free_hint = start + n;
            return Ok(start * self.cs);
        }
    }

    /// Create refcount blocks for table indices `idx` at clusters `at, at+1, ...` (all free and
    /// covered by existing blocks or by these new ones).
    fn create_refblocks(&mut self, idx: &[u64], at: u64) -> Result<()> {
        let order = self.h.refcount_order;
        let pos: Vec<u64> = (0..idx.len() as u64).map(|j| at + j).collect();
        // Refcounts of new blocks that land in ranges of existing blocks go first (a crash
        // after this only leaks).
        let mut d = BTreeMap::new();
        for &p in &pos {
            if !idx.contains(&(p / self.rbe)) {
                d.insert(p, 1i64);
            }
        }
        self.apply_deltas(&d)?;
        for (j, &i) in idx.iter().enumerate() {
            let mut blk = vec![0u8; self.cs as usize];
            for &p in &pos {
                if p / self.rbe == i {
                    rc_set(&mut blk, p % self.rbe, order, 1);
                }
            }
            self.file
                .write_at(&blk, pos[j] * self.cs)
                .ctx("writing a refcount block")?;
            self.rb_cache.insert(pos[j] * self.cs, blk);
        }
        self.barrier()?;
        for (j, &i) in idx.iter().enumerate() {
            let off = pos[j] * self.cs;
            self.rt[i as usize] = off;
            self.file
                .write_at(&off.to_be_bytes(), self.h.refcount_table_offset + i * 8)
                .ctx("writing the refcount table")?;
        }
        Ok(())
    }

    fn find_free_run(&mut self, n: u64) -> Result<u64> {
        let covered = self.rt.len() as u64 * self.rbe;
        let mut c = self.free_hint.max(1);
        let mut run_start = c;
        let limit = MAX_HOST / self.cs;
        // Past the end of the file almost everything is free; a long run of set refcounts
        // there only happens in hostile images.
        let give_up = self.file_len()?.div_ceil(self.cs) + n + (1 << 20);
        loop {
            if c > give_up {
                return corrupt(
                    "no free cluster found: refcounts past the end of the file are set",
                );
            }
            if c - run_start >= n {
                return Ok(run_start);
            }
            if c >= covered {
                // Everything past the refcount table's reach is free.
                if run_start + n > limit {
                    return Err(Error::InvalidArgument(
                        "image would exceed 2^56 bytes".into(),
                    ));
                }
                return Ok(run_start);
            }
            if self.refcount(c)? != 0 {
                run_start = c + 1;
            }
            c += 1;
        }
    }

    /// Relocate the refcount table to a bigger one with at least `min_idx + 1` entries. The new
    /// table and the blocks describing it are placed in the first range no block covers yet.
    fn grow_reftable(&mut self, min_idx: u64) -> Result<()> {
        let old_entries = self.rt.len() as u64;
        let per_cluster = self.cs / 8;
        let s = old_entries * self.rbe;
        let mut entries = (min_idx + 1).max(old_entries + old_entries / 2 + 1);
        let (mut k, mut t);
        loop {
            t = entries.div_ceil(per_cluster);
            k = (t + 1).div_ceil(self.rbe.saturating_sub(1).max(1)).max(1);
            while k * self.rbe < k + t {
                k += 1;
            }
            if entries >= old_entries + k {
                break;
            }
            entries = old_entries + k;
        }
        if t * self.cs > header::MAX_REFTABLE_BYTES.max(self.cs) {
            return Err(Error::InvalidArgument(
                "refcount table would exceed 8 MiB".into(),
            ));
        }
        if (s + k + t) * self.cs > MAX_HOST {
            return Err(Error::InvalidArgument(
                "image would exceed 2^56 bytes".into(),
            ));
        }
        let entries = t * per_cluster;
        let order = self.h.refcount_order;
        let mut new_rt = self.rt.clone();
        new_rt.resize(entries as usize, 0);
        for j in 0..k {
            let boff = (s + j) * self.cs;
            let mut blk = vec![0u8; self.cs as usize];
            let lo = s + j * self.rbe;
            let hi = lo + self.rbe;
            for c in lo.max(s)..hi.min(s + k + t) {
                rc_set(&mut blk, c - lo, order, 1);
            }
            self.file
                .write_at(&blk, boff)
                .ctx("writing a refcount block")?;
            new_rt[(old_entries + j) as usize] = boff;
        }
        let toff = (s + k) * self.cs;
        self.file
            .write_at(&entries_to_bytes(&new_rt), toff)
            .ctx("writing the refcount table")?;
        self.sync()?;
        let mut hb = Vec::with_capacity(12);
        hb.extend_from_slice(&toff.to_be_bytes());
        hb.extend_from_slice(&(t as u32).to_be_bytes());
        self.file
            .write_at(&hb, header::OFF_REFTABLE)
            .ctx("updating the header")?;
        self.sync()?;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = self.h.refcount_table_clusters as u64;
        self.h.refcount_table_offset = toff;
        self.h.refcount_table_clusters = t as u32;
        self.rt = new_rt;
        self.add_range(old_off / self.cs, old_clusters, -1)?;
        Ok(())
    }
}
