//! How the virtio-blk device's concurrent I/O and every other use of a drive's image share it:
//! [`GatedIo`], the device's direct path (ranges mapped under the image lock, I/O on the host
//! file without it, each call holding the drive's gate shared), and [`BackendGuard`], what
//! [`SharedDisk::backend`] hands out (the image lock with the gate held exclusively, so a
//! mapping stays true while its I/O runs).

use super::SharedDisk;
use qcow2::{BlockBackend, IoBuf, ParallelIo};
use std::sync::{MutexGuard, RwLockWriteGuard};

/// The image of a [`SharedDisk`], held exclusively (see [`SharedDisk::backend`]).
pub struct BackendGuard<'a> {
    pub(super) inner: MutexGuard<'a, Option<Box<dyn BlockBackend>>>,
    pub(super) _gate: RwLockWriteGuard<'a, ()>,
}

impl std::ops::Deref for BackendGuard<'_> {
    type Target = Option<Box<dyn BlockBackend>>;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl std::ops::DerefMut for BackendGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

/// The device's concurrent I/O on a disk whose image offers it (raw and qcow2 images on a
/// local file): each call takes the disk's gate shared, maps its range under the image's lock
/// ([`BlockBackend::map_direct`]: the host runs of allocated clusters; for raw the same
/// offsets), and does the I/O on the image's host file without the lock. Every other use of
/// the image ([`SharedDisk::backend`]: metadata changes, allocating writes, snapshots, a
/// handover, a mirror starting) takes the gate exclusively, so a mapping stays true while its
/// I/O runs. A call declines (`Ok(false)`; the device then goes through [`DiskHandle`]) when the
/// range is not plainly mapped, while the image is not open here, and for writes while a mirror
/// runs (they must pass its write hook).
pub(super) struct GatedIo(pub(super) SharedDisk);

impl GatedIo {
    /// # Safety
    /// As [`ParallelIo::read_vectored`] / [`ParallelIo::write_vectored`].
    unsafe fn transfer(&self, off: u64, bufs: &[IoBuf], write: bool) -> qcow2::Result<bool> {
        let _g = self.0.gate.read().unwrap_or_else(|p| p.into_inner());
        let total: u64 = bufs.iter().map(|b| b.len as u64).sum();
        let (runs, io) = {
            let mut g = self.0.locked();
            let Some(b) = g.as_mut() else { return Ok(false) };
            if write && self.0.mirror().is_some() {
                return Ok(false);
            }
            let Some(runs) = b.map_direct(off, total, write) else { return Ok(false) };
            let Some(io) = b.host_io() else { return Ok(false) };
            (runs, io)
        };
        let Some(parts) = qcow2::split_bufs(bufs, &runs) else { return Ok(false) };
        for (host, part) in parts {
            // SAFETY: the parts are pieces of the caller's buffers (its contract holds).
            let done = unsafe {
                if write {
                    io.write_vectored(host, &part)
                } else {
                    io.read_vectored(host, &part)
                }
            }?;
            if !done {
                // Off the host file's alignment: the caller redoes the whole request its way
                // (the same bytes again, for a write).
                return Ok(false);
            }
        }
        if write {
            self.0.note_write_after_mirror();
        }
        Ok(true)
    }
}

impl ParallelIo for GatedIo {
    fn alignment(&self) -> (u64, usize) {
        self.0.locked().as_mut().and_then(|b| b.host_io()).map_or((1, 1), |io| io.alignment())
    }
    unsafe fn read_vectored(&self, off: u64, bufs: &[IoBuf]) -> qcow2::Result<bool> {
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer(off, bufs, false) }
    }
    unsafe fn write_vectored(&self, off: u64, bufs: &[IoBuf]) -> qcow2::Result<bool> {
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer(off, bufs, true) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drives::parse_drive;
    use std::time::Duration;

    fn buf(v: &mut [u8]) -> IoBuf {
        IoBuf { ptr: v.as_mut_ptr(), len: v.len() }
    }

    /// Raw: direct I/O lands in the image; it waits while anyone else holds the image, and
    /// declines once the image was handed over.
    #[test]
    fn raw_direct_io_goes_through_the_gate() {
        let p = std::env::temp_dir().join(format!("gate-{}.raw", std::process::id()));
        drop(qcow2::RawImage::create(&p, 1 << 20).unwrap());
        let spec = parse_drive(&format!("file={},format=raw", p.display())).unwrap();
        let disk = SharedDisk::open(&spec, false).unwrap();
        let mut dev = disk.device_backend();
        let pio = dev.parallel_io().expect("a raw image offers concurrent I/O");
        let mut w = vec![7u8; 4096];
        // SAFETY: the buffers outlive the calls.
        assert!(unsafe { pio.write_vectored(8192, &[buf(&mut w)]) }.unwrap());
        let mut r = vec![0u8; 4096];
        dev.read_at(8192, &mut r).unwrap();
        assert_eq!(r, w);
        // Someone holds the image: direct I/O waits for it.
        let held = disk.backend();
        let p2 = pio.clone();
        let t = std::thread::spawn(move || {
            let mut b = vec![0u8; 4096];
            // SAFETY: as above.
            let done = unsafe { p2.read_vectored(8192, &[buf(&mut b)]) }.unwrap();
            (done, b)
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!t.is_finished(), "direct I/O ran while the image was held");
        drop(held);
        let (done, b) = t.join().unwrap();
        assert!(done && b == w);
        // Handed over: declined (the device then goes through the handle, which reopens).
        disk.release().unwrap();
        // SAFETY: as above.
        assert!(!unsafe { pio.read_vectored(0, &[buf(&mut r)]) }.unwrap());
        let _ = std::fs::remove_file(&p);
    }

    /// qcow2: allocated clusters go direct, unallocated ones are declined (the handle
    /// allocates them under the image lock).
    #[test]
    fn qcow2_direct_io_only_on_allocated_clusters() {
        let p = std::env::temp_dir().join(format!("gate-{}.qcow2", std::process::id()));
        let mut q = qcow2::Qcow2::create(&p, &qcow2::CreateOptions { size: 4 << 20, ..Default::default() }).unwrap();
        q.write_at(0, &[5u8; 65536]).unwrap();
        drop(q);
        let spec = parse_drive(&format!("file={},format=qcow2", p.display())).unwrap();
        let disk = SharedDisk::open(&spec, false).unwrap();
        let mut dev = disk.device_backend();
        let pio = dev.parallel_io().expect("a qcow2 image on a local file offers concurrent I/O");
        let mut w = vec![9u8; 8192];
        // SAFETY: the buffers outlive the calls.
        assert!(unsafe { pio.write_vectored(4096, &[buf(&mut w)]) }.unwrap());
        assert!(!unsafe { pio.write_vectored(1 << 20, &[buf(&mut w)]) }.unwrap(), "unallocated");
        let mut r = vec![0u8; 16384];
        dev.read_at(0, &mut r).unwrap();
        assert!(r[..4096].iter().all(|&x| x == 5) && r[4096..12288].iter().all(|&x| x == 9) && r[12288..].iter().all(|&x| x == 5));
        drop(dev);
        disk.release().unwrap();
        let _ = std::fs::remove_file(&p);
    }
}
