//! Property test: random sequences of guest writes, zero-writes, discards, savevm-style and
//! disk-only snapshots, applies, deletes, resizes and reopens, checked against a plain in-memory
//! model after every step (active contents, a full refcount recount by `check`), with
//! `qemu-img check` of the final image of every case. The image under test is either
//! standalone or the top of a backing chain (qcow2 base, or raw base under a qcow2 middle
//! layer, with random data in each), the model starting from the chain's flattened contents;
//! the final chain is also read by `qemu-img convert` and must equal the model.

mod common;
use common::*;
use proptest::prelude::*;
use qcow2::storage::MemStorage;
use qcow2::backing::{OpenedBacking, Opener};
use qcow2::{BlockBackend, CreateOptions, ImageFormat, NewSnapshot, OpenOptions, Qcow2, RawImage};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Backing files kept in memory, by name.
#[derive(Debug)]
struct MemOpener(BTreeMap<PathBuf, MemStorage>);

impl Opener for MemOpener {
    fn open(&self, path: &Path, _opts: &OpenOptions) -> qcow2::Result<OpenedBacking> {
        let m = self.0.get(path).ok_or_else(|| qcow2::Error::InvalidArgument(format!("no {}", path.display())))?;
        Ok(OpenedBacking { storage: Box::new(m.clone()), identity: path.to_path_buf(), guard: None })
    }
}

/// Backing chain of `depth` layers (1: qcow2 base; 2: raw base under a qcow2 middle) with data
/// from `seed`; returns the opener, the top's backing (name, format) and the flattened contents.
fn backing_chain(depth: u32, seed: u64) -> (MemOpener, Option<(&'static str, ImageFormat)>, Vec<u8>) {
    let mut files = BTreeMap::new();
    let mut flat = vec![0u8; DISK as usize];
    if depth == 0 {
        return (MemOpener(files), None, flat);
    }
    let writes = |b: &mut dyn BlockBackend, flat: &mut Vec<u8>, k: u64| {
        for i in 0..6u64 {
            let off = (seed.wrapping_mul(i + 1 + k * 7) >> 7) % (DISK - 70_000);
            let len = 1 + ((seed >> (i + k)) % 69_000) as usize;
            let d = pattern(seed ^ (i + 100 * k), len);
            b.write_at(off, &d).unwrap();
            flat[off as usize..off as usize + len].copy_from_slice(&d);
        }
    };
    let base = MemStorage::new();
    if depth == 1 {
        let mut q = Qcow2::create_on(Box::new(base.clone()), &CreateOptions { size: DISK, ..Default::default() }).unwrap();
        writes(&mut q, &mut flat, 0);
        drop(q);
        files.insert(PathBuf::from("b1.qcow2"), base);
        return (MemOpener(files), Some(("b1.qcow2", ImageFormat::Qcow2)), flat);
    }
    qcow2::storage::Storage::set_len(&base, DISK).unwrap();
    let mut r = RawImage::on(Box::new(base.clone()), false).unwrap();
    writes(&mut r, &mut flat, 0);
    files.insert(PathBuf::from("b2.raw"), base);
    let mid = MemStorage::new();
    let c = CreateOptions {
        size: DISK,
        cluster_size: 4096,
        backing_file: Some("b2.raw".into()),
        backing_format: Some(ImageFormat::Raw),
        ..Default::default()
    };
    drop(Qcow2::create_on(Box::new(mid.clone()), &c).unwrap());
    let opener = Arc::new(MemOpener(files.clone()));
    let mut q = Qcow2::open_storage(Box::new(mid.clone()), &OpenOptions { backing_opener: Some(opener), ..Default::default() }).unwrap();
    writes(&mut q, &mut flat, 1);
    drop(q);
    files.insert(PathBuf::from("b1.qcow2"), mid);
    (MemOpener(files), Some(("b1.qcow2", ImageFormat::Qcow2)), flat)
}

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: usize, seed: u64 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
    SaveVm { name: u8, vm_len: usize, seed: u64 },
    Snap { name: u8 },
    Goto { name: u8 },
    Delete { name: u8 },
    Grow { add: u64 },
    Reopen,
}

const DISK: u64 = 1 << 20;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..DISK, 1usize..150_000, any::<u64>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        1 => (0..DISK, 1u64..200_000).prop_map(|(off, len)| Op::Zero { off, len }),
        1 => (0..DISK, 1u64..200_000).prop_map(|(off, len)| Op::Discard { off, len }),
        2 => (0u8..3, 0usize..300_000, any::<u64>()).prop_map(|(name, vm_len, seed)| Op::SaveVm { name, vm_len, seed }),
        2 => (0u8..3).prop_map(|name| Op::Snap { name }),
        2 => (0u8..3).prop_map(|name| Op::Goto { name }),
        1 => (0u8..3).prop_map(|name| Op::Delete { name }),
        1 => (1u64..300_000).prop_map(|add| Op::Grow { add }),
        1 => Just(Op::Reopen),
    ]
}

/// (version, cluster size, refcount bits, backing chain depth, extended L2)
type Config = (u32, u64, u32, u32, bool);

fn config() -> impl Strategy<Value = Config> {
    prop_oneof![
        Just((2u32, 65536u64, 16u32, 0u32, false)),
        Just((3, 512, 16, 0, false)),
        Just((3, 4096, 4, 0, false)),
        Just((3, 4096, 64, 0, false)),
        Just((3, 65536, 8, 0, false)),
        Just((3, 4096, 2, 0, false)),
        Just((3, 65536, 16, 1, false)),
        Just((2, 4096, 16, 1, false)),
        Just((3, 512, 16, 2, false)),
        Just((3, 65536, 16, 2, false)),
        Just((3, 16384, 16, 0, true)),
        Just((3, 65536, 16, 1, true)),
        Just((3, 32768, 16, 2, true)),
    ]
}

struct Model {
    disk: Vec<u8>,
    snaps: BTreeMap<String, (Vec<u8>, Vec<u8>)>,
}

fn clip(off: u64, len: u64, size: u64) -> (u64, u64) {
    let off = off % size;
    (off, len.min(size - off))
}

/// True if `r` failed because the refcount width is too small (allowed only below 16 bits).
fn refused(r: qcow2::Result<()>, rb: u32) -> Result<bool, TestCaseError> {
    match r {
        Ok(()) => Ok(false),
        Err(qcow2::Error::RefcountOverflow(_)) if rb < 16 => Ok(true),
        Err(e) => Err(TestCaseError::fail(format!("unexpected error: {e}"))),
    }
}

/// Contents equal the model and a full recount agrees with the on-disk refcounts.
fn continue_checks(q: &mut Qcow2, m: &Model, step: usize, op: &Op) -> Result<(), TestCaseError> {
    prop_assert_eq!(q.size(), m.disk.len() as u64);
    let got = our_raw(q);
    prop_assert!(
        first_diff(&got, &m.disk).is_none(),
        "step {} {:?}: contents differ at {:?}",
        step,
        op,
        first_diff(&got, &m.disk)
    );
    let r = q.check().unwrap();
    prop_assert!(
        r.is_clean(),
        "step {} {:?}: recount: {:?}",
        step,
        op,
        r.messages
    );
    Ok(())
}

fn run_case(
    cfg: Config,
    ops: &[Op],
    dir: &Scratch,
    case: usize,
    seed: u64,
) -> Result<(), TestCaseError> {
    let (version, cs, rb, depth, extended_l2) = cfg;
    let mem = MemStorage::new();
    let (opener, backing, flat) = backing_chain(depth, seed);
    let files = opener.0.clone();
    let opts = OpenOptions { backing_opener: Some(Arc::new(opener)), ..Default::default() };
    drop(Qcow2::create_on(
        Box::new(mem.clone()),
        &CreateOptions {
            size: DISK,
            cluster_size: cs,
            version,
            refcount_bits: rb,
            backing_file: backing.map(|b| b.0.to_string()),
            backing_format: backing.map(|b| b.1),
            extended_l2,
            ..Default::default()
        },
    )
    .unwrap());
    let mut q = Qcow2::open_storage(Box::new(mem.clone()), &opts).unwrap();
    let mut m = Model {
        disk: flat,
        snaps: BTreeMap::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        let size = m.disk.len() as u64;
        match op {
            Op::Write { off, len, seed } => {
                let (off, len) = clip(*off, *len as u64, size);
                let d = pattern(*seed, len as usize);
                q.write_at(off, &d).unwrap();
                m.disk[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::Zero { off, len } => {
                let (off, len) = clip(*off, *len, size);
                q.write_zeroes(off, len).unwrap();
                m.disk[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { off, len } => {
                let (off, len) = clip(*off, *len, size);
                q.discard(off, len).unwrap();
                // Whole clusters inside the range read as zeros afterwards.
                let a = off.div_ceil(cs) * cs;
                let b = (off + len) / cs * cs;
                if a < b {
                    m.disk[a as usize..b as usize].fill(0);
                }
            }
            Op::SaveVm { name, vm_len, seed } => {
                let vm = pattern(*seed, *vm_len);
                let mut w = q.vmstate_writer().unwrap();
                w.write_all_bytes(&vm).unwrap();
                let n = w.finish().unwrap();
                let mut s = NewSnapshot::new(&format!("s{name}"));
                s.vm_state_size = n;
                s.vm_clock_ns = *seed >> 8;
                // Narrow refcounts may overflow: then nothing may change.
                if refused(q.create_snapshot(&s).map(|_| ()), rb)? {
                    continue_checks(&mut q, &m, step, op)?;
                    continue;
                }
                m.snaps.insert(format!("s{name}"), (m.disk.clone(), vm));
            }
            Op::Snap { name } => {
                let r = q.create_snapshot(&NewSnapshot::new(&format!("s{name}")));
                if refused(r.map(|_| ()), rb)? {
                    continue_checks(&mut q, &m, step, op)?;
                    continue;
                }
                m.snaps
                    .insert(format!("s{name}"), (m.disk.clone(), Vec::new()));
            }
            Op::Goto { name } => {
                let n = format!("s{name}");
                match m.snaps.get(&n) {
                    Some((d, _)) => {
                        if !refused(q.goto_snapshot(&n).map(|_| ()), rb)? {
                            m.disk = d.clone();
                        }
                    }
                    None => prop_assert!(q.goto_snapshot(&n).is_err()),
                }
            }
            Op::Delete { name } => {
                let n = format!("s{name}");
                if m.snaps.remove(&n).is_some() {
                    q.delete_snapshot(&n).unwrap();
                } else {
                    prop_assert!(q.delete_snapshot(&n).is_err());
                }
            }
            Op::Grow { add } => {
                q.resize(size + add).unwrap();
                m.disk.resize((size + add) as usize, 0);
            }
            Op::Reopen => {
                drop(q);
                q = Qcow2::open_storage(Box::new(mem.clone()), &opts).unwrap();
            }
        }
        prop_assert_eq!(q.size(), m.disk.len() as u64);
        let got = our_raw(&mut q);
        prop_assert!(
            first_diff(&got, &m.disk).is_none(),
            "step {} {:?}: contents differ at {:?}",
            step,
            op,
            first_diff(&got, &m.disk)
        );
        let r = q.check().unwrap();
        prop_assert!(
            r.is_clean(),
            "step {} {:?}: recount: {:?}",
            step,
            op,
            r.messages
        );
    }
    // Snapshots hold what they held when taken.
    let names: Vec<String> = q.snapshots().iter().map(|s| s.name.clone()).collect();
    prop_assert_eq!(names.len(), m.snaps.len());
    for (n, (d, vm)) in &m.snaps {
        let s = q.find_snapshot(n).unwrap();
        let mut v = vec![0u8; s.disk_size as usize];
        q.read_snapshot(n, 0, &mut v).unwrap();
        prop_assert!(first_diff(&v, d).is_none(), "snapshot {} contents", n);
        prop_assert_eq!(s.vm_state_size, vm.len() as u64);
        let mut got = vec![0u8; vm.len()];
        let k = q.load_vmstate(n, 0, &mut got).unwrap();
        prop_assert_eq!(k, vm.len());
        prop_assert!(first_diff(&got, vm).is_none(), "vmstate of {}", n);
    }
    drop(q);
    let f = dir.path(&format!("case{case}.qcow2"));
    std::fs::write(&f, mem.to_vec()).unwrap();
    for (name, m) in &files {
        std::fs::write(dir.0.join(name), m.to_vec()).unwrap();
    }
    let (code, out) = qemu_check_code(&f);
    prop_assert_eq!(code, 0, "qemu-img check: {}", out);
    if depth > 0 {
        // qemu-img sees whole sectors only (an odd size is cut to its last full sector).
        let theirs = qemu_raw(&f, None, dir);
        let n = m.disk.len().min(theirs.len());
        prop_assert_eq!(theirs.len(), m.disk.len() / 512 * 512);
        prop_assert!(first_diff(&theirs[..n], &m.disk[..n]).is_none(), "qemu-img reads the chain differently at {:?}", first_diff(&theirs[..n], &m.disk[..n]));
    }
    let _ = std::fs::remove_file(&f);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_match_model(cfg in config(), ops in prop::collection::vec(op(), 1..24), seed in any::<u64>()) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static CASE: AtomicUsize = AtomicUsize::new(0);
        let dir = Scratch::new("model");
        run_case(cfg, &ops, &dir, CASE.fetch_add(1, Ordering::SeqCst), seed)?;
    }
}
