//! Guest data path: reads through any L1 table (active or a snapshot's), writes with
//! copy-on-write of shared L2 tables and data clusters, discard and zero-writes, and reading
//! zlib-compressed clusters.

use crate::error::{corrupt, Error, IoCtx, Result};
use crate::image::{entries_to_bytes, Kind, Qcow2, COPIED, OFFSET_MASK, ZERO};
use std::collections::BTreeMap;

/// Longest run of clusters allocated and written in one go.
const MAX_RUN: u64 = 8192;

impl Qcow2 {
    /// Read guest bytes through `l1` (entries past its end read as zeros).
    pub(crate) fn read_l1(&mut self, l1: &[u64], mut off: u64, buf: &mut [u8]) -> Result<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let span = self.span();
            let l1_idx = off / span;
            let n = ((span - off % span) as usize).min(buf.len() - pos);
            let piece = &mut buf[pos..pos + n];
            let e = l1.get(l1_idx as usize).copied().unwrap_or(0);
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                self.read_backing(off, piece)?;
            } else {
                self.read_in_l2(l2, off, piece)?;
            }
            pos += n;
            off += n as u64;
        }
        Ok(())
    }

    fn read_in_l2(&mut self, l2: u64, off: u64, buf: &mut [u8]) -> Result<()> {
        if self.ext {
            return self.read_ext(l2, off, buf);
        }
        let cs = self.cs;
        let first = (off / cs) % self.l2e;
        let nclu = (off % cs + buf.len() as u64).div_ceil(cs);
        let ents = self.l2_entries(l2, first, nclu)?;
        let mut pos = 0usize;
        let mut g = off;
        // Pending contiguous host read: (buf pos, host offset, len).
        let mut pend: Option<(usize, u64, usize)> = None;
        // Pending run of unallocated clusters read from the backing chain: (buf pos, len).
        let mut back: Option<(usize, usize)> = None;
        for e in ents {
            let in_off = g % cs;
            let n = ((cs - in_off) as usize).min(buf.len() - pos);
            match self.classify(e) {
                Kind::Normal(h) => {
                    let host = h + in_off;
                    match &mut pend {
                        Some((pp, ph, pl)) if *pp + *pl == pos && *ph + *pl as u64 == host => {
                            *pl += n
                        }
                        _ => {
                            self.flush_pending(buf, pend.take())?;
                            pend = Some((pos, host, n));
                        }
                    }
                }
                Kind::Compressed(h, l) => {
                    self.flush_pending(buf, pend.take())?;
                    let data = self.decompress(e, h, l)?;
                    buf[pos..pos + n].copy_from_slice(&data[in_off as usize..in_off as usize + n]);
                }
                Kind::Unalloc => match &mut back {
                    Some((bp, bl)) if *bp + *bl == pos => *bl += n,
                    _ => {
                        self.flush_back(off, buf, back.take())?;
                        back = Some((pos, n));
                    }
                },
                _ => {
                    self.flush_pending(buf, pend.take())?;
                    buf[pos..pos + n].fill(0);
                }
            }
            pos += n;
            g += n as u64;
        }
        self.flush_back(off, buf, back)?;
        self.flush_pending(buf, pend)
    }

    /// Read a run of unallocated clusters (buffer position, length) from the backing chain;
    /// `off` is the guest offset of `buf[0]`.
    fn flush_back(&mut self, off: u64, buf: &mut [u8], b: Option<(usize, usize)>) -> Result<()> {
        match b {
            Some((pos, len)) => self.read_backing(off + pos as u64, &mut buf[pos..pos + len]),
            None => Ok(()),
        }
    }

    fn flush_pending(&self, buf: &mut [u8], p: Option<(usize, u64, usize)>) -> Result<()> {
        if let Some((pos, host, len)) = p {
            self.file
                .read_at(&mut buf[pos..pos + len], host)
                .ctx("reading guest data")?;
        }
        Ok(())
    }

    /// Full guest contents of the cluster at guest offset `g` described by L2 entry `e`
    /// (an unallocated cluster reads from the backing chain: copy-on-write of partial writes).
    fn cluster_contents(&mut self, g: u64, e: u64, out: &mut [u8]) -> Result<()> {
        match self.classify(e) {
            Kind::Unalloc => self.read_backing(g, out),
            Kind::Normal(h) => self.file.read_at(out, h).ctx("reading guest data"),
            Kind::Compressed(h, l) => {
                let d = self.decompress(e, h, l)?;
                out.copy_from_slice(&d);
                Ok(())
            }
            _ => {
                out.fill(0);
                Ok(())
            }
        }
    }

    /// [`crate::BlockBackend::map_direct`] for the active layer: host runs of `[off, off + len)`
    /// when every cluster of it is a plain allocated one (for `write`: also not shared, so it
    /// is overwritten in place), None otherwise. Images with extended L2 entries answer None.
    pub(crate) fn map_active(&mut self, off: u64, len: u64, write: bool) -> Result<Option<Vec<(u64, u64)>>> {
        if self.ext || (write && self.check_writable().is_err()) {
            return Ok(None);
        }
        let cs = self.cs;
        let end = off.checked_add(len).ok_or_else(|| Error::InvalidArgument("range overflows".into()))?;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut g = off;
        while g < end {
            let span = self.span();
            let l1_idx = g / span;
            let e = self.l1.get(l1_idx as usize).copied().unwrap_or(0);
            let l2 = e & OFFSET_MASK;
            if l2 == 0 || (write && e & COPIED == 0) {
                return Ok(None);
            }
            let stop = end.min((l1_idx + 1) * span);
            let first = (g / cs) % self.l2e;
            let nclu = (g % cs + (stop - g)).div_ceil(cs);
            for ent in self.l2_entries(l2, first, nclu)? {
                let n = (cs - g % cs).min(stop - g);
                let host = match self.classify(ent) {
                    Kind::Normal(h) if !write || ent & COPIED != 0 => h + g % cs,
                    _ => return Ok(None),
                };
                match runs.last_mut() {
                    Some((h, l)) if *h + *l == host => *l += n,
                    _ => runs.push((host, n)),
                }
                g += n;
            }
        }
        Ok(Some(runs))
    }

    /// Write guest bytes into the active layer (no bounds check against the disk size: the
    /// VM-state area lies beyond it).
    pub(crate) fn write_active(&mut self, mut off: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let mut pos = 0usize;
        while pos < data.len() {
            let span = self.span();
            let n = ((span - off % span) as usize).min(data.len() - pos);
            self.write_in_l2(off / span, off, &data[pos..pos + n])?;
            pos += n;
            off += n as u64;
        }
        Ok(())
    }

    /// The active L2 table for `l1_idx`, allocated or copied so that it may be modified.
    pub(crate) fn writable_l2(&mut self, l1_idx: u64) -> Result<u64> {
        if l1_idx >= self.l1.len() as u64 {
            self.grow_l1(l1_idx + 1, false)?;
        }
        let e = self.l1[l1_idx as usize];
        let off = e & OFFSET_MASK;
        if off != 0 && e & COPIED != 0 {
            return Ok(off);
        }
        if off != 0 && self.refcount(off / self.cs)? == 1 {
            self.set_l1_entry(l1_idx, off | COPIED)?;
            return Ok(off);
        }
        let new = self.alloc_clusters(1)?;
        let table = if off == 0 {
            vec![0u64; (self.cs / 8) as usize]
        } else {
            // Shared with a snapshot: every data cluster stays shared, so no entry is COPIED
            // (descriptor words only: extended entries keep their bitmaps).
            let mut t = match self.l2_cache.get(off) {
                Some(t) => t.clone(),
                None => self.read_l2_raw(off)?,
            };
            for x in t.iter_mut().step_by(self.stride()) {
                *x &= !COPIED;
            }
            t
        };
        self.file
            .write_at(&entries_to_bytes(&table), new)
            .ctx("writing an L2 table")?;
        self.l2_cache.insert(new, table);
        self.barrier()?;
        self.set_l1_entry(l1_idx, new | COPIED)?;
        if off != 0 {
            self.barrier()?;
            self.add_range(off / self.cs, 1, -1)?;
        }
        Ok(new)
    }

    fn write_in_l2(&mut self, l1_idx: u64, off: u64, data: &[u8]) -> Result<()> {
        if self.ext {
            return self.write_ext(l1_idx, off, data);
        }
        let cs = self.cs;
        let l2 = self.writable_l2(l1_idx)?;
        let first = (off / cs) % self.l2e;
        let in0 = off % cs;
        let nclu = (in0 + data.len() as u64).div_ceil(cs);
        let ents = self.l2_entries(l2, first, nclu)?;
        // Byte range of `data` that falls in cluster i of this request.
        let piece = |i: u64| -> (usize, usize, u64) {
            let start = if i == 0 { 0 } else { (i * cs - in0) as usize };
            let end = (((i + 1) * cs - in0) as usize).min(data.len());
            let cin = if i == 0 { in0 } else { 0 };
            (start, end, cin)
        };
        let in_place = |e: u64| {
            e & COPIED != 0 && e & (crate::image::COMPRESSED | ZERO) == 0 && e & OFFSET_MASK != 0
        };
        let mut i = 0u64;
        while i < nclu {
            let e = ents[i as usize];
            if in_place(e) {
                let mut j = i;
                while j + 1 < nclu
                    && in_place(ents[(j + 1) as usize])
                    && ents[(j + 1) as usize] & OFFSET_MASK == (e & OFFSET_MASK) + (j + 1 - i) * cs
                {
                    j += 1;
                }
                let (s, _, cin) = piece(i);
                let (_, z, _) = piece(j);
                let host = (e & OFFSET_MASK) + cin;
                let end_file = self.file_len()?;
                if host > end_file + cs {
                    return corrupt(format!("data cluster {host:#x} lies past the end of file"));
                }
                self.file
                    .write_at(&data[s..z], host)
                    .ctx("writing guest data")?;
                i = j + 1;
                continue;
            }
            let mut j = i;
            while j + 1 < nclu && !in_place(ents[(j + 1) as usize]) && j + 1 - i < MAX_RUN {
                j += 1;
            }
            let k = j - i + 1;
            let new = self.alloc_clusters(k)?;
            // Head and tail clusters may be partial: merge with old contents.
            let mut m = i;
            while m <= j {
                let (s, z, cin) = piece(m);
                let host = new + (m - i) * cs;
                if cin == 0 && (z - s) as u64 == cs {
                    // Run of full clusters: write straight from the caller's buffer.
                    let mut q = m;
                    while q < j && {
                        let (s2, z2, c2) = piece(q + 1);
                        c2 == 0 && (z2 - s2) as u64 == cs
                    } {
                        q += 1;
                    }
                    let (_, zq, _) = piece(q);
                    self.file
                        .write_at(&data[s..zq], host)
                        .ctx("writing guest data")?;
                    m = q + 1;
                } else {
                    let mut buf = vec![0u8; cs as usize];
                    let g = (off / cs + m) * cs;
                    self.cluster_contents(g, ents[m as usize], &mut buf)?;
                    buf[cin as usize..cin as usize + (z - s)].copy_from_slice(&data[s..z]);
                    self.file.write_at(&buf, host).ctx("writing guest data")?;
                    m += 1;
                }
            }
            self.barrier()?;
            let newents: Vec<u64> = (0..k).map(|x| (new + x * cs) | COPIED).collect();
            self.set_l2_entries(l2, first + i, &newents)?;
            let mut d = BTreeMap::new();
            for x in i..=j {
                self.deref_entry(ents[x as usize], &mut d);
            }
            if !d.is_empty() {
                self.barrier()?;
                self.apply_deltas(&d)?;
            }
            i = j + 1;
        }
        Ok(())
    }

    /// Make the whole clusters inside [off, off+len) of the active layer read as zeros and drop
    /// their data clusters (v3: zero flag; v2: unallocated, which reads as zeros without a
    /// backing file). Partial clusters at the edges are zero-filled if `zero_partial`.
    pub(crate) fn discard_active(&mut self, off: u64, len: u64, zero_partial: bool) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let cs = self.cs;
        let end = off + len;
        let a = off.div_ceil(cs) * cs;
        let b = end / cs * cs;
        if a >= b {
            if zero_partial {
                return self.write_active(off, &vec![0u8; len as usize]);
            }
            return Ok(());
        }
        if zero_partial && off < a {
            self.write_active(off, &vec![0u8; (a - off) as usize])?;
        }
        if zero_partial && b < end {
            self.write_active(b, &vec![0u8; (end - b) as usize])?;
        }
        if self.h.version < 3 && self.backing.is_some() {
            // v2 has no zero flag, and unallocated would expose the backing file: write zeros.
            let chunk = vec![0u8; (cs * 16).min(b - a) as usize];
            let mut g = a;
            while g < b {
                let n = (chunk.len() as u64).min(b - g);
                self.write_active(g, &chunk[..n as usize])?;
                g += n;
            }
            return Ok(());
        }
        let newval = if self.h.version >= 3 { ZERO } else { 0 };
        let mut g = a;
        while g < b {
            let span = self.span();
            let l1_idx = g / span;
            let n = (span - g % span).min(b - g);
            let e = self.l1.get(l1_idx as usize).copied().unwrap_or(0);
            // Without an L2 table the range reads as zeros, unless a backing file shows through.
            if e & OFFSET_MASK != 0 || self.backing.is_some() {
                let l2 = self.writable_l2(l1_idx)?;
                let first = (g / cs) % self.l2e;
                let cnt = n / cs;
                if self.ext {
                    self.zero_ext(l2, first, cnt)?;
                    g += n;
                    continue;
                }
                let ents = self.l2_entries(l2, first, cnt)?;
                if ents.iter().any(|&x| x != newval) {
                    let mut d = BTreeMap::new();
                    for &x in &ents {
                        self.deref_entry(x, &mut d);
                    }
                    self.set_l2_entries(l2, first, &vec![newval; cnt as usize])?;
                    if !d.is_empty() {
                        self.barrier()?;
                        self.apply_deltas(&d)?;
                    }
                }
            }
            g += n;
        }
        Ok(())
    }

    /// Drop the active layer's L1 entries from `from_idx` on (the VM-state area), releasing the
    /// tables and clusters only it referenced.
    pub(crate) fn drop_active_from(&mut self, from_idx: u64) -> Result<()> {
        self.check_writable()?;
        for idx in from_idx..self.l1.len() as u64 {
            let e = self.l1[idx as usize];
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            self.set_l1_entry(idx, 0)?;
            self.barrier()?;
            let mut d = BTreeMap::new();
            if self.refcount(off / self.cs)? == 1 {
                let ents = self.l2_entries(off, 0, self.l2e)?;
                for x in ents {
                    self.deref_entry(x, &mut d);
                }
            }
            *d.entry(off / self.cs).or_insert(0) -= 1;
            self.apply_deltas(&d)?;
        }
        Ok(())
    }

    /// Read guest bytes of the active layer.
    pub(crate) fn read_active(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        let l1 = std::mem::take(&mut self.l1);
        let r = self.read_l1(&l1, off, buf);
        self.l1 = l1;
        r
    }

    pub(crate) fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(e) if e <= self.h.size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "access {off}+{len} beyond the disk size {}",
                self.h.size
            ))),
        }
    }
}
