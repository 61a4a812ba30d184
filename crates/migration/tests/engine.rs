//! The migration engine against a fake VM (no KVM needed): plain memory as RAM, a writer thread
//! as the "guest", a software dirty log. Checks convergence, exact RAM equality, and that every
//! failure leaves the source running and the destination never resumed.

use migration::receiver;
use migration::sender::{migrate, Shared};
use migration::stats::Status;
use migration::transport::{Listener, Uri};
use migration::{MigratableVm, MigrationError, RamRegion};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmstate::Section;

const PAGE: usize = 4096;

struct FakeVm {
    mem: *mut u8,
    size: usize,
    dirty: Mutex<Vec<u64>>,
    logging: AtomicBool,
    running: AtomicBool,
    resumes: AtomicU64,
    counter: AtomicU64,
    config: String,
    stop: AtomicBool,
}
unsafe impl Send for FakeVm {}
unsafe impl Sync for FakeVm {}

impl FakeVm {
    fn new(pages: usize, config: &str) -> Arc<FakeVm> {
        let size = pages * PAGE;
        let mem = unsafe {
            libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        } as *mut u8;
        assert!(!mem.is_null());
        Arc::new(FakeVm {
            mem,
            size,
            dirty: Mutex::new(vec![0; pages.div_ceil(64)]),
            logging: AtomicBool::new(false),
            running: AtomicBool::new(false),
            resumes: AtomicU64::new(0),
            counter: AtomicU64::new(0),
            config: config.into(),
            stop: AtomicBool::new(false),
        })
    }

    fn page_mut(&self, p: usize) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.mem.add(p * PAGE), PAGE) }
    }

    fn bytes(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.mem, self.size) }
    }

    /// The "guest": rewrites `hot` pages in a loop while running, marking them dirty.
    fn start_guest(self: &Arc<Self>, hot: usize, pause_us: u64) -> std::thread::JoinHandle<()> {
        let vm = self.clone();
        vm.running.store(true, Ordering::SeqCst);
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !vm.stop.load(Ordering::SeqCst) {
                if !vm.running.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let p = (i as usize * 7919) % hot;
                // Mark before writing, as the write fault of KVM's log would, under the lock
                // so a harvest never splits the pair.
                let mut d = vm.dirty.lock().unwrap();
                vm.page_mut(p)[..8].copy_from_slice(&i.to_le_bytes());
                vm.page_mut(p)[PAGE - 1] = (i % 251) as u8 + 1;
                d[p / 64] |= 1 << (p % 64);
                drop(d);
                i += 1;
                vm.counter.store(i, Ordering::SeqCst);
                if pause_us > 0 {
                    std::thread::sleep(Duration::from_micros(pause_us));
                }
            }
        })
    }
}

impl MigratableVm for FakeVm {
    fn ram_regions(&self) -> Vec<RamRegion> {
        vec![RamRegion { gpa: 0, size: self.size as u64, host: self.mem as u64 }]
    }
    fn discard_ram(&self) -> Result<(), String> {
        unsafe { libc::madvise(self.mem as *mut _, self.size, libc::MADV_DONTNEED) };
        Ok(())
    }
    fn set_dirty_logging(&self, on: bool) -> Result<(), String> {
        self.logging.store(on, Ordering::SeqCst);
        Ok(())
    }
    fn take_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        let mut d = self.dirty.lock().unwrap();
        let out = d.clone();
        d.iter_mut().for_each(|w| *w = 0);
        Ok(vec![out])
    }
    fn pause(&self) {
        // Wait for the guest thread to finish its current write (it holds the dirty lock).
        let _g = self.dirty.lock().unwrap();
        self.running.store(false, Ordering::SeqCst);
    }
    fn resume(&self) {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        self.running.store(true, Ordering::SeqCst);
    }
    fn save_state(&self) -> Result<Vec<Section>, String> {
        Ok(vec![Section::encode("fake", 1, &self.counter.load(Ordering::SeqCst)).unwrap()])
    }
    fn check_state(&self, s: &[Section]) -> Result<(), String> {
        vmstate::find(s, "fake").and_then(|x| x.decode::<u64>("fake", 1)).map(|_| ()).map_err(|e| e.to_string())
    }
    fn restore_state(&self, s: &[Section]) -> Result<(), String> {
        let c: u64 = vmstate::find(s, "fake").and_then(|x| x.decode("fake", 1)).map_err(|e| e.to_string())?;
        self.counter.store(c, Ordering::SeqCst);
        Ok(())
    }
    fn config_summary(&self) -> String {
        self.config.clone()
    }
}

fn listen() -> (Listener, Uri) {
    let l = Listener::bind(&Uri::Tcp { host: "127.0.0.1".into(), port: 0 }).unwrap();
    let port = l.local_port().unwrap();
    (l, Uri::Tcp { host: "127.0.0.1".into(), port })
}

fn spawn_dest(dst: Arc<FakeVm>, l: Listener) -> std::thread::JoinHandle<Result<receiver::IncomingStats, MigrationError>> {
    std::thread::spawn(move || receiver::incoming(&*dst, &l))
}

#[test]
fn converging_migration_copies_ram_exactly() {
    let src = FakeVm::new(4096, "mem=16MiB");
    for p in (0..4096).step_by(3) {
        src.page_mut(p)[100] = (p % 200) as u8 + 1;
    }
    let guest = src.start_guest(64, 50);
    let dst = FakeVm::new(4096, "mem=16MiB");
    let (l, uri) = listen();
    let d = spawn_dest(dst.clone(), l);
    let shared = Shared::new();
    let passes = AtomicU64::new(0);
    migrate(&*src, &uri, &shared, &|e| {
        if let migration::sender::Event::Pass(_) = e {
            passes.fetch_add(1, Ordering::SeqCst);
        }
    })
    .unwrap();
    let ds = d.join().unwrap().unwrap();
    src.stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    let st = shared.stats();
    assert_eq!(st.status, Status::Completed);
    assert!(!src.running.load(Ordering::SeqCst), "source must stay paused after success");
    assert_eq!(dst.resumes.load(Ordering::SeqCst), 1, "destination resumed exactly once");
    if src.bytes() != dst.bytes() {
        let bad: Vec<usize> = (0..4096).filter(|&p| src.bytes()[p * PAGE..(p + 1) * PAGE] != dst.bytes()[p * PAGE..(p + 1) * PAGE]).collect();
        panic!("destination RAM differs from the paused source in {} pages, first {:?}; rounds {:?}", bad.len(), &bad[..bad.len().min(8)], st.rounds);
    }
    assert_eq!(dst.counter.load(Ordering::SeqCst), src.counter.load(Ordering::SeqCst));
    assert!(st.rounds.len() >= 1 && passes.load(Ordering::SeqCst) >= 1);
    assert!(st.duplicate > 0, "zero pages were seen and not sent");
    assert!(ds.bytes < 4096 * 4096, "zero pages must not be sent ({} bytes)", ds.bytes);
}

#[test]
fn refused_config_keeps_source_running() {
    let src = FakeVm::new(64, "mem=a");
    src.running.store(true, Ordering::SeqCst);
    let dst = FakeVm::new(64, "mem=b");
    let (l, uri) = listen();
    let d = spawn_dest(dst.clone(), l);
    let shared = Shared::new();
    let e = migrate(&*src, &uri, &shared, &|_| {}).unwrap_err();
    assert!(e.to_string().contains("mem=a"), "{e}");
    assert!(d.join().unwrap().is_err());
    assert_eq!(shared.stats().status, Status::Failed);
    assert!(src.running.load(Ordering::SeqCst));
    assert_eq!(dst.resumes.load(Ordering::SeqCst), 0);
}

#[test]
fn destination_dying_mid_stream_leaves_source_running() {
    let src = FakeVm::new(8192, "x");
    for p in 0..8192 {
        src.page_mut(p)[0] = 1;
    }
    src.running.store(true, Ordering::SeqCst);
    let (l, uri) = listen();
    // A "destination" that accepts, acknowledges HELLO, reads a little and dies.
    let d = std::thread::spawn(move || {
        use std::io::Read;
        let mut c = l.accept().unwrap();
        let mut buf = vec![0u8; 4096];
        c.read_exact(&mut buf[..17]).unwrap();
        let mut hello = vec![0u8; u32::from_le_bytes(buf[13..17].try_into().unwrap()) as usize];
        c.read_exact(&mut hello).unwrap();
        migration::protocol::write_reply(&mut c, &migration::protocol::Reply::Ready).unwrap();
        c.read_exact(&mut buf).unwrap();
        drop(c);
    });
    let shared = Shared::new();
    assert!(migrate(&*src, &uri, &shared, &|_| {}).is_err());
    d.join().unwrap();
    assert_eq!(shared.stats().status, Status::Failed);
    assert!(src.running.load(Ordering::SeqCst), "source must run after a failed migration");
    assert!(!src.logging.load(Ordering::SeqCst), "dirty logging must be off again");
}

#[test]
fn cancel_keeps_source_running() {
    let src = FakeVm::new(1024, "x");
    let guest = src.start_guest(1024, 0);
    let dst = FakeVm::new(1024, "x");
    let (l, uri) = listen();
    let d = spawn_dest(dst.clone(), l);
    let shared = Shared::new();
    // 4 MiB/s with a busy guest never converges under 1 ms; cancel after a while.
    *shared.params.lock().unwrap() = migration::stats::Params { downtime_limit_ms: 1, max_bandwidth: 4 << 20, ..Default::default() };
    let s2 = shared.clone();
    let canceller = std::thread::spawn(move || {
        // Cancel once the bulk round is over and dirty rounds are going on.
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while s2.stats().dirty_sync_count < 2 && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        s2.cancel.store(true, Ordering::SeqCst);
    });
    let e = migrate(&*src, &uri, &shared, &|_| {}).unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(e, MigrationError::Cancelled), "{e}");
    assert_eq!(shared.stats().status, Status::Cancelled);
    assert!(shared.stats().dirty_sync_count >= 1);
    assert!(src.running.load(Ordering::SeqCst));
    assert!(d.join().unwrap().is_err(), "destination must fail when the source goes away");
    assert_eq!(dst.resumes.load(Ordering::SeqCst), 0, "destination must never run the guest");
    src.stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
}

/// Records a complete stream from a real source, then feeds damaged copies to receivers.
#[test]
fn truncated_and_corrupted_streams_never_resume_the_destination() {
    let src = FakeVm::new(256, "x");
    for p in 0..256 {
        src.page_mut(p)[7] = p as u8 | 1;
    }
    // Capture the stream with a recording "destination".
    let (l, uri) = listen();
    let rec = std::thread::spawn(move || {
        use std::io::Read;
        let mut c = l.accept().unwrap();
        let mut all = Vec::new();
        let mut buf = vec![0u8; 65536];
        let mut acked = false;
        loop {
            let n = c.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !acked && all.len() >= 17 {
                acked = true;
                migration::protocol::write_reply(&mut c, &migration::protocol::Reply::Ready).unwrap();
                // The guest is static: one round, whose end the source waits to see acknowledged.
                migration::protocol::write_reply(&mut c, &migration::protocol::Reply::RoundAck(0)).unwrap();
            }
            if all.ends_with(&[]) && all.len() > 1000 && all[all.len() - 13] == 0x0F {
                migration::protocol::write_reply(
                    &mut c,
                    &migration::protocol::Reply::Running(migration::protocol::Running { switchover_us: 1, restore_us: 1 }),
                )
                .unwrap();
                break;
            }
        }
        all
    });
    let shared = Shared::new();
    migrate(&*src, &uri, &shared, &|_| {}).unwrap();
    let stream = rec.join().unwrap();

    let feed = |bytes: Vec<u8>| -> (Result<receiver::IncomingStats, MigrationError>, u64) {
        let dst = FakeVm::new(256, "x");
        let (l, uri) = listen();
        let t = std::thread::spawn(move || {
            use std::io::Write;
            let Uri::Tcp { host, port } = uri else { unreachable!() };
            let mut s = std::net::TcpStream::connect((host.as_str(), port)).unwrap();
            let _ = s.write_all(&bytes);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        });
        let r = receiver::incoming(&*dst, &l);
        t.join().unwrap();
        (r, dst.resumes.load(Ordering::SeqCst))
    };
    // The intact stream works.
    let (ok, resumed) = feed(stream.clone());
    assert!(ok.is_ok(), "{:?}", ok.err());
    assert_eq!(resumed, 1);
    // Every truncation fails without resuming.
    for cut in (0..stream.len()).step_by(stream.len() / 97 + 1) {
        let (r, resumed) = feed(stream[..cut].to_vec());
        assert!(r.is_err(), "truncation at {cut} accepted");
        assert_eq!(resumed, 0);
    }
    // A flipped byte in round 0's page data is caught at that round's ROUND_END (its CRC), not
    // only at END: the destination refuses the round instead of acknowledging it.
    {
        let mut s = stream.clone();
        s[stream.len() / 3] ^= 0x01;
        let (r, resumed) = feed(s);
        let e = r.expect_err("a corrupted page was accepted").to_string();
        assert!(e.contains("ROUND_END 0") && e.contains("checksum"), "{e}");
        assert_eq!(resumed, 0);
    }
    // Flipped bytes in headers: no panic, never a resume with a broken END count.
    for pos in [0usize, 9, 12, 13, 20, 40, stream.len() - 5, stream.len() - 9] {
        let mut s = stream.clone();
        s[pos] ^= 0xff;
        let (r, resumed) = feed(s);
        assert!(r.is_err(), "corruption at {pos} of {} accepted", stream.len());
        assert_eq!(resumed, 0);
    }
}
