//! The mirror engine: bulk pass over the allocation map, dirty passes, the switch to
//! write-through, and the job's end (cancel, complete with pivot, error).

use crate::bitmap::DirtyBitmap;
use crate::target::MirrorTarget;
use qcow2::{BlockBackend, MapKind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Dirty-bitmap granularity.
pub const GRANULARITY: u64 = 64 * 1024;
/// Largest piece read and sent at once.
const CHUNK: u64 = 1024 * 1024;
/// A pass that leaves at most this much dirty ends the copy: the rest is copied with guest
/// I/O held off and the mirror turns write-through (ready).
pub const READY_DIRTY_BYTES: u64 = 4 * 1024 * 1024;

/// Errors setting up a mirror.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("Source and target image have different sizes ({source_size} vs {target_size} bytes)")]
    SizeMismatch { source_size: u64, target_size: u64 },
}

/// What the first pass copies (QEMU's `sync` of `drive-mirror` / `blockdev-mirror`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// The whole disk as the guest sees it, backing chain included.
    #[default]
    Full,
    /// Only what the top image holds itself (data and zero clusters); what reads through to
    /// the backing chain is skipped: the target is an overlay over its own copy of the base.
    /// Without a backing file, the same as `Full`.
    Top,
    /// No first pass: only what the guest writes from now on.
    None,
}

/// What a guest request did to the source, reported to [`Mirror::on_write`].
#[derive(Debug, Clone, Copy)]
pub enum WriteKind<'a> {
    Data(&'a [u8]),
    Zeroes(u64),
    Discard(u64),
}

/// The drive being mirrored, as the job needs it.
pub trait SourceDisk: Send + Sync {
    /// Runs `f` on the source backend with the drive's I/O lock held (no guest request runs
    /// meanwhile; guest writes call [`Mirror::on_write`] under that same lock).
    fn locked(&self, f: &mut dyn FnMut(&mut dyn BlockBackend) -> qcow2::Result<()>) -> qcow2::Result<()>;
    /// Removes the mirror's write hook from the drive.
    fn detach(&self);
    /// `block-job-complete`: with the drive's I/O lock held, calls `take` for the new backend
    /// (the mirror target), removes the hook and replaces the drive's backend by it. Taking the
    /// target and switching happen under one hold of the lock, so no guest write can fall
    /// between the last one forwarded to the target and the first one the target receives as
    /// the drive. If `take` gives nothing, only the hook is removed and an error returned.
    fn pivot(&self, take: &mut dyn FnMut() -> Option<Box<dyn BlockBackend>>) -> Result<(), String>;
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// Target consistent (ready job cancelled, or completed and pivoted).
    Completed,
    /// Cancelled before it was ready (or force-cancelled).
    Cancelled,
    /// The copy failed; the source is untouched.
    Failed(String),
}

/// Progress as `query-block-jobs` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub offset: u64,
    pub len: u64,
    pub speed: u64,
    pub ready: bool,
    pub busy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Tracking,
    WriteThrough,
    Detached,
}

struct State {
    mode: Mode,
    dirty: DirtyBitmap,
    error: Option<String>,
}

struct Inner {
    size: u64,
    state: Mutex<State>,
    wake: Condvar,
    target: Mutex<Box<dyn MirrorTarget>>,
    cancel: AtomicBool,
    force: AtomicBool,
    complete: AtomicBool,
    ready: AtomicBool,
    speed: AtomicU64,
    copied: AtomicU64,
    first_pass_left: AtomicU64,
    sync: SyncMode,
}

/// One mirror (cheap to clone; the drive's hook and the job thread share it).
#[derive(Clone)]
pub struct Mirror(Arc<Inner>);

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mirror {
    /// A mirror of a `size`-byte source into `target` (same size, as QEMU's `mode: existing`),
    /// `sync: full`.
    pub fn new(size: u64, target: Box<dyn MirrorTarget>) -> Result<Mirror, MirrorError> {
        Self::with_sync(size, target, SyncMode::Full)
    }

    /// [`Mirror::new`] with the given [`SyncMode`].
    pub fn with_sync(size: u64, target: Box<dyn MirrorTarget>, sync: SyncMode) -> Result<Mirror, MirrorError> {
        if target.size() != size {
            return Err(MirrorError::SizeMismatch { source_size: size, target_size: target.size() });
        }
        Ok(Mirror(Arc::new(Inner {
            size,
            state: Mutex::new(State { mode: Mode::Tracking, dirty: DirtyBitmap::new(size, GRANULARITY), error: None }),
            wake: Condvar::new(),
            target: Mutex::new(target),
            cancel: AtomicBool::new(false),
            force: AtomicBool::new(false),
            complete: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            speed: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            first_pass_left: AtomicU64::new(size),
            sync,
        })))
    }

    /// Called by the drive after each successful guest write/zero/discard of the source,
    /// with the drive's I/O lock held and `src` the source backend.
    pub fn on_write(&self, src: &mut dyn BlockBackend, off: u64, kind: WriteKind<'_>) {
        {
            let mut st = lock(&self.0.state);
            match st.mode {
                Mode::Detached => return,
                Mode::Tracking => {
                    let len = match kind {
                        WriteKind::Data(d) => d.len() as u64,
                        WriteKind::Zeroes(l) | WriteKind::Discard(l) => l,
                    };
                    st.dirty.set_range(off, len);
                    return;
                }
                Mode::WriteThrough => {}
            }
        }
        // Write-through. The state lock is not held during the target I/O (queries stay
        // responsive); the drive's I/O lock, held by our caller, keeps guest writes and the
        // mode switches of `run` in order.
        let res = {
            let mut t = lock(&self.0.target);
            match kind {
                WriteKind::Data(d) => t.write(off, d),
                WriteKind::Zeroes(l) => t.zero(off, l),
                // What a discarded range reads as is the source's business: copy it.
                WriteKind::Discard(l) => copy_range(src, &mut **t, off, l),
            }
            .and_then(|()| t.drain())
        };
        if let Err(e) = res {
            let mut st = lock(&self.0.state);
            st.error = Some(format!("writing to the mirror target: {e}"));
            st.mode = Mode::Detached;
            self.0.wake.notify_all();
        }
    }

    /// `block-job-cancel` (`force`: abandon even a ready job).
    pub fn cancel(&self, force: bool) {
        self.0.force.store(force, Ordering::SeqCst);
        self.0.cancel.store(true, Ordering::SeqCst);
        self.0.wake.notify_all();
    }

    /// `block-job-complete`: only once ready.
    pub fn complete(&self) -> Result<(), String> {
        if !self.0.ready.load(Ordering::SeqCst) {
            return Err("The active block job cannot be completed: it is not ready yet".into());
        }
        self.0.complete.store(true, Ordering::SeqCst);
        self.0.wake.notify_all();
        Ok(())
    }

    /// `block-job-set-speed` (bytes per second, 0 = unlimited).
    pub fn set_speed(&self, bps: u64) {
        self.0.speed.store(bps, Ordering::SeqCst);
    }

    pub fn progress(&self) -> Progress {
        let dirty = lock(&self.0.state).dirty.dirty_bytes();
        let offset = self.0.copied.load(Ordering::SeqCst);
        let ready = self.0.ready.load(Ordering::SeqCst);
        Progress {
            offset,
            len: offset + self.0.first_pass_left.load(Ordering::SeqCst) + dirty,
            speed: self.0.speed.load(Ordering::SeqCst),
            ready,
            busy: !ready,
        }
    }

    fn stop_requested(&self) -> bool {
        self.0.cancel.load(Ordering::SeqCst)
    }

    fn error(&self) -> Option<String> {
        lock(&self.0.state).error.clone()
    }

    /// Runs the job to its end on the calling thread. The mirror must already be the drive's
    /// write hook. `on_ready` is called once, when source and target are in sync.
    pub fn run(&self, src: &dyn SourceDisk, on_ready: &mut dyn FnMut()) -> JobEnd {
        let end = self.copy_and_wait(src, on_ready);
        let pivoting = matches!(end, Ok(JobEnd::Completed))
            && self.0.complete.load(Ordering::SeqCst)
            && !self.0.cancel.load(Ordering::SeqCst);
        // Stop tracking/forwarding before anything else: the guest owns its disk again.
        // Except on the way to a pivot: until the drive switches to the target, every guest
        // write must still reach the target, or it would be lost with the old image.
        let stop_forwarding = || {
            let _ = src.locked(&mut |_| {
                lock(&self.0.state).mode = Mode::Detached;
                Ok(())
            });
        };
        if !pivoting {
            stop_forwarding();
        }
        match end {
            Ok(JobEnd::Completed) => {
                let flushed = {
                    let mut t = lock(&self.0.target);
                    t.drain().and_then(|()| t.flush())
                };
                if let Err(e) = flushed {
                    stop_forwarding();
                    src.detach();
                    return JobEnd::Failed(format!("flushing the mirror target: {e}"));
                }
                if pivoting {
                    return self.pivot(src);
                }
                src.detach();
                JobEnd::Completed
            }
            Ok(other) => {
                src.detach();
                other
            }
            Err(e) => {
                src.detach();
                JobEnd::Failed(e)
            }
        }
    }

    fn pivot(&self, src: &dyn SourceDisk) -> JobEnd {
        // Under the drive's lock: forwarding stops and the target moves into the drive (the
        // mirror keeps a placeholder), with no guest write in between.
        let mut unusable = false;
        let r = src.pivot(&mut || {
            lock(&self.0.state).mode = Mode::Detached;
            let t = std::mem::replace(&mut *lock(&self.0.target), Box::new(Gone(self.0.size)));
            let b = t.into_backend();
            unusable = b.is_none();
            b
        });
        match r {
            Ok(()) => JobEnd::Completed,
            Err(_) if unusable => JobEnd::Failed("the mirror target cannot serve as the drive".into()),
            Err(e) => JobEnd::Failed(format!("switching the drive to the mirror target: {e}")),
        }
    }

    fn copy_and_wait(&self, src: &dyn SourceDisk, on_ready: &mut dyn FnMut()) -> Result<JobEnd, String> {
        let started = Instant::now();
        self.first_pass(src, started)?;
        // Dirty passes until little is left.
        loop {
            if self.stop_requested() {
                return Ok(JobEnd::Cancelled);
            }
            if let Some(e) = self.error() {
                return Err(e);
            }
            let dirty = lock(&self.0.state).dirty.dirty_bytes();
            if dirty <= READY_DIRTY_BYTES {
                break;
            }
            self.dirty_pass(src, started)?;
        }
        // The rest with guest I/O held off, then write-through.
        let mut failure = None;
        src.locked(&mut |b| {
            let mut st = lock(&self.0.state);
            let mut t = lock(&self.0.target);
            let mut at = 0;
            while let Some((first, n)) = st.dirty.next_run(at, CHUNK / GRANULARITY) {
                let off = first * GRANULARITY;
                let len = (n * GRANULARITY).min(self.0.size - off);
                if let Err(e) = copy_range(b, &mut **t, off, len) {
                    failure = Some(e);
                    return Ok(());
                }
                st.dirty.clear_bits(first, n);
                self.0.copied.fetch_add(len, Ordering::SeqCst);
                at = first + n;
            }
            if let Err(e) = t.drain() {
                failure = Some(e);
                return Ok(());
            }
            st.mode = Mode::WriteThrough;
            Ok(())
        })
        .map_err(|e| format!("reading the source: {e}"))?;
        if let Some(e) = failure {
            return Err(format!("writing to the mirror target: {e}"));
        }
        self.0.ready.store(true, Ordering::SeqCst);
        on_ready();
        // Ready: the hook forwards every guest write; wait for the verdict.
        let mut st = lock(&self.0.state);
        loop {
            if let Some(e) = st.error.clone() {
                return Err(e);
            }
            if self.0.cancel.load(Ordering::SeqCst) {
                return Ok(if self.0.force.load(Ordering::SeqCst) { JobEnd::Cancelled } else { JobEnd::Completed });
            }
            if self.0.complete.load(Ordering::SeqCst) {
                return Ok(JobEnd::Completed);
            }
            st = self.0.wake.wait_timeout(st, Duration::from_millis(500)).map(|r| r.0).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Copies the disk once: zero clusters (and unallocated ones of an image without a
    /// backing file) as zero requests without reading them, everything else read and sent as
    /// data or, when it reads as zeros, as zero requests. With `sync: top` and a backing file,
    /// the runs the top image does not hold are left out (the target's own base has them);
    /// its zero clusters are still sent, since they hide base data. `sync: none` copies
    /// nothing here.
    fn first_pass(&self, src: &dyn SourceDisk, started: Instant) -> Result<(), String> {
        let mut map: Vec<(u64, u64, bool)> = Vec::new(); // (start, len, known zero)
        if self.0.sync == SyncMode::None {
            self.0.first_pass_left.store(0, Ordering::SeqCst);
            return Ok(());
        }
        src.locked(&mut |b| {
            map = match b.as_qcow2() {
                Some(q) => {
                    // Without a backing file, unallocated clusters read as zeros: no need to
                    // read them. With one, they read through to it and are copied as data,
                    // or skipped with `sync: top`.
                    let standalone = q.backing_file().is_none();
                    let top_only = self.0.sync == SyncMode::Top && !standalone;
                    q.map()?
                        .into_iter()
                        .filter(|e| !(top_only && e.kind == MapKind::Unallocated))
                        .map(|e| {
                            let zero = match e.kind {
                                MapKind::Zero(_) => true,
                                MapKind::Unallocated => standalone,
                                _ => false,
                            };
                            (e.start, e.length, zero)
                        })
                        .collect()
                }
                None => vec![(0, b.size(), false)],
            };
            Ok(())
        })
        .map_err(|e| format!("reading the source's allocation map: {e}"))?;
        // Progress counts only what this pass will copy.
        let total: u64 = map.iter().map(|r| r.1).sum();
        self.0.first_pass_left.store(total, Ordering::SeqCst);
        let mut buf = vec![0u8; CHUNK as usize];
        for (start, len, zero) in map {
            let mut pos = start;
            while pos < start + len {
                if self.stop_requested() || self.error().is_some() {
                    return Ok(());
                }
                let n = (start + len - pos).min(CHUNK);
                if zero {
                    lock(&self.0.target).zero(pos, n)?;
                } else {
                    let b = &mut buf[..n as usize];
                    src.locked(&mut |s| s.read_at(pos, b)).map_err(|e| format!("reading the source: {e}"))?;
                    let mut t = lock(&self.0.target);
                    if b.iter().all(|&x| x == 0) {
                        t.zero(pos, n)?;
                    } else {
                        t.write(pos, b)?;
                    }
                }
                self.0.first_pass_left.fetch_sub(n, Ordering::SeqCst);
                self.0.copied.fetch_add(n, Ordering::SeqCst);
                pos += n;
                self.throttle(started)?;
            }
        }
        lock(&self.0.target).drain()
    }

    /// Copies the chunks dirtied so far (each read with its bits cleared under the I/O lock,
    /// so a write after the read dirties it again).
    fn dirty_pass(&self, src: &dyn SourceDisk, started: Instant) -> Result<(), String> {
        let mut buf = vec![0u8; CHUNK as usize];
        let mut at = 0;
        loop {
            if self.stop_requested() || self.error().is_some() {
                return Ok(());
            }
            let Some((first, n)) = lock(&self.0.state).dirty.next_run(at, CHUNK / GRANULARITY) else { break };
            let off = first * GRANULARITY;
            let len = (n * GRANULARITY).min(self.0.size - off);
            let b = &mut buf[..len as usize];
            src.locked(&mut |s| {
                s.read_at(off, b)?;
                lock(&self.0.state).dirty.clear_bits(first, n);
                Ok(())
            })
            .map_err(|e| format!("reading the source: {e}"))?;
            {
                let mut t = lock(&self.0.target);
                if b.iter().all(|&x| x == 0) {
                    t.zero(off, len)?;
                } else {
                    t.write(off, b)?;
                }
            }
            self.0.copied.fetch_add(len, Ordering::SeqCst);
            at = first + n;
            self.throttle(started)?;
        }
        // Overlapping requests in flight have no defined order: settle this pass first.
        lock(&self.0.target).drain()
    }

    /// Sleeps while the copy is ahead of `speed` bytes/s (checking for cancel). Before
    /// sleeping, the requests in flight are settled, so a failing target is noticed now rather
    /// than when the pipeline window fills.
    fn throttle(&self, started: Instant) -> Result<(), String> {
        let mut drained = false;
        loop {
            let speed = self.0.speed.load(Ordering::SeqCst);
            if speed == 0 || self.stop_requested() {
                return Ok(());
            }
            let due = Duration::from_secs_f64(self.0.copied.load(Ordering::SeqCst) as f64 / speed as f64);
            let el = started.elapsed();
            if el >= due {
                return Ok(());
            }
            if !drained {
                lock(&self.0.target).drain()?;
                drained = true;
            }
            std::thread::sleep((due - el).min(Duration::from_millis(100)));
        }
    }
}

/// Copies `[off, off+len)` from `src` to `t` in pieces, zero pieces as zero requests.
fn copy_range(src: &mut dyn BlockBackend, t: &mut dyn MirrorTarget, off: u64, len: u64) -> Result<(), String> {
    let mut buf = vec![0u8; len.min(CHUNK) as usize];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(CHUNK);
        let b = &mut buf[..n as usize];
        src.read_at(pos, b).map_err(|e| format!("reading the source: {e}"))?;
        if b.iter().all(|&x| x == 0) {
            t.zero(pos, n)?;
        } else {
            t.write(pos, b)?;
        }
        pos += n;
    }
    Ok(())
}

/// Placeholder left in the mirror after its target moved into the drive.
struct Gone(u64);

impl MirrorTarget for Gone {
    fn size(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<(), String> {
        Err("mirror finished".into())
    }
    fn zero(&mut self, _: u64, _: u64) -> Result<(), String> {
        Err("mirror finished".into())
    }
    fn drain(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), String> {
        Ok(())
    }
    fn into_backend(self: Box<Self>) -> Option<Box<dyn BlockBackend>> {
        None
    }
}
