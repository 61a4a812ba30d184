//! The migration report chart: from Godwit's `migrate -r FILE` JSON, one bar per pre-copy round
//! with the bytes found dirty when it started (log scale, left axis), the bandwidth each round
//! achieved (line, right axis), the switch-over threshold (what fits in the downtime limit at
//! that bandwidth), and the end: the stop-and-copy bar with the downtime, or the verdict of a
//! migration that did not converge. Drawn with `plotters` as SVG and PNG.

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;
use std::path::Path;
use std::sync::OnceLock;

const PAGE: f64 = 4096.0;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("cannot read report {0}: {1}")]
    Read(String, std::io::Error),
    #[error("report {0} is not a migration report: {1}")]
    Parse(String, serde_json::Error),
    #[error("the report has no pre-copy round to draw")]
    NoRounds,
    #[error("no TrueType font for the chart's text: install fonts-dejavu-core or set GODWIT_BENCH_FONT to a .ttf file")]
    NoFont,
    #[error("drawing {0}: {1}")]
    Draw(String, String),
}

/// One pre-copy round of the report (the fields the chart reads).
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct Round {
    pub round: u32,
    pub dirty_pages: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub at_ms: f64,
    pub bandwidth_bps: f64,
}

/// Godwit's migration report (`migrate -r FILE`); unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Report {
    pub status: String,
    pub error: Option<String>,
    pub total_time_ms: f64,
    pub downtime_ms: f64,
    pub expected_downtime_ms: f64,
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub normal: u64,
    pub dirty_pages_rate: u64,
    pub dirty_sync_count: u64,
    pub rounds: Vec<Round>,
    pub downtime_limit_ms: u64,
    pub max_bandwidth: u64,
    /// Post-copy: pages still on the source when the guest started on the destination, and
    /// how many times the destination asked for pages (0 for a pre-copy migration).
    pub postcopy_pages: u64,
    pub postcopy_requests: u64,
}

impl Report {
    pub fn load(path: &Path) -> Result<Report, ChartError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ChartError::Read(name.clone(), e))?;
        serde_json::from_str(&text).map_err(|e| ChartError::Parse(name, e))
    }
}

/// One bar of the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    /// MiB dirty at the start of the round (round 0: populated RAM); for the stop-and-copy
    /// bar, the data sent while the VM was paused.
    pub mib: f64,
    /// The round's bandwidth in MiB/s (none for the stop-and-copy bar).
    pub bandwidth_mibs: Option<f64>,
    pub stop_and_copy: bool,
}

/// What the chart shows, computed from a report (kept apart from drawing so it is testable).
#[derive(Debug, Clone, PartialEq)]
pub struct ChartData {
    pub bars: Vec<Bar>,
    pub completed: bool,
    /// The measured downtime of a completed migration.
    pub downtime_ms: Option<f64>,
    /// Bytes that fit in the downtime limit at the last measured bandwidth, in MiB.
    pub threshold_mib: f64,
    /// The line under the chart: downtime, or why it did not converge.
    pub verdict: String,
}

/// Bandwidth the engine would use after the last round: the last round that moved ≥ 2 MiB,
/// capped by max-bandwidth.
fn last_bandwidth(r: &Report) -> f64 {
    let bw = r
        .rounds
        .iter()
        .rev()
        .find(|x| x.bytes >= 2 << 20)
        .map(|x| x.bandwidth_bps)
        .unwrap_or(100e6);
    if r.max_bandwidth > 0 {
        bw.min(r.max_bandwidth as f64)
    } else {
        bw
    }
}

pub fn chart_data(r: &Report) -> Result<ChartData, ChartError> {
    if r.rounds.is_empty() {
        return Err(ChartError::NoRounds);
    }
    let mut bars: Vec<Bar> = r
        .rounds
        .iter()
        .map(|x| Bar {
            label: x.round.to_string(),
            mib: x.dirty_pages as f64 * PAGE / MIB,
            bandwidth_mibs: Some(x.bandwidth_bps / MIB),
            stop_and_copy: false,
        })
        .collect();
    let completed = r.status == "completed";
    let bw = last_bandwidth(r);
    let threshold_mib = bw * r.downtime_limit_ms as f64 / 1000.0 / MIB;
    let verdict = if completed && r.postcopy_pages > 0 {
        bars.push(Bar { label: "stop".into(), mib: 0.0, bandwidth_mibs: None, stop_and_copy: true });
        format!(
            "post-copy after {} round(s): downtime {:.2} ms (limit {} ms), then {:.1} MiB pulled by the destination ({} requests), total {:.0} ms, {:.1} MiB sent",
            r.rounds.len(),
            r.downtime_ms,
            r.downtime_limit_ms,
            r.postcopy_pages as f64 * PAGE / MIB,
            r.postcopy_requests,
            r.total_time_ms,
            r.transferred as f64 / MIB
        )
    } else if completed {
        // Data pages sent in the pause = all data pages minus those of the rounds.
        let in_rounds: u64 = r.rounds.iter().map(|x| x.data_pages).sum();
        let final_pages = r.normal.saturating_sub(in_rounds);
        let final_mib = final_pages as f64 * PAGE / MIB;
        bars.push(Bar {
            label: "stop".into(),
            mib: final_mib,
            bandwidth_mibs: None,
            stop_and_copy: true,
        });
        format!(
            "converged after {} round(s): stop-and-copy {:.2} MiB, downtime {:.2} ms (limit {} ms), total {:.0} ms, {:.1} MiB sent",
            r.rounds.len(),
            final_mib,
            r.downtime_ms,
            r.downtime_limit_ms,
            r.total_time_ms,
            r.transferred as f64 / MIB
        )
    } else {
        let last = r
            .rounds
            .last()
            .map(|x| x.dirty_pages as f64 * PAGE / MIB)
            .unwrap_or(0.0);
        let cap = if r.max_bandwidth > 0 {
            format!("cap {:.0} MiB/s", r.max_bandwidth as f64 / MIB)
        } else {
            "no cap".into()
        };
        format!(
            "{} after {:.1} s, {} round(s): did not converge — rounds find {:.1} MiB dirty, {:.2} MiB fit in the {} ms limit at {:.1} MiB/s ({cap}); expected downtime {:.0} ms{}",
            if r.status.is_empty() { "stopped" } else { &r.status },
            r.total_time_ms / 1000.0,
            r.rounds.len(),
            last,
            threshold_mib,
            r.downtime_limit_ms,
            bw / MIB,
            r.expected_downtime_ms,
            r.error.as_ref().map(|e| format!(" — {e}")).unwrap_or_default()
        )
    };
    Ok(ChartData {
        bars,
        completed,
        downtime_ms: completed.then_some(r.downtime_ms),
        threshold_mib,
        verdict,
    })
}

static FONT: OnceLock<Result<(), ()>> = OnceLock::new();

/// Registers a system TrueType font as plotters' "sans-serif" (once per process).
fn ensure_font() -> Result<(), ChartError> {
    let r = FONT.get_or_init(|| {
        let mut candidates: Vec<String> = std::env::var("GODWIT_BENCH_FONT").into_iter().collect();
        candidates.extend(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
                "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
            ]
            .map(String::from),
        );
        for c in candidates {
            if let Ok(bytes) = std::fs::read(&c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(())
    });
    r.map_err(|_| ChartError::NoFont)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, d: &ChartData) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let h = root.dim_in_pixel().1;
    let (upper, lower) = root.split_vertically(h.saturating_sub(56));
    let n = d.bars.len() as f64;
    let pos: Vec<f64> = d.bars.iter().map(|b| b.mib).filter(|x| *x > 0.0).collect();
    let lo_data = pos
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .min(d.threshold_mib.max(1e-3));
    let ymin = if lo_data.is_finite() {
        (lo_data / 3.0).max(1e-4)
    } else {
        1e-3
    };
    let ymax = pos
        .iter()
        .copied()
        .fold(d.threshold_mib, f64::max)
        .max(ymin * 10.0)
        * 12.0;
    let bwmax = d
        .bars
        .iter()
        .filter_map(|b| b.bandwidth_mibs)
        .fold(1.0, f64::max)
        * 1.8;

    let mut chart = ChartBuilder::on(&upper)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(78)
        .right_y_label_area_size(78)
        .build_cartesian_2d(-0.5f64..n - 0.5, (ymin..ymax).log_scale())?
        .set_secondary_coord(-0.5f64..n - 0.5, 0f64..bwmax);
    let labels: Vec<String> = d.bars.iter().map(|b| b.label.clone()).collect();
    let fmt_x = move |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
            labels[i as usize].clone()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .x_labels((n as usize).clamp(2, 25) + 1)
        .x_label_formatter(&fmt_x)
        .disable_x_mesh()
        .x_desc("pre-copy round (\"stop\" = VM paused: stop-and-copy)")
        .y_desc("dirty at start of round (MiB, log scale)")
        .y_label_formatter(&|y| crate::results::fmt_num(*y))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("bandwidth of the round (MiB/s)")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;

    let blue = RGBColor(70, 110, 190);
    let orange = RGBColor(230, 120, 20);
    let red = RGBColor(200, 30, 30);
    let green = RGBColor(40, 150, 70);
    chart
        .draw_series(
            d.bars
                .iter()
                .enumerate()
                .filter(|(_, b)| !b.stop_and_copy)
                .map(|(i, b)| {
                    let x = i as f64;
                    Rectangle::new(
                        [(x - 0.35, ymin), (x + 0.35, b.mib.max(ymin))],
                        blue.mix(0.75).filled(),
                    )
                }),
        )?
        .label("dirty at round start (MiB)")
        .legend(move |(x, y)| {
            Rectangle::new([(x, y - 5), (x + 14, y + 5)], blue.mix(0.75).filled())
        });
    if let Some((i, b)) = d.bars.iter().enumerate().find(|(_, b)| b.stop_and_copy) {
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x - 0.35, ymin), (x + 0.35, b.mib.max(ymin))],
                orange.filled(),
            )))?
            .label("sent during the downtime (MiB)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], orange.filled()));
        chart.draw_series(std::iter::once(Text::new(
            format!("downtime {:.2} ms", d.downtime_ms.unwrap_or(f64::NAN)),
            (x - 0.45, (b.mib.max(ymin) * 1.6).min(ymax / 1.2)),
            ("sans-serif", 15).into_font().color(&red),
        )))?;
    }
    chart
        .draw_series(LineSeries::new(
            [(-0.5, d.threshold_mib), (n - 0.5, d.threshold_mib)],
            green.stroke_width(2),
        ))?
        .label("switch-over threshold: downtime limit × bandwidth (MiB)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], green.stroke_width(2)));
    let bw: Vec<(f64, f64)> = d
        .bars
        .iter()
        .enumerate()
        .filter_map(|(i, b)| b.bandwidth_mibs.map(|v| (i as f64, v)))
        .collect();
    chart
        .draw_secondary_series(LineSeries::new(bw.clone(), red.stroke_width(2)))?
        .label("bandwidth (MiB/s, right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], red.stroke_width(2)));
    chart.draw_secondary_series(bw.iter().map(|p| Circle::new(*p, 4, red.filled())))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    let color = if d.completed { BLACK } else { red };
    // The verdict, on a second line after its " — " when it has one.
    for (i, part) in d.verdict.splitn(2, " — ").enumerate() {
        let style = ("sans-serif", 15).into_font().color(&color);
        lower.draw(&Text::new(part.to_string(), (16, 6 + 22 * i as i32), style))?;
    }
    root.present()?;
    Ok(())
}

/// Draws the chart of `report` to `path`: SVG if it ends in `.svg`, else PNG.
pub fn render(report: &Report, title: &str, path: &Path) -> Result<ChartData, ChartError> {
    let d = chart_data(report)?;
    ensure_font()?;
    let name = path.display().to_string();
    let size = (1100, 620);
    let res = if path.extension().is_some_and(|e| e == "svg") {
        draw(SVGBackend::new(path, size).into_drawing_area(), title, &d)
    } else {
        draw(
            BitMapBackend::new(path, size).into_drawing_area(),
            title,
            &d,
        )
    };
    res.map_err(|e| ChartError::Draw(name, e.to_string()))?;
    Ok(d)
}
