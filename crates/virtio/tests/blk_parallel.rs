//! virtio-blk with several requests in flight: a backend with a concurrent I/O handle (an
//! in-memory disk whose calls take chosen times, so they finish out of order; a raw image file
//! with `O_DIRECT`) and a mock guest that queues many requests before notifying once. Checks
//! that requests really overlap, that out-of-order completion keeps every byte where it
//! belongs and returns each request exactly once, that FLUSH waits for the writes before it,
//! that pause drains what is in flight (the save/restore guarantee), that error policy `stop`
//! takes back exactly the unpublished requests, and that reads straight into guest memory mark
//! it dirty.

mod common;

use common::*;
use std::collections::HashSet;
use std::time::Duration;
use virtio::block::policy::{ErrorAction, ErrorPolicy};
use virtio::block::BlockConfig;
use virtio::MemDisk;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MIB: usize = 1 << 20;
const QSIZE: u16 = 64;

/// Later 4 KiB blocks are faster: a batch in sector order finishes in reverse.
fn reverse_by_block(off: u64, _write: bool) -> Duration {
    Duration::from_millis(20u64.saturating_sub(off / 4096 % 16))
}

fn slow(_off: u64, _write: bool) -> Duration {
    Duration::from_millis(40)
}

fn start(disk: MemDisk, cfg: BlockConfig) -> Driver {
    let mut d = Driver::raw(disk, cfg);
    let f = d.device_features();
    assert!(d.negotiate(f & !F_EVENT_IDX));
    d.setup_queue(QSIZE);
    d.driver_ok();
    d
}

fn filled(len: usize) -> MemDisk {
    MemDisk::from_bytes((0..len).map(|i| (i / 512 * 13 + i * 3) as u8).collect())
}

/// The head of the request queued last.
fn last_head(d: &Driver) -> u32 {
    let slot = AVAIL + 4 + 2 * u64::from(d.avail_idx.wrapping_sub(1) % d.qsize);
    u32::from(d.mem.read_obj::<u16>(GuestAddress(slot)).unwrap())
}

fn read_back(d: &Driver, pieces: &[(u64, u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(a, l) in pieces {
        let mut b = vec![0u8; l as usize];
        d.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
        out.extend_from_slice(&b);
    }
    out
}

#[test]
fn reads_in_flight_complete_out_of_order_with_intact_data() {
    let disk = filled(4 * MIB).with_parallel_io(reverse_by_block);
    let mut d = start(disk.clone(), BlockConfig::default());
    let want = disk.contents();
    let mut reqs = Vec::new();
    for k in 0..16u64 {
        // 4 KiB at block k, in 1..=3 pieces.
        let (st, pieces) = d.queue_request(T_IN, k * 8, &Data::In(4096, 1 + k as usize % 3));
        reqs.push((last_head(&d), k, st, pieces));
    }
    d.notify();
    let used = d.wait_used(16);
    let order: Vec<u32> = used.iter().map(|u| u.0).collect();
    let heads: Vec<u32> = reqs.iter().map(|r| r.0).collect();
    assert_eq!(order.iter().collect::<HashSet<_>>(), heads.iter().collect::<HashSet<_>>(), "each request once");
    assert_ne!(order, heads, "the slow first requests finished after the fast later ones");
    for (head, k, st, pieces) in &reqs {
        assert_eq!(d.status_byte(*st), S_OK);
        let len = used.iter().find(|u| u.0 == *head).unwrap().1;
        assert_eq!(len, 4097, "data plus status byte");
        let at = *k as usize * 4096;
        assert_eq!(read_back(&d, pieces), want[at..at + 4096], "block {k}");
    }
    let s = disk.stats();
    assert!(s.max_concurrent >= 4, "requests overlapped: {s:?}");
    assert!(s.max_concurrent <= 16, "at most 16 in flight: {s:?}");
    assert_eq!(s.parallel_reads, 16, "{s:?}");
    assert_eq!(s.reads, 0, "no request took the serialized path: {s:?}");
}

#[test]
fn writes_in_flight_land_and_flush_waits_for_them() {
    for werror in [ErrorAction::Enospc, ErrorAction::Report] {
        let disk = MemDisk::new(4 * MIB).with_parallel_io(reverse_by_block);
        let policy = ErrorPolicy { werror, ..Default::default() };
        let mut d = start(disk.clone(), BlockConfig { policy, ..Default::default() });
        let mut heads = Vec::new();
        for k in 0..12u64 {
            d.queue_request(T_OUT, k * 8, &Data::Out(pattern(k, 4096, 5), 2));
            heads.push(last_head(&d));
        }
        d.queue_request(T_FLUSH, 0, &Data::None);
        let flush = last_head(&d);
        d.queue_request(T_OUT, 200 * 8, &Data::Out(pattern(200, 4096, 5), 1));
        d.notify();
        let used = d.wait_used(14);
        let pos = |h: u32| used.iter().position(|u| u.0 == h).unwrap();
        for h in &heads {
            assert!(pos(*h) < pos(flush), "{werror}: a write before the flush completed after it");
        }
        let s = disk.stats();
        assert_eq!(s.flushes, 1);
        assert!(s.writes_at_last_flush >= 12, "{werror}: the flush ran before the writes ahead of it: {s:?}");
        assert!(s.max_concurrent >= 4, "{werror}: writes overlapped: {s:?}");
        let c = disk.contents();
        for k in (0..12u64).chain([200]) {
            let at = k as usize * 4096;
            assert_eq!(c[at..at + 4096], pattern(k, 4096, 5)[..], "{werror}: block {k}");
        }
        if werror == ErrorAction::Enospc {
            // Writes that may stop the device are published in the order they were popped.
            let order: Vec<u32> = used.iter().map(|u| u.0).take(12).collect();
            assert_eq!(order, heads, "writes published in pop order under werror=enospc");
        }
    }
}

#[test]
fn pause_drains_requests_in_flight_and_takes_no_more() {
    let disk = filled(MIB).with_parallel_io(slow);
    let mut d = start(disk.clone(), BlockConfig::default());
    for k in 0..8u64 {
        d.queue_request(T_IN, k * 8, &Data::In(4096, 1));
    }
    d.notify();
    wait_for("requests in flight", || disk.stats().max_concurrent >= 2);
    d.dev.pause().expect("pause");
    // Everything popped is finished and returned: the state a save sees is complete.
    assert_eq!(d.used_idx(), 8, "pause returned with requests still in flight");
    assert_eq!(d.dev.queue_indices(0).unwrap().0, 8);
    // Requests made while paused stay in the ring.
    d.queue_request(T_IN, 100, &Data::In(512, 1));
    d.queue_request(T_OUT, 101, &Data::Out(vec![7; 512], 1));
    d.notify();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.used_idx(), 8);
    assert_eq!(d.dev.queue_indices(0).unwrap().0, 8);
    d.dev.resume();
    d.used_seen = 8;
    assert_eq!(d.wait_used(2).len(), 2);
    assert_eq!(&disk.contents()[101 * 512..102 * 512], &[7; 512][..]);
}

#[test]
fn stop_takes_back_the_failed_request_and_everything_after_it() {
    let disk = MemDisk::new(MIB).with_parallel_io(reverse_by_block);
    let (tx, rx) = std::sync::mpsc::channel();
    let hook = virtio::block::policy::ErrorHook(std::sync::Arc::new(move |r: &virtio::block::policy::IoErrorReport| {
        let _ = tx.send(r.clone());
    }));
    let policy = ErrorPolicy { werror: ErrorAction::Stop, rerror: ErrorAction::Stop, hook: Some(hook) };
    let mut d = start(disk.clone(), BlockConfig { policy, ..Default::default() });
    // Block 2 fails; blocks 3..6 finish before it, blocks 0 and 1 after it.
    disk.set_failing_range(Some((2 * 4096, 3 * 4096)));
    let mut heads = Vec::new();
    for k in 0..6u64 {
        d.queue_request(T_OUT, k * 8, &Data::Out(pattern(k, 4096, 9), 1));
        heads.push(last_head(&d));
    }
    d.notify();
    let r = rx.recv_timeout(PATIENCE).expect("the failure reaches the hook");
    assert!(r.write && r.action == ErrorAction::Stop, "{r:?}");
    wait_for("the device to stop on the error", || d.device().stopped_on_error());
    // Only the requests before the failed one were returned; the rest is back in the ring.
    assert_eq!(d.wait_used(2).iter().map(|u| u.0).collect::<Vec<_>>(), heads[..2]);
    d.dev.pause().expect("pause while stopped");
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.dev.queue_indices(0).unwrap().0, 2, "available index rewound to the failed request");
    disk.set_failing_range(None);
    d.dev.resume();
    let rest = d.wait_used(4);
    assert_eq!(rest.iter().map(|u| u.0).collect::<HashSet<_>>(), heads[2..].iter().copied().collect::<HashSet<_>>());
    assert!(rx.try_recv().is_err(), "one report for one failure");
    let c = disk.contents();
    for k in 0..6u64 {
        let at = k as usize * 4096;
        assert_eq!(c[at..at + 4096], pattern(k, 4096, 9)[..], "block {k}");
    }
}

#[test]
fn reads_report_errors_without_stopping_and_others_complete() {
    let disk = filled(MIB).with_parallel_io(reverse_by_block);
    let mut d = start(disk.clone(), BlockConfig::default());
    disk.set_failing_range(Some((3 * 4096, 4 * 4096)));
    let mut reqs = Vec::new();
    for k in 0..8u64 {
        let (st, _) = d.queue_request(T_IN, k * 8, &Data::In(4096, 1));
        reqs.push((k, st));
    }
    d.notify();
    d.wait_used(8);
    for (k, st) in reqs {
        assert_eq!(d.status_byte(st), if k == 3 { S_IOERR } else { S_OK }, "block {k}");
    }
    assert!(!d.device().stopped_on_error());
}

#[test]
fn direct_reads_mark_guest_memory_dirty() {
    let disk = filled(MIB).with_parallel_io(slow);
    let mut d = start(disk.clone(), BlockConfig::default());
    let mut pieces = Vec::new();
    for k in 0..4u64 {
        pieces.push(d.queue_request(T_IN, k * 8, &Data::In(4096, 1)).1);
    }
    // The driver's own writes dirtied the buffers: start clean.
    let mem = d.mem.clone();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    std::ops::Deref::deref(region).bitmap().reset();
    d.notify();
    d.wait_used(4);
    assert!(disk.stats().parallel_reads == 4);
    for p in pieces.iter().flatten() {
        assert!(region.bitmap().dirty_at(p.0 as usize), "buffer at {:#x} not marked dirty", p.0);
    }
}

#[test]
fn raw_image_with_cache_none_in_flight_aligned_and_not() {
    // Not /tmp: it may be a tmpfs without O_DIRECT.
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("blk-parallel-{}.raw", std::process::id()));
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i / 512 * 7 + i) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let opts = qcow2::OpenOptions { cache: qcow2::CacheMode::None, ..Default::default() };
    let backend = match qcow2::open(&path, Some(qcow2::ImageFormat::Raw), &opts) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipped: no O_DIRECT here ({e})");
            let _ = std::fs::remove_file(&path);
            return;
        }
    };
    let mut d = Driver::raw_on(backend, BlockConfig::default());
    let f = d.device_features();
    assert!(d.negotiate(f));
    d.setup_queue(QSIZE);
    d.driver_ok();
    // Page-aligned buffers go straight to the file, 16-byte aligned ones are bounced.
    let mut reqs = Vec::new();
    for k in 0..12u64 {
        if k % 2 == 0 {
            let a = d.alloc(8192);
            let _ = d.alloc((4096 - (a + 8192) % 4096) % 4096);
        }
        let (st, p) = d.queue_request(T_IN, k * 24, &Data::In(8192, 1));
        reqs.push((k, st, p));
    }
    d.notify();
    d.wait_used(12);
    for (k, st, p) in &reqs {
        assert_eq!(d.status_byte(*st), S_OK);
        let at = *k as usize * 24 * 512;
        assert_eq!(read_back(&d, p), data[at..at + 8192], "read {k}");
    }
    // And writes, then read back through the file.
    for k in 0..12u64 {
        d.queue_request(T_OUT, 3000 + k * 16, &Data::Out(pattern(k, 8192, 4), 1 + k as usize % 2));
    }
    d.queue_request(T_FLUSH, 0, &Data::None);
    d.notify();
    d.wait_used(13);
    d.dev.pause().unwrap();
    let back = std::fs::read(&path).unwrap();
    for k in 0..12u64 {
        let at = (3000 + k as usize * 16) * 512;
        assert_eq!(back[at..at + 8192], pattern(k, 8192, 4)[..], "write {k}");
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn large_requests_overlap_even_through_the_page_cache() {
    fn quick(_off: u64, _write: bool) -> Duration {
        Duration::from_millis(5)
    }
    let disk = filled(4 * MIB).with_parallel_io(quick);
    let mut d = start(disk.clone(), BlockConfig::default());
    // 256 KiB requests through a page-cache-like handle: worth spreading over threads.
    let mut reqs = Vec::new();
    for k in 0..6u64 {
        let (st, p) = d.queue_request(T_IN, k * 512, &Data::In(256 << 10, 2));
        reqs.push((k, st, p));
    }
    d.notify();
    d.wait_used(6);
    let want = disk.contents();
    for (k, st, p) in &reqs {
        assert_eq!(d.status_byte(*st), S_OK);
        let at = *k as usize * (256 << 10);
        assert_eq!(read_back(&d, p), want[at..at + (256 << 10)], "request {k}");
    }
    assert!(disk.stats().max_concurrent >= 2, "{:?}", disk.stats());
}
