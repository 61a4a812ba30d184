//! Hostile zstd-compressed and extended-L2 images: a property test mutates valid in-memory
//! images of both kinds (bit flips, interesting words over L2 entries and bitmaps, corrupted
//! zstd frames) and drives every path through `qcow2::fuzzing::exercise_image`; specific
//! corruptions (both bitmap bits set, allocated subcluster without a host cluster, garbage in
//! a zstd frame) give clear errors.

mod common;
use common::*;
use proptest::prelude::*;
use qcow2::storage::MemStorage;
use qcow2::{BlockBackend, CreateOptions, OpenOptions, Qcow2};

fn zstd_seed() -> Vec<u8> {
    let mem = MemStorage::new();
    let c = CreateOptions { size: 300_000, cluster_size: 4096, compression_type: 1, ..Default::default() };
    let mut q = Qcow2::create_on(Box::new(mem.clone()), &c).unwrap();
    for i in 0..8u64 {
        let d: Vec<u8> = (0..4096).map(|k| ((k / 64) as u64 + i) as u8).collect();
        q.write_compressed(i * 4096, &d).unwrap();
    }
    q.close().unwrap();
    drop(q);
    mem.to_vec()
}

fn ext_seed() -> Vec<u8> {
    let mem = MemStorage::new();
    let c = CreateOptions { size: 600_000, cluster_size: 16384, extended_l2: true, ..Default::default() };
    let mut q = Qcow2::create_on(Box::new(mem.clone()), &c).unwrap();
    q.write_at(100, &pattern(1, 700)).unwrap();
    q.write_at(20_000, &pattern(2, 40_000)).unwrap();
    q.write_zeroes(70_000, 5000).unwrap();
    q.close().unwrap();
    drop(q);
    mem.to_vec()
}

fn open_ro(v: &[u8]) -> qcow2::Result<Qcow2> {
    Qcow2::open_storage(Box::new(MemStorage::from_vec(v.to_vec())), &OpenOptions { read_only: true, ..Default::default() })
}

/// Host offset of the first L2 table (L1 entry 0).
fn l2_of(v: &[u8]) -> usize {
    let l1 = u64::from_be_bytes(v[40..48].try_into().unwrap()) as usize;
    (u64::from_be_bytes(v[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize
}

#[test]
fn specific_corruptions_are_clear_errors() {
    let v = ext_seed();
    let l2 = l2_of(&v);
    // Entry 0's bitmap: allocated and zero at once.
    let mut w = v.clone();
    let bm = u64::from_be_bytes(w[l2 + 8..l2 + 16].try_into().unwrap()) | (1 << 32) | 1;
    w[l2 + 8..l2 + 16].copy_from_slice(&bm.to_be_bytes());
    let mut b = vec![0u8; 16384];
    let e = open_ro(&w).unwrap().read_at(0, &mut b).unwrap_err();
    assert!(e.to_string().contains("both allocated and zero"), "{e}");
    // Entry 3 (no data written there... or zeroed): an allocated bit without a host cluster.
    let mut w = v.clone();
    let (d, m) = (l2 + 16 * 9, l2 + 16 * 9 + 8);
    w[d..d + 8].copy_from_slice(&0u64.to_be_bytes());
    w[m..m + 8].copy_from_slice(&1u64.to_be_bytes());
    let e = open_ro(&w).unwrap().read_at(9 * 16384, &mut b).unwrap_err();
    assert!(e.to_string().contains("without a host cluster"), "{e}");
    // A zstd frame with garbage inside.
    let mut w = zstd_seed();
    let l2 = l2_of(&w);
    let e0 = u64::from_be_bytes(w[l2..l2 + 8].try_into().unwrap());
    let x = 62 - (12 - 8);
    let host = (e0 & ((1u64 << x) - 1)) as usize;
    for k in 6..40 {
        w[host + k] ^= 0x5a;
    }
    let e = open_ro(&w).unwrap().read_at(0, &mut b[..4096]).unwrap_err();
    assert!(e.to_string().contains("zstd"), "{e}");
    // The untouched images read fine.
    let mut q = open_ro(&zstd_seed()).unwrap();
    q.read_at(4096, &mut b[..4096]).unwrap();
    assert_eq!(b[0], 1);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { pos: usize, bit: u8 },
    Word { pos: usize, val: u64 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(0xffff_ffff),
        Just(0xffff_ffff_0000_0000),
        Just(1u64 << 63),
        Just((1u64 << 62) | 0x200),
        Just(0x8000_0000_0001_0000),
        any::<u64>(),
    ];
    prop_oneof![
        3 => (0usize..70_000, 0u8..8).prop_map(|(pos, bit)| Mutation::Flip { pos, bit }),
        2 => (0usize..9000, interesting).prop_map(|(w, val)| Mutation::Word { pos: w * 8, val }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, max_shrink_iters: 300, ..ProptestConfig::default() })]
    #[test]
    fn mutated_zstd_and_extended_l2_images_never_panic(ext in any::<bool>(), muts in prop::collection::vec(mutation(), 1..6)) {
        let mut v = if ext { ext_seed() } else { zstd_seed() };
        for m in &muts {
            match *m {
                Mutation::Flip { pos, bit } => if pos < v.len() { v[pos] ^= 1 << bit },
                Mutation::Word { pos, val } => if pos + 8 <= v.len() { v[pos..pos + 8].copy_from_slice(&val.to_be_bytes()) },
            }
        }
        qcow2::fuzzing::exercise_image(&v);
    }
}
