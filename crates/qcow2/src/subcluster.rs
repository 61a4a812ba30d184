//! Extended L2 entries (incompatible feature bit 4): each L2 entry is a descriptor word (host
//! cluster, COPIED, compressed) plus a bitmap word with, for each of the 32 subclusters,
//! "allocated" (bit i: data at host + i·subcluster) and "reads as zero" (bit 32+i). A subcluster
//! with neither bit reads from the backing chain (or as zeros). Compressed clusters are whole
//! (bitmap 0). Reads, copy-on-write writes at subcluster granularity, zeroing and the
//! allocation map live here; refcounting only sees the descriptor (one reference to its host
//! cluster), as for standard entries.

use crate::error::{corrupt, IoCtx, Result};
use crate::image::{Qcow2, COMPRESSED, COPIED, OFFSET_MASK};
use crate::map::MapKind;
use std::collections::BTreeMap;

/// Subclusters per cluster.
pub(crate) const SUBCLUSTERS: u64 = 32;
/// Bitmap with every subcluster reading as zero.
pub(crate) const ALL_ZERO: u64 = 0xffff_ffff << 32;
/// Bitmap with every subcluster allocated.
const ALL_ALLOC: u64 = 0xffff_ffff;

/// State of one subcluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sub {
    /// Falls through to the backing chain (or zeros).
    Unalloc,
    /// Reads as zeros.
    Zero,
    /// Data at this host offset.
    Data(u64),
    /// Part of a compressed cluster.
    Compressed,
}

fn mask(first: u64, last: u64) -> u64 {
    let n = last - first + 1;
    (if n >= 32 { ALL_ALLOC } else { (1u64 << n) - 1 }) << first
}

impl Qcow2 {
    pub(crate) fn sc_size(&self) -> u64 {
        self.cs / SUBCLUSTERS
    }

    /// Classify subcluster `i` of the extended entry (e, bm).
    pub(crate) fn sub_kind(&self, e: u64, bm: u64, i: u64) -> Result<Sub> {
        if e & COMPRESSED != 0 {
            return Ok(Sub::Compressed);
        }
        let host = e & OFFSET_MASK;
        let a = bm >> i & 1 != 0;
        let z = bm >> (32 + i) & 1 != 0;
        match (a, z) {
            (true, true) => corrupt(format!("subcluster {i} both allocated and zero (bitmap {bm:#x})")),
            (true, false) if host == 0 => {
                corrupt(format!("subcluster {i} allocated without a host cluster (bitmap {bm:#x})"))
            }
            (true, false) => Ok(Sub::Data(host + i * self.sc_size())),
            (false, true) => Ok(Sub::Zero),
            (false, false) => Ok(Sub::Unalloc),
        }
    }

    /// Read guest bytes at `off` (within one L2 table at `l2`) of an extended-L2 image.
    pub(crate) fn read_ext(&mut self, l2: u64, off: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cs;
        let sc = self.sc_size();
        let first = (off / cs) % self.l2e;
        let nclu = (off % cs + buf.len() as u64).div_ceil(cs);
        let pairs = self.l2_pairs(l2, first, nclu)?;
        let mut pos = 0usize;
        let mut g = off;
        for (e, bm) in pairs {
            let in_off = g % cs;
            let n = ((cs - in_off) as usize).min(buf.len() - pos);
            if e & COMPRESSED != 0 {
                let (h, l) = match self.classify(e) {
                    crate::image::Kind::Compressed(h, l) => (h, l),
                    _ => return corrupt("compressed descriptor"),
                };
                let data = self.decompress(e, h, l)?;
                buf[pos..pos + n].copy_from_slice(&data[in_off as usize..in_off as usize + n]);
                pos += n;
                g += n as u64;
                continue;
            }
            let end = pos + n;
            while pos < end {
                let i = (g % cs) / sc;
                let m = ((sc - g % sc) as usize).min(end - pos);
                let piece = &mut buf[pos..pos + m];
                match self.sub_kind(e, bm, i)? {
                    Sub::Data(h) => self
                        .file
                        .read_at(piece, h + g % sc)
                        .ctx("reading guest data")?,
                    Sub::Zero => piece.fill(0),
                    Sub::Unalloc | Sub::Compressed => self.read_backing(g, piece)?,
                }
                pos += m;
                g += m as u64;
            }
        }
        Ok(())
    }

    /// Write guest bytes at `off` (within the L2 table of `l1_idx`) of an extended-L2 image:
    /// per cluster, the touched subclusters are completed from their current contents and
    /// written in place (cluster owned) or into a new cluster (unallocated, shared or
    /// compressed; the old cluster's allocated subclusters are copied along).
    pub(crate) fn write_ext(&mut self, l1_idx: u64, off: u64, data: &[u8]) -> Result<()> {
        let cs = self.cs;
        let sc = self.sc_size();
        let mut pos = 0usize;
        let mut g = off;
        while pos < data.len() {
            let cin0 = g % cs;
            let n = ((cs - cin0) as usize).min(data.len() - pos);
            let gc = g - cin0;
            let (fs, ls) = (cin0 / sc, (cin0 + n as u64 - 1) / sc);
            let (a, z) = (fs * sc, (ls + 1) * sc);
            // Current contents of the touched subclusters, then the new bytes over them.
            let mut buf = vec![0u8; (z - a) as usize];
            self.read_active(gc + a, &mut buf)?;
            buf[(cin0 - a) as usize..(cin0 - a) as usize + n].copy_from_slice(&data[pos..pos + n]);
            let l2 = self.writable_l2(l1_idx)?;
            let idx = (gc / cs) % self.l2e;
            let (e, bm) = self.l2_pairs(l2, idx, 1)?[0];
            let touched = mask(fs, ls);
            let host = e & OFFSET_MASK;
            if e & COMPRESSED == 0 && host != 0 && e & COPIED != 0 {
                self.file
                    .write_at(&buf, host + a)
                    .ctx("writing guest data")?;
                self.barrier()?;
                self.set_l2_pairs(l2, idx, &[(e, (bm | touched) & !(touched << 32))])?;
            } else {
                let new = self.alloc_clusters(1)?;
                let new_bm = if e & COMPRESSED != 0 {
                    let mut full = vec![0u8; cs as usize];
                    self.read_active(gc, &mut full)?;
                    full[a as usize..z as usize].copy_from_slice(&buf);
                    self.file.write_at(&full, new).ctx("writing guest data")?;
                    ALL_ALLOC
                } else {
                    if host != 0 {
                        // Shared cluster: its allocated subclusters move along.
                        let mut old = vec![0u8; cs as usize];
                        self.file.read_at(&mut old, host).ctx("reading guest data")?;
                        old[a as usize..z as usize].copy_from_slice(&buf);
                        self.file.write_at(&old, new).ctx("writing guest data")?;
                    } else {
                        self.file.write_at(&buf, new + a).ctx("writing guest data")?;
                    }
                    (bm | touched) & !(touched << 32)
                };
                self.barrier()?;
                self.set_l2_pairs(l2, idx, &[(new | COPIED, new_bm)])?;
                let mut d = BTreeMap::new();
                self.deref_entry(e, &mut d);
                if !d.is_empty() {
                    self.barrier()?;
                    self.apply_deltas(&d)?;
                }
            }
            pos += n;
            g += n as u64;
        }
        Ok(())
    }

    /// Make `cnt` whole clusters from entry `first` of table `l2` read as zeros (all zero
    /// bits, no host cluster), dropping their host clusters.
    pub(crate) fn zero_ext(&mut self, l2: u64, first: u64, cnt: u64) -> Result<()> {
        let pairs = self.l2_pairs(l2, first, cnt)?;
        if pairs.iter().all(|&p| p == (0, ALL_ZERO)) {
            return Ok(());
        }
        let mut d = BTreeMap::new();
        for &(e, _) in &pairs {
            self.deref_entry(e, &mut d);
        }
        self.set_l2_pairs(l2, first, &vec![(0, ALL_ZERO); cnt as usize])?;
        if !d.is_empty() {
            self.barrier()?;
            self.apply_deltas(&d)?;
        }
        Ok(())
    }

    /// Map kinds of the subclusters of `cnt` clusters from entry `first` of table `l2`, as
    /// (guest length, kind) units, one per subcluster (one per cluster when compressed).
    pub(crate) fn map_ext(&mut self, l2: u64, first: u64, cnt: u64) -> Result<Vec<(u64, MapKind)>> {
        let sc = self.sc_size();
        let mut v = Vec::new();
        for (e, bm) in self.l2_pairs(l2, first, cnt)? {
            if e & COMPRESSED != 0 {
                v.push((self.cs, MapKind::Compressed));
                continue;
            }
            let host = e & OFFSET_MASK;
            for i in 0..SUBCLUSTERS {
                let k = match self.sub_kind(e, bm, i)? {
                    Sub::Data(h) => MapKind::Data(h),
                    Sub::Zero if host != 0 => MapKind::Zero(Some(host + i * sc)),
                    Sub::Zero => MapKind::Zero(None),
                    _ if host != 0 => MapKind::UnallocatedAt(host + i * sc),
                    _ => MapKind::Unallocated,
                };
                v.push((sc, k));
            }
        }
        Ok(v)
    }
}
