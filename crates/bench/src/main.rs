//! `godwit-bench`: the side-by-side benchmark suite (Godwit vs QEMU on the same PVH test guest).
//! Each scenario runs for both VMMs with the same `-m`, `-smp`, workload, downtime limit and
//! bandwidth cap, alternating which goes first, N runs each; the results go to stdout and
//! `bench/results/` as Markdown and JSON, with the charts of Godwit's migration reports.
//! `bench/run.sh` builds the workspace and runs this; see `bench/README.md`.

mod boot;
mod ceiling;
mod disk;
mod forecast;
mod libvirt;
mod links;
mod linux;
mod migrate;
mod nfsdisk;
mod snapshot;
mod storage;
mod vm;

use bench::results::{markdown, Host, Metric, Results};
use clap::Parser;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vm::{BenchError, Bins, Vmm};

const SCENARIOS: &[&str] = &[
    "boot",
    "mig-idle",
    "mig-dirty",
    "mig-4g",
    "mig-16g",
    "mig-64g",
    "mig-noconv",
    "mig-postcopy",
    "mig-autoconv",
    "forecast",
    "snapshot",
    "disk",
    "storage",
    "storage-inc",
    // Only when asked for by name (needs root for network namespaces; ~15 min): see links.rs.
    "links",
    // Only when asked for by name (root, nfs-ganesha): the disk on an NFS server, see nfsdisk.rs.
    "nfs",
    // Only when asked for by name (root, libvirt 9.0): virsh migrate, see libvirt.rs.
    "libvirt",
    // Only when asked for by name (boots Linux for minutes per run here): see linux.rs.
    "linux",
];

#[derive(Parser, Debug)]
#[command(
    name = "godwit-bench",
    about = "Godwit vs QEMU on the same test guest (see bench/README.md)"
)]
struct Args {
    /// Runs per VMM and scenario (alternating Godwit and QEMU).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Only these scenarios (comma-separated): boot, mig-idle, mig-dirty, mig-4g, mig-16g, mig-64g, mig-noconv,
    /// mig-postcopy, mig-autoconv, forecast, snapshot, disk.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only one side: godwit or qemu (for trying things out; the table needs both).
    #[arg(long)]
    vmm: Option<String>,
    /// Time budget for the non-converging migration before `migrate_cancel`, in seconds.
    #[arg(long, default_value_t = 8)]
    noconv_budget: u64,
    /// The downtime limit given to both VMMs, in ms.
    #[arg(long, default_value_t = 30)]
    downtime_limit: u64,
    /// Seconds a migration across a shaped link (`--only links`) gets before `migrate_cancel`.
    #[arg(long, default_value_t = 30)]
    links_budget: u64,
    /// Which shaped-link cases (comma-separated): near1 (1 Gbit/s, guest at 100 MiB/s), max10
    /// (10 Gbit/s, guest as fast as it can), above1 (1 Gbit/s, guest at 150 MiB/s). Default all.
    #[arg(long, value_delimiter = ',')]
    links_cases: Vec<String>,
    /// Which modes (comma-separated): plain, multifd, zstd, tls. Default all.
    #[arg(long, value_delimiter = ',')]
    links_modes: Vec<String>,
    /// Where the results and charts go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// qemu-system-x86_64 to compare with (default: from PATH).
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Directory with godwit, godwit-guest and godwit-img (default: this program's own).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn fail(msg: &str) -> ! {
    eprintln!("godwit-bench: {msg}");
    std::process::exit(2)
}

fn bins(a: &Args) -> Bins {
    let dir = a.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let need = |n: &str| {
        let p = dir.join(n);
        if !p.is_file() {
            fail(&format!("{} is missing: build first (bench/run.sh runs `cargo build --release --workspace`)", p.display()));
        }
        p
    };
    let qemu = match &a.qemu {
        Some(q) if q.is_file() => q.clone(),
        Some(q) => fail(&format!("--qemu {}: no such file", q.display())),
        None => find_in_path("qemu-system-x86_64").unwrap_or_else(|| {
            fail("qemu-system-x86_64 not found in PATH: install QEMU with `apt-get install qemu-system-x86` (Debian/Ubuntu) or pass --qemu PATH")
        }),
    };
    Bins {
        godwit: need("godwit"),
        guest: need("godwit-guest"),
        godwit_img: need("godwit-img"),
        qemu,
        qemu_img: find_in_path("qemu-img"),
    }
}

fn host(b: &Bins) -> Host {
    let first_line = |prog: &Path, args: &[&str]| {
        std::process::Command::new(prog)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let git = Path::new("git");
    let mut commit = first_line(git, &["rev-parse", "--short", "HEAD"]);
    if !first_line(git, &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        commit += " (work tree modified)";
    }
    Host {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        qemu_version: first_line(&b.qemu, &["--version"])
            .replace("QEMU emulator version ", "QEMU "),
        godwit_commit: commit,
    }
}

/// Samples per metric and VMM, plus notes.
#[derive(Default)]
struct Collect {
    samples: BTreeMap<(String, Vmm), Vec<f64>>,
    notes: Vec<String>,
    /// (scenario, vmm) → why it has no value.
    na: BTreeMap<(String, Vmm), String>,
    failures: BTreeMap<(String, Vmm), (usize, String)>,
}

impl Collect {
    fn add(&mut self, key: &str, vmm: Vmm, v: f64) {
        self.samples
            .entry((key.to_string(), vmm))
            .or_default()
            .push(v);
    }
    fn get(&self, key: &str, vmm: Vmm) -> Vec<f64> {
        self.samples
            .get(&(key.to_string(), vmm))
            .cloned()
            .unwrap_or_default()
    }
    fn metric(&self, scen: &str, key: &str, label: &str, unit: &str) -> Metric {
        let k = format!("{scen}/{key}");
        let mut m = Metric::new(
            scen,
            label,
            unit,
            &self.get(&k, Vmm::Godwit),
            &self.get(&k, Vmm::Qemu),
        );
        for v in [Vmm::Godwit, Vmm::Qemu] {
            if let Some(n) = self.na.get(&(scen.to_string(), v)) {
                let prev = m.note.take().map(|p| format!("{p}; ")).unwrap_or_default();
                m = m.note(format!("{prev}{} n/a: {n}", v.name()));
            }
        }
        m
    }
    fn flag(&mut self, key: &str, vmm: Vmm, b: bool) {
        self.add(key, vmm, if b { 1.0 } else { 0.0 });
    }
    fn failed(&mut self, scen: &str, vmm: Vmm, e: &BenchError) {
        let f = self
            .failures
            .entry((scen.to_string(), vmm))
            .or_insert((0, e.to_string()));
        f.0 += 1;
    }
}

fn order(i: usize, sides: &[Vmm]) -> Vec<Vmm> {
    let mut v = sides.to_vec();
    if i % 2 == 1 {
        v.reverse();
    }
    v
}

fn mig_cases(a: &Args) -> Vec<(migrate::Case, &'static str)> {
    let base = |key, mem, workload: &str, touch_mib: u64| migrate::Case {
        key,
        mem_mib: mem,
        smp: 2,
        workload: workload.to_string(),
        touch_pages: touch_mib * 256,
        downtime_limit_ms: a.downtime_limit,
        max_bandwidth_mib: 0,
        budget: Duration::from_secs(120),
        postcopy: false,
        setup: Vec::new(),
        forecast: false,
    };
    vec![
        (base("mig-idle", 1024, "mode=idle", 0), "idle 1 GiB guest"),
        (
            base("mig-dirty", 1024, "mode=dirty mib=256 rate=100", 256),
            "1 GiB guest, 256 MiB rewritten at 100 MiB/s",
        ),
        (
            base("mig-4g", 4096, "mode=dirty mib=32 rate=16", 32),
            "4 GiB guest, mostly idle (32 MiB rewritten at 16 MiB/s)",
        ),
        (
            base("mig-16g", 16384, "mode=dirty mib=64 rate=16", 64),
            "16 GiB guest, 64 MiB touched (rewritten at 16 MiB/s)",
        ),
        (
            base("mig-64g", 65536, "mode=dirty mib=64 rate=16", 64),
            "64 GiB guest, 64 MiB touched (rewritten at 16 MiB/s)",
        ),
        (
            migrate::Case {
                max_bandwidth_mib: 16,
                budget: Duration::from_secs(a.noconv_budget),
                ..base("mig-noconv", 1024, "mode=dirty mib=24 rate=64", 24)
            },
            "1 GiB guest rewriting 24 MiB at 64 MiB/s, max-bandwidth 16 MiB/s",
        ),
        (
            migrate::Case {
                max_bandwidth_mib: 16,
                postcopy: true,
                ..base("mig-postcopy", 1024, "mode=dirty mib=24 rate=64", 24)
            },
            "the same non-converging guest with post-copy (postcopy-ram, migrate_start_postcopy after the first full pass)",
        ),
        (
            migrate::Case {
                max_bandwidth_mib: 16,
                setup: autoconv_setup(),
                budget: Duration::from_secs(90),
                ..base("mig-autoconv", 1024, "mode=dirty mib=24 rate=64", 24)
            },
            "the same non-converging guest with auto-converge (cpu-throttle-initial 50, increment 20)",
        ),
    ]
}

/// Auto-converge as both VMMs take it: the capability and QEMU's throttle parameters.
pub fn autoconv_setup() -> Vec<String> {
    vec![
        "migrate_set_capability auto-converge on".into(),
        "migrate_set_parameter cpu-throttle-initial 50".into(),
        "migrate_set_parameter cpu-throttle-increment 20".into(),
    ]
}

fn run_migrations(
    a: &Args,
    b: &Bins,
    sides: &[Vmm],
    dir: &Path,
    only: &dyn Fn(&str) -> bool,
    c: &mut Collect,
    metrics: &mut Vec<Metric>,
) {
    for (case, title) in mig_cases(a) {
        if !only(case.key) {
            continue;
        }
        let k = case.key;
        let mut last_report: Option<PathBuf> = None;
        let mut ceil = Vec::new();
        let mut touch = Vec::new();
        for i in 0..a.runs {
            if k == "mig-dirty" {
                // The ceiling, measured in the same run as the streams it bounds.
                match ceiling::loopback_mibs(1 << 30) {
                    Ok(v) => ceil.push(v),
                    Err(e) => c.notes.push(format!("loopback ceiling: {e}")),
                }
                match ceiling::first_touch_mibs(256 << 20) {
                    Ok(v) => touch.push(v),
                    Err(e) => c.notes.push(format!("first-touch ceiling: {e}")),
                }
            }
            for vmm in order(i, sides) {
                eprint!("[{k} {}/{}] {:<6} ", i + 1, a.runs, vmm.name());
                match migrate::run(b, vmm, &case, dir, i) {
                    Ok(r) => {
                        if r.converged {
                            eprintln!(
                                "total {:.0} ms, downtime {:.2} ms (heartbeat gap {:.2} ms), {:.1} MiB, {} syncs, ledger {}",
                                r.total_ms,
                                r.downtime_ms,
                                r.hb_gap_ms,
                                r.transferred_mib,
                                r.dirty_syncs,
                                if r.ledger_ok { "OK" } else { "BAD" }
                            );
                            c.add(&format!("{k}/total"), vmm, r.total_ms);
                            c.add(&format!("{k}/downtime"), vmm, r.downtime_ms);
                            c.add(&format!("{k}/gap"), vmm, r.hb_gap_ms);
                            c.add(&format!("{k}/mib"), vmm, r.transferred_mib);
                            c.add(&format!("{k}/syncs"), vmm, r.dirty_syncs);
                            c.add(&format!("{k}/tput"), vmm, r.throughput_mibs);
                            c.add(&format!("{k}/rss-src"), vmm, r.src_rss_mib);
                            c.add(&format!("{k}/rss-dst"), vmm, r.dst_rss_mib);
                            if case.postcopy {
                                c.add(&format!("{k}/requests"), vmm, r.postcopy_requests);
                            }
                            c.flag(&format!("{k}/seq"), vmm, r.seq_ok);
                            if !r.seq_ok {
                                eprintln!("    heartbeat sequence broken: {}", r.seq_detail);
                                c.notes.push(format!(
                                    "{k}: {} run {}: heartbeat sequence broken: {}",
                                    vmm.name(),
                                    i + 1,
                                    r.seq_detail
                                ));
                            }
                        } else {
                            eprintln!(
                                "not converged in {:.0} ms: {} syncs, {:.1} MiB sent; cancel {:.0} ms, source {}, ledger {}",
                                r.total_ms,
                                r.dirty_syncs,
                                r.transferred_mib,
                                r.cancel_ms,
                                if r.source_running_after_cancel { "running" } else { "NOT running" },
                                if r.ledger_ok { "OK" } else { "BAD" }
                            );
                            c.add(&format!("{k}/syncs"), vmm, r.dirty_syncs);
                            c.add(&format!("{k}/mib"), vmm, r.transferred_mib);
                            c.add(&format!("{k}/cancel"), vmm, r.cancel_ms);
                            c.flag(&format!("{k}/running"), vmm, r.source_running_after_cancel);
                        }
                        c.flag(&format!("{k}/converged"), vmm, r.converged);
                        c.flag(&format!("{k}/ledger"), vmm, r.ledger_ok);
                        if let Some(p) = r.report.filter(|p| p.is_file()) {
                            last_report = Some(p);
                        }
                    }
                    Err(e) => {
                        eprintln!("FAILED: {e}");
                        c.failed(k, vmm, &e);
                    }
                }
            }
        }
        let m = |key: &str, label: &str, unit: &str| c.metric(k, key, label, unit);
        let scen = format!("{k}: {title}");
        let mut rows = if k == "mig-noconv" {
            vec![
                m(
                    "converged",
                    &format!("converged within the {} s budget", a.noconv_budget),
                    "runs",
                )
                .fraction(),
                m("syncs", "dirty syncs before cancel", "count"),
                m("mib", "sent before cancel", "MiB"),
                m("cancel", "migrate_cancel → cancelled (polled)", "ms"),
                m("running", "source running after cancel", "runs").fraction(),
                m("ledger", "source LEDGER OK after cancel", "runs").fraction(),
            ]
        } else {
            let mut v = vec![
                m("total", "total time (reported)", "ms"),
                m("downtime", "downtime (reported)", "ms"),
                m(
                    "gap",
                    "downtime seen by the guest (heartbeat gap, 2 ms period)",
                    "ms",
                ),
                m("mib", "RAM transferred (reported)", "MiB"),
                m("syncs", "dirty syncs (reported)", "count"),
                m("seq", "heartbeat seq continues on destination", "runs").fraction(),
                m("ledger", "destination LEDGER OK", "runs").fraction(),
            ];
            if k == "mig-16g" || k == "mig-64g" || k == "mig-4g" {
                v.push(m("rss-src", "source RSS when completed", "MiB"));
                v.push(m("rss-dst", "destination RSS when completed", "MiB"));
            }
            if k == "mig-autoconv" {
                v.insert(0, m("converged", "converged (within 90 s)", "runs").fraction());
            }
            if case.postcopy {
                v.push(m("requests", "pages requested by the destination (postcopy request count)", "count"));
            }
            if k == "mig-dirty" {
                v.push(m(
                    "tput",
                    "stream throughput (transferred ÷ total time)",
                    "MiB/s",
                ));
                v.push(
                    Metric::new(
                        k,
                        "loopback TCP copy, 1 MiB buffers (ceiling, same run)",
                        "MiB/s",
                        &ceil,
                        &ceil,
                    )
                    .note("one measurement, shown in both columns"),
                );
                v.push(
                    Metric::new(
                        k,
                        "first write to 256 MiB of fresh memory (round 0's other ceiling, same run)",
                        "MiB/s",
                        &touch,
                        &touch,
                    )
                    .note("one measurement, shown in both columns: every page of a first pass lands in memory the destination never touched"),
                );
            }
            v
        };
        for r in &mut rows {
            r.scenario = scen.clone();
        }
        metrics.extend(rows);
        if let Some(p) = last_report {
            chart(a, k, title, &p, c);
        }
    }
}

/// Keeps Godwit's last report of a scenario and draws it.
fn chart(a: &Args, key: &str, title: &str, report: &Path, c: &mut Collect) {
    let json = a.out.join(format!("report-{key}.json"));
    if let Err(e) = std::fs::copy(report, &json) {
        c.notes.push(format!("cannot keep {}: {e}", json.display()));
        return;
    }
    let r = match bench::chart::Report::load(&json) {
        Ok(r) => r,
        Err(e) => return c.notes.push(e.to_string()),
    };
    for ext in ["svg", "png"] {
        let p = a.out.join(format!("chart-{key}.{ext}"));
        if let Err(e) = bench::chart::render(&r, &format!("Godwit live migration: {title}"), &p) {
            c.notes.push(format!("chart {}: {e}", p.display()));
        }
    }
}

fn main() {
    let a = Args::parse();
    for s in &a.only {
        if !SCENARIOS.contains(&s.as_str()) {
            fail(&format!(
                "unknown scenario {s:?} (known: {})",
                SCENARIOS.join(", ")
            ));
        }
    }
    if a.runs == 0 {
        fail("--runs must be at least 1");
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        fail(&format!("/dev/kvm is not usable ({e}): both VMMs need KVM"));
    }
    let sides: Vec<Vmm> = match a.vmm.as_deref() {
        None | Some("both") => vec![Vmm::Godwit, Vmm::Qemu],
        Some("godwit") => vec![Vmm::Godwit],
        Some("qemu") => vec![Vmm::Qemu],
        Some(o) => fail(&format!("--vmm {o}: godwit, qemu or both")),
    };
    let b = bins(&a);
    std::fs::create_dir_all(&a.out).unwrap_or_else(|e| fail(&format!("{}: {e}", a.out.display())));
    let dir = std::env::temp_dir().join(format!("godwit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(&format!("{}: {e}", dir.display())));
    let started = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let only = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let mut c = Collect::default();
    let mut metrics = Vec::new();

    if only("boot") {
        for i in 0..a.runs {
            for vmm in order(i, &sides) {
                match boot::run(&b, vmm) {
                    Ok(r) => {
                        eprintln!(
                            "[boot {}/{}] {:<6} GUEST READY after {:.1} ms, RSS {:.1} MiB",
                            i + 1,
                            a.runs,
                            vmm.name(),
                            r.ready_ms,
                            r.rss_mib
                        );
                        c.add("boot/ready", vmm, r.ready_ms);
                        c.add("boot/rss", vmm, r.rss_mib);
                    }
                    Err(e) => {
                        eprintln!("[boot {}/{}] {:<6} FAILED: {e}", i + 1, a.runs, vmm.name());
                        c.failed("boot", vmm, &e);
                    }
                }
            }
        }
        let scen = format!("boot: {} MiB, {} vCPUs", boot::MEM_MIB, boot::SMP);
        let mut r1 = c.metric("boot", "ready", "process start → GUEST READY", "ms");
        let mut r2 = c.metric(
            "boot",
            "rss",
            &format!("RSS after the guest wrote {} MiB", boot::TOUCH_MIB),
            "MiB",
        );
        r1.scenario = scen.clone();
        r2.scenario = scen;
        metrics.extend([r1, r2]);
    }

    run_migrations(&a, &b, &sides, &dir, &only, &mut c, &mut metrics);
    if only("forecast") && sides.contains(&Vmm::Godwit) {
        let budget = Duration::from_secs(a.noconv_budget);
        metrics.extend(forecast::run(&b, &dir, a.runs, a.downtime_limit, budget, &mut c.notes));
    }

    if only("snapshot") {
        for touch in [16u64, 512] {
            let k = format!("snap{touch}");
            for i in 0..a.runs {
                for vmm in order(i, &sides) {
                    if c.na.contains_key(&(k.clone(), vmm)) {
                        continue;
                    }
                    eprint!(
                        "[savevm/loadvm {touch} MiB {}/{}] {:<6} ",
                        i + 1,
                        a.runs,
                        vmm.name()
                    );
                    match snapshot::run(&b, vmm, touch, &dir) {
                        Ok(r) => {
                            eprintln!(
                                "savevm {:.0} ms (+{:.1} MiB), loadvm → heartbeat {:.1} ms, -loadvm start → heartbeat {:.1} ms, ledger {}",
                                r.savevm_ms,
                                r.growth_mib,
                                r.loadvm_ms,
                                r.cold_loadvm_ms,
                                if r.ledger_ok { "OK" } else { "BAD" }
                            );
                            c.add(&format!("{k}/savevm"), vmm, r.savevm_ms);
                            c.add(&format!("{k}/growth"), vmm, r.growth_mib);
                            c.add(&format!("{k}/loadvm"), vmm, r.loadvm_ms);
                            c.add(&format!("{k}/cold"), vmm, r.cold_loadvm_ms);
                            c.flag(&format!("{k}/ledger"), vmm, r.ledger_ok);
                        }
                        Err(BenchError::Unsupported(why)) => {
                            eprintln!("n/a: {why}");
                            c.na.insert((k.clone(), vmm), why);
                        }
                        Err(e) => {
                            eprintln!("FAILED: {e}");
                            c.failed(&k, vmm, &e);
                        }
                    }
                }
            }
            let scen = format!("savevm/loadvm: 1 GiB guest, {touch} MiB touched");
            let rows = [
                c.metric(&k, "savevm", "savevm (command → answer)", "ms"),
                c.metric(&k, "growth", "qcow2 image growth", "MiB"),
                c.metric(
                    &k,
                    "loadvm",
                    "loadvm → first heartbeat from the snapshot",
                    "ms",
                ),
                c.metric(&k, "cold", "start with -loadvm → first heartbeat", "ms"),
                c.metric(&k, "ledger", "LEDGER OK after both loads", "runs")
                    .fraction(),
            ];
            for mut r in rows {
                r.scenario = scen.clone();
                metrics.push(r);
            }
        }
    }

    if only("storage") {
        storage::run_all(a.runs, &b, &sides, &dir, &mut c, &mut metrics);
    }

    if only("storage-inc") {
        storage::run_all_top(a.runs, &b, &sides, &dir, &mut c, &mut metrics);
    }

    if only("disk") {
        disk::run_all(a.runs, &b, &sides, &dir, &mut c, &mut metrics);
    }

    if a.only.iter().any(|o| o == "libvirt") {
        libvirt::run_all(a.runs, &b, &sides, &dir, &mut c, &mut metrics);
    }

    if a.only.iter().any(|o| o == "linux") {
        linux::run_all(a.runs, &b, &sides, &dir, &mut c, &mut metrics);
    }

    if a.only.iter().any(|o| o == "nfs") {
        nfsdisk::run_all(a.runs, &b, &sides, &dir, &mut c, &mut metrics);
    }

    if a.only.iter().any(|o| o == "links") {
        let budget = Duration::from_secs(a.links_budget);
        for l in &a.links_cases {
            if !links::CASES.contains(&l.as_str()) {
                fail(&format!("--links-cases {l}: one of {}", links::CASES.join(", ")));
            }
        }
        for m in &a.links_modes {
            if !links::MODES.contains(&m.as_str()) {
                fail(&format!("--links-modes {m}: one of {}", links::MODES.join(", ")));
            }
        }
        let rows = links::run_all(a.runs, &b, &sides, &dir, budget, &a.links_cases, &a.links_modes);
        let md = links::markdown(&rows, budget);
        println!("{md}");
        let json = serde_json::to_string_pretty(&rows).unwrap_or_else(|e| fail(&e.to_string()));
        for (ext, body) in [("md", md), ("json", json)] {
            let p = a.out.join(format!("links.{ext}"));
            match std::fs::write(&p, body) {
                Ok(()) => eprintln!("wrote {}", p.display()),
                Err(e) => eprintln!("godwit-bench: cannot write {}: {e}", p.display()),
            }
        }
    }

    for ((scen, vmm), (n, first)) in &c.failures {
        c.notes.push(format!(
            "{scen}: {} failed {n} run(s); first error: {}",
            vmm.name(),
            first.replace('\n', " ")
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let results = Results {
        started_unix,
        duration_s: started.elapsed().as_secs_f64(),
        runs: a.runs,
        host: host(&b),
        metrics,
        notes: c.notes.clone(),
    };
    let md = markdown(&results);
    println!("{md}");
    let stem = if a.only.is_empty() && a.vmm.is_none() {
        "latest".to_string()
    } else {
        format!("partial-{}", a.only.join("+"))
    };
    let stem = stem.trim_end_matches('-').to_string();
    let json = serde_json::to_string_pretty(&results).unwrap_or_else(|e| fail(&e.to_string()));
    for (ext, body) in [("md", md), ("json", json)] {
        let p = a.out.join(format!("{stem}.{ext}"));
        if let Err(e) = std::fs::write(&p, body) {
            eprintln!("godwit-bench: cannot write {}: {e}", p.display());
        } else {
            eprintln!("wrote {}", p.display());
        }
    }
}
