//! The migration report chart, drawn from reports that real Godwit migrations wrote
//! (`migrate -r FILE`, kept in `tests/fixtures/`): a converging migration of a guest rewriting
//! 256 MiB at 100 MiB/s, an idle guest (one round), and a guest that could not converge under a
//! 16 MiB/s cap and was cancelled. The charts are left in `target/tmp/bench-charts/` to look at.

use bench::chart::{chart_data, render, ChartError, Report};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> Report {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Report::load(&p).unwrap_or_else(|e| panic!("{e}"))
}

fn out(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-charts");
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

const BAR: &str = "fill=\"#466EBE\"";
const STOP: &str = "fill=\"#E67814\"";

/// `(y, height)` of every SVG rect with `fill`, legend swatches (10 px high) left out.
fn rects(svg: &str, fill: &str) -> Vec<(i64, i64)> {
    svg.split("<rect ")
        .skip(1)
        .filter(|r| r.split('>').next().unwrap_or("").contains(fill))
        .filter_map(|r| {
            let attr = |k: &str| -> Option<i64> {
                r.split(&format!(" {k}=\""))
                    .nth(1)?
                    .split('"')
                    .next()?
                    .parse()
                    .ok()
            };
            Some((attr("y")?, attr("height")?))
        })
        .filter(|(_, h)| *h != 10)
        .collect()
}

/// Checks the PNG signature and its IHDR size.
fn png_size(p: &Path) -> (u32, u32) {
    let b = std::fs::read(p).unwrap();
    assert_eq!(
        &b[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        p.display()
    );
    assert_eq!(&b[12..16], b"IHDR");
    let be = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    (be(16), be(20))
}

#[test]
fn converging_migration_chart() {
    let r = fixture("converging.json");
    let d = chart_data(&r).unwrap();
    assert!(d.completed);
    assert_eq!(
        d.bars.len(),
        r.rounds.len() + 1,
        "one bar per round plus the stop-and-copy"
    );
    for (b, x) in d.bars.iter().zip(&r.rounds) {
        assert_eq!(b.mib, x.dirty_pages as f64 * 4096.0 / 1048576.0);
        assert_eq!(b.bandwidth_mibs, Some(x.bandwidth_bps / 1048576.0));
    }
    // The pages sent while paused: all data pages minus those sent in the rounds.
    let stop = d.bars.last().unwrap();
    assert!(stop.stop_and_copy && stop.bandwidth_mibs.is_none());
    let in_rounds: u64 = r.rounds.iter().map(|x| x.data_pages).sum();
    assert_eq!(stop.mib, (r.normal - in_rounds) as f64 * 4096.0 / 1048576.0);
    assert_eq!(d.downtime_ms, Some(r.downtime_ms));
    assert!(
        d.verdict.starts_with("converged after 2 round(s)"),
        "{}",
        d.verdict
    );

    let svg = out("converging.svg");
    render(&r, "Godwit live migration: converging", &svg).unwrap();
    let s = std::fs::read_to_string(&svg).unwrap();
    for label in [
        "pre-copy round",
        "dirty at start of round (MiB, log scale)",
        "bandwidth of the round (MiB/s)",
        "Godwit live migration: converging",
    ] {
        assert!(s.contains(label), "axis/title text {label:?} missing");
    }
    assert!(
        s.contains(&format!("downtime {:.2} ms", r.downtime_ms)),
        "downtime not marked"
    );
    let bars = rects(&s, BAR);
    assert_eq!(bars.len(), r.rounds.len(), "round bars: {bars:?}");
    // Round 0 found more dirty than round 1: its bar is taller (log scale, same baseline).
    assert!(
        bars[0].1 > bars[1].1 && bars[0].0 + bars[0].1 == bars[1].0 + bars[1].1,
        "{bars:?}"
    );
    assert_eq!(rects(&s, STOP).len(), 1, "one stop-and-copy bar");

    let png = out("converging.png");
    render(&r, "Godwit live migration: converging", &png).unwrap();
    assert_eq!(png_size(&png), (1100, 620));
    eprintln!("charts: {} {}", svg.display(), png.display());
}

#[test]
fn idle_migration_has_one_round() {
    let r = fixture("converging-idle.json");
    let d = chart_data(&r).unwrap();
    assert_eq!(d.bars.len(), 2);
    let svg = out("idle.svg");
    render(&r, "idle", &svg).unwrap();
    let s = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(rects(&s, BAR).len(), 1);
    assert_eq!(rects(&s, STOP).len(), 1);
}

#[test]
fn non_converging_migration_chart() {
    let r = fixture("nonconverging.json");
    assert_eq!(r.status, "cancelled");
    let d = chart_data(&r).unwrap();
    assert!(!d.completed && d.downtime_ms.is_none());
    assert_eq!(d.bars.len(), r.rounds.len(), "no stop-and-copy bar");
    assert!(d.bars.iter().all(|b| !b.stop_and_copy));
    // Every round found more dirty than fits in the downtime limit: that is why.
    assert!(d.bars.iter().all(|b| b.mib > d.threshold_mib), "{d:?}");
    let cap = r.max_bandwidth as f64 / 1048576.0;
    assert!(
        (d.threshold_mib - cap * r.downtime_limit_ms as f64 / 1000.0).abs() < 0.01,
        "{d:?}"
    );
    assert!(d.verdict.contains("did not converge"), "{}", d.verdict);

    let svg = out("nonconverging.svg");
    render(&r, "Godwit live migration: not converging", &svg).unwrap();
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("did not converge"));
    assert!(
        !s.contains("downtime 0"),
        "no downtime is marked for a cancelled migration"
    );
    assert_eq!(rects(&s, BAR).len(), r.rounds.len());
    assert!(rects(&s, STOP).is_empty());
    let png = out("nonconverging.png");
    render(&r, "Godwit live migration: not converging", &png).unwrap();
    assert_eq!(png_size(&png), (1100, 620));
    eprintln!("charts: {} {}", svg.display(), png.display());
}

#[test]
fn bad_reports_are_errors() {
    let r = Report {
        status: "completed".into(),
        ..Default::default()
    };
    assert!(matches!(chart_data(&r), Err(ChartError::NoRounds)));
    let p = out("garbage.json");
    std::fs::write(&p, "{\"rounds\": 7}").unwrap();
    assert!(matches!(Report::load(&p), Err(ChartError::Parse(..))));
    assert!(matches!(
        Report::load(&out("missing.json")),
        Err(ChartError::Read(..))
    ));
}
