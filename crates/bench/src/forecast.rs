//! The migration forecast against reality (Godwit only: QEMU has no forecast, its column stays
//! empty). For each workload a Godwit source answers `info migrate_forecast` right before it
//! migrates; the predicted total time of the strategy it migrates with is compared with the
//! measured one, and each verdict with what happened. A "does not converge" verdict for plain
//! pre-copy is checked by a plain migration that must still be unfinished at its budget (then
//! cancelled). Bandwidth is capped (`max-bandwidth`) so the forecast knows the link, as an
//! operator who sets a cap does.

use crate::migrate::{self, Case};
use crate::vm::{Bins, Vmm};
use bench::results::Metric;
use std::path::Path;
use std::time::Duration;

/// One workload and how it is migrated.
struct Workload {
    key: &'static str,
    title: &'static str,
    case: Case,
    /// Migrate with auto-converge (the forecast's auto-converge line is the prediction);
    /// otherwise plain pre-copy.
    auto: bool,
}

/// The forecast's verdicts and predicted totals, per strategy (None: does not converge).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Forecast {
    pub precopy: Option<Option<f64>>,
    pub auto_converge: Option<Option<f64>>,
}

/// Reads `info migrate_forecast`'s lines `precopy: converges, total ~N ms, ...` and
/// `auto-converge: does not converge`.
pub fn parse(text: &str) -> Forecast {
    let line = |name: &str| -> Option<Option<f64>> {
        let l = text.lines().find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))?;
        if l.starts_with("does not converge") {
            return Some(None);
        }
        let t = l.split("total ~").nth(1)?.split_whitespace().next()?.parse::<f64>().ok()?;
        Some(Some(t))
    };
    Forecast { precopy: line("precopy"), auto_converge: line("auto-converge") }
}

fn workloads(downtime_limit_ms: u64) -> Vec<Workload> {
    let case = |key: &'static str, workload: &str, touch_mib: u64, bw: u64, setup: Vec<String>| Case {
        key,
        mem_mib: 1024,
        smp: 2,
        workload: workload.into(),
        touch_pages: touch_mib * 256,
        downtime_limit_ms,
        max_bandwidth_mib: bw,
        budget: Duration::from_secs(90),
        postcopy: false,
        setup,
        forecast: true,
    };
    vec![
        Workload {
            key: "fc-idle",
            title: "idle 1 GiB guest, 128 MiB/s link, plain pre-copy",
            case: case("fc-idle", "mode=idle", 0, 128, vec![]),
            auto: false,
        },
        Workload {
            key: "fc-32",
            title: "128 MiB rewritten at 32 MiB/s, 128 MiB/s link, plain pre-copy",
            case: case("fc-32", "mode=dirty mib=128 rate=32", 128, 128, vec![]),
            auto: false,
        },
        Workload {
            key: "fc-80",
            title: "128 MiB rewritten at 80 MiB/s, 128 MiB/s link, plain pre-copy",
            case: case("fc-80", "mode=dirty mib=128 rate=80", 128, 128, vec![]),
            auto: false,
        },
        Workload {
            key: "fc-hot",
            title: "24 MiB rewritten at 64 MiB/s, 16 MiB/s link, auto-converge",
            case: case("fc-hot", "mode=dirty mib=24 rate=64", 24, 16, crate::autoconv_setup()),
            auto: true,
        },
    ]
}

/// Runs every workload `runs` times; returns the table rows. Problems go to `notes`.
pub fn run(bins: &Bins, dir: &Path, runs: usize, downtime_limit_ms: u64, noconv_budget: Duration, notes: &mut Vec<String>) -> Vec<Metric> {
    let mut rows = Vec::new();
    for w in workloads(downtime_limit_ms) {
        let (mut predicted, mut measured, mut error, mut within, mut right) = (vec![], vec![], vec![], vec![], vec![]);
        for i in 0..runs {
            eprint!("[forecast {} {}/{}] ", w.key, i + 1, runs);
            let r = match migrate::run(bins, Vmm::Godwit, &w.case, dir, i) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    notes.push(format!("forecast {}: run {}: {e}", w.key, i + 1));
                    continue;
                }
            };
            let f = parse(r.forecast.as_deref().unwrap_or(""));
            let (Some(pre), Some(auto)) = (f.precopy, f.auto_converge) else {
                eprintln!("no forecast in {:?}", r.forecast);
                notes.push(format!("forecast {}: unreadable forecast {:?}", w.key, r.forecast));
                continue;
            };
            let p = if w.auto { auto } else { pre };
            // The strategy used: its verdict is right when it converged as said.
            let mut ok = p.is_some() == r.converged;
            if let (Some(p), true) = (p, r.converged) {
                let e = (p - r.total_ms).abs() / r.total_ms.max(1.0) * 100.0;
                predicted.push(p);
                measured.push(r.total_ms);
                error.push(e);
                within.push(if e <= 30.0 { 1.0 } else { 0.0 });
            }
            let mut detail = String::new();
            // Plain pre-copy said "does not converge" while we migrated with auto-converge:
            // check that verdict too, with a plain migration and a budget.
            if w.auto && pre.is_none() {
                let plain = Case {
                    setup: vec![],
                    forecast: false,
                    budget: noconv_budget,
                    ..w.case.clone()
                };
                match migrate::run(bins, Vmm::Godwit, &plain, dir, i) {
                    Ok(pr) => {
                        ok &= !pr.converged;
                        detail = format!(", plain pre-copy {}", if pr.converged { "CONVERGED" } else { "did not converge (as said)" });
                    }
                    Err(e) => notes.push(format!("forecast {}: plain check: {e}", w.key)),
                }
            }
            eprintln!(
                "predicted {}, measured {}{detail}",
                p.map_or("no convergence".into(), |p| format!("{p:.0} ms")),
                if r.converged { format!("{:.0} ms", r.total_ms) } else { "not converged".into() },
            );
            right.push(if ok { 1.0 } else { 0.0 });
        }
        let scen = format!("forecast {}: {}", w.key, w.title);
        let m = |metric: &str, unit: &str, v: &[f64]| Metric::new(&scen, metric, unit, v, &[]);
        rows.push(m("predicted total time", "ms", &predicted).note("Godwit only: QEMU has no forecast"));
        rows.push(m("measured total time", "ms", &measured));
        rows.push(m("prediction error (predicted vs measured, absolute)", "%", &error));
        rows.push(m("predicted total within 30 %", "runs", &within).fraction());
        rows.push(m("verdicts right (converges / does not)", "runs", &right).fraction());
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_forecast_lines() {
        let t = "ram: 1024.0 MiB\ndirty rate: 63.2 MiB/s (sampled over 500 ms)\nbandwidth: 16.0 MiB/s\n\
                 precopy: does not converge\nauto-converge: converges, total ~5120 ms, downtime ~12 ms\n\
                 postcopy: converges, total ~1800 ms, downtime ~3 ms\nrecommended: auto-converge\n";
        assert_eq!(parse(t), Forecast { precopy: Some(None), auto_converge: Some(Some(5120.0)) });
        assert_eq!(parse("garbage"), Forecast::default());
    }
}
