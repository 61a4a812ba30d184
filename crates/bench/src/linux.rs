//! Linux under both VMMs, moved while it boots (issue 15, part 4): the Linux kit's kernel,
//! command line and initramfs (`scripts/linux-kit.sh`; on this host's `kvm_pvm` KVM with the
//! host profile), `-m 256`, booted by Godwit and by QEMU (microvm, PVH entry), each live-migrated
//! over loopback when the kernel prints its SLUB line, the destination carrying on to `Run /init`.
//!
//! Per run: wall time from spawn to each milestone (banner, SLUB set-up, initramfs unpack,
//! `Run /init`), the migration's total time and downtime as the VMM reports them, the gap the
//! harness saw between the source's last kernel line and the destination's first, and whether the
//! kernel log up to `/init` is clean (no RCU stall, lockup, clocksource-watchdog complaint,
//! Oops, BUG or WARNING). Boots take minutes of interpreted kernel code here: this scenario runs
//! only when asked for by name (`--only linux`), one run per VMM unless `--runs` says more.

use crate::vm::{free_port, BenchError, Bins, Hmp, Proc, Res, Spec, Vmm};
use bench::results::Metric;
use bench::hmptext::{migration_status, number};
use bench::linuxlog::{bad, kit_fields, up_to, BANNER, INIT, SLUB, UNPACK};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const STAGE: Duration = Duration::from_secs(1800);
const T: Duration = Duration::from_secs(60);
/// What `scripts/linux-kit.sh` printed.
pub struct Kit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub profile: String,
}

/// Builds (or reuses) the kit in `dir`.
pub fn kit(dir: &Path) -> Res<Kit> {
    let out = std::process::Command::new("bash")
        .arg("scripts/linux-kit.sh")
        .arg(dir)
        .output()
        .map_err(|e| BenchError::Io("bash scripts/linux-kit.sh".into(), e))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(BenchError::Failed(format!(
            "scripts/linux-kit.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let kv = kit_fields(&text);
    let get = |k: &str| {
        kv.get(k)
            .map(|v| v.to_string())
            .ok_or_else(|| BenchError::Failed(format!("the kit printed no {k}=")))
    };
    Ok(Kit {
        kernel: get("kernel")?.into(),
        initrd: get("initrd")?.into(),
        append: get("append")?,
        profile: get("profile")?,
    })
}

#[derive(Debug, Default, Clone)]
pub struct Run {
    pub banner_s: f64,
    pub slub_s: f64,
    pub unpack_s: f64,
    pub init_s: f64,
    pub total_ms: f64,
    pub downtime_ms: f64,
    /// Source's last kernel line → destination's first, as the harness read them.
    pub gap_ms: f64,
    pub clean: bool,
    pub bad_line: Option<String>,
}

fn spec(kit: &Kit, smp: u32, monitor: Option<PathBuf>, incoming: Option<String>) -> Spec {
    Spec {
        mem_mib: 256,
        smp,
        append: kit.append.clone(),
        monitor,
        incoming,
        kernel: Some(kit.kernel.clone()),
        initrd: Some(kit.initrd.clone()),
        no_reboot: true,
        ..Default::default()
    }
}

fn first_bad(lines: &[(Instant, String)]) -> Option<String> {
    let text: Vec<&str> = lines.iter().map(|(_, l)| l.as_str()).collect();
    up_to(&text, Some(INIT)).iter().find(|l| bad(l).is_some()).map(|l| l.to_string())
}

pub fn run(bins: &Bins, vmm: Vmm, kit: &Kit, smp: u32, dir: &Path) -> Res<Run> {
    let name = vmm.name();
    let mon = dir.join(format!("{name}-linux-src.sock"));
    let dmon = dir.join(format!("{name}-linux-dst.sock"));
    let _ = std::fs::remove_file(&mon);
    let _ = std::fs::remove_file(&dmon);
    let mut src = Proc::spawn(bins, vmm, &spec(kit, smp, Some(mon.clone()), None), &format!("{name}-linux-src"))?;
    let t0 = src.started;
    let secs = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let mut out = Run { banner_s: secs(src.wait_for(BANNER, STAGE)?.0), ..Default::default() };
    let mut hmp = Hmp::connect(&mon, vmm, &format!("{name}-linux-src monitor"), T)?;
    out.slub_s = secs(src.wait_for(SLUB, STAGE)?.0);

    let port = free_port()?;
    let incoming = Some(format!("tcp:127.0.0.1:{port}"));
    let dst_mon = (vmm == Vmm::Qemu).then(|| dmon.clone());
    let mut dst = Proc::spawn(bins, vmm, &spec(kit, smp, dst_mon, incoming), &format!("{name}-linux-dst"))?;
    match vmm {
        Vmm::Godwit => dst.wait_stderr("waiting for an incoming migration", T)?,
        Vmm::Qemu => {
            let mut h = Hmp::connect(&dmon, vmm, "qemu-linux-dst monitor", T)?;
            if !h.cmd("info status")?.contains("inmigrate") {
                return Err(BenchError::Failed("qemu destination not waiting".into()));
            }
        }
    }
    let a = hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{port}"))?;
    if a.to_ascii_lowercase().contains("error") {
        return Err(BenchError::Failed(format!("migrate: {a}")));
    }
    let started = Instant::now();
    let info = loop {
        std::thread::sleep(Duration::from_millis(25));
        let info = hmp.cmd("info migrate")?;
        match migration_status(&info).and_then(|s| s.split_whitespace().next()) {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => {
                return Err(BenchError::Failed(format!("{name} migration: {}", info.trim())))
            }
            _ if started.elapsed() > Duration::from_secs(600) => {
                return Err(BenchError::Failed(format!("{name} migration did not settle: {}", info.trim())))
            }
            _ => {}
        }
    };
    out.total_ms = number(&info, "total time").unwrap_or(f64::NAN);
    out.downtime_ms = number(&info, "downtime").unwrap_or(f64::NAN);
    let (t_dst, _) = dst.wait_line("first output after migration", STAGE, |_| true)?;
    hmp.quit();
    src.finish(Duration::from_secs(10));
    let t_src = src.lines.last().map(|(t, _)| *t).unwrap_or(t0);
    out.gap_ms = t_dst.saturating_duration_since(t_src).as_secs_f64() * 1000.0;
    out.unpack_s = secs(dst.wait_for(UNPACK, STAGE)?.0);
    out.init_s = secs(dst.wait_for(INIT, STAGE)?.0);
    let all: Vec<(Instant, String)> = src.lines.iter().chain(dst.lines.iter()).cloned().collect();
    out.bad_line = first_bad(&all);
    out.clean = out.bad_line.is_none();
    dst.quit();
    Ok(out)
}

/// `linux`: `runs` boots per VMM and vCPU count (1 and 2), alternating which VMM goes first.
pub fn run_all(runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, c: &mut crate::Collect, metrics: &mut Vec<Metric>) {
    let kit_dir = Path::new(&std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("linux-kit");
    let kit = match kit(&kit_dir) {
        Ok(k) => k,
        Err(e) => {
            c.notes.push(format!("linux: no Linux kit: {e}"));
            return;
        }
    };
    for smp in [1u32, 2] {
        let k = format!("linux-smp{smp}");
        for i in 0..runs {
            for vmm in crate::order(i, sides) {
                eprint!("[{k} {}/{runs}] {:<6} ", i + 1, vmm.name());
                match run(bins, vmm, &kit, smp, dir) {
                    Ok(r) => {
                        eprintln!(
                            "banner {:.1} s, SLUB {:.1} s, unpack {:.1} s, /init {:.1} s; migration at SLUB: total {:.0} ms, downtime {:.1} ms, gap {:.1} ms; log {}",
                            r.banner_s, r.slub_s, r.unpack_s, r.init_s, r.total_ms, r.downtime_ms, r.gap_ms,
                            r.bad_line.as_deref().map_or("clean".to_string(), |l| format!("NOT clean: {l}"))
                        );
                        for (m, v) in [("banner", r.banner_s), ("slub", r.slub_s), ("unpack", r.unpack_s), ("init", r.init_s), ("total", r.total_ms), ("downtime", r.downtime_ms), ("gap", r.gap_ms)] {
                            c.add(&format!("{k}/{m}"), vmm, v);
                        }
                        c.flag(&format!("{k}/clean"), vmm, r.clean);
                    }
                    Err(e) => {
                        eprintln!("FAILED: {e}");
                        c.failed(&k, vmm, &e);
                    }
                }
            }
        }
        let scen = format!(
            "Linux ({} profile) -smp {smp} -m 256, live-migrated when SLUB is set up, to Run /init",
            kit.profile
        );
        for (m, label, unit) in [
            ("banner", "spawn → kernel banner", "s"),
            ("slub", "spawn → SLUB set-up (migration starts)", "s"),
            ("unpack", "spawn → initramfs unpack (on the destination)", "s"),
            ("init", "spawn → Run /init (on the destination)", "s"),
            ("total", "migration total time", "ms"),
            ("downtime", "migration downtime (VMM's report)", "ms"),
            ("gap", "source's last kernel line → destination's first (harness)", "ms"),
        ] {
            let mut r = c.metric(&k, m, label, unit);
            r.scenario = scen.clone();
            metrics.push(r);
        }
        let mut r = c.metric(&k, "clean", "kernel log clean up to /init (no stall, lockup, Oops, BUG, WARNING)", "runs").fraction();
        r.scenario = scen;
        metrics.push(r);
    }
}
