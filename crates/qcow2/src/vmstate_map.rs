//! Where a snapshot's VM state lies in the image file, so another thread can read it without
//! the image (lazy `loadvm` serves guest RAM from it while the guest runs and the image keeps
//! serving the disk). Only plain allocated clusters of a host file qualify; anything else
//! (compressed or zero clusters, subclusters, a backing file behind, storage that is not a
//! local file) gives `None` and the caller reads the state through the image instead.
//!
//! The clusters belong to the snapshot, which never rewrites them: the map stays valid as long
//! as the snapshot exists (the caller must not delete it while reading).

use crate::error::{Error, Result};
use crate::image::{Kind, Qcow2};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// A snapshot's VM state as byte ranges of the image file, with a descriptor of its own.
#[derive(Debug)]
pub struct VmStateFileMap {
    file: File,
    /// (state position, length, file offset), ascending and contiguous in position.
    extents: Vec<(u64, u64, u64)>,
    len: u64,
}

impl VmStateFileMap {
    /// Size of the state.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Number of contiguous file ranges.
    pub fn extent_count(&self) -> usize {
        self.extents.len()
    }
    /// Offset in the image file of state byte `pos`.
    pub fn file_offset(&self, pos: u64) -> Option<u64> {
        let i = self.extents.partition_point(|&(p, l, _)| p + l <= pos);
        self.extents.get(i).filter(|&&(p, _, _)| p <= pos).map(|&(p, _, h)| h + (pos - p))
    }
    /// Reads `buf.len()` bytes of the state at `pos` (positional reads; any thread).
    pub fn read_at(&self, mut pos: u64, mut buf: &mut [u8]) -> io::Result<()> {
        if pos.checked_add(buf.len() as u64).is_none_or(|e| e > self.len) {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the VM state"));
        }
        while !buf.is_empty() {
            let i = self.extents.partition_point(|&(p, l, _)| p + l <= pos);
            let &(p, l, host) = self.extents.get(i).ok_or(io::ErrorKind::UnexpectedEof)?;
            let n = ((p + l - pos) as usize).min(buf.len());
            let (now, rest) = buf.split_at_mut(n);
            self.file.read_exact_at(now, host + (pos - p))?;
            buf = rest;
            pos += n as u64;
        }
        Ok(())
    }
}

impl Qcow2 {
    /// The file map of the VM state of snapshot `key` (id, then name), or `None` where it
    /// cannot be read straight from the file (see the module documentation).
    pub fn vmstate_file_map(&mut self, key: &str) -> Result<Option<VmStateFileMap>> {
        let i = self.find_id_or_name(key).ok_or_else(|| Error::SnapshotNotFound(key.into()))?;
        let s = self.snapshots[i].clone();
        let Some(fd) = self.file.host_fd().map(|f| f.as_raw_fd()) else { return Ok(None) };
        if self.ext || s.vm_state_size == 0 {
            return Ok(None);
        }
        let l1 = self.snapshot_l1(&s)?;
        let base = self.vmstate_base(s.disk_size)?;
        let file_len = self.file_len()?;
        let (cs, span) = (self.cs, self.span());
        let end = base
            .checked_add(s.vm_state_size)
            .ok_or_else(|| Error::Corrupt("VM state size is absurd".into()))?;
        let mut extents: Vec<(u64, u64, u64)> = Vec::new();
        let mut g = base;
        while g < end {
            let l2 = l1.get((g / span) as usize).copied().unwrap_or(0) & crate::image::OFFSET_MASK;
            if l2 == 0 {
                return Ok(None);
            }
            let first = (g / cs) % self.l2e;
            let n = ((end - g).div_ceil(cs)).min(self.l2e - first);
            for e in self.l2_entries(l2, first, n)? {
                let Kind::Normal(h) = self.classify(e) else { return Ok(None) };
                let len = (cs - g % cs).min(end - g);
                let host = h + g % cs;
                if host.checked_add(len).is_none_or(|x| x > file_len) {
                    return Err(Error::Corrupt("VM state cluster lies past the end of the file".into()));
                }
                let pos = g - base;
                match extents.last_mut() {
                    Some((p, l, hh)) if *p + *l == pos && *hh + *l == host => *l += len,
                    _ => extents.push((pos, len, host)),
                }
                g += len;
            }
        }
        // A descriptor of its own (no O_DIRECT, own file position) on the same file.
        let file = File::open(format!("/proc/self/fd/{fd}"))
            .map_err(|e| Error::Io { context: "reopening the image for the VM state", source: e })?;
        Ok(Some(VmStateFileMap { file, extents, len: s.vm_state_size }))
    }
}

impl Qcow2 {
    /// The descriptor of the local host file under the image, if it is one (writers on other
    /// threads reopen it through `/proc/self/fd`).
    pub fn host_file_fd(&self) -> Option<i32> {
        self.file.host_fd().map(|f| f.as_raw_fd())
    }

    /// Makes every cluster of the active VM-state area that overlaps `[pos, pos+len)` an
    /// allocated cluster of this image, written in place, and returns where those bytes lie in
    /// the file: (state position, length, file offset), ascending. For writers that put large
    /// pieces of the state straight into the file (e.g. with `O_DIRECT`, on other threads).
    /// New clusters hold whatever the file held there: every byte of the state must then be
    /// written before it is read. Clusters that cannot be written in place (shared with a
    /// snapshot, compressed, zero-flagged) and extended-L2 images give
    /// [`Error::Unsupported`]: write through [`Qcow2::save_vmstate`] instead.
    pub fn alloc_vmstate(&mut self, pos: u64, len: u64) -> Result<Vec<(u64, u64, u64)>> {
        use crate::image::{COMPRESSED, COPIED, OFFSET_MASK};
        self.check_writable()?;
        if self.ext {
            return Err(Error::Unsupported("direct VM-state writes with extended L2 entries".into()));
        }
        let base = self.vmstate_offset();
        let start = base.checked_add(pos);
        let end = start.and_then(|s| s.checked_add(len)).filter(|&e| e < crate::image::MAX_HOST);
        let (Some(mut g), Some(end)) = (start, end) else {
            return Err(Error::InvalidArgument("VM state offset too large".into()));
        };
        let cs = self.cs;
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        while g < end {
            let span = self.span();
            let l1_idx = g / span;
            let seg_end = end.min((l1_idx + 1) * span);
            let l2 = self.writable_l2(l1_idx)?;
            let first = (g / cs) % self.l2e;
            let nclu = (seg_end - g / cs * cs).div_ceil(cs);
            let mut ents = self.l2_entries(l2, first, nclu)?;
            let in_place = |e: u64| e & COPIED != 0 && e & (COMPRESSED | crate::image::ZERO) == 0 && e & OFFSET_MASK != 0;
            if let Some(bad) = ents.iter().find(|&&e| e != 0 && !in_place(e)) {
                return Err(Error::Unsupported(format!("VM-state cluster {bad:#x} is not writable in place")));
            }
            let need = ents.iter().filter(|&&e| e == 0).count() as u64;
            if need > 0 {
                let mut at = self.alloc_clusters(need)?;
                for e in ents.iter_mut().filter(|e| **e == 0) {
                    *e = at | COPIED;
                    at += cs;
                }
                self.barrier()?;
                self.set_l2_entries(l2, first, &ents)?;
            }
            for (i, e) in ents.iter().enumerate() {
                let c0 = (g / cs + i as u64) * cs;
                let (a, b) = (c0.max(g), (c0 + cs).min(seg_end));
                let host = (e & OFFSET_MASK) + (a - c0);
                match out.last_mut() {
                    Some((p, l, h)) if *p + *l == a - base && *h + *l == host => *l += b - a,
                    _ => out.push((a - base, b - a, host)),
                }
            }
            g = seg_end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::{CreateOptions, NewSnapshot, Qcow2};

    #[test]
    fn file_map_reads_what_was_saved() {
        let path = std::env::temp_dir().join(format!("qcow2-vmmap-{}.qcow2", std::process::id()));
        let mut q = Qcow2::create(&path, &CreateOptions { size: 1 << 20, cluster_size: 4096, ..Default::default() }).unwrap();
        let state: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        // Written out of order (data, then the head), as savevm does, with disk writes between.
        q.save_vmstate(8192, &state[8192..]).unwrap();
        crate::BlockBackend::write_at(&mut q, 0, &[7u8; 4096]).unwrap();
        q.save_vmstate(0, &state[..8192]).unwrap();
        let mut s = NewSnapshot::new("a");
        s.vm_state_size = state.len() as u64;
        q.create_snapshot(&s).unwrap();
        let m = q.vmstate_file_map("a").unwrap().expect("a plain file image maps");
        assert_eq!(m.len(), state.len() as u64);
        assert!(m.extent_count() >= 2, "the head landed in a cluster of its own");
        let mut got = vec![0u8; state.len()];
        m.read_at(0, &mut got).unwrap();
        assert!(got == state);
        let off = m.file_offset(123_456).unwrap();
        let mut one = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&path).unwrap(), &mut one, off).unwrap();
        assert_eq!(one[0], state[123_456]);
        assert_eq!(m.file_offset(state.len() as u64), None);
        let mut piece = vec![0u8; 5000];
        m.read_at(4000, &mut piece).unwrap();
        assert_eq!(piece[..], state[4000..9000]);
        assert!(m.read_at(state.len() as u64 - 10, &mut piece).is_err(), "past the end");
        // The map outlives later writes to the active layer (the snapshot owns its clusters).
        q.discard_vmstate().unwrap();
        q.save_vmstate(0, &vec![0xEEu8; 300_000]).unwrap();
        m.read_at(0, &mut got).unwrap();
        assert!(got == state);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn allocated_vmstate_is_where_the_image_reads_it() {
        use std::os::unix::fs::FileExt;
        let path = std::env::temp_dir().join(format!("qcow2-vmalloc-{}.qcow2", std::process::id()));
        let mut q = Qcow2::create(&path, &CreateOptions { size: 1 << 20, cluster_size: 4096, ..Default::default() }).unwrap();
        let state: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        q.discard_vmstate().unwrap();
        // Pieces that share clusters, written straight into the file.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        for (a, b) in [(4096usize, 50_000usize), (50_000, 100_000)] {
            for (p, l, h) in q.alloc_vmstate(a as u64, (b - a) as u64).unwrap() {
                f.write_all_at(&state[p as usize..(p + l) as usize], h).unwrap();
            }
        }
        q.save_vmstate(0, &state[..4096]).unwrap();
        let mut got = vec![0u8; state.len()];
        q.read_active_vmstate(0, &mut got).unwrap();
        assert!(got == state);
        let mut s = NewSnapshot::new("a");
        s.vm_state_size = state.len() as u64;
        q.create_snapshot(&s).unwrap();
        // Writing a new state the same way never touches the snapshot's.
        for (_, l, h) in q.alloc_vmstate(0, 100_000).unwrap() {
            f.write_all_at(&vec![0xEE; l as usize], h).unwrap();
        }
        let mut old = vec![0u8; state.len()];
        q.load_vmstate("a", 0, &mut old).unwrap();
        assert!(old == state);
        assert!(q.check().unwrap().is_clean());
        std::fs::remove_file(&path).unwrap();
    }
}
