//! Where savevm's RAM goes: straight from guest memory into the image file with `O_DIRECT`,
//! on two writer threads, while the saving thread goes on scanning and checksumming the next
//! pages. Buffered writes spend most of savevm copying guest RAM into fresh page-cache pages
//! (`copy_folio_from_iter_atomic`, profiled with perf: 84% of a 512 MiB savevm on this host);
//! direct writes let the disk read guest memory itself. The clusters are allocated first
//! (`Qcow2::alloc_vmstate`), the small pieces (header, sections, chunk list) go through the
//! image as before. Anything unusual — a file that refuses `O_DIRECT`, storage that is not a
//! local file, clusters that cannot be written in place — falls back to writing through the
//! image.

use migration::snapshot_v2::StateSink;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const WRITERS: usize = 2;

/// (host address of guest memory, length, file offset)
type Job = (u64, usize, u64);

struct Writers {
    tx: Option<SyncSender<Job>>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

pub struct DirectSink<'a> {
    q: &'a mut qcow2::Qcow2,
    writers: Option<Writers>,
    pub direct_bytes: u64,
}

fn writer(direct: Arc<File>, buffered: Arc<File>, rx: Arc<Mutex<Receiver<Job>>>) -> io::Result<()> {
    loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((host, len, off)) = job else { return Ok(()) };
        // SAFETY: guest RAM, unchanged while the VM is paused for savevm (the caller waits for
        // every job in `finish_ram` before resuming).
        let mem = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        match direct.write_all_at(mem, off) {
            Ok(()) => {}
            // Misaligned for this device: the same bytes through the page cache.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => buffered.write_all_at(mem, off)?,
            Err(e) => return Err(e),
        }
    }
}

impl<'a> DirectSink<'a> {
    /// A sink over `q`'s active VM-state area (already emptied).
    pub fn new(q: &'a mut qcow2::Qcow2) -> DirectSink<'a> {
        let writers = q.host_file_fd().and_then(|fd| {
            let path = format!("/proc/self/fd/{fd}");
            let direct = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&path).ok()?;
            let buffered = std::fs::OpenOptions::new().write(true).open(&path).ok()?;
            let (direct, buffered) = (Arc::new(direct), Arc::new(buffered));
            let (tx, rx) = sync_channel::<Job>(4);
            let rx = Arc::new(Mutex::new(rx));
            let threads = (0..WRITERS)
                .map(|i| {
                    let (d, b, r) = (direct.clone(), buffered.clone(), rx.clone());
                    std::thread::Builder::new().name(format!("savevm-write{i}")).spawn(move || writer(d, b, r)).ok()
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Writers { tx: Some(tx), threads })
        });
        DirectSink { q, writers, direct_bytes: 0 }
    }
}

impl StateSink for DirectSink<'_> {
    fn write_at(&mut self, pos: u64, data: &[u8]) -> io::Result<()> {
        self.q.save_vmstate(pos, data).map_err(io::Error::other)
    }

    fn write_ram(&mut self, pos: u64, host: u64, len: usize) -> io::Result<()> {
        let page = 4096u64;
        if let Some(w) = self.writers.as_ref().filter(|_| pos.is_multiple_of(page) && host.is_multiple_of(page)) {
            match self.q.alloc_vmstate(pos, len as u64) {
                Ok(extents) => {
                    for (p, l, off) in extents {
                        let tx = w.tx.as_ref().ok_or_else(|| io::Error::other("savevm writers stopped"))?;
                        tx.send((host + (p - pos), l as usize, off)).map_err(|_| io::Error::other("savevm writer failed"))?;
                    }
                    self.direct_bytes += len as u64;
                    return Ok(());
                }
                Err(e) => tracing::debug!("savevm: direct writes not possible here ({e})"),
            }
        }
        // SAFETY: guest RAM passed by `save`, unchanged while the VM is paused.
        let mem = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        self.write_at(pos, mem)
    }

    fn finish_ram(&mut self) -> io::Result<()> {
        let Some(mut w) = self.writers.take() else { return Ok(()) };
        drop(w.tx.take());
        let mut res = Ok(());
        for t in w.threads.drain(..) {
            let r = t.join().unwrap_or_else(|_| Err(io::Error::other("savevm writer panicked")));
            if res.is_ok() {
                res = r;
            }
        }
        res
    }
}

impl Drop for DirectSink<'_> {
    fn drop(&mut self) {
        let _ = self.finish_ram();
    }
}
