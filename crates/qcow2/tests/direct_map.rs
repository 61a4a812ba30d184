//! `BlockBackend::map_direct` and `host_io`, what a device with several requests in flight
//! uses to do guest I/O on the host file without the image's lock: plain allocated clusters
//! map (to the bytes `read_at` would read), anything else declines — unallocated, zero, shared
//! with a snapshot (for writes), read-only images (for writes) — and writes through the mapping
//! are what `read_at` then reads.

mod common;
use common::*;
use qcow2::{BlockBackend, CreateOptions, IoBuf, NewSnapshot, OpenOptions, Qcow2, RawImage};

const K: u64 = 1024;

fn read_runs(io: &dyn qcow2::ParallelIo, runs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(h, l) in runs {
        let mut b = vec![0u8; l as usize];
        // SAFETY: `b` outlives the call.
        assert!(unsafe { io.read_vectored(h, &[IoBuf { ptr: b.as_mut_ptr(), len: b.len() }]) }.unwrap());
        out.extend_from_slice(&b);
    }
    out
}

#[test]
fn qcow2_maps_plain_clusters_only() {
    let dir = Scratch::new("direct-map");
    let path = dir.path("d.qcow2");
    let mut q = Qcow2::create(&path, &CreateOptions { size: 8 << 20, ..Default::default() }).unwrap();
    let a = pattern(1, 128 * K as usize);
    q.write_at(0, &a).unwrap();
    q.write_at(1 << 20, &pattern(2, 4096)).unwrap();
    let io = q.host_io().expect("a host file");
    // Allocated: maps, both ways, to the bytes read_at reads.
    let runs = q.map_direct(4 * K, 100 * K, false).expect("allocated clusters map");
    assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), 100 * K);
    assert_eq!(read_runs(&*io, &runs), a[4 * K as usize..104 * K as usize]);
    let w = q.map_direct(8 * K, 64 * K, true).expect("unshared clusters map for writes");
    let mut new = pattern(3, 64 * K as usize);
    let mut at = 0usize;
    for (h, l) in &w {
        let b = IoBuf { ptr: new[at..].as_mut_ptr(), len: *l as usize };
        // SAFETY: `new` outlives the call.
        assert!(unsafe { io.write_vectored(*h, &[b]) }.unwrap());
        at += *l as usize;
    }
    let mut back = vec![0u8; 64 * K as usize];
    q.read_at(8 * K, &mut back).unwrap();
    assert_eq!(back, new);
    // Unallocated, partly allocated, zeroed, past the end: no mapping.
    assert!(q.map_direct(256 * K, 4 * K, false).is_none());
    assert!(q.map_direct(120 * K, 16 * K, false).is_none());
    q.write_zeroes(64 * K, 64 * K).unwrap();
    assert!(q.map_direct(64 * K, 4 * K, false).is_none());
    assert!(q.map_direct((8 << 20) - 4 * K, 8 * K, false).is_none());
    // Shared with a snapshot: reads map, writes do not, until a write copied the cluster.
    q.create_snapshot(&NewSnapshot::new("s")).unwrap();
    let before = q.map_direct(0, 4 * K, false).expect("shared clusters map for reads");
    assert!(q.map_direct(0, 4 * K, true).is_none(), "a shared cluster is not overwritten in place");
    q.write_at(0, &pattern(4, 4096)).unwrap();
    let after = q.map_direct(0, 4 * K, true).expect("copied cluster maps again");
    assert_ne!(before, after, "the copy lives elsewhere");
    drop(io);
    drop(q);
    let mut ro = Qcow2::open(&path, &OpenOptions { read_only: true, ..Default::default() }).unwrap();
    assert!(ro.map_direct(1 << 20, 4 * K, false).is_some());
    assert!(ro.map_direct(1 << 20, 4 * K, true).is_none(), "read-only image");
}

#[test]
fn raw_maps_one_to_one() {
    let dir = Scratch::new("direct-map-raw");
    let mut r = RawImage::create(dir.path("d.raw"), 1 << 20).unwrap();
    assert_eq!(r.map_direct(4096, 8192, true), Some(vec![(4096, 8192)]));
    assert!(r.map_direct((1 << 20) - 4096, 8192, false).is_none());
    assert!(r.host_io().is_some() && r.parallel_io().is_some());
}
