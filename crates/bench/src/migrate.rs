//! Live migration over loopback TCP, the same way for both VMMs: a destination with
//! `-incoming tcp:127.0.0.1:PORT`, a source with an HMP socket, `migrate_set_parameter
//! downtime-limit` / `max-bandwidth`, `migrate -d`, `info migrate` polled until it settles (or,
//! past the time budget, `migrate_cancel`). Downtime is read twice: from the VMM's own report
//! and from the guest's 2 ms heartbeats as the harness saw them (last on the source, first on
//! the destination).

use crate::vm::{free_port, hb_seq, BenchError, Bins, Hmp, Proc, Res, Spec, Vmm};
use bench::hmptext::{migration_status, number};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// One migration scenario.
#[derive(Debug, Clone)]
pub struct Case {
    pub key: &'static str,
    pub mem_mib: u64,
    pub smp: u32,
    /// Guest workload (`mode=... mib=... rate=...`).
    pub workload: String,
    /// Pages the workload must have written once before the migration starts (0: none).
    pub touch_pages: u64,
    pub downtime_limit_ms: u64,
    /// MiB per second, 0 = unlimited (for both VMMs). Given with an `M` suffix: QEMU's HMP
    /// reads a bare number as MiB/s, Godwit's as bytes/s; `16M` means 16 MiB/s to both.
    pub max_bandwidth_mib: u64,
    /// Give up (and `migrate_cancel`) after this long.
    pub budget: Duration,
    /// Post-copy: `postcopy-ram` on (both sides, as QEMU needs), `migrate_start_postcopy`
    /// once the first full pass is done.
    pub postcopy: bool,
    /// More monitor commands before `migrate` (capabilities, throttle parameters), the same
    /// for both VMMs.
    pub setup: Vec<String>,
    /// Godwit only: ask `info migrate_forecast` right before migrating (kept in [`Run`]).
    pub forecast: bool,
}

/// What one migration gave.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub converged: bool,
    pub total_ms: f64,
    pub downtime_ms: f64,
    /// Source's last heartbeat → destination's first, as read by the harness.
    pub hb_gap_ms: f64,
    /// The destination's first heartbeat continued the source's sequence (no gap, no repeat).
    pub seq_ok: bool,
    /// When the sequence did not continue: what was seen on each side.
    pub seq_detail: String,
    pub transferred_mib: f64,
    pub dirty_syncs: f64,
    /// transferred ÷ total time.
    pub throughput_mibs: f64,
    /// `LEDGER OK` on the destination (or, after a cancel, on the source).
    pub ledger_ok: bool,
    /// Post-copy: pages the destination asked for (`postcopy request count`).
    pub postcopy_requests: f64,
    /// After a cancel: `migrate_cancel` → status `cancelled` as polled, and the source running.
    pub cancel_ms: f64,
    pub source_running_after_cancel: bool,
    pub report: Option<PathBuf>,
    /// The forecast asked right before `migrate` (see [`Case::forecast`]).
    pub forecast: Option<String>,
    /// Resident memory of the source and the destination process once the migration
    /// completed (MiB): what each side holds for the guest's touched memory.
    pub src_rss_mib: f64,
    pub dst_rss_mib: f64,
}

fn append(case: &Case) -> String {
    format!("{} hb=compact hb_ms=2 cpus={}", case.workload, case.smp)
}

/// The destination, listening: Godwit says so on stderr; QEMU's monitor answers only once the
/// incoming socket is set up (it is created before QEMU's main loop runs).
fn destination(bins: &Bins, vmm: Vmm, case: &Case, dir: &Path, port: u16) -> Res<Proc> {
    let mon = dir.join(format!("{}-dst.sock", vmm.name()));
    let _ = std::fs::remove_file(&mon);
    let spec = Spec {
        mem_mib: case.mem_mib,
        smp: case.smp,
        append: append(case),
        monitor: (vmm == Vmm::Qemu).then(|| mon.clone()),
        incoming: Some(format!("tcp:127.0.0.1:{port}")),
        ..Default::default()
    };
    let mut p = Proc::spawn(bins, vmm, &spec, &format!("{}-dst", vmm.name()))?;
    match vmm {
        Vmm::Godwit => p.wait_stderr("waiting for an incoming migration", T)?,
        Vmm::Qemu => {
            let mut h = Hmp::connect(&mon, vmm, "qemu-dst monitor", T)?;
            let st = h.cmd("info status")?;
            if !st.contains("inmigrate") {
                return Err(BenchError::Failed(format!(
                    "qemu destination not waiting: {st}"
                )));
            }
            if case.postcopy {
                let a = h.cmd("migrate_set_capability postcopy-ram on")?;
                if !a.trim().is_empty() {
                    return Err(BenchError::Failed(format!("qemu destination postcopy-ram: {a}")));
                }
            }
        }
    }
    Ok(p)
}

/// The status word (`failed (reason)` → `failed`).
fn status(info: &str) -> String {
    migration_status(info)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("?")
        .to_string()
}

/// The status line and any error line, for a failure message.
fn brief(info: &str) -> String {
    let mut v: Vec<&str> = info
        .lines()
        .filter(|l| l.starts_with("Migration status") || l.starts_with("Error"))
        .collect();
    if v.is_empty() {
        v.push(info.trim());
    }
    v.join("; ")
}

pub fn run(bins: &Bins, vmm: Vmm, case: &Case, dir: &Path, idx: usize) -> Res<Run> {
    let port = free_port()?;
    let mut dst = destination(bins, vmm, case, dir, port)?;
    let mon = dir.join(format!("{}-src.sock", vmm.name()));
    let _ = std::fs::remove_file(&mon);
    let spec = Spec {
        mem_mib: case.mem_mib,
        smp: case.smp,
        append: append(case),
        monitor: Some(mon.clone()),
        ..Default::default()
    };
    let mut src = Proc::spawn(bins, vmm, &spec, &format!("{}-src", vmm.name()))?;
    src.wait_for("GUEST READY", T)?;
    let mut hmp = Hmp::connect(&mon, vmm, &format!("{}-src monitor", vmm.name()), T)?;
    if case.touch_pages > 0 {
        src.wait_dirtied(case.touch_pages, Duration::from_secs(60))?;
    }
    // A steady state: a few hundred heartbeats before the migration starts.
    std::thread::sleep(Duration::from_millis(500));
    let mut setup = vec![
        format!(
            "migrate_set_parameter downtime-limit {}",
            case.downtime_limit_ms
        ),
        format!(
            "migrate_set_parameter max-bandwidth {}M",
            case.max_bandwidth_mib
        ),
    ];
    if case.postcopy {
        setup.push("migrate_set_capability postcopy-ram on".into());
    }
    setup.extend(case.setup.iter().cloned());
    for c in setup {
        let a = hmp.cmd(&c)?;
        if a.to_ascii_lowercase().contains("error") || crate::vm::unsupported(&a) {
            return Err(BenchError::Failed(format!("{c}: {a}")));
        }
    }
    let forecast = match case.forecast && vmm == Vmm::Godwit {
        true => Some(hmp.cmd("info migrate_forecast")?),
        false => None,
    };
    let report = (vmm == Vmm::Godwit).then(|| dir.join(format!("report-{}-{idx}.json", case.key)));
    let uri = format!("tcp:127.0.0.1:{port}");
    let cmd = match &report {
        Some(r) => format!("migrate -d -r {} {uri}", r.display()),
        None => format!("migrate -d {uri}"),
    };
    let t0 = Instant::now();
    let a = hmp.cmd(&cmd)?;
    if a.to_ascii_lowercase().contains("error") {
        return Err(BenchError::Failed(format!("{cmd}: {a}")));
    }
    let mut out = Run {
        report: report.clone(),
        ..Default::default()
    };
    out.forecast = forecast;
    let mut info;
    let mut postcopy_started = false;
    // Post-copy starts once the first full pass is done: QEMU counts a dirty sync at setup and
    // one after the pass, Godwit one after the pass.
    let first_pass_syncs = if vmm == Vmm::Qemu { 2.0 } else { 1.0 };
    loop {
        std::thread::sleep(Duration::from_millis(25));
        info = hmp.cmd("info migrate")?;
        if case.postcopy && !postcopy_started && number(&info, "dirty sync count").unwrap_or(0.0) >= first_pass_syncs {
            let a = hmp.cmd("migrate_start_postcopy")?;
            if !a.trim().is_empty() {
                return Err(BenchError::Failed(format!("migrate_start_postcopy: {a}")));
            }
            postcopy_started = true;
        }
        match status(&info).as_str() {
            "completed" => break,
            "failed" | "cancelled" => {
                return Err(BenchError::Failed(format!(
                    "{} migration {}",
                    vmm.name(),
                    brief(&info)
                )))
            }
            _ => {}
        }
        if t0.elapsed() > case.budget {
            return cancel(&mut hmp, &mut src, dst, info, out);
        }
    }
    out.converged = true;
    out.total_ms = number(&info, "total time").unwrap_or(f64::NAN);
    out.downtime_ms = number(&info, "downtime").unwrap_or(f64::NAN);
    out.transferred_mib = number(&info, "transferred ram").unwrap_or(f64::NAN) / 1024.0;
    out.dirty_syncs = number(&info, "dirty sync count").unwrap_or(f64::NAN);
    out.throughput_mibs = out.transferred_mib / (out.total_ms / 1000.0);
    out.postcopy_requests = number(&info, "postcopy request count").unwrap_or(0.0);

    out.src_rss_mib = src.rss_mib().unwrap_or(f64::NAN);
    out.dst_rss_mib = dst.rss_mib().unwrap_or(f64::NAN);
    // The destination prints nothing before the guest runs there: its first output ends the
    // pause. The source is stopped so that a heartbeat line the switchover cut in two (its
    // start on the source, its end on the destination) can be put back together.
    let (t_dst, first) = dst.wait_line("first output after migration", T, |_| true)?;
    hmp.quit();
    src.finish(Duration::from_secs(10));
    let last = src.heartbeats().into_iter().max_by_key(|(_, s)| *s);
    let (t_src, last) =
        last.ok_or_else(|| BenchError::Failed("no heartbeat from the source".into()))?;
    out.hb_gap_ms = t_dst.saturating_duration_since(t_src).as_secs_f64() * 1000.0;
    let joined = format!("{}{first}", src.partial.clone().unwrap_or_default());
    out.seq_ok = hb_seq(&joined) == Some(last + 1);
    if !out.seq_ok {
        out.seq_detail = format!(
            "source's last heartbeat {last} (cut line {:?}), destination's first line {first:?}",
            src.partial
        );
    }
    out.ledger_ok = dst.ledger_ok()?;
    dst.quit();
    drop(src);
    Ok(out)
}

/// Past the budget: record where it stood, cancel, and check the source runs on with its memory
/// intact.
fn cancel(hmp: &mut Hmp, src: &mut Proc, dst: Proc, info: String, mut out: Run) -> Res<Run> {
    out.converged = false;
    out.total_ms = number(&info, "total time").unwrap_or(f64::NAN);
    out.transferred_mib = number(&info, "transferred ram").unwrap_or(f64::NAN) / 1024.0;
    out.dirty_syncs = number(&info, "dirty sync count").unwrap_or(f64::NAN);
    out.throughput_mibs = out.transferred_mib / (out.total_ms / 1000.0);
    let t = Instant::now();
    hmp.cmd("migrate_cancel")?;
    loop {
        let i = hmp.cmd("info migrate")?;
        let s = status(&i);
        if s == "cancelled" || s == "failed" || s == "completed" {
            out.converged = s == "completed";
            break;
        }
        if t.elapsed() > T {
            return Err(BenchError::Failed(format!(
                "migrate_cancel did not settle: {}",
                brief(&i)
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out.cancel_ms = t.elapsed().as_secs_f64() * 1000.0;
    out.source_running_after_cancel = hmp.cmd("info status")?.contains("running");
    // Give a Godwit source time to write its report before we stop it.
    std::thread::sleep(Duration::from_millis(200));
    out.ledger_ok = src.ledger_ok()?;
    drop(dst);
    Ok(out)
}
