//! Post-copy through the engine against fake VMs (plain memory as RAM, no KVM): a "guest"
//! thread on the source dirties every page faster than the capped link carries them, so
//! pre-copy cannot converge and the sender switches to post-copy after its first pass. On
//! the destination a reader thread plays the guest: it touches pages in a scattered order the
//! moment the VM resumes, so its accesses fault through userfaultfd and are served on
//! demand. At the end the destination's RAM must equal the paused source's byte for byte.

use migration::receiver;
use migration::sender::{migrate, Shared};
use migration::stats::{Params, Status};
use migration::transport::{Listener, Uri};
use migration::{MigratableVm, RamRegion};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmstate::Section;

const PAGE: usize = 4096;
const PAGES: usize = 2048;

struct FakeVm {
    mem: *mut u8,
    size: usize,
    dirty: Mutex<Vec<u64>>,
    running: AtomicBool,
    resumes: AtomicU64,
    counter: AtomicU64,
    stop: AtomicBool,
}
// SAFETY: the raw pointer is a private mapping the test keeps for the VM's lifetime.
unsafe impl Send for FakeVm {}
// SAFETY: as above; concurrent access is what the engine does to real guest RAM.
unsafe impl Sync for FakeVm {}

impl FakeVm {
    fn new() -> Arc<FakeVm> {
        let size = PAGES * PAGE;
        // SAFETY: a fresh private anonymous mapping.
        let mem = unsafe {
            libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        } as *mut u8;
        assert!(!mem.is_null());
        Arc::new(FakeVm {
            mem,
            size,
            dirty: Mutex::new(vec![0; PAGES.div_ceil(64)]),
            running: AtomicBool::new(false),
            resumes: AtomicU64::new(0),
            counter: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the whole mapping.
        unsafe { std::slice::from_raw_parts(self.mem, self.size) }
    }

    /// Rewrites every page (but every 5th, left zero) in a scattered loop while running.
    fn start_guest(self: &Arc<Self>) -> std::thread::JoinHandle<()> {
        let vm = self.clone();
        vm.running.store(true, Ordering::SeqCst);
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !vm.stop.load(Ordering::SeqCst) {
                if !vm.running.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let p = (i as usize * 7919) % PAGES;
                // Under the lock pause() takes, so a pause never splits a step.
                let mut d = vm.dirty.lock().unwrap();
                if !vm.running.load(Ordering::SeqCst) {
                    continue;
                }
                if p % 5 != 0 {
                    // SAFETY: page p is inside the mapping.
                    unsafe {
                        std::ptr::write_volatile(vm.mem.add(p * PAGE) as *mut u64, i);
                        std::ptr::write_volatile(vm.mem.add(p * PAGE + PAGE - 8) as *mut u64, !i);
                    }
                    d[p / 64] |= 1 << (p % 64);
                }
                i += 1;
                vm.counter.store(i, Ordering::SeqCst);
                drop(d);
            }
        })
    }
}

impl MigratableVm for FakeVm {
    fn ram_regions(&self) -> Vec<RamRegion> {
        vec![RamRegion { gpa: 0, size: self.size as u64, host: self.mem as u64 }]
    }
    fn discard_ram(&self) -> Result<(), String> {
        // SAFETY: our mapping.
        unsafe { libc::madvise(self.mem as *mut _, self.size, libc::MADV_DONTNEED) };
        Ok(())
    }
    fn set_dirty_logging(&self, _on: bool) -> Result<(), String> {
        Ok(())
    }
    fn take_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        let mut d = self.dirty.lock().unwrap();
        let out = d.clone();
        d.iter_mut().for_each(|w| *w = 0);
        Ok(vec![out])
    }
    fn pause(&self) {
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
        "fake".into()
    }
}

#[test]
fn postcopy_moves_a_non_converging_guest_exactly() {
    run(false);
}

/// `migrate_start_postcopy` in the middle of the first full pass: the pages that pass had not
/// reached yet must still arrive (they are listed with the dirty ones).
#[test]
fn postcopy_started_mid_first_pass_loses_nothing() {
    run(true);
}

fn run(mid_first_pass: bool) {
    if let Err(e) = migration::uffd::Uffd::new() {
        panic!("post-copy needs userfaultfd (run as root or with access to /dev/userfaultfd): {e}");
    }
    let src = FakeVm::new();
    let guest = src.start_guest();
    // Every page the guest writes is populated before the migration starts.
    while src.counter.load(Ordering::SeqCst) < 4 * PAGES as u64 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let dst = FakeVm::new();
    let l = Listener::bind(&Uri::Tcp { host: "127.0.0.1".into(), port: 0 }).unwrap();
    let uri = Uri::Tcp { host: "127.0.0.1".into(), port: l.local_port().unwrap() };
    let d = {
        let dst = dst.clone();
        std::thread::spawn(move || receiver::incoming(&*dst, &l))
    };
    // The destination's "guest": once resumed, read pages in a scattered order.
    let touched = Arc::new(AtomicU64::new(0));
    let reader = {
        let (dst, touched) = (dst.clone(), touched.clone());
        std::thread::spawn(move || {
            while dst.resumes.load(Ordering::SeqCst) == 0 {
                if dst.stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            for k in 0..PAGES {
                let p = (k * 1231 + 17) % PAGES;
                // SAFETY: inside the mapping; a missing page blocks until post-copy serves it.
                let _ = unsafe { std::ptr::read_volatile(dst.mem.add(p * PAGE) as *const u64) };
                touched.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let shared = Shared::new();
    *shared.params.lock().unwrap() =
        Params {
        max_bandwidth: 8 << 20,
        downtime_limit_ms: 1,
        // Capped, so the reader on the destination runs ahead of the background stream.
        max_postcopy_bandwidth: 4 << 20,
        postcopy: true,
        postcopy_auto_start: !mid_first_pass,
        ..Default::default()
    };
    let starter = mid_first_pass.then(|| {
        let sh = shared.clone();
        std::thread::spawn(move || {
            let end = std::time::Instant::now() + Duration::from_secs(30);
            // Round 0 sends ~6.4 MiB at 8 MiB/s; start once it is under way.
            while sh.stats().status != Status::Active && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(200));
            sh.start_postcopy().unwrap();
        })
    });
    let seen = Mutex::new(Vec::new());
    migrate(&*src, &uri, &shared, &|e| {
        if let migration::sender::Event::Status(s) = e {
            seen.lock().unwrap().push(s);
        }
    })
    .unwrap();
    if let Some(t) = starter {
        t.join().unwrap();
        let st = shared.stats();
        assert!(st.rounds.is_empty(), "the first pass should have been cut short: {:?}", st.rounds);
    }
    let ds = d.join().unwrap().unwrap();
    dst.stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    src.stop.store(true, Ordering::SeqCst);
    guest.join().unwrap();
    let st = shared.stats();
    assert_eq!(st.status, Status::Completed);
    assert!(seen.lock().unwrap().contains(&Status::PostcopyActive), "{:?}", seen.lock().unwrap());
    assert!(!src.running.load(Ordering::SeqCst), "source must stay paused after success");
    assert_eq!(dst.resumes.load(Ordering::SeqCst), 1);
    assert_eq!(touched.load(Ordering::SeqCst), PAGES as u64);
    assert!(st.postcopy_pages > 0 && st.postcopy_bytes > 0, "{st:?}");
    assert!(st.postcopy_requests > 0, "the destination never waited for a page");
    if src.bytes() != dst.bytes() {
        let bad: Vec<usize> = (0..PAGES).filter(|&p| src.bytes()[p * PAGE..(p + 1) * PAGE] != dst.bytes()[p * PAGE..(p + 1) * PAGE]).collect();
        panic!("destination RAM differs in {} pages, first {:?}", bad.len(), &bad[..bad.len().min(8)]);
    }
    assert_eq!(dst.counter.load(Ordering::SeqCst), src.counter.load(Ordering::SeqCst));
    eprintln!(
        "post-copy engine: downtime {:.2} ms, {} pages after the switch, {} requests, total {} ms, destination {:?}",
        st.downtime_ms, st.postcopy_pages, st.postcopy_requests, st.total_time_ms, ds
    );
}
