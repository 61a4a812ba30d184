//! `sync: top` against real qcow2 chains: the source is an overlay over a base, the target an
//! overlay over its own copy of that base. Only what the source's top image holds may be
//! written into the target (its zero clusters included, as they hide base data); the target
//! chain must read exactly as the source chain, also with a writer busy during the copy.
//! `sync: full` over the same chain copies the base's data too (the count tells them apart);
//! without a backing file `top` copies what `full` does.

use mirror::{BackendTarget, JobEnd, Mirror, MirrorTarget, SourceDisk, SyncMode, WriteKind};
use qcow2::{BlockBackend, CreateOptions, ImageFormat, OpenOptions, Qcow2};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

/// A scratch directory for one test, removed when the test ends.
fn dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("mirror-top-{name}-")).tempdir().expect("scratch directory")
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8 | 1
        })
        .collect()
}

/// The drive: backend and mirror hook under one lock.
struct Drive(Mutex<(Box<dyn BlockBackend>, Option<Mirror>)>);

impl Drive {
    fn write(&self, off: u64, data: &[u8]) {
        let mut g = self.0.lock().unwrap();
        let (b, m) = &mut *g;
        b.write_at(off, data).unwrap();
        if let Some(m) = m.clone() {
            m.on_write(&mut **b, off, WriteKind::Data(data));
        }
    }
    fn read_all(&self) -> Vec<u8> {
        read_all(&mut *self.0.lock().unwrap().0)
    }
}

fn read_all(b: &mut dyn BlockBackend) -> Vec<u8> {
    let mut v = vec![0u8; b.size() as usize];
    b.read_at(0, &mut v).unwrap();
    v
}

impl SourceDisk for Drive {
    fn locked(&self, f: &mut dyn FnMut(&mut dyn BlockBackend) -> qcow2::Result<()>) -> qcow2::Result<()> {
        f(&mut *self.0.lock().unwrap().0)
    }
    fn detach(&self) {
        self.0.lock().unwrap().1 = None;
    }
    fn pivot(&self, _: &mut dyn FnMut() -> Option<Box<dyn BlockBackend>>) -> Result<(), String> {
        Err("not in this test".into())
    }
}

/// Counts the data bytes and the zeroed bytes written into the target.
struct Counting(BackendTarget, Arc<AtomicU64>, Arc<AtomicU64>);

impl MirrorTarget for Counting {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), String> {
        self.1.fetch_add(data.len() as u64, Ordering::SeqCst);
        self.0.write(off, data)
    }
    fn zero(&mut self, off: u64, len: u64) -> Result<(), String> {
        self.2.fetch_add(len, Ordering::SeqCst);
        self.0.zero(off, len)
    }
    fn drain(&mut self) -> Result<(), String> {
        self.0.drain()
    }
    fn flush(&mut self) -> Result<(), String> {
        self.0.flush()
    }
    fn into_backend(self: Box<Self>) -> Option<Box<dyn BlockBackend>> {
        None
    }
}

fn overlay(path: &Path, backing: &str) -> Qcow2 {
    let o = CreateOptions {
        size: SIZE,
        backing_file: Some(backing.into()),
        backing_format: Some(ImageFormat::Qcow2),
        ..Default::default()
    };
    Qcow2::create(path, &o).unwrap()
}

/// Source chain in `d/src` (base with 24 MiB of data; overlay with a partial-cluster write,
/// whole clusters, a zeroed range over base data), the base copied to `d/dst` with an empty
/// overlay over it. Returns the source overlay and the target overlay's path.
fn chains(d: &Path) -> (Qcow2, PathBuf) {
    for sub in ["src", "dst"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let mut base = Qcow2::create(d.join("src/base.qcow2"), &CreateOptions { size: SIZE, ..Default::default() }).unwrap();
    base.write_at(0, &fill(1, 24 * MIB as usize)).unwrap();
    base.flush().unwrap();
    drop(base);
    std::fs::copy(d.join("src/base.qcow2"), d.join("dst/base.qcow2")).unwrap();
    let mut top = overlay(&d.join("src/top.qcow2"), "base.qcow2");
    top.write_at(2 * MIB + 1000, &fill(2, 100_000)).unwrap();
    top.write_at(12 * MIB, &fill(3, 2 * MIB as usize)).unwrap();
    top.write_zeroes(8 * MIB, MIB).unwrap();
    top.write_at(28 * MIB, &fill(4, 300_000)).unwrap();
    drop(overlay(&d.join("dst/top.qcow2"), "base.qcow2"));
    (top, d.join("dst/top.qcow2"))
}

fn top_allocated(q: &mut Qcow2) -> u64 {
    q.top_allocation(0, SIZE).unwrap().iter().filter(|r| r.2).map(|r| r.1).sum()
}

/// Runs the mirror to ready (with `writer` busy meanwhile if given), cancels; returns the
/// data and zero bytes sent.
fn run(drive: Arc<Drive>, target: PathBuf, sync: SyncMode, writer: bool) -> (u64, u64) {
    let t = Qcow2::open(&target, &OpenOptions::default()).unwrap();
    let (data, zero) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let m = Mirror::with_sync(SIZE, Box::new(Counting(BackendTarget(Box::new(t)), data.clone(), zero.clone())), sync).unwrap();
    drive.0.lock().unwrap().1 = Some(m.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (d2, s2) = (drive.clone(), stop.clone());
    let w = std::thread::spawn(move || {
        let mut i = 0u64;
        while writer && !s2.load(Ordering::SeqCst) {
            // Anywhere on the disk, mostly where the top image holds nothing yet.
            let off = (i * 7919 * 4096 + 777) % (SIZE - 70_000);
            d2.write(off, &fill(100 + i, 5000 + (i as usize % 50_000)));
            i += 1;
            std::thread::yield_now();
        }
        i
    });
    let (m2, d3) = (m.clone(), drive.clone());
    let job = std::thread::spawn(move || m2.run(&*d3, &mut || {}));
    while !m.progress().ready && !job.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    stop.store(true, Ordering::SeqCst);
    let writes = w.join().unwrap();
    assert_eq!(writes > 0, writer);
    m.cancel(false);
    assert_eq!(job.join().unwrap(), JobEnd::Completed);
    (data.load(Ordering::SeqCst), zero.load(Ordering::SeqCst))
}

fn target_reads(target: &Path) -> Vec<u8> {
    read_all(&mut Qcow2::open(target, &OpenOptions::default()).unwrap())
}

#[test]
fn top_copies_only_the_top_image_and_the_chains_read_alike() {
    let scratch = dir("only");
    let d = scratch.path();
    let (mut src, dst) = chains(&d);
    let top = top_allocated(&mut src);
    let drive = Arc::new(Drive(Mutex::new((Box::new(src), None))));
    let (data, zero) = run(drive.clone(), dst.clone(), SyncMode::Top, false);
    // Data: the clusters the top image holds (the zeroed MiB reads as zeros: a zero request).
    assert!(data > 0 && data + zero <= top, "data {data} + zero {zero} > top-allocated {top}");
    assert!(zero >= MIB, "the zeroed range over base data must be sent ({zero})");
    assert!(data < 8 * MIB, "far less than the base's 24 MiB of data: {data}");
    assert!(drive.read_all() == target_reads(&dst), "target chain differs from the source chain");
    // The target's base was not written; its top holds what was copied.
    let mut t = Qcow2::open(&dst, &OpenOptions::default()).unwrap();
    assert!(!t.is_allocated_top(20 * MIB, MIB).unwrap(), "base-only data stays in the base");
    assert!(t.is_allocated_top(8 * MIB, MIB).unwrap(), "the zeroed range is a zero cluster in the top");
}

#[test]
fn top_under_writes_keeps_the_target_chain_equal() {
    let scratch = dir("writes");
    let d = scratch.path();
    let (src, dst) = chains(&d);
    let drive = Arc::new(Drive(Mutex::new((Box::new(src), None))));
    run(drive.clone(), dst.clone(), SyncMode::Top, true);
    assert!(drive.read_all() == target_reads(&dst), "target chain differs from the source chain");
}

#[test]
fn full_copies_the_base_too_and_top_without_backing_is_full() {
    let scratch = dir("full");
    let d = scratch.path();
    let (src, dst) = chains(&d);
    let drive = Arc::new(Drive(Mutex::new((Box::new(src), None))));
    let (data, _) = run(drive.clone(), dst.clone(), SyncMode::Full, false);
    assert!(data >= 20 * MIB, "full must send the base's data through: {data}");
    assert!(drive.read_all() == target_reads(&dst));

    // A standalone image: top sends everything full would.
    let mut s = Qcow2::create(d.join("alone.qcow2"), &CreateOptions { size: SIZE, ..Default::default() }).unwrap();
    s.write_at(5 * MIB, &fill(9, 3 * MIB as usize)).unwrap();
    let t = d.join("alone-dst.qcow2");
    drop(Qcow2::create(&t, &CreateOptions { size: SIZE, ..Default::default() }).unwrap());
    let drive = Arc::new(Drive(Mutex::new((Box::new(s), None))));
    let (data, _) = run(drive.clone(), t.clone(), SyncMode::Top, false);
    assert_eq!(data, 3 * MIB);
    assert!(drive.read_all() == target_reads(&t));
}

#[test]
fn none_copies_only_new_writes() {
    let scratch = dir("none");
    let d = scratch.path();
    let (src, dst) = chains(&d);
    let drive = Arc::new(Drive(Mutex::new((Box::new(src), None))));
    let (data, zero) = run(drive, dst, SyncMode::None, false);
    assert_eq!((data, zero), (0, 0));
}
