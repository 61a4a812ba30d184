//! `info migrate_forecast` / `query-migrate-forecast`: sample the running guest's dirty rate,
//! take the bandwidth (`max-bandwidth` when set, else what the last migration measured, else
//! an assumed 1 GB/s) and predict plain pre-copy, auto-converge and post-copy (possible when
//! this host has userfaultfd; recommended when pre-copy cannot converge and the `postcopy-ram`
//! capability is on).

use crate::machine::Machine;
use migration::forecast::{predict, sample_with};
use monitor::migration::{MigrationForecast, MigrationStrategy, StrategyForecast};
use std::time::Duration;

const WINDOW: Duration = Duration::from_millis(500);
const ASSUMED_BANDWIDTH: f64 = 1e9;

/// What `strategy auto` should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    Precopy,
    AutoConverge,
    Postcopy,
}

/// Returns the forecast and what `strategy auto` should pick: plain pre-copy when it
/// converges, else post-copy when the `postcopy-ram` capability is on and this host can serve
/// it (userfaultfd), else auto-converge.
pub fn forecast(m: &Machine) -> Result<(MigrationForecast, Choice), String> {
    let params = m.mig.params();
    let last = m.mig.stats();
    let bandwidth = if params.max_bandwidth > 0 {
        params.max_bandwidth as f64
    } else if let Some(bw) = last.rounds.iter().filter(|r| r.bytes >= 2 << 20).map(|r| r.bandwidth_bps).reduce(f64::max) {
        bw
    } else {
        ASSUMED_BANDWIDTH
    };
    // With multifd compression on, the sample also measures the ratio and speed.
    let s = sample_with(&m.handle(), WINDOW, &params).map_err(|e| e.to_string())?;
    let mut strategies = Vec::new();
    let mut ok = Vec::new();
    for (strategy, auto) in [(MigrationStrategy::Precopy, false), (MigrationStrategy::AutoConverge, true)] {
        let p = predict(&s, bandwidth, &params, auto);
        if p.converges {
            ok.push(strategy);
        }
        strategies.push(StrategyForecast {
            strategy,
            converges: p.converges,
            total_time: p.converges.then_some(p.total_ms.round() as u64),
            downtime: p.converges.then_some(p.downtime_ms.round() as u64),
        });
    }
    let postcopy = migration::postcopy::available();
    let pc = migration::postcopy::predict(&s, bandwidth);
    strategies.push(StrategyForecast {
        strategy: MigrationStrategy::Postcopy,
        converges: postcopy,
        total_time: postcopy.then_some(pc.total_ms.round() as u64),
        downtime: postcopy.then_some(pc.downtime_ms.round() as u64),
    });
    let choice = if ok.first() == Some(&MigrationStrategy::Precopy) {
        Choice::Precopy
    } else if postcopy && params.postcopy {
        Choice::Postcopy
    } else if ok.first() == Some(&MigrationStrategy::AutoConverge) {
        Choice::AutoConverge
    } else {
        Choice::Precopy
    };
    let recommended = match choice {
        Choice::Precopy => ok.first().copied(),
        Choice::AutoConverge => Some(MigrationStrategy::AutoConverge),
        Choice::Postcopy => Some(MigrationStrategy::Postcopy),
    };
    Ok((
        MigrationForecast {
            ram_total: s.total_pages * 4096,
            dirty_rate: s.dirty_rate() as u64,
            sample_time: (s.window_s * 1000.0) as u64,
            bandwidth: bandwidth as u64,
            strategies,
            recommended,
        },
        choice,
    ))
}
