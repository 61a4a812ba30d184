//! Hostile backing chains, all in memory: loops, missing files, absurd depths, bad backing
//! names and formats give clear errors; a property test mutates overlay headers (backing name
//! offset/length, the backing-format extension, the name bytes) and drives every chain path
//! through `qcow2::fuzzing::exercise_chain`, the body of the `backing_chain` fuzz target.

mod common;
use common::*;
use proptest::prelude::*;
use qcow2::backing::{OpenedBacking, Opener, MAX_CHAIN_DEPTH};
use qcow2::storage::MemStorage;
use qcow2::{BlockBackend, CreateOptions, Error, ImageFormat, OpenOptions, Qcow2};
use std::path::Path;
use std::sync::Arc;

/// Every name is the same image, except "missing".
#[derive(Debug)]
struct Same(Vec<u8>);

impl Opener for Same {
    fn open(&self, path: &Path, _: &OpenOptions) -> qcow2::Result<OpenedBacking> {
        if path.ends_with("missing") {
            return Err(Error::Io { context: "opening the backing file", source: std::io::ErrorKind::NotFound.into() });
        }
        Ok(OpenedBacking { storage: Box::new(MemStorage::from_vec(self.0.clone())), identity: path.into(), guard: None })
    }
}

fn overlay(name: &str, fmt: Option<ImageFormat>) -> Vec<u8> {
    let mem = MemStorage::new();
    let c = CreateOptions {
        size: 300_000,
        cluster_size: 4096,
        backing_file: Some(name.into()),
        backing_format: fmt,
        ..Default::default()
    };
    let mut q = Qcow2::create_on(Box::new(mem.clone()), &c).unwrap();
    q.write_at(5000, &pattern(3, 9000)).unwrap();
    drop(q);
    mem.to_vec()
}

fn open_self(v: &[u8]) -> qcow2::Result<Qcow2> {
    let opts = OpenOptions { read_only: true, backing_opener: Some(Arc::new(Same(v.to_vec()))), ..Default::default() };
    Qcow2::open_storage(Box::new(MemStorage::from_vec(v.to_vec())), &opts)
}

#[test]
fn loops_depths_and_missing_files_are_clear_errors() {
    // "a" whose backing is "a": the second visit is a loop.
    let e = open_self(&overlay("a", Some(ImageFormat::Qcow2))).unwrap_err();
    assert!(matches!(e, Error::BackingLoop(_)), "{e}");
    // "d/x" relative to itself: d/x, d/d/x, d/d/d/x, ... never repeats; the depth cap stops it.
    let e = open_self(&overlay("d/x", None)).unwrap_err();
    assert!(matches!(e, Error::BackingTooDeep(MAX_CHAIN_DEPTH)), "{e}");
    let e = open_self(&overlay("missing", Some(ImageFormat::Qcow2))).unwrap_err();
    assert!(e.to_string().contains("Could not open backing file 'missing'"), "{e}");
    // Absolute names are used as they are.
    let e = open_self(&overlay("/x/missing", Some(ImageFormat::Qcow2))).unwrap_err();
    assert!(e.to_string().contains("/x/missing"), "{e}");
}

#[test]
fn bad_backing_names_and_formats_are_refused() {
    let good = overlay("base", Some(ImageFormat::Raw));
    let off = u64::from_be_bytes(good[8..16].try_into().unwrap()) as usize;
    let cases: Vec<(&str, Box<dyn Fn(&mut Vec<u8>)>, &str)> = vec![
        ("name length 0 with offset", Box::new(|v| v[16..20].copy_from_slice(&0u32.to_be_bytes())), "backing file name length"),
        ("name too long", Box::new(|v| v[16..20].copy_from_slice(&5000u32.to_be_bytes())), "backing file name length"),
        ("name past cluster 0", Box::new(|v| v[8..16].copy_from_slice(&4094u64.to_be_bytes())), "first cluster"),
        ("name inside the fixed header", Box::new(|v| v[8..16].copy_from_slice(&8u64.to_be_bytes())), "first cluster"),
        ("NUL in the name", Box::new(move |v| v[off + 1] = 0), "NUL"),
        ("unknown backing format", Box::new(|v| {
            let p = v.windows(3).position(|w| w == b"raw").unwrap();
            v[p..p + 3].copy_from_slice(b"vmd");
        }), "image format 'vmd'"),
    ];
    for (what, f, expect) in cases {
        let mut v = good.clone();
        f(&mut v);
        let e = open_self(&v).expect_err(what).to_string();
        assert!(e.contains(expect), "{what}: '{e}' does not mention '{expect}'");
    }
    // The good one opens, with the raw backing (itself, as a raw disk) showing through.
    let mut q = open_self(&good).unwrap();
    let mut b = [0u8; 4];
    q.read_at(0, &mut b).unwrap();
    assert_eq!(&b, b"QFI\xfb");
}

#[derive(Debug, Clone)]
enum Mutation {
    Byte { pos: usize, val: u8 },
    Word { pos: usize, val: u64 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        // Header words, the extension area and the backing name.
        3 => (0usize..600, any::<u8>()).prop_map(|(pos, val)| Mutation::Byte { pos, val }),
        1 => (0usize..13, prop_oneof![Just(0u64), Just(u64::MAX), Just(112), Just(4095), Just(1 << 40), any::<u64>()])
            .prop_map(|(w, val)| Mutation::Word { pos: w * 8, val }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, max_shrink_iters: 300, ..ProptestConfig::default() })]
    #[test]
    fn mutated_chain_headers_never_panic(which in 0usize..3, muts in prop::collection::vec(mutation(), 1..5)) {
        let seeds = [overlay("b", Some(ImageFormat::Qcow2)), overlay("dir/b", None), overlay("b", Some(ImageFormat::Raw))];
        let mut v = seeds[which].clone();
        for m in &muts {
            match *m {
                Mutation::Byte { pos, val } => if pos < v.len() { v[pos] = val },
                Mutation::Word { pos, val } => if pos + 8 <= v.len() { v[pos..pos + 8].copy_from_slice(&val.to_be_bytes()) },
            }
        }
        let base = seeds[0].clone();
        qcow2::fuzzing::exercise_chain(&v, &[&base]);
    }
}
