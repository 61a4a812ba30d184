//! Linux moved while it boots (issue 15, part 3): Debian's cloud kernel from the Linux kit
//! (`scripts/linux-kit.sh`: on this host's nested `kvm_pvm` KVM, with the host profile) under
//! Godwit, on `-smp 1` and `-smp 2`:
//!
//! - **boot, live-migrated twice**: from power-on (A), live-migrated during SLUB set-up to a
//!   second Godwit (B); when the initramfs unpack starts B takes `savevm mid` into its qcow2
//!   disk and is live-migrated to a third (C), which reaches `Run /init as init process`. One
//!   boot per vCPU count serves every test (boots take minutes here).
//! - **cold migration in mid-boot**: B's image (holding `mid`) copied to another directory, the
//!   same command line plus `-loadvm mid` there; the boot finishes.
//!
//! Every kernel log is checked up to `Run /init`: no RCU stall, soft or hard lockup,
//! clocksource-watchdog complaint, `Oops`, `BUG` or `WARNING`; printk timestamps never go back,
//! and across each move the kernel's clock leads wall time by no more than it did on the source
//! (plus a second; see `check_continuity`), so nothing jumped. What follows `/init` differs by host: here init's
//! first system call cannot reach the kernel (docs/linux-boot.md) and the kernel panics; on a
//! KVM that runs user space the agent starts.
//!
//! These boot Linux for minutes of interpreted kernel code each, so they are `#[ignore]`d in the
//! ordinary workspace run; `scripts/test.sh` runs them in a step of their own
//! (`cargo test --release -p godwit --test linux_moves -- --ignored`).

mod common;
#[path = "../../bench/src/linuxlog.rs"]
mod linuxlog;

use common::*;
use linuxlog::{bad, kit_fields, up_to, BANNER, INIT, SLUB, UNPACK, UNPACKED};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Catches hangs only: a boot here takes 4–10 minutes depending on the machine's load.
const STAGE: Duration = Duration::from_secs(1500);
const MIGRATION: Duration = Duration::from_secs(300);

struct Kit {
    kernel: String,
    initrd: String,
    append: String,
    profile: String,
}

/// The kit, built once into the target dir (later runs reuse it).
fn kit() -> &'static Kit {
    static K: OnceLock<Kit> = OnceLock::new();
    K.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-kit");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/linux-kit.sh");
        let out = Command::new("bash").arg(&script).arg(&dir).output().expect("run bash");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "scripts/linux-kit.sh failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kv = kit_fields(&text);
        let get = |k: &str| kv.get(k).unwrap_or_else(|| panic!("the kit printed no {k}=: {text}")).to_string();
        let kit = Kit { kernel: get("kernel"), initrd: get("initrd"), append: get("append"), profile: get("profile") };
        eprintln!("Linux kit: profile {} kernel {} append {}", kit.profile, kit.kernel, kit.append);
        kit
    })
}

/// One VM's command line: the kit's kernel, a qcow2 disk that holds the snapshots, a monitor.
fn args(smp: u32, image: &Path, mon: &Path, extra: &[&str]) -> Vec<String> {
    let k = kit();
    let mut v: Vec<String> = [
        "-m",
        "256",
        "-smp",
        &smp.to_string(),
        "-no-reboot",
        "-kernel",
        &k.kernel,
        "-initrd",
        &k.initrd,
        "-append",
        &k.append,
        "-drive",
        &format!("file={},if=none,id=d0", image.display()),
        "-device",
        "virtio-blk-device,drive=d0",
        "-monitor",
        &format!("unix:{},server,nowait", mon.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn spawn(a: &[String]) -> Vm {
    Vm::spawn(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

/// The printk timestamp of a kernel log line (`[   12.345678] …`).
fn stamp(line: &str) -> Option<f64> {
    let l = line.trim_start_matches(|c: char| c != '[');
    let end = l.find(']')?;
    l.get(1..end)?.trim().parse().ok()
}

/// Waits for a line containing `pat`, then returns it with the wall time it came.
/// A line already read (the destination's first line, read by `migrate`, can be the very one
/// awaited: a move late in the unpack) counts: it is not printed twice.
fn wait(vm: &mut Vm, pat: &str, what: &str) -> (String, Instant) {
    if let Some(i) = vm.seen.iter().position(|l| l.contains(pat)) {
        eprintln!("{what}: {:?} (already read)", vm.seen[i].trim_end());
        return (vm.seen[i].clone(), vm.seen_at[i]);
    }
    let t0 = Instant::now();
    let l = vm.wait_for(pat, STAGE);
    eprintln!("{what}: {:?} after {:.1?}", l.trim_end(), t0.elapsed());
    // When the line arrived from the VM, not when this thread got to it.
    (l, vm.seen_at.last().copied().unwrap_or_else(Instant::now))
}

/// The log checks above, on everything one VM printed up to `until` (or all of it).
fn check_log(who: &str, lines: &[String], until: Option<&str>) {
    let lines = up_to(lines, until);
    let mut last = f64::MIN;
    for l in lines {
        if let Some(bad) = bad(l) {
            panic!("{who}: the kernel log has {bad:?}: {l}\n--- log ---\n{}", lines.join("\n"));
        }
        if let Some(t) = stamp(l) {
            assert!(t >= last, "{who}: printk time went back from {last} to {t}: {l}");
            last = t;
        }
    }
}

/// Across a move: the kernel's clock on the destination never goes back from the source's last
/// line, and it does not lead wall time by more than the source's did (plus one second):
/// nothing jumped. Each line's printk stamp is compared with when it arrived from the VM.
/// A printk stamp is taken when the message is stored, and on this host's interpreted kernel
/// the console can print it more than a second later, so the source's lead is the largest over
/// its lines of the last `LEAD_WINDOW` seconds before the trigger, not only the trigger line's
/// (a late trigger line alone made a sound move look like a jump).
fn check_continuity(src: &Vm, trigger: &str, trigger_at: Instant, first: &str, first_at: Instant) {
    let last = src.seen.iter().rev().find_map(|l| stamp(l)).expect("source printed no timestamp");
    let t0 = stamp(trigger).expect("trigger line has no timestamp");
    let b = stamp(first).expect("destination line has no timestamp");
    // Kernel time minus wall time since the trigger line arrived, per line.
    let lead = |stamp: f64, at: Instant| {
        let wall = if at >= trigger_at {
            at.duration_since(trigger_at).as_secs_f64()
        } else {
            -trigger_at.duration_since(at).as_secs_f64()
        };
        stamp - t0 - wall
    };
    let src_lead = src
        .seen
        .iter()
        .zip(&src.seen_at)
        .filter_map(|(l, &at)| stamp(l).map(|s| (s, at)))
        .filter(|&(s, _)| s >= t0 - LEAD_WINDOW && s <= last)
        .map(|(s, at)| lead(s, at))
        .fold(0.0f64, f64::max);
    let dst_lead = lead(b, first_at);
    let wall = first_at.saturating_duration_since(trigger_at).as_secs_f64();
    eprintln!(
        "kernel clock: source's last line {last:.6}, destination's first {b:.6}; {:.3} s of kernel time since the trigger line in {wall:.3} s of wall time; lead over wall time: source {src_lead:.3} s, destination {dst_lead:.3} s",
        b - t0
    );
    assert!(b >= last, "the destination's kernel clock went back: {last} -> {b}");
    assert!(
        dst_lead <= src_lead + 1.0,
        "the kernel clock ran {:.3} s ahead in {wall:.3} s of wall time across the move (lead over wall time: source {src_lead:.3} s, destination {dst_lead:.3} s)",
        b - t0
    );
}

/// How far before the trigger line the source's lines count for its clock's lead.
const LEAD_WINDOW: f64 = 10.0;

/// After `Run /init`: on this host init's first system call cannot reach the kernel and init
/// dies (`Kernel panic - not syncing: Attempted to kill init!`); elsewhere the agent starts.
/// Either way the VM is stopped here.
fn finish(vm: &mut Vm, who: &str) {
    let what = if kit().profile == "pvm" { "Attempted to kill init" } else { "AGENT READY" };
    let l = vm.wait_for(what, STAGE);
    eprintln!("{who}: after /init: {}", l.trim_end());
    let _ = vm.child.kill();
    let _ = vm.child.wait();
}

fn quit(vm: &mut Vm, hmp: &mut Hmp) {
    hmp.quit();
    let _ = vm.wait_exit(Duration::from_secs(30));
    let _ = vm.child.kill();
    let _ = vm.child.wait();
}

/// Where the boot stands, for the cold-migration test: the image that holds `mid`.
struct Boot {
    image: PathBuf,
}

/// Power-on to `Run /init`, moved on the way (once per vCPU count, shared by the tests):
/// A boots and is live-migrated to B during SLUB set-up; when the initramfs unpack starts B
/// takes `savevm mid` and is live-migrated to C; C reaches `Run /init`. Every log is checked.
fn boot(smp: u32) -> &'static Boot {
    static B1: OnceLock<Result<Boot, String>> = OnceLock::new();
    static B2: OnceLock<Result<Boot, String>> = OnceLock::new();
    let cell = if smp == 1 { &B1 } else { &B2 };
    // The -smp 1 and -smp 2 boots may run side by side (the second vCPU mostly halts). A boot
    // that fails fails every test that needs it, once (not a second boot per test).
    let r = cell.get_or_init(|| {
        std::panic::catch_unwind(|| boot_once(smp)).map_err(|e| {
            e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
        })
    });
    match r {
        Ok(b) => b,
        Err(e) => panic!("the -smp {smp} boot failed: {e}"),
    }
}

fn boot_once(smp: u32) -> Boot {
    {
        require_kvm();
        // Under the target directory, one set per vCPU count reused by every run: B's image
        // outlives this function (the cold-migration tests load `mid` from it).
        let vm_dir = |n: &str| {
            let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("linux-boot-{smp}-{n}"));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).expect("boot directory");
            (d.join("mon.sock"), d.join("snap.qcow2"))
        };
        let t0 = Instant::now();
        let (mon_a, img_a) = vm_dir("a");
        create_image(&img_a, "qcow2", "64M");
        let mut a = spawn(&args(smp, &img_a, &mon_a, &[]));
        let mut hmp_a = Hmp::connect(&mon_a);
        wait(&mut a, BANNER, &format!("-smp {smp} A: banner"));
        let t = wait(&mut a, SLUB, &format!("-smp {smp} A: SLUB set-up"));
        // Shared storage in spirit: each VM has its own copy of the (still unwritten) disk.
        let (mon_b, img_b) = vm_dir("b");
        std::fs::copy(&img_a, &img_b).unwrap();
        let mut b = migrate(&mut a, &mut hmp_a, &t, &args(smp, &img_b, &mon_b, &[]), &format!("-smp {smp} A -> B (SLUB set-up)"));
        check_log("A", &a.seen, None);
        quit(&mut a, &mut hmp_a);
        let mut hmp_b = Hmp::connect(&mon_b);
        let t = wait(&mut b, UNPACK, &format!("-smp {smp} B: initramfs unpack starts"));
        let saved = Instant::now();
        let out = hmp_b.cmd("savevm mid");
        eprintln!("-smp {smp} B: savevm mid took {:.1?}", saved.elapsed());
        assert!(!out.to_lowercase().contains("error"), "savevm mid: {out}");
        let list = hmp_b.cmd("info snapshots");
        assert!(list.contains("mid"), "{list}");
        let (mon_c, img_c) = vm_dir("c");
        std::fs::copy(&img_b, &img_c).unwrap();
        let mut c = migrate(&mut b, &mut hmp_b, &t, &args(smp, &img_c, &mon_c, &[]), &format!("-smp {smp} B -> C (initramfs unpack)"));
        check_log("B", &b.seen, None);
        // The move happened mid-unpack: B never finished it, C does.
        assert!(!b.seen.iter().any(|l| l.contains(UNPACKED)), "B finished the unpack before the move");
        quit(&mut b, &mut hmp_b);
        wait(&mut c, UNPACKED, &format!("-smp {smp} C: initramfs unpacked"));
        wait(&mut c, INIT, &format!("-smp {smp} C: init"));
        eprintln!("-smp {smp}: power-on to {INIT:?} in {:.1?} with two live migrations and a savevm", t0.elapsed());
        check_log("C", &c.seen, Some(INIT));
        if smp > 1 {
            let all: Vec<String> = a.seen.iter().chain(&b.seen).chain(&c.seen).cloned().collect();
            let up = all.iter().find(|l| l.contains("smp: Brought up")).cloned().unwrap_or_default();
            assert!(up.contains(&format!("{smp} CPUs")), "-smp {smp}: the kernel brought up: {up:?}");
        }
        finish(&mut c, &format!("-smp {smp} C"));
        Boot { image: img_b }
    }
}

fn boot_moved_twice_reaches_init(smp: u32) {
    let b = boot(smp);
    let out = sh("qemu-img", &["snapshot", "-l", b.image.to_str().unwrap()]);
    assert!(out.contains("mid"), "qemu-img sees: {out}");
    let (rc, check) = qemu_img_check(&b.image);
    assert_eq!(rc, 0, "qemu-img check: {check}");
}

/// Live-migrates `src` (monitor `hmp`) to a new Godwit started with `dst_args`; returns the
/// destination with its first timestamped line seen, after checking the clock across the move.
fn migrate(src: &mut Vm, hmp: &mut Hmp, trigger: &(String, Instant), dst_args: &[String], label: &str) -> Vm {
    let port = free_port();
    let mut a = dst_args.to_vec();
    a.extend(["-incoming".to_string(), format!("tcp:127.0.0.1:{port}")]);
    let mut dst = spawn(&a);
    dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(60));
    eprintln!("{label}: destination waiting {:.3?} after the trigger line", trigger.1.elapsed());
    let out = hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{port}"));
    assert!(!out.to_lowercase().contains("error"), "{label}: migrate: {out}");
    let info = hmp.wait_migration(MIGRATION);
    assert!(info.contains("Migration status: completed"), "{label}: {info}");
    let num = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.trim().trim_end_matches(" ms").parse::<u64>().ok());
    eprintln!("{label}: completed, total time {:?} ms, downtime {:?} ms", num("total time:"), num("downtime:"));
    eprintln!("{label}: migration completed {:.3?} after the trigger line", trigger.1.elapsed());
    let first = dst.wait_for("] ", STAGE);
    let first_at = dst.seen_at.last().copied().unwrap_or_else(Instant::now);
    eprintln!("{label}: destination's first line {:.3?} after the trigger line", trigger.1.elapsed());
    // Lines the source printed after the last one we read, before it paused, are in its log too.
    src.collect_for(Duration::from_millis(200));
    check_continuity(src, &trigger.0, trigger.1, &first, first_at);
    dst
}

fn cold_migration_in_mid_boot(smp: u32) {
    let src = &boot(smp).image;
    let dir = tmpdir(&format!("linux-cold-{smp}"));
    let image = dir.join("snap.qcow2");
    std::fs::copy(src, &image).unwrap();
    let mon = dir.join("mon.sock");
    let t0 = Instant::now();
    let mut vm = spawn(&args(smp, &image, &mon, &["-loadvm", "mid"]));
    let first = vm.wait_for("] ", STAGE);
    let t = stamp(&first).unwrap();
    eprintln!("-smp {smp}: -loadvm mid in another directory: first kernel line after {:.1?}: {}", t0.elapsed(), first.trim_end());
    wait(&mut vm, INIT, &format!("-smp {smp}: init after -loadvm mid"));
    check_log("after -loadvm mid", &vm.seen, Some(INIT));
    let init_t = vm.seen.iter().find(|l| l.contains(INIT)).and_then(|l| stamp(l)).unwrap();
    assert!(init_t >= t, "{init_t} < {t}");
    finish(&mut vm, &format!("-smp {smp} cold"));
}

#[test]
#[ignore = "boots Linux for minutes: scripts/test.sh runs it (cargo test --release -p godwit --test linux_moves -- --ignored)"]
fn smp1_booting_linux_live_migrated_twice_reaches_init() {
    boot_moved_twice_reaches_init(1);
}

#[test]
#[ignore = "boots Linux for minutes: scripts/test.sh runs it (cargo test --release -p godwit --test linux_moves -- --ignored)"]
fn smp1_savevm_in_mid_boot_then_loadvm_elsewhere_finishes_the_boot() {
    cold_migration_in_mid_boot(1);
}

#[test]
#[ignore = "boots Linux for minutes: scripts/test.sh runs it (cargo test --release -p godwit --test linux_moves -- --ignored)"]
fn smp2_booting_linux_live_migrated_twice_reaches_init() {
    boot_moved_twice_reaches_init(2);
}

#[test]
#[ignore = "boots Linux for minutes: scripts/test.sh runs it (cargo test --release -p godwit --test linux_moves -- --ignored)"]
fn smp2_savevm_in_mid_boot_then_loadvm_elsewhere_finishes_the_boot() {
    cold_migration_in_mid_boot(2);
}
