//! Live migration end to end: two godwit processes on loopback, the test guest's heartbeats
//! and memory ledger prove nothing was lost; failures leave the source running.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

struct Pair {
    src: Vm,
    dst: Vm,
    hmp: Hmp,
    port: u16,
    _dir: common::TestDir,
}

fn pair(name: &str, mem: &str, smp: &str, append: &str, dst_mem: &str) -> Pair {
    let dir = tmpdir(name);
    let sock = dir.join("src.sock");
    let port = free_port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let dst = Vm::guest(&["-m", dst_mem, "-smp", smp, "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut src = Vm::guest(&["-m", mem, "-smp", smp, "-monitor", &mon], append);
    src.wait_for("GUEST READY", T);
    let hmp = Hmp::connect(&sock);
    Pair { src, dst, hmp, port, _dir: dir }
}

fn migrate_and_check(smp: &str, append: &str) {
    let mut p = pair(&format!("mig{smp}"), "512", smp, append, "512");
    let before = p.src.wait_for("HEARTBEAT", T);
    let out = p.hmp.cmd(&format!("migrate tcp:127.0.0.1:{}", p.port));
    assert!(out.contains("completed"), "{out}");
    let info = p.hmp.cmd("info migrate");
    assert!(info.contains("Migration status: completed"), "{info}");
    assert!(p.hmp.cmd("info status").contains("postmigrate"));
    // The source's last heartbeat and the destination's first continue one sequence.
    let src_lines = p.src.collect_for(Duration::from_millis(300));
    let last_src = seqs(&p.src.seen).into_iter().max().unwrap();
    assert!(src_lines.iter().all(|l| !l.starts_with("HEARTBEAT") || field(l, "seq").unwrap() <= last_src));
    let first_dst = p.dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&p.src.seen, &p.dst.seen, &first_dst);
    assert!(field(&first_dst, "seq") > field(&before, "seq"));
    // Every page the guest wrote arrived.
    p.dst.send(b"v");
    p.dst.wait_for("LEDGER OK", T);
    let h = p.dst.wait_for("HEARTBEAT", T);
    assert!(field(&h, "ticks") > field(&first_dst, "ticks"));
    p.dst.send(b"q");
    assert_eq!(p.dst.wait_exit(T), Some(0));
}

#[test]
fn idle_guest_one_vcpu() {
    migrate_and_check("1", "mode=idle hb_ms=100");
}

#[test]
fn dirtying_guest_four_vcpus() {
    migrate_and_check("4", "mode=dirty mib=128 rate=40 hb_ms=100");
}

#[test]
fn mismatched_memory_is_refused_and_source_keeps_running() {
    let mut p = pair("mismatch", "512", "1", "mode=dirty mib=32 rate=20 hb_ms=100", "256");
    let out = p.hmp.cmd(&format!("migrate tcp:127.0.0.1:{}", p.port));
    assert!(out.contains("refused") && out.contains("incompatible"), "{out}");
    let info = p.hmp.wait_migration(T);
    assert!(info.contains("Migration status: failed"), "{info}");
    assert!(info.contains("mem=512MiB"), "the reason names the mismatch: {info}");
    assert!(p.hmp.cmd("info status").contains("running"));
    assert_eq!(p.dst.wait_exit(T), Some(1), "the destination exits non-zero");
    assert!(p.dst.stderr.lock().unwrap().contains("incoming migration failed"));
    assert!(!p.dst.seen.iter().any(|l| l.contains("HEARTBEAT")), "destination must never run the guest");
    let h1 = p.src.wait_for("HEARTBEAT", T);
    let h2 = p.src.wait_for("HEARTBEAT", T);
    assert!(field(&h2, "seq") > field(&h1, "seq"));
    p.src.send(b"v");
    p.src.wait_for("LEDGER OK", T);
}

#[test]
fn killed_destination_leaves_source_running_and_second_migrate_works() {
    let mut p = pair("killdst", "512", "2", "mode=dirty mib=128 rate=30 hb_ms=100", "512");
    // Cap the bandwidth so the bulk phase lasts long enough to kill the destination in it.
    p.hmp.cmd("migrate_set_parameter max-bandwidth 8M");
    p.hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{}", p.port));
    std::thread::sleep(Duration::from_millis(700));
    assert!(p.hmp.cmd("info migrate").contains("Migration status: active"));
    p.dst.child.kill().unwrap();
    let info = p.hmp.wait_migration(T);
    assert!(info.contains("Migration status: failed"), "{info}");
    assert!(p.hmp.cmd("info status").contains("running"));
    p.src.send(b"v");
    p.src.wait_for("LEDGER OK", T);
    // A second migration to a fresh destination succeeds.
    let port = free_port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let mut dst2 = Vm::guest(&["-m", "512", "-smp", "2", "-incoming", &incoming], "mode=dirty mib=128 rate=30 hb_ms=100");
    dst2.wait_stderr("waiting for an incoming migration", T);
    p.hmp.cmd("migrate_set_parameter max-bandwidth 0");
    let out = p.hmp.cmd(&format!("migrate {incoming}"));
    assert!(out.contains("completed"), "{out}");
    dst2.send(b"v");
    dst2.wait_for("LEDGER OK", T);
}

#[test]
fn non_converging_guest_shows_it_and_cancel_returns_to_running() {
    let mut p = pair("noconv", "512", "2", "mode=dirty mib=256 rate=0 hb_ms=100", "512");
    p.hmp.cmd("migrate_set_parameter max-bandwidth 16M");
    p.hmp.cmd("migrate_set_parameter downtime-limit 5");
    p.hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{}", p.port));
    // Wait until several dirty syncs happened without converging.
    let mut info = String::new();
    for _ in 0..200 {
        info = p.hmp.cmd("info migrate");
        let syncs: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("dirty sync count: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if syncs >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(info.contains("Migration status: active"), "{info}");
    assert!(info.contains("dirty pages rate"), "{info}");
    p.hmp.cmd("migrate_cancel");
    let info = p.hmp.wait_migration(T);
    assert!(info.contains("Migration status: cancelled"), "{info}");
    assert!(p.hmp.cmd("info status").contains("running"));
    p.src.send(b"v");
    p.src.wait_for("LEDGER OK", T);
    assert_eq!(p.dst.wait_exit(T), Some(1));
}

#[test]
fn auto_converge_finishes_what_plain_precopy_cannot() {
    let mut p = pair("autoconv", "512", "2", "mode=dirty mib=128 rate=0 hb_ms=100 cpus=2", "512");
    p.hmp.cmd("migrate_set_parameter max-bandwidth 32M");
    p.hmp.cmd("migrate_set_parameter cpu-throttle-initial 50");
    p.hmp.cmd("migrate_set_parameter cpu-throttle-increment 20");
    assert_eq!(p.hmp.cmd("migrate_set_capability auto-converge on").trim(), "");
    assert!(p.hmp.cmd("info migrate_capabilities").contains("auto-converge: on"));
    p.hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{}", p.port));
    let mut throttled = false;
    let info = loop {
        let info = p.hmp.cmd("info migrate");
        throttled |= info.contains("throttle");
        if info.contains("Migration status: completed") || info.contains("Migration status: failed") {
            break info;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(info.contains("Migration status: completed"), "{info}");
    assert!(throttled, "the guest was never throttled");
    let first = p.dst.wait_for("HEARTBEAT", T);
    p.src.collect_for(Duration::from_millis(200));
    assert_seq_continues(&p.src.seen, &p.dst.seen, &first);
    p.dst.send(b"v");
    p.dst.wait_for("LEDGER OK", T);
    // The destination runs unthrottled: its guest dirties at full speed again.
    let a = p.dst.wait_for("HEARTBEAT", T);
    let b = p.dst.wait_for("HEARTBEAT", T);
    assert!(field(&b, "dirtied") > field(&a, "dirtied"));
}

/// The forecast's verdicts against what happens: an idle guest converges with plain
/// pre-copy; a guest dirtying faster than a capped link does not, auto-converge would, and
/// `strategy auto` then finishes the migration. (How close the predicted times come is a
/// benchmark matter, not a test's.)
#[test]
fn forecast_verdicts_match_reality() {
    let mut p = pair("forecast-idle", "512", "1", "mode=idle hb_ms=100 cpus=1", "512");
    let f = p.hmp.cmd("info migrate_forecast");
    assert!(f.contains("precopy: converges") && f.contains("recommended: precopy"), "{f}");
    let out = p.hmp.cmd(&format!("migrate tcp:127.0.0.1:{}", p.port));
    assert!(out.contains("completed"), "{out}");
    drop(p);

    let mut p = pair("forecast-hot", "512", "2", "mode=dirty mib=128 rate=0 hb_ms=100 cpus=2", "512");
    p.hmp.cmd("migrate_set_parameter max-bandwidth 32M");
    p.hmp.cmd("migrate_set_parameter cpu-throttle-initial 50");
    p.hmp.cmd("migrate_set_parameter cpu-throttle-increment 20");
    let f = p.hmp.cmd("info migrate_forecast");
    assert!(f.contains("precopy: does not converge"), "{f}");
    assert!(f.contains("auto-converge: converges") && f.contains("recommended: auto-converge"), "{f}");
    p.hmp.cmd("migrate_set_parameter strategy auto");
    p.hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{}", p.port));
    let info = p.hmp.wait_migration(T);
    assert!(info.contains("Migration status: completed"), "{info}");
    p.dst.wait_for("HEARTBEAT", T);
    p.dst.send(b"v");
    p.dst.wait_for("LEDGER OK", T);
}
