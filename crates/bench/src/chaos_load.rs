//! The campaign's load run (`godwit-chaos --load K`): K test guests of mixed sizes (256 MiB to
//! 4 GiB, every other one rewriting memory) run on "host A", are all migrated at the same time
//! to "host B", then all back to fresh processes on A. Every guest must answer `LEDGER OK` after
//! each move. Reports each move's slowest total time and downtime and each host's peak RSS
//! (the sum over its VMM processes, sampled while the migrations run). Both "hosts" are sets
//! of processes on this machine, talking over loopback.

use crate::vm::{self, Bins, Hmp, Proc, Res, Spec, Vmm};
use bench::hmptext;
use std::path::Path;
use std::time::{Duration, Instant};

struct Guest {
    mem: u64,
    append: String,
}

fn guests(k: usize) -> Vec<Guest> {
    const SIZES: [u64; 4] = [256, 512, 1024, 4096];
    (0..k)
        .map(|i| {
            let mem = SIZES[i % SIZES.len()];
            let append = if i % 2 == 1 {
                "mode=dirty mib=64 rate=32 hb_ms=50".to_string()
            } else {
                "mode=dirty mib=16 rate=8 hb_ms=50".to_string()
            };
            Guest { mem, append }
        })
        .collect()
}

fn rss_sum(ps: &[&Proc]) -> f64 {
    ps.iter().filter_map(|p| p.rss_mib().ok()).sum()
}

/// One move of every guest at once: `from` (with monitors) → new incoming processes.
struct Move {
    total_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
    peak_rss_from: f64,
    peak_rss_to: f64,
    ledgers_ok: usize,
}

fn spawn_incoming(bins: &Bins, dir: &Path, gs: &[Guest], tag: &str) -> Res<(Vec<Proc>, Vec<u16>)> {
    let mut ps = Vec::new();
    let mut ports = Vec::new();
    for (i, g) in gs.iter().enumerate() {
        let port = vm::free_port()?;
        let spec = Spec {
            mem_mib: g.mem,
            smp: 1,
            append: g.append.clone(),
            monitor: Some(dir.join(format!("{tag}{i}.sock"))),
            incoming: Some(format!("tcp:127.0.0.1:{port}")),
            ..Default::default()
        };
        let mut p = Proc::spawn(bins, Vmm::Godwit, &spec, &format!("{tag}{i}"))?;
        p.wait_stderr("waiting for an incoming migration", Duration::from_secs(30))?;
        ps.push(p);
        ports.push(port);
    }
    Ok((ps, ports))
}

fn move_all(from: &mut [Proc], hmps: &mut [Hmp], to: &mut [Proc], ports: &[u16]) -> Res<Move> {
    for (h, port) in hmps.iter_mut().zip(ports) {
        h.cmd(&format!("migrate -d tcp:127.0.0.1:{port}"))?;
    }
    let mut m = Move { total_ms: vec![], downtime_ms: vec![], peak_rss_from: 0.0, peak_rss_to: 0.0, ledgers_ok: 0 };
    let mut done = vec![false; hmps.len()];
    let end = Instant::now() + Duration::from_secs(300);
    while done.iter().any(|d| !d) {
        if Instant::now() > end {
            return Err(vm::BenchError::Failed("load: migrations did not settle within 300 s".into()));
        }
        m.peak_rss_from = m.peak_rss_from.max(rss_sum(&from.iter().collect::<Vec<_>>()));
        m.peak_rss_to = m.peak_rss_to.max(rss_sum(&to.iter().collect::<Vec<_>>()));
        for (i, h) in hmps.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            let t = h.cmd("info migrate")?;
            let status = t.lines().find_map(|l| l.strip_prefix("Migration status: ")).unwrap_or("").to_string();
            if status.starts_with("completed") {
                done[i] = true;
                m.total_ms.push(hmptext::number(&t, "total time").unwrap_or(f64::NAN));
                m.downtime_ms.push(hmptext::number(&t, "downtime").unwrap_or(f64::NAN));
            } else if status.starts_with("failed") || status.starts_with("cancelled") {
                return Err(vm::BenchError::Failed(format!("load: migration {i} {status}")));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in to.iter_mut() {
        if p.ledger_ok()? {
            m.ledgers_ok += 1;
        }
    }
    let _ = from;
    Ok(m)
}

/// Runs the load scenario; returns the Markdown report.
pub fn run(bins: &Bins, k: usize) -> Res<String> {
    let dir = std::env::temp_dir().join(format!("godwit-chaos-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    let gs = guests(k);
    let mut a = Vec::new();
    let mut ha = Vec::new();
    for (i, g) in gs.iter().enumerate() {
        let spec = Spec {
            mem_mib: g.mem,
            smp: 1,
            append: g.append.clone(),
            monitor: Some(dir.join(format!("a{i}.sock"))),
            ..Default::default()
        };
        let mut p = Proc::spawn(bins, Vmm::Godwit, &spec, &format!("a{i}"))?;
        p.wait_for("GUEST READY", Duration::from_secs(30))?;
        a.push(p);
    }
    for (i, p) in a.iter_mut().enumerate() {
        let mib = if i % 2 == 1 { 64 } else { 16 };
        p.wait_dirtied(mib * 256, Duration::from_secs(60))?;
        ha.push(Hmp::connect(&dir.join(format!("a{i}.sock")), Vmm::Godwit, &format!("a{i}"), Duration::from_secs(10))?);
    }
    let (mut b, ports_b) = spawn_incoming(bins, &dir, &gs, "b")?;
    let there = move_all(&mut a, &mut ha, &mut b, &ports_b)?;
    drop(ha);
    drop(a);
    let mut hb = Vec::new();
    for i in 0..gs.len() {
        hb.push(Hmp::connect(&dir.join(format!("b{i}.sock")), Vmm::Godwit, &format!("b{i}"), Duration::from_secs(10))?);
    }
    let (mut a2, ports_a) = spawn_incoming(bins, &dir, &gs, "c")?;
    let back = move_all(&mut b, &mut hb, &mut a2, &ports_a)?;
    drop(hb);
    drop(b);
    for p in a2 {
        p.quit();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let max = |v: &[f64]| v.iter().cloned().fold(f64::NAN, f64::max);
    let sizes: Vec<String> = gs.iter().map(|g| format!("{} MiB", g.mem)).collect();
    let mut s = format!(
        "## Load: {k} guests moved at the same time, A → B, then B → A\n\n\
         Guests: {} (odd ones rewrite 64 MiB at 32 MiB/s, the others 16 MiB at 8 MiB/s); both \
         \"hosts\" are processes on this machine over loopback (`godwit-chaos --load {k}`).\n\n\
         | move | LEDGER OK | slowest total time (ms) | largest downtime (ms) | peak RSS, sending host (MiB) | peak RSS, receiving host (MiB) |\n\
         |---|---|---|---|---|---|\n",
        sizes.join(", ")
    );
    for (name, m) in [("A → B", &there), ("B → A", &back)] {
        s += &format!(
            "| {name} | {}/{k} | {:.0} | {:.1} | {:.0} | {:.0} |\n",
            m.ledgers_ok,
            max(&m.total_ms),
            max(&m.downtime_ms),
            m.peak_rss_from,
            m.peak_rss_to
        );
    }
    Ok(s)
}
