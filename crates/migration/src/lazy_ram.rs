//! Lazy `loadvm`: guest RAM served from a saved VM state (`vmstate::snapfile`) after the guest
//! has resumed, with the userfaultfd layer post-copy uses ([`crate::uffd`]).
//!
//! Guest RAM is dropped and registered in MISSING mode; the machine state is restored and the
//! guest runs at once. Two threads then bring RAM back:
//! - the **fault thread** answers every access to a missing page — from vCPUs, KVM itself,
//!   device threads, the monitor — by reading the whole chunk around it from the image,
//!   checking its CRC-32 and installing it atomically (`UFFDIO_COPY`); pages in no chunk are
//!   zero (`UFFDIO_ZEROPAGE`);
//! - the **fill thread** walks the chunks in order and installs each one nobody asked for yet.
//!
//! A chunk is claimed by whoever reads it first (missing → loading → in), so no chunk is read
//! twice and no page is ever installed over one the guest already wrote (`UFFDIO_COPY` never
//! overwrites). When every chunk is in, RAM is unregistered and everything is ordinary memory
//! again: dirty logging, migration and `savevm` work as on any VM (they wait for the fill with
//! [`LazyRam::wait`] first, because the page map only reports pages that are present).
//!
//! Integrity: a chunk's bytes are checked before the guest can see any of them. A chunk that
//! fails (or cannot be read) is never installed: the failure is reported through the
//! `on_error` callback (the VMM stops the VM and says why), threads touching it stay waiting,
//! the rest of RAM is still served, and [`LazyRam::wait`] returns the error.

use crate::snapshot_v2::{corrupt_text, host_of, Plan};
use crate::uffd::{Uffd, PAGE};
use crate::{MigratableVm, MigrationError, RamRegion, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmstate::snapfile::Chunk;

/// Reads saved state bytes from another thread (the image's file, by its own descriptor).
pub trait ChunkSource: Send + Sync {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

const MISSING: u8 = 0;
const LOADING: u8 = 1;
const IN: u8 = 2;
const BAD: u8 = 3;

/// Counters of a lazy load.
#[derive(Debug, Default, Clone, Copy)]
pub struct LazyStats {
    pub chunks: u64,
    pub by_fault: u64,
    pub by_fill: u64,
    pub zero_faults: u64,
    /// From start to the last chunk in (None while filling).
    pub fill_ms: Option<f64>,
}

struct Inner {
    uffd: Uffd,
    regions: Vec<RamRegion>,
    chunks: Vec<Chunk>,
    offsets: Vec<u64>,
    state: Vec<AtomicU8>,
    src: Box<dyn ChunkSource>,
    on_error: Box<dyn Fn(&str) + Send + Sync>,
    stop: AtomicBool,
    /// None while running; Some(Ok) when every chunk is in; Some(Err) after a failure.
    outcome: Mutex<Option<std::result::Result<(), String>>>,
    cv: Condvar,
    by_fault: AtomicU64,
    by_fill: AtomicU64,
    zero_faults: AtomicU64,
    started: Instant,
    fill_ns: AtomicU64,
}

/// A lazy load in progress (or finished). Dropping it stops the threads.
pub struct LazyRam {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

impl Inner {
    fn unregister(&self) {
        for r in &self.regions {
            let _ = self.uffd.unregister(r.host, r.size);
        }
    }

    fn fail(&self, msg: String) {
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if o.is_none() {
            // Reported before anyone waiting in `wait` sees the failure.
            tracing::error!("lazy loadvm: {msg}");
            (self.on_error)(&msg);
            *o = Some(Err(msg));
            drop(o);
            self.cv.notify_all();
        }
    }

    /// Claims, reads, checks and installs chunk `i`. Returns false if another thread had it.
    fn load(&self, i: usize, buf: &mut Vec<u8>, on_demand: bool) -> bool {
        if self.state[i].compare_exchange(MISSING, LOADING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        let c = &self.chunks[i];
        buf.resize(c.len() as usize, 0);
        let res = self
            .src
            .read_at(self.offsets[i], buf)
            .map_err(|e| format!("reading saved RAM at {:#x}: {e}", c.gpa))
            .and_then(|()| {
                let got = crc32fast::hash(buf);
                if got == c.crc {
                    Ok(())
                } else {
                    Err(corrupt_text(c, got))
                }
            })
            .and_then(|()| {
                let host = host_of(&self.regions, c.gpa, c.len()).ok_or("chunk outside guest RAM")?;
                self.uffd.copy(host, buf).map(|_| ()).map_err(|e| e.to_string())
            });
        match res {
            Ok(()) => {
                self.state[i].store(IN, Ordering::Release);
                true
            }
            Err(e) => {
                self.state[i].store(BAD, Ordering::Release);
                let who = if on_demand { "a guest access" } else { "the background fill" };
                self.fail(format!("{e} (found by {who}); the VM is stopped (its RAM is not the saved one)"));
                true
            }
        }
    }

    fn serve(&self, addr: u64, buf: &mut Vec<u8>) {
        let Some((r, off)) = self.regions.iter().find(|r| addr >= r.host && addr < r.host + r.size).map(|r| (r, addr - r.host)) else {
            return;
        };
        let page_host = r.host + (off & !(PAGE - 1));
        let gpa = r.gpa + (off & !(PAGE - 1));
        let i = self.chunks.partition_point(|c| c.end() <= gpa);
        if i < self.chunks.len() && self.chunks[i].gpa <= gpa {
            // LOADING: the loader's copy wakes the waiting thread; BAD: it stays waiting.
            let st = self.state[i].load(Ordering::Acquire);
            if st == MISSING && self.load(i, buf, true) {
                self.by_fault.fetch_add(1, Ordering::Relaxed);
            } else if st == IN {
                let _ = self.uffd.wake(page_host, PAGE);
            }
        } else {
            self.zero_faults.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.uffd.zero(page_host, PAGE) {
                if !self.stop.load(Ordering::Acquire) {
                    tracing::warn!("lazy loadvm: zero page at {gpa:#x}: {e}");
                }
            }
        }
    }

    fn fault_loop(&self) {
        let mut buf = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            match self.uffd.next_fault(Duration::from_millis(20)) {
                Ok(Some(f)) => self.serve(f.addr, &mut buf),
                Ok(None) => {}
                Err(e) => {
                    self.fail(format!("userfaultfd: {e}"));
                    return;
                }
            }
        }
    }

    fn fill_loop(&self) {
        let mut buf = Vec::new();
        for i in 0..self.chunks.len() {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            if self.load(i, &mut buf, false) {
                self.by_fill.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Chunks the fault thread was still loading.
        while self.state.iter().any(|s| s.load(Ordering::Acquire) == LOADING) {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.fill_ns.store(self.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut o = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let complete = o.is_none();
        if complete {
            // Everything is in: RAM becomes ordinary memory (untouched pages read as zero).
            self.unregister();
            *o = Some(Ok(()));
            self.stop.store(true, Ordering::Release);
        }
        drop(o);
        self.cv.notify_all();
        if !complete {
            return;
        }
        tracing::info!(
            "lazy loadvm: RAM complete in {:.1} ms ({} chunks: {} on demand, {} by the fill; {} zero-page faults)",
            self.started.elapsed().as_secs_f64() * 1e3,
            self.chunks.len(),
            self.by_fault.load(Ordering::Relaxed),
            self.by_fill.load(Ordering::Relaxed),
            self.zero_faults.load(Ordering::Relaxed)
        );
    }
}

impl LazyRam {
    /// Drops guest RAM, registers it for lazy serving and starts the fault thread. The VM must
    /// be paused; restore the machine state afterwards, then [`LazyRam::start_fill`].
    /// `on_error` runs on the fault or fill thread: it must not block (hand the work over).
    pub fn begin(
        vm: &dyn MigratableVm,
        plan: &Plan,
        src: Box<dyn ChunkSource>,
        on_error: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Result<LazyRam> {
        let uffd = Uffd::new().map_err(|e| MigrationError::Vm(e.to_string()))?;
        let regions = vm.ram_regions();
        vm.discard_ram().map_err(MigrationError::Vm)?;
        for (k, r) in regions.iter().enumerate() {
            if let Err(e) = uffd.register_missing(r.host, r.size) {
                for r in &regions[..k] {
                    let _ = uffd.unregister(r.host, r.size);
                }
                return Err(MigrationError::Vm(e.to_string()));
            }
        }
        let inner = Arc::new(Inner {
            uffd,
            regions,
            chunks: plan.chunks.clone(),
            offsets: plan.offsets.clone(),
            state: (0..plan.chunks.len()).map(|_| AtomicU8::new(MISSING)).collect(),
            src,
            on_error,
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            cv: Condvar::new(),
            by_fault: AtomicU64::new(0),
            by_fill: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            started: Instant::now(),
            fill_ns: AtomicU64::new(0),
        });
        let i2 = inner.clone();
        let t = std::thread::Builder::new()
            .name("loadvm-faults".into())
            .spawn(move || i2.fault_loop())
            .map_err(MigrationError::Io)?;
        Ok(LazyRam { inner, threads: vec![t] })
    }

    /// Starts the background fill.
    pub fn start_fill(&mut self) -> Result<()> {
        let i2 = self.inner.clone();
        let t = std::thread::Builder::new()
            .name("loadvm-fill".into())
            .spawn(move || i2.fill_loop())
            .map_err(MigrationError::Io)?;
        self.threads.push(t);
        Ok(())
    }

    /// Waits until every chunk is in (Ok) or one failed (Err, with the reason).
    pub fn wait(&self) -> std::result::Result<(), String> {
        let mut o = self.inner.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = o.as_ref() {
                return r.clone();
            }
            o = self.inner.cv.wait(o).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Finished (either way)?
    pub fn is_done(&self) -> bool {
        self.inner.outcome.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub fn stats(&self) -> LazyStats {
        let ns = self.inner.fill_ns.load(Ordering::Relaxed);
        LazyStats {
            chunks: self.inner.chunks.len() as u64,
            by_fault: self.inner.by_fault.load(Ordering::Relaxed),
            by_fill: self.inner.by_fill.load(Ordering::Relaxed),
            zero_faults: self.inner.zero_faults.load(Ordering::Relaxed),
            fill_ms: (ns != 0).then(|| ns as f64 / 1e6),
        }
    }

    /// Stops serving (RAM is about to be replaced, or the process ends): unregisters RAM,
    /// which wakes any thread still waiting (it then sees an ordinary, zero page).
    pub fn cancel(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.inner.unregister();
        let mut o = self.inner.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if o.is_none() {
            *o = Some(Err("lazy loadvm cancelled".into()));
        }
        drop(o);
        self.inner.cv.notify_all();
    }
}

impl Drop for LazyRam {
    fn drop(&mut self) {
        self.shutdown();
    }
}
