#![cfg(test)]
//! The suite's plumbing, checked on any host with KVM (this one included) by running Godwit and
//! QEMU with the suite's own command line (`vm::Spec`) but the test guest (crates/guest) as
//! the kernel: the namespace and taps, the serial console, HMP through each VMM's monitor
//! (QEMU's echo and escapes), the suite's pre-copy, post-copy and auto-converge migrations
//! between the two taps (`moves`), savevm/loadvm, a cold migration (savevm, quit, copies of
//! both images, -loadvm on the other tap), quit.
//! Needs root, /dev/kvm, the test guest and godwit built (`cargo build --release`), and
//! qemu-system-x86_64 on PATH.

use crate::host::which;
use crate::image;
use crate::net::{Lan, TAPS};
use crate::moves::{expect_ok, handover, live_migrate};
use crate::vm::{field, info_ms, Machine, Spec, Vmm};
use std::path::PathBuf;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn built(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target");
    ["release", "debug"]
        .iter()
        .map(|p| root.join(p).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not built: cargo build --release -p godwit -p godwit-guest"))
}

fn plumbing(vmm: Vmm, bin: PathBuf) {
    let lan = Lan::new(&format!("p{}", &vmm.name()[..1])).expect("namespace, bridge and taps");
    let dir = std::env::temp_dir().join(format!("e2e-plumbing-{}-{}", vmm.name(), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (ledger, data) = (dir.join("ledger.qcow2"), dir.join("data.qcow2"));
    image::create_qcow2(&ledger, "16M").unwrap();
    image::create_ext4_qcow2(&data, "16M").unwrap();
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, b"not a cpio: the test guest ignores it").unwrap();
    let spec = |tap: usize, n: u32, incoming: bool| Spec {
        vmm,
        bin: bin.clone(),
        netns: lan.ns.clone(),
        kernel: built("godwit-guest"),
        initrd: initrd.clone(),
        // Dirtying faster than post-copy's and auto-converge's link (moves::bandwidth).
        append: "mode=dirty mib=64 rate=256 hb_ms=100".into(),
        ledger: ledger.clone(),
        data: data.clone(),
        tap: TAPS[tap].into(),
        mac: "52:54:00:00:e2:09".into(),
        monitor: dir.join(format!("mon{n}")),
        incoming: incoming.then(|| format!("unix:{}", dir.join(format!("mig{n}")).display())),
        loadvm: None,
    };
    let mut cur = Machine::start(&spec(0, 1, false)).unwrap();
    let ready = cur.wait_for("GUEST READY", T).unwrap().1;
    assert_eq!(field(&ready, "cpus"), Some(2), "{ready}");
    cur.wait_for("HEARTBEAT", T).unwrap();
    let st = cur.hmp().unwrap().cmd("info status").unwrap();
    assert_eq!(st.trim(), "VM status: running", "{}: echo and escapes removed", vmm.name());
    // The suite's three live migrations, back and forth between the taps, with the suite's
    // own monitor code; the test guest's memory ledger checked after each.
    for (n, kind) in ["precopy", "postcopy", "auto-converge"].into_iter().enumerate() {
        let dspec = spec((n + 1) % 2, n as u32 + 2, true);
        let mut dst = Machine::start(&dspec).unwrap();
        dst.hmp().unwrap();
        let uri = dspec.incoming.clone().unwrap();
        let (info, total) = live_migrate(&mut cur, &mut dst, &uri, kind).unwrap_or_else(|e| panic!("{}: {kind}: {e}", vmm.name()));
        let (last, first) = handover(&mut cur, &mut dst).unwrap_or_else(|e| panic!("{}: {kind}: {e}", vmm.name()));
        eprintln!(
            "{}: {kind}: downtime {:?} ms, total {total} ms, heartbeat {last:?} on the source then {}",
            vmm.name(),
            info_ms(&info, "downtime:"),
            field(&first, "seq").unwrap_or(0)
        );
        cur.quit();
        assert!(cur.wait_exit(T).is_ok());
        cur = dst;
        cur.send("v").unwrap();
        let l = cur.wait_for("LEDGER", T).unwrap().1;
        assert!(l.starts_with("LEDGER OK"), "{}: after {kind}: {l}", vmm.name());
    }
    let mut dst = cur;
    let h = dst.hmp().unwrap();
    expect_ok(h.cmd("savevm p1").unwrap()).unwrap();
    expect_ok(h.cmd("loadvm p1").unwrap()).unwrap();
    assert!(dst.hmp().unwrap().cmd("info snapshots").unwrap().contains("p1"));
    dst.wait_for("HEARTBEAT", T).unwrap();
    // Cold migration as the suite does it: savevm, quit, copy both images, -loadvm elsewhere.
    dst.collect(Duration::from_millis(50));
    expect_ok(dst.hmp().unwrap().cmd("savevm p2").unwrap()).unwrap();
    let at_save = field(&dst.wait_for("HEARTBEAT", T).unwrap().1, "seq").unwrap();
    dst.quit();
    assert!(dst.wait_exit(T).is_ok());
    let cold = dir.join("cold");
    std::fs::create_dir_all(&cold).unwrap();
    let (l2, d2) = (cold.join("ledger.qcow2"), cold.join("data.qcow2"));
    image::copy(&ledger, &l2).unwrap();
    image::copy(&data, &d2).unwrap();
    let cspec = Spec { ledger: l2, data: d2.clone(), loadvm: Some("p2".into()), ..spec(1, 9, false) };
    let mut c = Machine::start(&cspec).unwrap();
    let back = field(&c.wait_for("HEARTBEAT", T).unwrap().1, "seq").unwrap();
    assert!(back <= at_save + 2 && back + 2 >= at_save, "{}: heartbeat {back} after -loadvm, {at_save} at savevm", vmm.name());
    c.send("v").unwrap();
    let l = c.wait_for("LEDGER", T).unwrap().1;
    assert!(l.starts_with("LEDGER OK"), "{}: after the cold migration: {l}", vmm.name());
    c.quit();
    assert!(c.wait_exit(T).is_ok());
    image::fsck(&d2).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn godwit_runs_the_suite_command_line_and_migrates_between_its_taps() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (network namespaces, taps)");
    assert!(std::path::Path::new("/dev/kvm").exists(), "this test needs /dev/kvm");
    plumbing(Vmm::Godwit, built("godwit"));
}

#[test]
fn qemu_runs_the_suite_command_line_and_migrates_between_its_taps() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (network namespaces, taps)");
    let q = which("qemu-system-x86_64").expect("this test needs qemu-system-x86_64 on PATH (Debian qemu-system-x86)");
    plumbing(Vmm::Qemu, q);
}
