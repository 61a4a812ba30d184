//! savevm in layout v2 and lazy loadvm against a fake VM (plain memory as RAM, no KVM): the
//! state saved into a byte vector is loaded back lazily while a "guest" thread reads pages in
//! a scattered order (its accesses fault through userfaultfd), and must equal the original
//! byte for byte; a corrupted chunk is reported and never installed; the eager path agrees.

use migration::lazy_ram::{ChunkSource, LazyRam};
use migration::snapshot_v2::{self, Plan};
use migration::{MigratableVm, RamRegion};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmstate::Section;

const PAGE: usize = 4096;
const PAGES: usize = 1024;

struct FakeVm {
    mem: *mut u8,
    size: usize,
    counter: AtomicU64,
}
// SAFETY: the raw pointer is a private mapping kept for the VM's lifetime.
unsafe impl Send for FakeVm {}
// SAFETY: as above.
unsafe impl Sync for FakeVm {}

impl FakeVm {
    fn new() -> Arc<FakeVm> {
        let size = PAGES * PAGE;
        // SAFETY: a fresh private anonymous mapping.
        let mem = unsafe {
            libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        } as *mut u8;
        assert!(!mem.is_null());
        Arc::new(FakeVm { mem, size, counter: AtomicU64::new(0) })
    }
    fn bytes(&self) -> Vec<u8> {
        // SAFETY: the whole mapping.
        unsafe { std::slice::from_raw_parts(self.mem, self.size) }.to_vec()
    }
    /// Pages with data, pages touched but zero, pages never touched.
    fn fill(&self) {
        for p in 0..PAGES {
            // SAFETY: inside the mapping.
            unsafe {
                match p % 7 {
                    0 | 1 => {}
                    2 => std::ptr::write_volatile(self.mem.add(p * PAGE) as *mut u64, 0),
                    _ => {
                        std::ptr::write_volatile(self.mem.add(p * PAGE + 8 * (p % 500)) as *mut u64, p as u64 * 0x9e37_79b9);
                        std::ptr::write_volatile(self.mem.add(p * PAGE + PAGE - 1), p as u8 | 1);
                    }
                }
            }
        }
        self.counter.store(77, Ordering::SeqCst);
    }
}

impl MigratableVm for FakeVm {
    fn ram_regions(&self) -> Vec<RamRegion> {
        vec![RamRegion { gpa: 0x10_0000, size: self.size as u64, host: self.mem as u64 }]
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
        Ok(vec![])
    }
    fn pause(&self) {}
    fn resume(&self) {}
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

struct VecSource(Arc<Vec<u8>>);
impl ChunkSource for VecSource {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let s = self.0.get(pos as usize..pos as usize + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(s);
        Ok(())
    }
}

fn saved() -> (Arc<FakeVm>, Vec<u8>) {
    let vm = FakeVm::new();
    vm.fill();
    let mut out = Vec::new();
    let (size, st) = snapshot_v2::save(&*vm, &mut |pos: u64, data: &[u8]| {
        let end = pos as usize + data.len();
        if out.len() < end {
            out.resize(end, 0);
        }
        out[pos as usize..end].copy_from_slice(data);
        Ok(())
    })
    .unwrap();
    assert_eq!(size as usize, out.len());
    assert_eq!(st.data_pages as usize, (0..PAGES).filter(|p| p % 7 > 2).count());
    assert_eq!(st.zero_pages as usize, (0..PAGES).filter(|p| p % 7 == 2).count());
    (vm, out)
}

fn plan(vm: &FakeVm, state: &[u8]) -> Plan {
    snapshot_v2::read_plan(vm, state.len() as u64, &mut |pos, buf: &mut [u8]| {
        buf.copy_from_slice(&state[pos as usize..pos as usize + buf.len()]);
        Ok(())
    })
    .unwrap()
}

fn uffd_or_fail() {
    if let Err(e) = migration::uffd::Uffd::new() {
        panic!("lazy loadvm needs userfaultfd (run as root or with access to /dev/userfaultfd): {e}");
    }
}

/// Reads every page in a scattered order from another thread; returns their first bytes sum.
fn touch_all(vm: &Arc<FakeVm>) -> std::thread::JoinHandle<()> {
    let base = vm.mem as usize;
    std::thread::spawn(move || {
        for i in 0..PAGES {
            let p = (i * 389) % PAGES;
            // SAFETY: inside the mapping; blocks until the page is served.
            unsafe { std::ptr::read_volatile((base + p * PAGE + 8) as *const u64) };
        }
    })
}

#[test]
fn lazy_load_restores_ram_exactly() {
    uffd_or_fail();
    let (src, state) = saved();
    let dst = FakeVm::new();
    // Garbage that must disappear.
    // SAFETY: inside the mapping.
    unsafe { std::ptr::write_bytes(dst.mem, 0xAB, 64 * PAGE) };
    let p = plan(&dst, &state);
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let e2 = errors.clone();
    let mut lazy = LazyRam::begin(&*dst, &p, Box::new(VecSource(Arc::new(state))), Box::new(move |m| e2.lock().unwrap().push(m.into()))).unwrap();
    dst.restore_state(&p.sections).unwrap();
    let guest = touch_all(&dst);
    std::thread::sleep(Duration::from_millis(20));
    lazy.start_fill().unwrap();
    guest.join().unwrap();
    lazy.wait().unwrap();
    let st = lazy.stats();
    assert_eq!(st.by_fault + st.by_fill, st.chunks, "{st:?}");
    assert!(st.by_fault > 0, "the guest's accesses were served on demand: {st:?}");
    assert!(errors.lock().unwrap().is_empty());
    assert_eq!(dst.counter.load(Ordering::SeqCst), 77);
    assert!(dst.bytes() == src.bytes(), "RAM differs after a lazy load");
    // After the fill RAM is ordinary memory again: writes just work.
    // SAFETY: inside the mapping.
    unsafe { std::ptr::write_volatile(dst.mem.add(5 * PAGE) as *mut u64, 5) };
    lazy.cancel();
}

#[test]
fn eager_load_of_v2_restores_ram_exactly() {
    let (src, state) = saved();
    let dst = FakeVm::new();
    let p = plan(&dst, &state);
    snapshot_v2::load_eager(&*dst, &p, &mut |pos, buf: &mut [u8]| {
        buf.copy_from_slice(&state[pos as usize..pos as usize + buf.len()]);
        Ok(())
    })
    .unwrap();
    assert!(dst.bytes() == src.bytes());
}

#[test]
fn a_corrupted_chunk_is_reported_and_never_installed() {
    uffd_or_fail();
    let (_src, mut state) = saved();
    let dst = FakeVm::new();
    let p = plan(&dst, &state);
    let bad = p.chunks.len() / 2;
    let bad_gpa = p.chunks[bad].gpa;
    state[p.offsets[bad] as usize + 100] ^= 0x40;
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let e2 = errors.clone();
    let mut lazy = LazyRam::begin(&*dst, &p, Box::new(VecSource(Arc::new(state.clone()))), Box::new(move |m| e2.lock().unwrap().push(m.into()))).unwrap();
    lazy.start_fill().unwrap();
    let err = lazy.wait().unwrap_err();
    assert!(err.contains("corrupted") && err.contains(&format!("{bad_gpa:#x}")), "{err}");
    let reported = errors.lock().unwrap().clone();
    assert_eq!(reported.len(), 1, "reported once: {reported:?}");
    // A thread touching the bad chunk waits (the guest never sees its bytes)...
    let host = dst.mem as usize + (bad_gpa - 0x10_0000) as usize;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: inside the mapping.
        let v = unsafe { std::ptr::read_volatile((host + 100) as *const u8) };
        let _ = tx.send(v);
    });
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "a corrupted page was served");
    // ...while the good chunks were all installed.
    let good = p.chunks.iter().position(|c| c.gpa != bad_gpa).unwrap();
    // SAFETY: inside the mapping (installed, so this does not block).
    let _ = unsafe { std::ptr::read_volatile((dst.mem as usize + (p.chunks[good].gpa - 0x10_0000) as usize) as *const u8) };
    // Cancelling (a new loadvm, or quit) releases the waiting thread.
    lazy.cancel();
    assert!(rx.recv_timeout(Duration::from_secs(5)).is_ok());
}

#[test]
fn eager_load_detects_a_corrupted_chunk() {
    let (_src, mut state) = saved();
    let dst = FakeVm::new();
    let p = plan(&dst, &state);
    state[p.offsets[0] as usize + 5] ^= 1;
    let e = snapshot_v2::load_eager(&*dst, &p, &mut |pos, buf: &mut [u8]| {
        buf.copy_from_slice(&state[pos as usize..pos as usize + buf.len()]);
        Ok(())
    })
    .unwrap_err();
    assert!(e.to_string().contains("corrupted"), "{e}");
}
