//! A forecast before migrating: sample the guest's dirty rate (KVM's dirty log over a short
//! window, no migration started), take the link bandwidth, and simulate the pre-copy rounds
//! the sender would run — plain, and with auto-converge's throttle steps — to say whether the
//! migration converges within the downtime limit, how long it takes and what downtime to
//! expect. The model is the sender's own rule, so the prediction follows what it will do.
//!
//! With multifd and compression on, a sample of the pages the guest dirtied is compressed as
//! the channel threads would: the measured ratio divides the bytes each page costs on the
//! link, and the measured per-thread speed times the channel count caps how fast pages can be
//! prepared (so one zstd thread cannot feed a 10 Gbit/s link, four can come closer).

use crate::ram::{count, populated_pages};
use crate::stats::Params;
use crate::{MigratableVm, MigrationError, Result};
use std::time::{Duration, Instant};
use vmstate::stream::PAGE_SIZE;

/// What a sample saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub window_s: f64,
    /// Distinct pages dirtied in the whole window.
    pub dirty_pages: u64,
    /// Pages dirtied per second, from the window's last part: once dirty logging is on and
    /// the log was harvested once, as during a migration's rounds (turning logging on stalls
    /// the guest for a moment here).
    pub rate_pages_s: f64,
    /// The guest's working set when the window showed it saturating (distinct pages grew
    /// much slower than the rate), else unknown.
    pub working_set: Option<u64>,
    /// Pages that hold anything (what round 0 looks at).
    pub populated_pages: u64,
    /// Of those, the ones estimated to hold non-zero data (what round 0 sends).
    pub data_pages: u64,
    pub total_pages: u64,
    /// What the migration's setup costs besides the link: reading which pages are populated.
    pub setup_s: f64,
    /// Bytes on the wire per byte of dirtied page data, as compressed with the migration's
    /// compression (1.0 without).
    pub compress_ratio: f64,
    /// Page bytes one channel thread compresses per second (infinite without compression).
    pub compress_bps: f64,
}

impl Sample {
    /// A sample with one rate over the whole window and every populated page holding data
    /// (for models and tests).
    pub fn simple(window_s: f64, dirty_pages: u64, populated_pages: u64, total_pages: u64) -> Sample {
        Sample {
            window_s,
            dirty_pages,
            rate_pages_s: dirty_pages as f64 / window_s.max(1e-6),
            working_set: None,
            populated_pages,
            data_pages: populated_pages,
            total_pages,
            setup_s: 0.0,
            compress_ratio: 1.0,
            compress_bps: f64::INFINITY,
        }
    }

    /// Page bytes per second the migration can move over a link carrying `link_bps`: the
    /// link divided by the compression ratio, and no faster than the channel threads compress
    /// (multifd with compression only; otherwise the link).
    pub fn page_bandwidth(&self, link_bps: f64, p: &Params) -> f64 {
        if !p.multifd || p.multifd_compression == crate::stats::Compression::None {
            return link_bps;
        }
        let wire = link_bps / self.compress_ratio.clamp(1e-3, 2.0);
        wire.min(self.compress_bps * p.multifd_channels.max(1) as f64)
    }

    /// Bytes dirtied per second.
    pub fn dirty_rate(&self) -> f64 {
        self.rate_pages_s * PAGE_SIZE as f64
    }

    /// The most distinct pages one round can find dirty.
    fn cap(&self) -> f64 {
        self.working_set.unwrap_or(self.populated_pages.max(self.dirty_pages)) as f64
    }
}

/// Share of the window (its end) used to measure the rate.
const RATE_SHARE: f64 = 0.4;
/// Populated pages looked at to estimate how many hold data.
const ZERO_PROBES: u64 = 16384;

/// Pages of the last dirty harvest compressed to measure the ratio.
const COMPRESS_PROBES: usize = 512;

/// Samples the dirty rate over `window` with the VM running (dirty logging on just for that).
pub fn sample(vm: &dyn MigratableVm, window: Duration) -> Result<Sample> {
    sample_with(vm, window, &Params::default())
}

/// As [`sample`]; with multifd compression in `p`, also measures the compression ratio and
/// speed on pages the guest dirtied during the window.
pub fn sample_with(vm: &dyn MigratableVm, window: Duration, p: &Params) -> Result<Sample> {
    let t_scan = Instant::now();
    let regions = vm.ram_regions();
    let pop: Vec<Vec<u64>> = regions.iter().map(populated_pages).collect();
    let setup_s = t_scan.elapsed().as_secs_f64();
    let populated: u64 = pop.iter().map(|b| count(b)).sum();
    let data_pages = estimate_data_pages(&regions, &pop, populated);
    let total: u64 = regions.iter().map(|r| r.size / PAGE_SIZE as u64).sum();
    vm.set_dirty_logging(true).map_err(MigrationError::Vm)?;
    let mut probe: Vec<u8> = Vec::new();
    let res = (|| -> Result<(f64, f64, u64)> {
        vm.take_dirty().map_err(MigrationError::Vm)?;
        let t0 = Instant::now();
        std::thread::sleep(window.mul_f64(1.0 - RATE_SHARE));
        let mut seen = vm.take_dirty().map_err(MigrationError::Vm)?;
        let t1 = Instant::now();
        std::thread::sleep(window.mul_f64(RATE_SHARE));
        let last = vm.take_dirty().map_err(MigrationError::Vm)?;
        let n_last = last.iter().map(|b| count(b)).sum::<u64>();
        let rate = n_last as f64 / t1.elapsed().as_secs_f64().max(1e-6);
        if p.multifd && p.multifd_compression != crate::stats::Compression::None {
            probe = dirty_probe(&regions, &last, n_last);
        }
        for (a, b) in seen.iter_mut().zip(&last) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= *y;
            }
        }
        let union = seen.iter().map(|b| count(b)).sum::<u64>();
        Ok((t0.elapsed().as_secs_f64(), rate, union))
    })();
    let _ = vm.set_dirty_logging(false);
    let (window_s, rate_pages_s, dirty_pages) = res?;
    let (mut compress_ratio, mut compress_bps) = (1.0, f64::INFINITY);
    if !probe.is_empty() {
        let (out, secs) = crate::multifd::compress_probe(p.multifd_compression, p.multifd_zstd_level, p.multifd_zlib_level, &probe)?;
        compress_ratio = out as f64 / probe.len() as f64;
        compress_bps = probe.len() as f64 / secs.max(1e-6);
    }
    // At the measured rate the whole window would have found this many distinct pages;
    // far fewer means the guest keeps rewriting a set that small.
    let working_set = (rate_pages_s * window_s > 1.25 * dirty_pages as f64 && dirty_pages > 0).then_some(dirty_pages);
    Ok(Sample {
        window_s,
        dirty_pages,
        rate_pages_s,
        working_set,
        populated_pages: populated,
        data_pages,
        total_pages: total,
        setup_s,
        compress_ratio,
        compress_bps,
    })
}

/// Copies up to [`COMPRESS_PROBES`] non-zero dirty pages, evenly spread over the `n` marked.
fn dirty_probe(regions: &[crate::RamRegion], marks: &[Vec<u64>], n: u64) -> Vec<u8> {
    let step = n.div_ceil(COMPRESS_PROBES as u64).max(1);
    let mut out = Vec::with_capacity(COMPRESS_PROBES * PAGE_SIZE);
    let mut seen = 0u64;
    for (r, bits) in regions.iter().zip(marks) {
        let npages = (r.size / PAGE_SIZE as u64) as usize;
        let mut p = 0;
        while let Some(i) = crate::ram::next_set(bits, p, npages) {
            p = i + 1;
            seen += 1;
            if (seen - 1) % step != 0 || out.len() >= COMPRESS_PROBES * PAGE_SIZE {
                continue;
            }
            // SAFETY: a page inside a live RAM region; a racy read only makes this an estimate.
            let page = unsafe { std::slice::from_raw_parts((r.host + (i * PAGE_SIZE) as u64) as *const u8, PAGE_SIZE) };
            if !vmstate::ram::is_zero_page(page) {
                out.extend_from_slice(page);
            }
        }
    }
    out
}

/// Looks at up to [`ZERO_PROBES`] populated pages, evenly spread, and scales the share that
/// holds data (zero pages are not sent).
fn estimate_data_pages(regions: &[crate::RamRegion], pop: &[Vec<u64>], populated: u64) -> u64 {
    if populated == 0 {
        return 0;
    }
    let step = populated.div_ceil(ZERO_PROBES).max(1);
    let (mut seen, mut probed, mut data) = (0u64, 0u64, 0u64);
    for (r, bits) in regions.iter().zip(pop) {
        for (w, &word) in bits.iter().enumerate() {
            let mut m = word;
            while m != 0 {
                let b = m.trailing_zeros() as u64;
                m &= m - 1;
                if seen % step == 0 {
                    let host = r.host + (w as u64 * 64 + b) * PAGE_SIZE as u64;
                    // SAFETY: a populated page inside a live RAM region; read-only, racy with
                    // the running guest, which only makes this an estimate.
                    let page = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE_SIZE) };
                    probed += 1;
                    if !vmstate::ram::is_zero_page(page) {
                        data += 1;
                    }
                }
                seen += 1;
            }
        }
    }
    (populated as f64 * data as f64 / probed.max(1) as f64).round() as u64
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

/// Simulates the sender's rounds with the sender's own rules (see `sender.rs`): stop once the
/// rest fits the limit and either fits a quarter of it or stopped shrinking by a quarter;
/// auto-converge (`auto`) steps the throttle when the distinct dirty bytes per round-time
/// exceed half the bandwidth twice in a row, and a throttle of p % leaves the guest
/// (100 - p) % of its rate.
pub fn predict(s: &Sample, bandwidth: f64, p: &Params, auto: bool) -> Prediction {
    let page = PAGE_SIZE as f64;
    let limit_s = p.downtime_limit_ms as f64 / 1000.0;
    let cap = s.cap();
    // In page bytes per second: compression stretches the link, the channel threads cap it.
    let bandwidth = s.page_bandwidth(bandwidth, p);
    let mut t = s.data_pages as f64 * page / bandwidth + ROUND_OVERHEAD_S;
    let mut total = s.setup_s + t;
    let (mut throttle, mut outrun, mut prev) = (0u8, 0u32, None::<f64>);
    for round in 1..=MAX_ROUNDS {
        let r = s.rate_pages_s * (1.0 - throttle as f64 / 100.0);
        let dirty = (r * t).min(cap);
        let send_s = dirty * page / bandwidth;
        let shrinking = prev.is_none_or(|p| dirty < 0.75 * p);
        if send_s <= limit_s && (send_s <= limit_s / 4.0 || !shrinking || round > 30) {
            let down = send_s + SWITCHOVER_S;
            return Prediction { converges: true, rounds: round, total_ms: (total + down) * 1e3, downtime_ms: down * 1e3, throttle };
        }
        prev = Some(dirty);
        if auto {
            outrun = if dirty * page / t > 0.5 * bandwidth { outrun + 1 } else { 0 };
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
        Sample::simple(1.0, (dirty_mib_s * 256.0) as u64, populated_mib * 256, 1 << 18)
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

    #[test]
    fn compression_and_channels_stretch_the_link() {
        let mut p = Params::default();
        // 130 MiB/s over a 1 Gbit/s link (125 MB/s): plain pre-copy cannot keep up.
        let mut sm = s(130.0, 256);
        let plain = predict(&sm, 125e6, &p, false);
        assert!(!plain.converges, "{plain:?}");
        // Pages compressing to a quarter, one fast thread: 4x the link, converges.
        p.multifd = true;
        p.multifd_compression = crate::stats::Compression::Zstd;
        p.multifd_channels = 1;
        sm.compress_ratio = 0.25;
        sm.compress_bps = 2e9;
        let zstd = predict(&sm, 125e6, &p, false);
        assert!(zstd.converges, "{zstd:?}");
        // A slow compressor caps it: one 100 MB/s thread cannot, four can.
        sm.compress_bps = 100e6;
        assert!(!predict(&sm, 125e6, &p, false).converges);
        p.multifd_channels = 4;
        assert!(predict(&sm, 125e6, &p, false).converges);
        // Without compression multifd does not change the link.
        p.multifd_compression = crate::stats::Compression::None;
        assert!(!predict(&sm, 125e6, &p, false).converges);
        assert_eq!(sm.page_bandwidth(125e6, &p), 125e6);
    }
}
