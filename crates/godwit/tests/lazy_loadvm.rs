//! Lazy loadvm end to end (issue 20): the guest resumes before its RAM is read from the
//! snapshot, and everything that follows still sees exactly the saved RAM — the guest's own
//! ledger, a live migration and a savevm started while the background fill is still running,
//! a cold `-loadvm` in a fresh process from a copied image. A RAM chunk corrupted in the image
//! is detected and the VM stopped (`internal-error`, a clear message), never run; a good
//! snapshot then brings it back. Snapshots in the layout written before (v1) still load.

mod common;
use common::*;
use std::path::Path;
use std::time::Duration;
use vmstate::snapfile;

const T: Duration = Duration::from_secs(60);
/// Enough touched RAM that the background fill is still running when the next command comes.
const APPEND: &str = "mode=dirty mib=192 rate=400 disk=on disk_mib=4 hb_ms=100";
const TOUCHED_PAGES: u64 = 192 * 256;

/// Waits until the guest has written all of its `mib` at least once.
fn wait_dirtied(vm: &mut Vm) {
    while field(&vm.wait_for("HEARTBEAT", T), "dirtied").unwrap_or(0) < TOUCHED_PAGES {}
}

/// godwit with `GODWIT_LOG=info` (the load says whether it was lazy) and the test guest.
fn start(img: &Path, sock: &Path, extra: &[&str]) -> Vm {
    start_env(img, sock, "GODWIT_LOG=info", extra)
}

fn start_env(img: &Path, sock: &Path, env: &str, extra: &[&str]) -> Vm {
    let own = [
        "GODWIT_LOG=info".to_string(),
        env.to_string(),
        godwit_bin().display().to_string(),
        "-kernel".into(),
        guest_bin().display().to_string(),
        "-append".into(),
        APPEND.into(),
        "-m".into(),
        "512".into(),
        "-smp".into(),
        "2".into(),
        "-drive".into(),
        format!("file={}", img.display()),
        "-monitor".into(),
        format!("unix:{},server,nowait", sock.display()),
    ];
    let mut args: Vec<&str> = own.iter().map(|s| s.as_str()).collect();
    args.extend_from_slice(extra);
    Vm::spawn_cmd("env", &args)
}

fn assert_clean(img: &Path) {
    let (code, out) = qemu_img_check(img);
    assert_eq!(code, 0, "qemu-img check: {out}");
}

fn ledger_ok(vm: &mut Vm) {
    vm.send(b"v");
    vm.wait_for("LEDGER OK", T);
    vm.wait_for("DISK OK", T);
}

/// Flips a byte inside RAM chunk `pick(number of chunks)` of snapshot `tag`'s state; returns
/// the chunk's address.
fn corrupt_chunk(img: &Path, tag: &str, pick: fn(usize) -> usize) -> u64 {
    let mut q = qcow2::Qcow2::open(img, &qcow2::OpenOptions { read_only: true, ..Default::default() }).unwrap();
    let size = q.find_snapshot(tag).unwrap().vm_state_size;
    let mut head = vec![0u8; snapfile::HEADER_SIZE as usize];
    q.load_vmstate(tag, 0, &mut head).unwrap();
    let h = snapfile::Header::parse(&head, size).expect("savevm writes layout v2");
    let mut meta = vec![0u8; h.meta_len as usize];
    q.load_vmstate(tag, h.meta_off, &mut meta).unwrap();
    let (_, chunks) = snapfile::parse_meta(&h, &meta).unwrap();
    let offsets = snapfile::chunk_offsets(&h, &chunks);
    let i = pick(chunks.len());
    let map = q.vmstate_file_map(tag).unwrap().expect("a plain image maps");
    let at = map.file_offset(offsets[i] + 1000).unwrap();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut b = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, at).unwrap();
    b[0] ^= 0x5a;
    std::os::unix::fs::FileExt::write_all_at(&f, &b, at).unwrap();
    f.sync_all().unwrap();
    chunks[i].gpa
}

#[test]
fn lazy_loadvm_then_migrate_and_savevm_during_the_fill() {
    let dir = tmpdir("lazy-mig");
    let img = dir.join("vm.qcow2");
    create_image(&img, "qcow2", "64M");
    let mut vm = start(&img, &dir.join("m.sock"), &[]);
    vm.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&dir.join("m.sock"));
    wait_dirtied(&mut vm);
    assert_eq!(hmp.cmd("savevm s1").trim(), "");
    for _ in 0..3 {
        vm.wait_for("HEARTBEAT", T);
    }
    // loadvm, then savevm at once: the new state must hold the loaded RAM, not holes.
    assert_eq!(hmp.cmd("loadvm s1").trim(), "");
    vm.wait_stderr("lazy,", T);
    assert_eq!(hmp.cmd("savevm s2").trim(), "", "savevm right after a lazy loadvm");
    ledger_ok(&mut vm);
    assert_eq!(hmp.cmd("loadvm s2").trim(), "");
    ledger_ok(&mut vm);
    // loadvm while the previous one is still filling: that fill is cancelled midway.
    assert_eq!(hmp.cmd("loadvm s1").trim(), "");
    assert_eq!(hmp.cmd("loadvm s2").trim(), "");
    ledger_ok(&mut vm);
    // loadvm, then a live migration at once (shared image).
    assert_eq!(hmp.cmd("loadvm s1").trim(), "");
    let port = free_port();
    let drive = format!("file={}", img.display());
    let incoming = format!("tcp:127.0.0.1:{port}");
    let mut dst = Vm::guest(&["-m", "512", "-smp", "2", "-drive", &drive, "-incoming", &incoming], APPEND);
    dst.wait_stderr("waiting for an incoming migration", T);
    let out = hmp.cmd(&format!("migrate tcp:127.0.0.1:{port}"));
    assert!(out.contains("completed") || out.trim().is_empty(), "{out}");
    let info = hmp.wait_migration(T);
    assert!(info.contains("completed"), "{info}");
    dst.wait_for("HEARTBEAT", T);
    ledger_ok(&mut dst);
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
    hmp.quit();
    let _ = vm.wait_exit(T);
    assert_clean(&img);
}

#[test]
fn cold_lazy_loadvm_from_a_copied_image() {
    let a = tmpdir("lazy-cold-a");
    let b = tmpdir("lazy-cold-b");
    let img = a.join("vm.qcow2");
    create_image(&img, "qcow2", "64M");
    let mut vm = start(&img, &a.join("m.sock"), &[]);
    vm.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&a.join("m.sock"));
    wait_dirtied(&mut vm);
    assert_eq!(hmp.cmd("savevm tag1").trim(), "");
    let at_save = seqs(&vm.seen).into_iter().max().unwrap();
    hmp.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
    let img2 = b.join("vm.qcow2");
    std::fs::copy(&img, &img2).unwrap();
    let mut vm2 = start(&img2, &b.join("m.sock"), &["-loadvm", "tag1"]);
    let first = vm2.wait_for("HEARTBEAT", T);
    vm2.wait_stderr("lazy,", T);
    let s = field(&first, "seq").unwrap();
    assert!(s + 2 > at_save && s <= at_save + 2, "continues from {at_save}: {first}");
    assert!(!vm2.seen.iter().any(|l| l.contains("GUEST READY")), "the guest must not boot again");
    ledger_ok(&mut vm2);
    vm2.send(b"q");
    assert_eq!(vm2.wait_exit(T), Some(0));
    assert_clean(&img2);
    let list = sh("qemu-img", &["snapshot", "-l", img2.to_str().unwrap()]);
    assert!(list.contains("tag1"), "{list}");
}

#[test]
fn a_corrupted_ram_chunk_stops_the_vm() {
    let dir = tmpdir("lazy-bad");
    let img = dir.join("vm.qcow2");
    create_image(&img, "qcow2", "64M");
    let sock = dir.join("m.sock");
    let mut vm = start(&img, &sock, &[]);
    vm.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock);
    wait_dirtied(&mut vm);
    assert_eq!(hmp.cmd("savevm good").trim(), "");
    assert_eq!(hmp.cmd("savevm bad").trim(), "");
    assert_eq!(hmp.cmd("savevm bad2").trim(), "");
    // The middle chunk (the fill tends to find it) and the last one (the guest's busiest pages
    // are there: the guest tends to touch it first, its vCPU waiting in the fault).
    let gpa = corrupt_chunk(&img, "bad", |n| n / 2);
    let gpa2 = corrupt_chunk(&img, "bad2", |n| n - 1);
    // HMP loadvm: the switch happens (everything but RAM checked), then the fill finds the chunk.
    assert_eq!(hmp.cmd("loadvm bad").trim(), "");
    // The VMM's own line comes once the VM is stopped.
    vm.wait_stderr(&format!("godwit: loadvm bad: saved RAM at {gpa:#x}"), T);
    let err = vm.stderr.lock().unwrap().clone();
    assert!(err.contains("is corrupted") && err.contains("VM is stopped"), "{err}");
    let status = hmp.cmd("info status");
    assert!(status.contains("internal-error"), "{status}");
    let cont = hmp.cmd("cont");
    assert!(cont.contains("Resetting the Virtual Machine is required"), "{cont}");
    let save = hmp.cmd("savevm after");
    assert!(save.contains("not restored"), "savevm of a VM whose RAM failed: {save}");
    // A good snapshot brings the VM back (stopped, as QEMU leaves a stopped VM).
    assert_eq!(hmp.cmd("loadvm good").trim(), "");
    assert!(hmp.cmd("info status").contains("paused"));
    assert_eq!(hmp.cmd("cont").trim(), "");
    ledger_ok(&mut vm);
    hmp.quit();
    let _ = vm.wait_exit(T);
    // -loadvm in a fresh process: the same, before the guest ever runs on it.
    let sock2 = dir.join("m2.sock");
    let mut vm2 = start(&img, &sock2, &["-loadvm", "bad2"]);
    vm2.wait_stderr(&format!("godwit: loadvm bad2: saved RAM at {gpa2:#x}"), T);
    let mut hmp2 = Hmp::connect(&sock2);
    let status = hmp2.cmd("info status");
    assert!(status.contains("internal-error"), "{status}");
    hmp2.quit();
    assert_eq!(vm2.wait_exit(T), Some(0), "quits cleanly with a thread waiting on the bad chunk");
}

/// A snapshot in the layout Godwit wrote before lazy loading (v1: one stream) still loads,
/// eagerly, in a fresh process, and the guest's RAM is exactly the saved one.
#[test]
fn snapshots_in_the_old_layout_still_load() {
    let dir = tmpdir("lazy-v1");
    let img = dir.join("vm.qcow2");
    create_image(&img, "qcow2", "64M");
    let mut vm = start_env(&img, &dir.join("a.sock"), "GODWIT_SAVEVM_LAYOUT=1", &[]);
    vm.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&dir.join("a.sock"));
    wait_dirtied(&mut vm);
    assert_eq!(hmp.cmd("savevm old").trim(), "");
    hmp.quit();
    assert_eq!(vm.wait_exit(T), Some(0));
    let mut q = qcow2::Qcow2::open(&img, &qcow2::OpenOptions { read_only: true, ..Default::default() }).unwrap();
    let mut head = [0u8; 12];
    q.load_vmstate("old", 0, &mut head).unwrap();
    assert_eq!(&head[..8], b"GODWITVM");
    assert_eq!(u32::from_le_bytes(head[8..12].try_into().unwrap()), 1, "written in the old layout");
    drop(q);
    let mut vm2 = start(&img, &dir.join("b.sock"), &["-loadvm", "old"]);
    vm2.wait_for("HEARTBEAT", T);
    ledger_ok(&mut vm2);
    assert!(!vm2.stderr.lock().unwrap().contains("lazy,"), "an old state loads eagerly");
    vm2.send(b"q");
    assert_eq!(vm2.wait_exit(T), Some(0));
    assert_clean(&img);
}
