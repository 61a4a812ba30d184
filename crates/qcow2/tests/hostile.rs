//! Corrupt, truncated and hostile images: specific nasty headers and tables must give a clear
//! error (never a panic), and a property test mutates valid images (bit flips, interesting
//! values in metadata words, truncation) and drives every path through
//! `qcow2::fuzzing::exercise_image`, the body of the cargo-fuzz target.

mod common;
use common::*;
use proptest::prelude::*;
use qcow2::storage::MemStorage;
use qcow2::{BlockBackend, CreateOptions, Error, NewSnapshot, OpenOptions, Qcow2};

/// A small valid image with data, a savevm snapshot and a disk-only one.
fn seed(version: u32, cs: u64, rb: u32) -> Vec<u8> {
    let mem = MemStorage::new();
    let mut q = Qcow2::create_on(
        Box::new(mem.clone()),
        &CreateOptions {
            size: 200_000,
            cluster_size: cs,
            version,
            refcount_bits: rb,
            ..Default::default()
        },
    )
    .unwrap();
    q.write_at(1000, &pattern(1, 20_000)).unwrap();
    q.save_vmstate(0, &pattern(2, 3000)).unwrap();
    let mut s = NewSnapshot::new("a");
    s.vm_state_size = 3000;
    q.create_snapshot(&s).unwrap();
    q.write_at(5000, &pattern(3, 3000)).unwrap();
    q.create_snapshot(&NewSnapshot::new("b")).unwrap();
    q.write_at(150_000, &pattern(4, 100)).unwrap();
    drop(q);
    mem.to_vec()
}

fn be32(v: &mut [u8], off: usize, x: u32) {
    v[off..off + 4].copy_from_slice(&x.to_be_bytes());
}
fn be64(v: &mut [u8], off: usize, x: u64) {
    v[off..off + 8].copy_from_slice(&x.to_be_bytes());
}

fn open_err(v: Vec<u8>) -> Error {
    match Qcow2::open_storage(
        Box::new(MemStorage::from_vec(v)),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    ) {
        Ok(_) => panic!("hostile image opened"),
        Err(e) => e,
    }
}

#[test]
fn hostile_headers_are_refused_clearly() {
    let good = seed(3, 512, 16);
    type Case = (&'static str, Box<dyn Fn(&mut Vec<u8>)>, &'static str);
    let cases: Vec<Case> = vec![
        ("bad magic", Box::new(|v| v[0] = 0), "not a qcow2"),
        ("version 4", Box::new(|v| be32(v, 4, 4)), "version"),
        (
            "cluster_bits 30",
            Box::new(|v| be32(v, 20, 30)),
            "cluster_bits",
        ),
        (
            "cluster_bits 8",
            Box::new(|v| be32(v, 20, 8)),
            "cluster_bits",
        ),
        ("encryption", Box::new(|v| be32(v, 32, 2)), "LUKS"),
        (
            "backing file",
            Box::new(|v| {
                be64(v, 8, 512);
                be32(v, 16, 4)
            }),
            "backing",
        ),
        (
            "absurd size",
            Box::new(|v| be64(v, 24, u64::MAX / 2)),
            "L1 table too small",
        ),
        (
            "L1 past EOF",
            Box::new(|v| be64(v, 40, 1 << 40)),
            "past the end",
        ),
        (
            "huge l1_size",
            Box::new(|v| be32(v, 36, u32::MAX)),
            "too large",
        ),
        (
            "refcount table past EOF",
            Box::new(|v| be64(v, 48, 1 << 40)),
            "past the end",
        ),
        (
            "refcount table huge",
            Box::new(|v| be32(v, 56, u32::MAX)),
            "too large",
        ),
        ("unaligned L1", Box::new(|v| be64(v, 40, 7)), "aligned"),
        (
            "unknown incompat bit",
            Box::new(|v| be64(v, 72, 1 << 40)),
            "unknown incompatible",
        ),
        (
            "external data file",
            Box::new(|v| be64(v, 72, 1 << 2)),
            "external data",
        ),
        ("zstd", Box::new(|v| be64(v, 72, 1 << 3)), "zstd"),
        (
            "extended L2",
            Box::new(|v| be64(v, 72, 1 << 4)),
            "extended L2",
        ),
        (
            "refcount order 7",
            Box::new(|v| be32(v, 96, 7)),
            "refcount_order",
        ),
        (
            "header length 3",
            Box::new(|v| be32(v, 100, 3)),
            "header length",
        ),
        (
            "too many snapshots",
            Box::new(|v| be32(v, 60, 70000)),
            "too many snapshots",
        ),
        (
            "snapshot table past EOF",
            Box::new(|v| be64(v, 64, 1 << 40)),
            "past the end",
        ),
        (
            "truncated header",
            Box::new(|v| v.truncate(50)),
            "too short",
        ),
    ];
    for (what, f, expect) in cases {
        let mut v = good.clone();
        f(&mut v);
        let e = open_err(v).to_string();
        assert!(
            e.contains(expect),
            "{what}: error '{e}' does not mention '{expect}'"
        );
    }
}

#[test]
fn hostile_tables_give_errors_not_panics() {
    let good = seed(3, 512, 16);
    let q = Qcow2::open_storage(
        Box::new(MemStorage::from_vec(good.clone())),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let h = q.header().clone();
    drop(q);
    // L1 entry pointing past EOF: reads fail with a clear corruption error or read zeros, and
    // the checker reports it.
    let mut v = good.clone();
    be64(&mut v, h.l1_table_offset as usize, (1u64 << 40) | (1 << 63));
    let mut q = Qcow2::open_storage(
        Box::new(MemStorage::from_vec(v.clone())),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let r = q.check().unwrap();
    assert!(r.corruptions > 0, "check must flag an L2 table past EOF");
    let mut b = [0u8; 512];
    let e = q.read_at(0, &mut b).unwrap_err();
    assert!(e.to_string().contains("past the end of the file"), "{e}");
    drop(q);
    // Writing through it must not extend the file to 1 TiB.
    let mem = MemStorage::from_vec(v);
    if let Ok(mut q) = Qcow2::open_storage(Box::new(mem.clone()), &OpenOptions::default()) {
        let _ = q.write_at(0, &[1u8; 512]);
    }
    assert!(mem.to_vec().len() < 1 << 30);
    // Refcount table whose entries all point at the same block (a loop), and at the header.
    let mut v = good.clone();
    let rt = h.refcount_table_offset as usize;
    let first = u64::from_be_bytes(v[rt..rt + 8].try_into().unwrap());
    for i in 0..64 {
        be64(&mut v, rt + 8 * i, if i % 2 == 0 { first } else { 0 });
    }
    qcow2::fuzzing::exercise_image(&v);
    // Snapshot with an absurd disk size and VM-state size.
    let mut v = good.clone();
    let so = h.snapshots_offset as usize;
    be64(&mut v, so + 40, u64::MAX - 5); // vm_state_size (large)
    be64(&mut v, so + 48, u64::MAX - 5); // disk_size
    let mut q = Qcow2::open_storage(
        Box::new(MemStorage::from_vec(v.clone())),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = [0u8; 16];
    assert!(q.load_vmstate("a", 0, &mut b).is_err());
    assert!(q.vmstate_reader("a").is_err());
    drop(q);
    qcow2::fuzzing::exercise_image(&v);
}

fn seeds() -> Vec<Vec<u8>> {
    vec![
        seed(3, 512, 16),
        seed(2, 512, 16),
        seed(3, 1024, 8),
        seed(3, 512, 64),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { pos: usize, bit: u8 },
    Word { pos: usize, val: u64 },
    Truncate { len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(1u64 << 63),
        Just((1u64 << 63) | 0x200),
        Just(0x4000_0000_0000_0200),
        Just(0x200),
        Just(0x400),
        Just(1 << 40),
        any::<u64>(),
    ];
    prop_oneof![
        4 => (0usize..8192, 0u8..8).prop_map(|(pos, bit)| Mutation::Flip { pos, bit }),
        4 => (0usize..1024, interesting).prop_map(|(w, val)| Mutation::Word { pos: w * 8, val }),
        1 => (0usize..20000).prop_map(|len| Mutation::Truncate { len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, max_shrink_iters: 500, ..ProptestConfig::default() })]
    #[test]
    fn mutated_images_never_panic(which in 0usize..4, muts in prop::collection::vec(mutation(), 1..6)) {
        let mut v = seeds()[which].clone();
        for m in &muts {
            match *m {
                Mutation::Flip { pos, bit } => if pos < v.len() { v[pos] ^= 1 << bit },
                Mutation::Word { pos, val } => if pos + 8 <= v.len() { be64(&mut v, pos, val) },
                Mutation::Truncate { len } => v.truncate(len),
            }
        }
        qcow2::fuzzing::exercise_image(&v);
    }
}
