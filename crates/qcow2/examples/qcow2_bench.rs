//! Benchmark body for `bench/qcow2-bench.sh`: times this crate on one image directory and
//! prints `key seconds` lines (the script turns them into a table next to qemu-img/qemu-io).
//!
//! Usage: qcow2_bench DIR GIB N_RANDOM
//!   vmstate_write  — stream GIB GiB through `vmstate_writer` (4 MiB writes) + fsync
//!   snapshot       — `create_snapshot` capturing that state
//!   vmstate_read   — stream it back with `vmstate_reader` (file evicted from the page cache)
//!   seq_write      — GIB GiB of guest writes, 4 MiB each, + fsync (what qemu-img bench does)
//!   seq_read       — read them back (evicted first)
//!   rand_alloc     — N_RANDOM random 4 KiB writes into unallocated clusters + fsync
//!   rand_overwrite — N_RANDOM random 4 KiB writes into allocated clusters + fsync

use qcow2::{BlockBackend, CreateOptions, NewSnapshot, OpenOptions, Qcow2};
use std::os::unix::io::AsRawFd;
use std::time::Instant;

fn evict(path: &std::path::Path) {
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: fadvise on a valid fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

fn offsets(n: usize, span: u64, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (span / 4096)) * 4096
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: qcow2_bench DIR GIB N_RANDOM");
        std::process::exit(1);
    }
    let dir = std::path::PathBuf::from(&args[1]);
    let gib: u64 = args[2].parse()?;
    let nrand: usize = args[3].parse()?;
    let total = gib << 30;
    let chunk = vec![0xa5u8; 4 << 20];

    // Untimed warm-up: the first big write of a process otherwise also pays for reclaiming
    // page cache, which would bias whichever row comes first.
    {
        use std::io::Write;
        let wp = dir.join("warmup.bin");
        let mut f = std::fs::File::create(&wp)?;
        for _ in 0..(total / chunk.len() as u64) {
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        drop(f);
        evict(&wp);
        std::fs::remove_file(&wp)?;
    }

    // VM state: 1 GiB stream past a 1 GiB disk.
    let p = dir.join("godwit-vmstate.qcow2");
    let mut q = Qcow2::create(
        &p,
        &CreateOptions {
            size: 1 << 30,
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    let mut w = q.vmstate_writer()?;
    let mut done = 0;
    while done < total {
        w.write_all_bytes(&chunk)?;
        done += chunk.len() as u64;
    }
    let n = w.finish()?;
    q.flush()?;
    println!("vmstate_write {:.3}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut s = NewSnapshot::new("bench");
    s.vm_state_size = n;
    q.create_snapshot(&s)?;
    println!("snapshot {:.3}", t.elapsed().as_secs_f64());
    drop(q);
    evict(&p);
    let mut q = Qcow2::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    let mut r = q.vmstate_reader("bench")?;
    let mut buf = vec![0u8; 4 << 20];
    let mut got = 0u64;
    loop {
        let k = r.read_bytes(&mut buf)?;
        if k == 0 {
            break;
        }
        got += k as u64;
    }
    assert_eq!(got, n);
    println!("vmstate_read {:.3}", t.elapsed().as_secs_f64());
    drop(q);
    std::fs::remove_file(&p)?;

    // Guest sequential I/O, same pattern as `qemu-img bench -s 4M -S 4M`.
    let p = dir.join("godwit-seq.qcow2");
    let mut q = Qcow2::create(
        &p,
        &CreateOptions {
            size: total,
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    let mut off = 0;
    while off < total {
        q.write_at(off, &chunk)?;
        off += chunk.len() as u64;
    }
    BlockBackend::flush(&mut q)?;
    println!("seq_write {:.3}", t.elapsed().as_secs_f64());
    drop(q);
    evict(&p);
    let mut q = Qcow2::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    let mut off = 0;
    while off < total {
        q.read_at(off, &mut buf)?;
        off += buf.len() as u64;
    }
    println!("seq_read {:.3}", t.elapsed().as_secs_f64());
    drop(q);
    std::fs::remove_file(&p)?;

    // Random 4 KiB writes over a 1 GiB disk.
    let p = dir.join("godwit-rand.qcow2");
    let mut q = Qcow2::create(
        &p,
        &CreateOptions {
            size: 1 << 30,
            ..Default::default()
        },
    )?;
    let page = vec![0x5au8; 4096];
    for (name, seed) in [("rand_alloc", 1u64), ("rand_overwrite", 1)] {
        let offs = offsets(nrand, 1 << 30, seed);
        let t = Instant::now();
        for o in offs {
            q.write_at(o, &page)?;
        }
        BlockBackend::flush(&mut q)?;
        println!("{name} {:.3}", t.elapsed().as_secs_f64());
    }
    drop(q);
    std::fs::remove_file(&p)?;
    Ok(())
}
