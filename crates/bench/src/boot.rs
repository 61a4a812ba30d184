//! Boot (issue 2): process start → the guest's `GUEST READY` line as the harness reads it, and
//! the RSS of a 1 GiB guest once it has written 64 MiB (RAM must be allocated lazily: RSS
//! should be near 64 MiB plus the VMM's own, not 1 GiB).

use crate::vm::{Bins, Proc, Res, Spec, Vmm};
use std::time::Duration;

pub const MEM_MIB: u64 = 1024;
pub const SMP: u32 = 2;
pub const TOUCH_MIB: u64 = 64;

#[derive(Debug, Clone, Default)]
pub struct Run {
    pub ready_ms: f64,
    pub rss_mib: f64,
}

pub fn run(bins: &Bins, vmm: Vmm) -> Res<Run> {
    // The region is written at 256 MiB/s: touched within a fraction of a second, and the
    // rewriting after that costs the host little.
    let spec = Spec {
        mem_mib: MEM_MIB,
        smp: SMP,
        append: format!("mode=dirty mib={TOUCH_MIB} rate=256 cpus={SMP}"),
        ..Default::default()
    };
    let mut p = Proc::spawn(bins, vmm, &spec, &format!("{}-boot", vmm.name()))?;
    let (t, _) = p.wait_for("GUEST READY", Duration::from_secs(60))?;
    let ready_ms = t.duration_since(p.started).as_secs_f64() * 1000.0;
    p.wait_dirtied(TOUCH_MIB * 256, Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(200));
    let rss_mib = p.rss_mib()?;
    p.quit();
    Ok(Run { ready_ms, rss_mib })
}
