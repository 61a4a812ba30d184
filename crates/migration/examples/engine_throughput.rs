//! Round 0's rate with no KVM and no guest around it: a fake VM of `--gib` GiB (default 1)
//! with `--touched` MiB (default 256) of non-zero pages, migrated over loopback TCP in one
//! process. `cargo run --release -p migration --example engine_throughput [GIB] [MIB]`.
//! Prints each round's pages, time and rate, so the engine's own ceiling can be compared with
//! what a real guest migration reaches. Extra words: `prefault` (the destination's pages
//! backed beforehand), `ahead` (backed by a second thread during the migration), `small`
//! (the destination on small pages); `touch [MiB] [pause-s] [rounds]` alone measures the host's first touch of fresh
//! memory with huge and with small pages.

use migration::sender::{migrate, Shared};
use migration::transport::{Listener, Uri};
use migration::{MigratableVm, RamRegion};
use std::time::Instant;
use vmstate::Section;

const PAGE: usize = 4096;

struct Mem {
    mem: *mut u8,
    size: usize,
    /// Keep the pages on `discard_ram` (they were pre-faulted on purpose).
    keep: bool,
}
// SAFETY: plain anonymous memory, only read by the engine and written before it starts.
unsafe impl Send for Mem {}
unsafe impl Sync for Mem {}

impl Mem {
    fn new(size: usize, huge: bool) -> Mem {
        // SAFETY: a fresh private anonymous mapping.
        let mem = unsafe {
            libc::mmap(std::ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
        };
        assert_ne!(mem, libc::MAP_FAILED);
        // SAFETY: our mapping.
        unsafe { libc::madvise(mem, size, if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE }) };
        Mem { mem: mem as *mut u8, size, keep: false }
    }
}

impl MigratableVm for Mem {
    fn ram_regions(&self) -> Vec<RamRegion> {
        vec![RamRegion { gpa: 0, size: self.size as u64, host: self.mem as u64 }]
    }
    fn discard_ram(&self) -> Result<(), String> {
        if self.keep {
            return Ok(());
        }
        // SAFETY: our mapping.
        unsafe { libc::madvise(self.mem as *mut _, self.size, libc::MADV_DONTNEED) };
        Ok(())
    }
    fn set_dirty_logging(&self, _on: bool) -> Result<(), String> {
        Ok(())
    }
    fn take_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        Ok(vec![vec![0; (self.size / PAGE).div_ceil(64)]])
    }
    fn pause(&self) {}
    fn resume(&self) {}
    fn save_state(&self) -> Result<Vec<Section>, String> {
        Ok(vec![Section::encode("fake", 1, &0u64).map_err(|e| e.to_string())?])
    }
    fn check_state(&self, _s: &[Section]) -> Result<(), String> {
        Ok(())
    }
    fn restore_state(&self, _s: &[Section]) -> Result<(), String> {
        Ok(())
    }
    fn config_summary(&self) -> String {
        format!("fake {}", self.size)
    }
}

/// `touch [MiB] [pause-s] [rounds]`: how fast this host hands out fresh memory (what every
/// page of a first pass costs the destination), with huge pages and with small ones: each
/// measurement maps new memory after a pause (so memory freed by the one before can go cold
/// again, see vmm's `pagesize`), writes it once, then a second time.
fn first_touch(a: &[String]) {
    let mib: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let pause: u64 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rounds: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let size = mib << 20;
    for _ in 0..rounds {
        for huge in [true, false] {
            std::thread::sleep(std::time::Duration::from_secs(pause));
            let m = Mem::new(size, huge);
            for pass in ["first touch", "second write"] {
                let t = Instant::now();
                // SAFETY: inside the mapping.
                unsafe { std::ptr::write_bytes(m.mem, 0x5a, size) };
                let dt = t.elapsed().as_secs_f64();
                let kind = if huge { "huge " } else { "small" };
                println!("{kind} pages, {mib} MiB {pass}: {:.1} ms = {:.0} MB/s", dt * 1e3, size as f64 / dt / 1e6);
            }
            // SAFETY: our mapping, no longer used (freed so the next measurement starts fresh).
            unsafe { libc::munmap(m.mem as *mut _, size) };
        }
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.get(1).map(String::as_str) == Some("touch") {
        return first_touch(&a);
    }
    let gib: usize = a.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let mib: usize = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    // `small`: the destination backs its RAM with small pages (what vmm::pagesize picks on a
    // host that reports free memory to a hypervisor below it).
    let small = a.iter().any(|x| x == "small");
    let (src, mut dst) = (Mem::new(gib << 30, true), Mem::new(gib << 30, !small));
    dst.keep = a.iter().any(|x| x == "prefault");
    for p in 0..(mib << 20) / PAGE {
        // SAFETY: inside the mapping.
        let page = unsafe { std::slice::from_raw_parts_mut(src.mem.add(p * PAGE), PAGE) };
        for (i, b) in page.iter_mut().enumerate().step_by(64) {
            *b = (p + i) as u8 | 1;
        }
    }
    if a.iter().any(|x| x == "prefault") {
        // The destination's pages already backed: what round 0 costs without first touches.
        // SAFETY: our mapping.
        unsafe { libc::madvise(dst.mem as *mut _, mib << 20, 23 /* MADV_POPULATE_WRITE */) };
    }
    let l = Listener::bind(&Uri::Tcp { host: "127.0.0.1".into(), port: 0 }).unwrap();
    let uri = Uri::Tcp { host: "127.0.0.1".into(), port: l.local_port().unwrap() };
    let dst = std::sync::Arc::new(dst);
    let d2 = dst.clone();
    let t = std::thread::spawn(move || migration::receiver::incoming(&*d2, &l));
    let shared = Shared::new();
    let t0 = Instant::now();
    let ahead = a.iter().any(|x| x == "ahead").then(|| {
        let (base, len) = (dst.mem as usize, mib << 20);
        std::thread::spawn(move || {
            // What a destination could do with the source's page map: back the pages on
            // another thread while the stream is still arriving.
            for off in (0..len).step_by(2 << 20) {
                // SAFETY: inside the destination's mapping.
                unsafe { libc::madvise((base + off) as *mut _, (2usize << 20).min(len - off), 23) };
            }
        })
    });
    migrate(&src, &uri, &shared, &|_| {}).unwrap();
    t.join().unwrap().unwrap();
    if let Some(h) = ahead {
        let _ = h.join();
    }
    let st = shared.stats();
    println!("{gib} GiB guest, {mib} MiB touched: total {:.1} ms, downtime {:.1} ms", t0.elapsed().as_secs_f64() * 1e3, st.downtime_ms);
    for r in &st.rounds {
        println!("  round {}: {} data + {} zero pages in {:.1} ms = {:.0} MB/s", r.round, r.data_pages, r.zero_pages, r.elapsed_ms, r.bytes as f64 / r.elapsed_ms / 1e3);
    }
}
