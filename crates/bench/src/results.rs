//! The results of one suite run: every metric with Godwit's and QEMU's samples summarised, as
//! JSON (`bench/results/latest.json`, for comparing runs over time) and as a Markdown table.

use crate::stats::{ratio, summarize, Summary};
use serde::{Deserialize, Serialize};

/// How a metric's cell is shown.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Shown {
    /// `median (min–max)`.
    Value,
    /// Samples are 0/1: shown as `k/n` (e.g. runs that converged).
    Fraction,
}

/// One row: a metric of a scenario, both VMMs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metric {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub shown: Shown,
    pub godwit: Option<Summary>,
    pub qemu: Option<Summary>,
    /// Godwit median ÷ QEMU median.
    pub ratio: Option<f64>,
    /// Why a side has no value (e.g. a command not supported yet), or what the value means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Metric {
    pub fn new(scenario: &str, metric: &str, unit: &str, godwit: &[f64], qemu: &[f64]) -> Metric {
        let g = summarize(godwit);
        let q = summarize(qemu);
        Metric {
            scenario: scenario.into(),
            metric: metric.into(),
            unit: unit.into(),
            shown: Shown::Value,
            ratio: ratio(g.as_ref(), q.as_ref()),
            godwit: g,
            qemu: q,
            note: None,
        }
    }
    pub fn fraction(mut self) -> Metric {
        self.shown = Shown::Fraction;
        self.ratio = None;
        self
    }
    pub fn note(mut self, n: impl Into<String>) -> Metric {
        let n = n.into();
        if !n.is_empty() {
            self.note = Some(n);
        }
        self
    }
}

/// Where and with what the suite ran.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Host {
    pub kernel: String,
    pub cpus: usize,
    pub qemu_version: String,
    pub godwit_commit: String,
}

/// A whole run of the suite.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Results {
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub duration_s: f64,
    /// Runs per VMM and scenario.
    pub runs: usize,
    pub host: Host,
    pub metrics: Vec<Metric>,
    pub notes: Vec<String>,
}

/// A number with a precision that suits its size.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a < 1.0 {
        format!("{x:.3}")
    } else if a < 10.0 {
        format!("{x:.2}")
    } else if a < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

fn cell(s: Option<&Summary>, shown: Shown) -> String {
    match (s, shown) {
        (None, _) => "n/a".into(),
        (Some(s), Shown::Fraction) => {
            let k = s.samples.iter().filter(|x| **x > 0.5).count();
            format!("{k}/{}", s.n)
        }
        (Some(s), Shown::Value) if s.n == 1 => fmt_num(s.median),
        (Some(s), Shown::Value) => format!(
            "{} ({}–{})",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
    }
}

/// The Markdown table (plus the notes), as printed and written to `latest.md`.
pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    s += &format!(
        "Godwit vs QEMU ({}) on the test guest — {} run(s) per VMM, alternating; host: {} CPUs, Linux {}; godwit {}\n\n",
        r.host.qemu_version, r.runs, r.host.cpus, r.host.kernel, r.host.godwit_commit
    );
    s += "| scenario | metric | unit | Godwit median (min–max) | QEMU median (min–max) | Godwit/QEMU |\n";
    s += "|---|---|---|---|---|---|\n";
    for m in &r.metrics {
        let ratio = m
            .ratio
            .map(|x| format!("{x:.2}"))
            .unwrap_or_else(|| "–".into());
        s += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            m.scenario,
            m.metric,
            m.unit,
            cell(m.godwit.as_ref(), m.shown),
            cell(m.qemu.as_ref(), m.shown),
            ratio
        );
    }
    let notes: Vec<String> = r
        .metrics
        .iter()
        .filter_map(|m| {
            m.note
                .as_ref()
                .map(|n| format!("{} / {}: {n}", m.scenario, m.metric))
        })
        .chain(r.notes.iter().cloned())
        .collect();
    if !notes.is_empty() {
        s += "\n";
        for n in notes {
            s += &format!("- {n}\n");
        }
    }
    s += &format!("\nSuite wall time: {:.0} s.\n", r.duration_s);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_one_row_per_metric_with_ratio_and_na() {
        let r = Results {
            runs: 3,
            metrics: vec![
                Metric::new(
                    "boot",
                    "to GUEST READY",
                    "ms",
                    &[10.0, 12.0, 11.0],
                    &[40.0, 44.0, 42.0],
                ),
                Metric::new("savevm", "time", "ms", &[], &[100.0])
                    .note("godwit: savevm not supported"),
                Metric::new(
                    "noconv",
                    "converged",
                    "runs",
                    &[0.0, 0.0, 1.0],
                    &[0.0, 0.0, 0.0],
                )
                .fraction(),
            ],
            ..Default::default()
        };
        let t = markdown(&r);
        assert!(
            t.contains(
                "| boot | to GUEST READY | ms | 11.0 (10.0–12.0) | 42.0 (40.0–44.0) | 0.26 |"
            ),
            "{t}"
        );
        assert!(t.contains("| savevm | time | ms | n/a | 100 | – |"), "{t}");
        assert!(t.contains("| 1/3 | 0/3 | – |"), "{t}");
        assert!(
            t.contains("- savevm / time: godwit: savevm not supported"),
            "{t}"
        );
    }

    #[test]
    fn json_round_trips() {
        let r = Results {
            metrics: vec![Metric::new("a", "b", "ms", &[1.0], &[2.0])],
            ..Default::default()
        };
        let j = serde_json::to_string(&r).unwrap();
        let back: Results = serde_json::from_str(&j).unwrap();
        assert_eq!(back.metrics[0].ratio, Some(0.5));
    }
}
