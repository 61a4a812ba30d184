//! The mirror engine against local images and our NBD server: a guest-like writer keeps
//! writing while the copy runs, through ready (write-through) to cancel; the target must equal
//! the source. A target that fails ends the job with an error and leaves the source alone.

use mirror::{BackendTarget, JobEnd, Mirror, MirrorTarget, NbdTarget, SourceDisk, WriteKind};
use qcow2::{BlockBackend, CreateOptions, Qcow2, RawImage};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;

/// A scratch directory for one test, removed when the test ends; each test shadows `tmp` with
/// `let tmp = |n: &str| dir.path().join(n);`.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("mirror-engine-").tempdir().expect("scratch directory")
}

/// A drive: the backend and the mirror hook under one lock, as godwit's drives keep them.
struct Drive {
    io: Mutex<(Box<dyn BlockBackend>, Option<Mirror>)>,
}

impl Drive {
    fn write(&self, off: u64, data: &[u8]) {
        let mut g = self.io.lock().unwrap();
        let (b, m) = &mut *g;
        b.write_at(off, data).unwrap();
        if let Some(m) = m.clone() {
            m.on_write(&mut **b, off, WriteKind::Data(data));
        }
    }
    fn zero(&self, off: u64, len: u64) {
        let mut g = self.io.lock().unwrap();
        let (b, m) = &mut *g;
        b.write_zeroes(off, len).unwrap();
        if let Some(m) = m.clone() {
            m.on_write(&mut **b, off, WriteKind::Zeroes(len));
        }
    }
    fn read_all(&self) -> Vec<u8> {
        let mut g = self.io.lock().unwrap();
        let mut v = vec![0u8; g.0.size() as usize];
        g.0.read_at(0, &mut v).unwrap();
        v
    }
}

impl SourceDisk for Drive {
    fn locked(&self, f: &mut dyn FnMut(&mut dyn BlockBackend) -> qcow2::Result<()>) -> qcow2::Result<()> {
        let mut g = self.io.lock().unwrap();
        f(&mut *g.0)
    }
    fn detach(&self) {
        self.io.lock().unwrap().1 = None;
    }
    fn pivot(&self, take: &mut dyn FnMut() -> Option<Box<dyn BlockBackend>>) -> Result<(), String> {
        let mut g = self.io.lock().unwrap();
        let new = take();
        g.1 = None;
        g.0 = new.ok_or("no backend")?;
        Ok(())
    }
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// Runs a mirror of `drive` into `target` with a writer thread busy throughout; cancels once
/// ready and some write-through writes happened. Returns how it ended.
fn mirror_under_writes(drive: Arc<Drive>, target: Box<dyn MirrorTarget>) -> JobEnd {
    let size = drive.io.lock().unwrap().0.size();
    let m = Mirror::new(size, target).unwrap();
    drive.io.lock().unwrap().1 = Some(m.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (d2, s2) = (drive.clone(), stop.clone());
    let writer = std::thread::spawn(move || {
        let mut i = 0u64;
        while !s2.load(Ordering::SeqCst) {
            let off = (i * 7919 * 4096) % (size - 70_000);
            if i % 5 == 4 {
                d2.zero(off, 8192);
            } else {
                d2.write(off + (i % 3), &fill(i, 3000 + (i as usize % 60_000)));
            }
            i += 1;
            if i % 64 == 0 {
                std::thread::yield_now();
            }
        }
        i
    });
    let m2 = m.clone();
    let job = std::thread::spawn(move || {
        let src: &dyn SourceDisk = &*drive;
        m2.run(src, &mut || {})
    });
    // Wait for ready, let some write-through happen, then cancel (QEMU: done, consistent).
    while !m.progress().ready {
        std::thread::sleep(std::time::Duration::from_millis(5));
        if job.is_finished() {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    m.cancel(false);
    job.join().unwrap()
}

#[test]
fn qcow2_source_to_local_target_stays_identical_under_writes() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let mut q = Qcow2::create(tmp("src.qcow2"), &CreateOptions { size: 32 * MIB, ..Default::default() }).unwrap();
    q.write_at(3 * MIB, &fill(1, 5 * MIB as usize)).unwrap();
    q.write_at(20 * MIB, &fill(2, 100_000)).unwrap();
    q.write_zeroes(4 * MIB, MIB).unwrap();
    let drive = Arc::new(Drive { io: Mutex::new((Box::new(q), None)) });
    // The target starts full of junk: the mirror must overwrite everything (sync full).
    let mut t = RawImage::create(tmp("dst.raw"), 32 * MIB).unwrap();
    t.write_at(0, &vec![0xee; 32 * MIB as usize]).unwrap();
    let end = mirror_under_writes(drive.clone(), Box::new(BackendTarget(Box::new(t))));
    assert_eq!(end, JobEnd::Completed);
    let src = drive.read_all();
    let dst = std::fs::read(tmp("dst.raw")).unwrap();
    assert!(src == dst, "target differs from source");
    // Detached: later writes do not reach the target.
    drive.write(0, &[9u8; 10]);
    assert_eq!(std::fs::read(tmp("dst.raw")).unwrap()[0], src[0]);
}

#[test]
fn raw_source_into_our_nbd_server() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let mut s = RawImage::create(tmp("nsrc.raw"), 16 * MIB).unwrap();
    s.write_at(MIB, &fill(5, 3 * MIB as usize)).unwrap();
    let drive = Arc::new(Drive { io: Mutex::new((Box::new(s), None)) });
    let dst = RawImage::create(tmp("ndst.raw"), 16 * MIB).unwrap();
    let srv = nbd::NbdServer::bind("127.0.0.1:0").unwrap();
    srv.add_export(nbd::Export {
        name: "d".into(),
        description: String::new(),
        backend: Arc::new(Mutex::new(Box::new(dst) as Box<dyn BlockBackend>)),
        writable: true,
    })
    .unwrap();
    let c = nbd::NbdClient::connect(&nbd::NbdTarget { host: "127.0.0.1".into(), port: srv.local_addr().port(), export: "d".into() }).unwrap();
    let end = mirror_under_writes(drive.clone(), Box::new(NbdTarget(c)));
    assert_eq!(end, JobEnd::Completed);
    srv.stop();
    assert!(drive.read_all() == std::fs::read(tmp("ndst.raw")).unwrap(), "NBD target differs");
}

/// A target with faults: it may die after some writes (the destination killed; it then cannot
/// serve as the drive either) and may take a while to flush (a remote disk syncing).
struct Faulty {
    inner: Box<dyn MirrorTarget>,
    /// Writes that succeed before one fails with a reset connection.
    writes_left: Option<u64>,
    flush_delay: std::time::Duration,
}

impl Faulty {
    fn dying_after(inner: Box<dyn MirrorTarget>, writes: u64) -> Faulty {
        Faulty { inner, writes_left: Some(writes), flush_delay: std::time::Duration::ZERO }
    }
    fn slow_flush(inner: Box<dyn MirrorTarget>, delay: std::time::Duration) -> Faulty {
        Faulty { inner, writes_left: None, flush_delay: delay }
    }
}

impl MirrorTarget for Faulty {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), String> {
        if let Some(left) = self.writes_left.as_mut() {
            let n = *left;
            *left = n.wrapping_sub(1);
            if n == 0 {
                return Err("connection reset by peer".into());
            }
        }
        self.inner.write(off, data)
    }
    fn zero(&mut self, off: u64, len: u64) -> Result<(), String> {
        self.inner.zero(off, len)
    }
    fn drain(&mut self) -> Result<(), String> {
        self.inner.drain()
    }
    fn flush(&mut self) -> Result<(), String> {
        std::thread::sleep(self.flush_delay);
        self.inner.flush()
    }
    fn into_backend(self: Box<Self>) -> Option<Box<dyn BlockBackend>> {
        if self.writes_left.is_some() {
            return None;
        }
        self.inner.into_backend()
    }
}

#[test]
fn dying_target_fails_the_job_and_spares_the_source() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let mut s = RawImage::create(tmp("fsrc.raw"), 8 * MIB).unwrap();
    let data = fill(7, 8 * MIB as usize);
    s.write_at(0, &data).unwrap();
    let drive = Arc::new(Drive { io: Mutex::new((Box::new(s), None)) });
    let t = BackendTarget(Box::new(RawImage::create(tmp("fdst.raw"), 8 * MIB).unwrap()));
    let m = Mirror::new(8 * MIB, Box::new(Faulty::dying_after(Box::new(t), 3))).unwrap();
    drive.io.lock().unwrap().1 = Some(m.clone());
    let end = m.run(&*drive, &mut || panic!("must not become ready"));
    match end {
        JobEnd::Failed(e) => assert!(e.contains("connection reset"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(drive.io.lock().unwrap().1.is_none(), "hook removed");
    drive.write(100, &[1, 2, 3]);
    let mut want = data;
    want[100..103].copy_from_slice(&[1, 2, 3]);
    assert!(drive.read_all() == want);
}

#[test]
fn complete_pivots_and_size_mismatch_is_refused() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let s = RawImage::create(tmp("psrc.raw"), 4 * MIB).unwrap();
    assert!(Mirror::new(4 * MIB + 512, Box::new(BackendTarget(Box::new(RawImage::create(tmp("x.raw"), 4 * MIB).unwrap())))).is_err());
    let drive = Arc::new(Drive { io: Mutex::new((Box::new(s), None)) });
    drive.write(4096, b"hello");
    let t = BackendTarget(Box::new(RawImage::create(tmp("pdst.raw"), 4 * MIB).unwrap()));
    let m = Mirror::new(4 * MIB, Box::new(t)).unwrap();
    assert!(m.complete().is_err(), "not ready yet");
    drive.io.lock().unwrap().1 = Some(m.clone());
    let m2 = m.clone();
    let mut readied = false;
    let d2 = drive.clone();
    let h = std::thread::spawn(move || m2.run(&*d2, &mut || {}));
    while !m.progress().ready {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    readied |= m.progress().ready;
    m.complete().unwrap();
    assert_eq!(h.join().unwrap(), JobEnd::Completed);
    assert!(readied);
    // The drive now writes into the former target.
    drive.write(0, b"after");
    let f = std::fs::read(tmp("pdst.raw")).unwrap();
    assert_eq!(&f[0..5], b"after");
    assert_eq!(&f[4096..4101], b"hello");
}

/// `complete` with the guest writing throughout: every write the guest saw complete is on
/// the drive after the pivot (which now is the former target), none left behind in the old
/// image.
#[test]
fn complete_under_writes_loses_nothing() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let size = 8 * MIB;
    let s = RawImage::create(tmp("wsrc.raw"), size).unwrap();
    let drive = Arc::new(Drive { io: Mutex::new((Box::new(s), None)) });
    let t = Faulty::slow_flush(
        Box::new(BackendTarget(Box::new(RawImage::create(tmp("wdst.raw"), size).unwrap()))),
        std::time::Duration::from_millis(150),
    );
    let m = Mirror::new(size, Box::new(t)).unwrap();
    drive.io.lock().unwrap().1 = Some(m.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let (d2, s2) = (drive.clone(), stop.clone());
    // The writer keeps what the drive must read as: its writes are ordered by the drive lock.
    let writer = std::thread::spawn(move || {
        let mut want = vec![0u8; size as usize];
        let mut i = 0u64;
        while !s2.load(Ordering::SeqCst) {
            let off = (i * 7919 * 512) % (size - 8192);
            let data = fill(i + 1, 4096 + (i as usize % 4096));
            d2.write(off, &data);
            want[off as usize..off as usize + data.len()].copy_from_slice(&data);
            i += 1;
            if i % 16 == 0 {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        (want, i)
    });
    let (m2, d3) = (m.clone(), drive.clone());
    let job = std::thread::spawn(move || m2.run(&*d3, &mut || {}));
    while !m.progress().ready {
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(!job.is_finished(), "the job ended before it was ready");
    }
    m.complete().unwrap();
    assert_eq!(job.join().unwrap(), JobEnd::Completed);
    // Writes go on for a moment on the pivoted drive, then stop.
    std::thread::sleep(std::time::Duration::from_millis(20));
    stop.store(true, Ordering::SeqCst);
    let (want, writes) = writer.join().unwrap();
    assert!(writes > 0);
    assert!(drive.io.lock().unwrap().1.is_none(), "hook removed");
    let got = std::fs::read(tmp("wdst.raw")).unwrap();
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(first_bad.is_none(), "the drive lost writes across the pivot: first difference at byte {first_bad:?} ({writes} writes)");
}
