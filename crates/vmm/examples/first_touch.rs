//! How fast fresh memory can be written for the first time, with huge pages and with small
//! ones: the cost an incoming migration pays for every page it receives (see
//! `vmm::pagesize`). Each measurement maps new anonymous memory, writes one byte per 4 KiB
//! and unmaps it, after a pause so that memory freed by the previous one can go cold again.
//!
//! `cargo run --release -p vmm --example first_touch [MiB] [pause-seconds] [rounds]`

use std::time::{Duration, Instant};

fn touch(bytes: usize, huge: bool) -> f64 {
    // SAFETY: a fresh private anonymous mapping, used only here and unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        assert!(p != libc::MAP_FAILED, "mmap of {bytes} bytes failed");
        libc::madvise(p, bytes, if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE });
        let t = Instant::now();
        let base = p as *mut u8;
        for off in (0..bytes).step_by(4096) {
            base.add(off).write_volatile(1);
        }
        let s = t.elapsed().as_secs_f64();
        libc::munmap(p, bytes);
        s
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let pause: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3);
    println!(
        "free page reporting on this host: {}",
        if vmm::pagesize::host_reports_free_pages() { "yes" } else { "no" }
    );
    for _ in 0..rounds {
        for huge in [true, false] {
            std::thread::sleep(Duration::from_secs(pause));
            let s = touch(mib << 20, huge);
            println!(
                "{} pages: {mib} MiB first-written in {:.1} ms ({:.0} MB/s)",
                if huge { "huge " } else { "small" },
                s * 1e3,
                (mib << 20) as f64 / s / 1e6
            );
        }
    }
}
