//! The VM-state area: a byte stream kept as ordinary guest data of the active layer past the
//! virtual disk, at `ceil(size / L2 span) * L2 span` (exactly where QEMU's savevm puts it), and
//! captured by the snapshot created right after it is written.
//!
//! Writers and readers move data in large cluster-aligned pieces (the writer buffers small
//! writes up to [`VMSTATE_CHUNK`]), so a multi-GiB state streams at disk speed.

use crate::error::{Error, Result};
use crate::image::Qcow2;
use std::io;

/// Size of the buffered pieces moved by [`VmStateWriter`] and [`VmStateReader`].
pub const VMSTATE_CHUNK: usize = 4 << 20;

impl Qcow2 {
    /// Empty the active layer's VM-state area (drop an unfinished or stale state).
    pub fn discard_vmstate(&mut self) -> Result<()> {
        let vsi = self.vm_state_index(self.h.size);
        self.drop_active_from(vsi)
    }

    /// Write `data` at byte `pos` of the active VM-state area. Prefer few large writes.
    pub fn save_vmstate(&mut self, pos: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let off = self
            .vmstate_offset()
            .checked_add(pos)
            .filter(|o| {
                o.checked_add(data.len() as u64)
                    .is_some_and(|e| e < crate::image::MAX_HOST)
            })
            .ok_or_else(|| Error::InvalidArgument("VM state offset too large".into()))?;
        self.write_active(off, data)
    }

    /// Read bytes of the active VM-state area (zeros where nothing was written).
    pub fn read_active_vmstate(&mut self, pos: u64, buf: &mut [u8]) -> Result<()> {
        let off = self
            .vmstate_offset()
            .checked_add(pos)
            .ok_or_else(|| Error::InvalidArgument("VM state offset too large".into()))?;
        self.read_active(off, buf)
    }

    /// Start writing a new VM state from position 0 (the area is emptied first). Finish with
    /// [`VmStateWriter::finish`], which returns the byte count to pass as `vm_state_size` to
    /// [`Qcow2::create_snapshot`].
    pub fn vmstate_writer(&mut self) -> Result<VmStateWriter<'_>> {
        self.check_writable()?;
        self.discard_vmstate()?;
        Ok(VmStateWriter {
            img: self,
            buf: Vec::with_capacity(VMSTATE_CHUNK),
            pos: 0,
        })
    }

    /// Read `buf.len()` bytes at `pos` of the VM state saved in snapshot `key` (id, then name);
    /// returns how many bytes were available (short at the end of the state).
    pub fn load_vmstate(&mut self, key: &str, pos: u64, buf: &mut [u8]) -> Result<usize> {
        let i = self
            .find_id_or_name(key)
            .ok_or_else(|| Error::SnapshotNotFound(key.into()))?;
        let s = self.snapshots[i].clone();
        let l1 = self.snapshot_l1(&s)?;
        let base = self.vmstate_base(s.disk_size)?;
        let avail = s.vm_state_size.saturating_sub(pos).min(buf.len() as u64) as usize;
        let off = base
            .checked_add(pos)
            .filter(|o| o.checked_add(avail as u64).is_some())
            .ok_or_else(|| Error::InvalidArgument("VM state offset too large".into()))?;
        self.read_l1(&l1, off, &mut buf[..avail])?;
        Ok(avail)
    }

    /// A streaming reader over the VM state of snapshot `key` (id, then name).
    pub fn vmstate_reader(&mut self, key: &str) -> Result<VmStateReader<'_>> {
        let i = self
            .find_id_or_name(key)
            .ok_or_else(|| Error::SnapshotNotFound(key.into()))?;
        let s = self.snapshots[i].clone();
        if s.vm_state_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "snapshot '{key}' is a disk-only snapshot (no VM state)"
            )));
        }
        let l1 = self.snapshot_l1(&s)?;
        let base = self.vmstate_base(s.disk_size)?;
        if base.checked_add(s.vm_state_size).is_none() {
            return Err(Error::Corrupt("VM state size is absurd".into()));
        }
        Ok(VmStateReader {
            img: self,
            l1,
            base,
            len: s.vm_state_size,
            pos: 0,
            buf: Vec::new(),
            buf_pos: 0,
        })
    }

    /// Read guest bytes of a snapshot (id, then name) as they were when it was taken.
    pub fn read_snapshot(&mut self, key: &str, off: u64, buf: &mut [u8]) -> Result<()> {
        let i = self
            .find_id_or_name(key)
            .ok_or_else(|| Error::SnapshotNotFound(key.into()))?;
        let s = self.snapshots[i].clone();
        match off.checked_add(buf.len() as u64) {
            Some(e) if e <= s.disk_size => {}
            _ => {
                return Err(Error::InvalidArgument(
                    "read beyond the snapshot's disk size".into(),
                ))
            }
        }
        let l1 = self.snapshot_l1(&s)?;
        self.read_l1(&l1, off, buf)
    }
}

/// Buffered sequential writer into the active VM-state area (see [`Qcow2::vmstate_writer`]).
pub struct VmStateWriter<'a> {
    img: &'a mut Qcow2,
    buf: Vec<u8>,
    pos: u64,
}

impl VmStateWriter<'_> {
    fn flush_buf(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            let pos = self.pos - self.buf.len() as u64;
            self.img.save_vmstate(pos, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Append bytes (large slices bypass the buffer).
    pub fn write_all_bytes(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.buf.is_empty() && data.len() >= VMSTATE_CHUNK {
                let n = data.len() / VMSTATE_CHUNK * VMSTATE_CHUNK;
                self.img.save_vmstate(self.pos, &data[..n])?;
                self.pos += n as u64;
                data = &data[n..];
                continue;
            }
            let n = (VMSTATE_CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            self.pos += n as u64;
            data = &data[n..];
            if self.buf.len() == VMSTATE_CHUNK {
                self.flush_buf()?;
            }
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Write out buffered bytes; returns the total size of the state.
    pub fn finish(mut self) -> Result<u64> {
        self.flush_buf()?;
        Ok(self.pos)
    }
}

impl io::Write for VmStateWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_all_bytes(data).map_err(io::Error::other)?;
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf().map_err(io::Error::other)
    }
}

/// Buffered sequential reader of a snapshot's VM state (see [`Qcow2::vmstate_reader`]).
pub struct VmStateReader<'a> {
    img: &'a mut Qcow2,
    l1: Vec<u64>,
    base: u64,
    len: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_pos: usize,
}

impl VmStateReader<'_> {
    /// Total size of the state.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for an empty state.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Read up to `out.len()` bytes; 0 at the end.
    pub fn read_bytes(&mut self, out: &mut [u8]) -> Result<usize> {
        if self.buf_pos == self.buf.len() {
            let left = self.len - self.pos;
            if left == 0 {
                return Ok(0);
            }
            if self.buf_pos == self.buf.len() && out.len() >= VMSTATE_CHUNK {
                // Large reads go straight into the caller's buffer.
                let n = (out.len() as u64).min(left) as usize;
                self.img
                    .read_l1(&self.l1, self.base + self.pos, &mut out[..n])?;
                self.pos += n as u64;
                return Ok(n);
            }
            let n = left.min(VMSTATE_CHUNK as u64) as usize;
            self.buf.resize(n, 0);
            self.img
                .read_l1(&self.l1, self.base + self.pos, &mut self.buf)?;
            self.pos += n as u64;
            self.buf_pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.buf_pos);
        out[..n].copy_from_slice(&self.buf[self.buf_pos..self.buf_pos + n]);
        self.buf_pos += n;
        Ok(n)
    }
}

impl io::Read for VmStateReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.read_bytes(out).map_err(io::Error::other)
    }
}
