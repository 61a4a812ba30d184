//! A forecast before migrating: sample the guest's dirty rate (KVM's dirty log over a short
//! window, no migration started), take the link bandwidth, and simulate the pre-copy rounds
//! the sender would run — plain, and with auto-converge's throttle steps — to say whether the
//! migration converges within the downtime limit, how long it takes and what downtime to
//! expect. The model is the sender's own rule, so the prediction follows what it will do.

use crate::ram::{count, populated_pages};
use crate::stats::Params;
use crate::{MigratableVm, MigrationError, Result};
use std::time::{Duration, Instant};
use vmstate::stream::PAGE_SIZE;

/// What a sample saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub window_s: f64,
    /// Distinct pages dirtied in the window.
    pub dirty_pages: u64,
    /// Pages that hold anything (what round 0 sends at most).
    pub populated_pages: u64,
    pub total_pages: u64,
}

impl Sample {
    /// Bytes dirtied per second.
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_pages as f64 * PAGE_SIZE as f64 / self.window_s.max(1e-6)
    }
}

/// Samples the dirty rate over `window` with the VM running (dirty logging on just for that).
pub fn sample(vm: &dyn MigratableVm, window: Duration) -> Result<Sample> {
    let populated: u64 = vm.ram_regions().iter().map(|r| count(&populated_pages(r))).sum();
    let total: u64 = vm.ram_regions().iter().map(|r| r.size / PAGE_SIZE as u64).sum();
    vm.set_dirty_logging(true).map_err(MigrationError::Vm)?;
    let res = (|| -> Result<(f64, u64)> {
        vm.take_dirty().map_err(MigrationError::Vm)?;
        let t0 = Instant::now();
        std::thread::sleep(window);
        let d = vm.take_dirty().map_err(MigrationError::Vm)?;
        Ok((t0.elapsed().as_secs_f64(), d.iter().map(|b| count(b)).sum::<u64>()))
    })();
    let _ = vm.set_dirty_logging(false);
    let (window_s, dirty_pages) = res?;
    Ok(Sample { window_s, dirty_pages, populated_pages: populated, total_pages: total })
}

/// The forecast for one strategy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub converges: bool,
    pub rounds: u32,
    pub total_ms: f64,
    pub downtime_ms: f64,
    /// Final throttle (auto-converge), percent.
    pub throttle: u8,
}

const MAX_ROUNDS: u32 = 200;
/// Fixed per-round cost (dirty log harvest, bookkeeping) and switchover cost (pause, state).
const ROUND_OVERHEAD_S: f64 = 0.002;
const SWITCHOVER_S: f64 = 0.003;

/// Simulates the sender's rounds. `auto` applies auto-converge's throttle rule.
pub fn predict(s: &Sample, bandwidth: f64, p: &Params, auto: bool) -> Prediction {
    let page = PAGE_SIZE as f64;
    let limit_s = p.downtime_limit_ms as f64 / 1000.0;
    let rate_pages = s.dirty_pages as f64 / s.window_s.max(1e-6);
    // A guest cannot have more distinct dirty pages than it has populated pages.
    let cap = s.populated_pages.max(s.dirty_pages) as f64;
    let mut t = s.populated_pages as f64 * page / bandwidth + ROUND_OVERHEAD_S;
    let mut total = t;
    let (mut throttle, mut outrun) = (0u8, 0u32);
    for round in 1..=MAX_ROUNDS {
        let r = rate_pages * (1.0 - throttle as f64 / 100.0);
        let dirty = (r * t).min(cap);
        let send_s = dirty * page / bandwidth;
        if send_s <= limit_s {
            let down = send_s + SWITCHOVER_S;
            return Prediction { converges: true, rounds: round, total_ms: (total + down) * 1e3, downtime_ms: down * 1e3, throttle };
        }
        if auto {
            outrun = if r * page > 0.5 * bandwidth { outrun + 1 } else { 0 };
            if outrun >= 2 {
                outrun = 0;
                throttle = if throttle == 0 { p.throttle_initial } else { throttle.saturating_add(p.throttle_increment) }
                    .min(p.throttle_max);
            }
        }
        t = send_s + ROUND_OVERHEAD_S;
        total += t;
    }
    Prediction { converges: false, rounds: MAX_ROUNDS, total_ms: f64::INFINITY, downtime_ms: f64::INFINITY, throttle }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(dirty_mib_s: f64, populated_mib: u64) -> Sample {
        Sample {
            window_s: 1.0,
            dirty_pages: (dirty_mib_s * 256.0) as u64,
            populated_pages: populated_mib * 256,
            total_pages: 1 << 18,
        }
    }

    #[test]
    fn verdicts_follow_rate_versus_bandwidth() {
        let p = Params::default();
        let idle = predict(&s(0.1, 16), 1e9, &p, false);
        assert!(idle.converges && idle.rounds == 1 && idle.downtime_ms < 30.0);
        // 100 MiB/s over a 1 GB/s link converges in a few rounds.
        let busy = predict(&s(100.0, 256), 1e9, &p, false);
        assert!(busy.converges && busy.downtime_ms <= 30.0 + 3.0, "{busy:?}");
        let slow = predict(&s(100.0, 256), 200e6, &p, false);
        assert!(slow.converges && slow.rounds > busy.rounds, "{slow:?}");
        assert!(busy.total_ms > idle.total_ms);
        // 200 MiB/s over a 16 MB/s link never does, unless throttled.
        let hot = predict(&s(200.0, 256), 16e6, &p, false);
        assert!(!hot.converges);
        let tamed = predict(&s(200.0, 256), 16e6, &p, true);
        assert!(tamed.converges && tamed.throttle > 0, "{tamed:?}");
    }
}
