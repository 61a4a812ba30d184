//! Property test: random sequences of guest writes, zero-writes, discards, savevm-style and
//! disk-only snapshots, applies, deletes, resizes and reopens, checked against a plain in-memory
//! model after every step (active contents, a full refcount recount by `check`), with
//! `qemu-img check` of the final image of every case.

mod common;
use common::*;
use proptest::prelude::*;
use qcow2::storage::MemStorage;
use qcow2::{BlockBackend, CreateOptions, NewSnapshot, OpenOptions, Qcow2};
use std::collections::BTreeMap;

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

fn config() -> impl Strategy<Value = (u32, u64, u32)> {
    prop_oneof![
        Just((2u32, 65536u64, 16u32)),
        Just((3, 512, 16)),
        Just((3, 4096, 4)),
        Just((3, 4096, 64)),
        Just((3, 65536, 8)),
        Just((3, 4096, 2)),
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
    cfg: (u32, u64, u32),
    ops: &[Op],
    dir: &Scratch,
    case: usize,
) -> Result<(), TestCaseError> {
    let (version, cs, rb) = cfg;
    let mem = MemStorage::new();
    let mut q = Qcow2::create_on(
        Box::new(mem.clone()),
        &CreateOptions {
            size: DISK,
            cluster_size: cs,
            version,
            refcount_bits: rb,
            ..Default::default()
        },
    )
    .unwrap();
    let mut m = Model {
        disk: vec![0; DISK as usize],
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
                q = Qcow2::open_storage(Box::new(mem.clone()), &OpenOptions::default()).unwrap();
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
    let (code, out) = qemu_check_code(&f);
    prop_assert_eq!(code, 0, "qemu-img check: {}", out);
    let _ = std::fs::remove_file(&f);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_match_model(cfg in config(), ops in prop::collection::vec(op(), 1..24)) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static CASE: AtomicUsize = AtomicUsize::new(0);
        let dir = Scratch::new("model");
        run_case(cfg, &ops, &dir, CASE.fetch_add(1, Ordering::SeqCst))?;
    }
}
