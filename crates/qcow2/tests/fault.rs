//! Crash safety: the writer dies at every point of a workload (injected I/O failure that stops
//! all later writes, and real SIGKILLs of a child process), and a full disk hits savevm. The
//! image must still open, `qemu-img check` may report leaks but never corruption, and the older
//! snapshot must be intact.

mod common;
use common::*;
use qcow2::storage::{FaultStorage, MemStorage, Storage};
use qcow2::{BlockBackend, CreateOptions, NewSnapshot, OpenOptions, Qcow2};
use std::sync::atomic::Ordering;

const MIB: u64 = 1 << 20;

/// A base image: data plus a savevm snapshot "base". Returns (bytes, base disk, base vmstate).
fn base_image(cs: u64, version: u32) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let mem = MemStorage::new();
    let mut q = Qcow2::create_on(
        Box::new(mem.clone()),
        &CreateOptions {
            size: 4 * MIB,
            cluster_size: cs,
            version,
            refcount_bits: 16,
            ..Default::default()
        },
    )
    .unwrap();
    q.write_at(0, &pattern(1, 700_000)).unwrap();
    q.write_at(3 * MIB, &pattern(2, 100_000)).unwrap();
    let vm = pattern(3, 900_000);
    q.save_vmstate(0, &vm).unwrap();
    let mut s = NewSnapshot::new("base");
    s.vm_state_size = vm.len() as u64;
    q.create_snapshot(&s).unwrap();
    let disk = our_raw(&mut q);
    drop(q);
    (mem.to_vec(), disk, vm)
}

/// The workload a dying writer runs (stops at the first error).
fn workload(q: &mut Qcow2, round: u64) -> qcow2::Result<()> {
    q.write_at(100_000, &pattern(10 + round, 300_000))?; // COW over "base"
    q.write_at(2 * MIB + 5, &pattern(11 + round, 50_000))?;
    q.write_zeroes(MIB, 200_000)?;
    let mut w = q.vmstate_writer()?;
    w.write_all_bytes(&pattern(12 + round, 1_500_000))?;
    let n = w.finish()?;
    let mut s = NewSnapshot::new("new");
    s.vm_state_size = n;
    q.create_snapshot(&s)?;
    q.write_at(0, &pattern(13 + round, 200_000))?;
    q.goto_snapshot("base")?;
    q.write_at(3 * MIB + 4096, &pattern(14 + round, 70_000))?;
    q.delete_snapshot("new")?;
    q.resize(5 * MIB)?;
    q.discard(0, MIB)?;
    q.flush()
}

/// After a crash: QEMU sees at most leaks, we open it, "base" is intact, repair makes it clean.
fn verify_after_crash(bytes: Vec<u8>, base_disk: &[u8], base_vm: &[u8], dir: &Scratch, what: &str) {
    let f = dir.path("crashed.qcow2");
    std::fs::write(&f, &bytes).unwrap();
    let (code, out) = qemu_check_code(&f);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check reports corruption (rc {code}):\n{out}"
    );
    let mut q = Qcow2::open(
        &f,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: our open failed: {e}"));
    let s = q
        .find_snapshot("base")
        .unwrap_or_else(|| panic!("{what}: snapshot base lost"));
    let mut d = vec![0u8; s.disk_size as usize];
    q.read_snapshot("base", 0, &mut d).unwrap();
    assert!(
        first_diff(&d, base_disk).is_none(),
        "{what}: base snapshot contents changed"
    );
    let mut vm = vec![0u8; base_vm.len()];
    assert_eq!(q.load_vmstate("base", 0, &mut vm).unwrap(), base_vm.len());
    assert!(vm == base_vm, "{what}: base VM state changed");
    drop(q);
    // Opening read-write repairs (dirty bit) or keeps it clean; fix leaks and recheck.
    let mut q = Qcow2::open(&f, &OpenOptions::default()).unwrap();
    let (_, after) = q.repair(qcow2::RepairMode::All).unwrap();
    assert!(
        after.is_clean(),
        "{what}: still unclean after repair: {:?}",
        after.messages
    );
    drop(q);
    assert_qemu_clean(&f);
}

#[test]
fn injected_write_failure_at_every_point() {
    let dir = Scratch::new("fault");
    for (cs, version) in [(65536u64, 3u32), (4096, 2), (512, 3)] {
        let (base, base_disk, base_vm) = base_image(cs, version);
        // Count the writes of a complete run.
        let fs = FaultStorage::new(MemStorage::from_vec(base.clone()), u64::MAX);
        let budget = fs.budget();
        let mut q = Qcow2::open_storage(Box::new(fs), &OpenOptions::default()).unwrap();
        workload(&mut q, 0).unwrap();
        drop(q);
        let total = u64::MAX - budget.load(Ordering::SeqCst);
        assert!(total > 20, "workload too small ({total} writes)");
        let step = (total / 120).max(1);
        let mut n = 0;
        let mut leaks_seen = 0;
        while n <= total {
            let mem = MemStorage::from_vec(base.clone());
            let fs = FaultStorage::new(mem.clone(), n);
            if let Ok(mut q) = Qcow2::open_storage(Box::new(fs), &OpenOptions::default()) {
                let r = workload(&mut q, 0);
                assert!(
                    n >= total || r.is_err(),
                    "workload finished within {n} < {total} writes"
                );
            }
            let bytes = mem.to_vec();
            let f = dir.path("probe.qcow2");
            std::fs::write(&f, &bytes).unwrap();
            if qemu_check_code(&f).0 == 3 {
                leaks_seen += 1;
            }
            verify_after_crash(
                bytes,
                &base_disk,
                &base_vm,
                &dir,
                &format!("cs {cs} v{version} cut after {n} writes"),
            );
            n += step;
        }
        // The cuts must land in the middle of operations, not only between them.
        assert!(
            leaks_seen > 0,
            "no cut point ever produced leaked clusters: cut points too coarse"
        );
    }
}

#[test]
fn full_disk_during_savevm_keeps_old_snapshots() {
    let dir = Scratch::new("enospc");
    let (base, base_disk, base_vm) = base_image(65536, 3);
    // (a) the VM-state write runs out of space; (b) the snapshot commit does.
    let (mut in_write, mut in_commit) = (0, 0);
    for extra in (0..40u64).map(|i| 200_000 + i * 50_000) {
        let mem = MemStorage::from_vec(base.clone());
        mem.set_space_limit(base.len() as u64 + extra);
        let mut q = Qcow2::open_storage(Box::new(mem.clone()), &OpenOptions::default()).unwrap();
        let mut stage = 0;
        let r = (|| -> qcow2::Result<()> {
            let mut w = q.vmstate_writer()?;
            w.write_all_bytes(&pattern(50, 1_600_000))?;
            let n = w.finish()?;
            stage = 1;
            let mut s = NewSnapshot::new("base"); // savevm over the same name
            s.vm_state_size = n;
            q.create_snapshot(&s)?;
            Ok(())
        })();
        match &r {
            Err(e) => {
                assert!(e.is_no_space(), "expected ENOSPC, got {e}");
                if stage == 0 {
                    in_write += 1
                } else {
                    in_commit += 1
                }
            }
            Ok(()) => {
                // Enough room: the replacement happened; nothing more to verify here.
                drop(q);
                continue;
            }
        }
        // The image stays usable after the failure: the old snapshot is still there.
        assert!(q.find_snapshot("base").is_some());
        drop(q);
        verify_after_crash(
            mem.to_vec(),
            &base_disk,
            &base_vm,
            &dir,
            &format!("ENOSPC with {extra} bytes free"),
        );
    }
    assert!(
        in_write > 0 && in_commit > 0,
        "ENOSPC hit the state write {in_write}x, the commit {in_commit}x"
    );
}

/// The body run by the child process of `sigkill_at_random_points`: loops forever.
#[test]
fn child_writer_entry() {
    let Ok(path) = std::env::var("QCOW2_FAULT_CHILD") else {
        return;
    };
    let mut q = Qcow2::open(&path, &OpenOptions::default()).unwrap();
    for round in 0.. {
        workload(&mut q, round).unwrap();
        let mut s = NewSnapshot::new("new");
        s.vm_state_size = 0;
        let _ = q.create_snapshot(&s);
        let _ = q.delete_snapshot("new");
        q.resize(4 * MIB + (round + 1) * 8 * MIB).unwrap();
    }
}

#[test]
fn sigkill_at_random_points() {
    let dir = Scratch::new("sigkill");
    let (base, base_disk, base_vm) = base_image(65536, 3);
    let exe = std::env::current_exe().unwrap();
    let mut delays_ms = vec![];
    let mut x: u64 = std::process::id() as u64 * 2654435761;
    for _ in 0..10 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        delays_ms.push(5 + x % 400);
    }
    for d in delays_ms {
        let f = dir.path("victim.qcow2");
        std::fs::write(&f, &base).unwrap();
        let mut child = std::process::Command::new(&exe)
            .args([
                "--exact",
                "child_writer_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("QCOW2_FAULT_CHILD", &f)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(d));
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc_kill(child.id() as i32, 9) };
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            st.signal(),
            Some(9),
            "child must die from SIGKILL mid-workload, not exit ({st:?})"
        );
        let bytes = std::fs::read(&f).unwrap();
        verify_after_crash(
            bytes,
            &base_disk,
            &base_vm,
            &dir,
            &format!("SIGKILL after {d} ms"),
        );
    }
    let _ = MemStorage::new().len();
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
