//! `godwit-chaos`: the reliability campaign. Runs N live migrations of the test guest (memory
//! and, most of the time, disk workloads, on loopback) and injects one fault in each, chosen
//! at random from a seed that is printed and recorded, so any case can be replayed with
//! `--seed S --cases 1`. After every case it checks the invariant:
//!
//! - exactly one copy of the guest runs (never both: split brain; never neither, unless the
//!   fault killed the side that had it — or the source fenced itself, see below),
//! - the running copy answers `v` with `LEDGER OK` (and `DISK OK` when it has a disk),
//! - no VMM process is left behind and `qemu-img check` finds no corruption in the image.
//!
//! The fence: once the source has sent the final state it resumes only if the destination
//! said it failed; when the destination's answer is lost it stays paused (the guest might run
//! there). The campaign then acts as the operator: the destination is seen not running, so it
//! `cont`s the source and checks the ledger; such cases count as "fenced".
//!
//! Results: a table per fault kind (cases, survived, violations, recovery time = fault → the
//! surviving copy running again) in Markdown + JSON; every violation's logs are kept under
//! the output directory as a reproducer.

#[path = "vm.rs"]
#[allow(dead_code)]
mod vm;
#[path = "chaos_proxy.rs"]
mod proxy;
#[path = "chaos_load.rs"]
mod load;

use clap::Parser;
use proxy::{Direction, Fault, Mischief, Proxy};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vm::{Bins, Hmp, Proc, Res, Spec, Vmm};

#[derive(Parser, Debug)]
#[command(name = "godwit-chaos", about = "Live migrations under random faults, with the survival table")]
struct Args {
    /// Number of cases.
    #[arg(long, default_value_t = 200)]
    cases: u32,
    /// 20 cases (CI).
    #[arg(long)]
    quick: bool,
    /// First case's seed (case i uses seed + i); default: from the clock.
    #[arg(long)]
    seed: Option<u64>,
    /// Only this fault kind.
    #[arg(long)]
    only: Option<String>,
    /// Where the table and reproducers go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Directory with the built binaries (godwit, godwit-guest, godwit-img).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Exit non-zero when any case violated the invariant.
    #[arg(long)]
    strict: bool,
    /// Instead of fault cases: the load run, K guests moved at once there and back.
    #[arg(long)]
    load: Option<usize>,
}

/// splitmix64: a small, well-known generator, so a seed replays a case exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

const KINDS: &[&str] = &[
    "kill-src",
    "kill-dst",
    "cancel",
    "stop-dst",
    "proxy-truncate",
    "proxy-truncate-replies",
    "proxy-flip",
    "proxy-duplicate",
    "proxy-stall",
    "proxy-delay",
    "double-migrate",
    "garbage-monitor",
];

#[derive(Debug, Clone, serde::Serialize)]
struct Case {
    index: u32,
    seed: u64,
    kind: String,
    detail: String,
    disk: bool,
    /// survived | fenced | killed-with-guest | violation
    outcome: String,
    /// Which copy ran at the end: source | destination | none.
    runs: String,
    recovery_ms: Option<f64>,
    violation: Option<String>,
    secs: f64,
}

fn main() {
    let mut args = Args::parse();
    if args.quick {
        args.cases = 20;
    }
    let seed0 = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let bins = Bins {
        godwit: args.bin_dir.join("godwit"),
        guest: args.bin_dir.join("godwit-guest"),
        qemu: PathBuf::from("qemu-system-x86_64"),
        godwit_img: args.bin_dir.join("godwit-img"),
        qemu_img: Some(PathBuf::from("qemu-img")),
    };
    for b in [&bins.godwit, &bins.guest, &bins.godwit_img] {
        if !b.exists() {
            eprintln!("godwit-chaos: {} is missing: cargo build --release --workspace first", b.display());
            std::process::exit(2);
        }
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        eprintln!("godwit-chaos: /dev/kvm is missing or not read/writable: the campaign needs KVM");
        std::process::exit(2);
    }
    let _ = std::fs::create_dir_all(&args.out);
    if let Some(k) = args.load {
        match load::run(&bins, k) {
            Ok(report) => {
                println!("{report}");
                let _ = std::fs::write(args.out.join("chaos-load.md"), &report);
                let all_ok = report.matches(&format!("| {k}/{k} |")).count() == 2;
                std::process::exit(if all_ok { 0 } else { 1 });
            }
            Err(e) => {
                eprintln!("godwit-chaos --load {k}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!("godwit-chaos: {} cases, first seed {seed0} (replay one: --seed S --cases 1)", args.cases);
    let mut cases = Vec::new();
    for i in 0..args.cases {
        let seed = seed0.wrapping_add(i as u64);
        let mut rng = Rng(seed);
        let kind = match &args.only {
            Some(k) => k.clone(),
            None => KINDS[rng.below(KINDS.len() as u64) as usize].to_string(),
        };
        let t0 = Instant::now();
        let dir = std::env::temp_dir().join(format!("godwit-chaos-{}-{seed}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        let mut c = match run_case(&bins, &dir, &kind, &mut rng) {
            Ok(c) => c,
            Err(e) => Case {
                index: 0,
                seed,
                kind: kind.clone(),
                detail: String::new(),
                disk: false,
                outcome: "violation".into(),
                runs: "?".into(),
                recovery_ms: None,
                violation: Some(format!("harness: {e}")),
                secs: 0.0,
            },
        };
        c.index = i;
        c.seed = seed;
        c.secs = t0.elapsed().as_secs_f64();
        println!(
            "case {:>3} seed {seed} {:<24} {:<18} -> {:<17} runs={:<11} recovery={} {}",
            i,
            c.kind,
            c.detail,
            c.outcome,
            c.runs,
            c.recovery_ms.map(|r| format!("{r:.0} ms")).unwrap_or_else(|| "-".into()),
            c.violation.as_deref().unwrap_or("")
        );
        if c.violation.is_some() {
            let keep = args.out.join("chaos-repro").join(format!("seed-{seed}"));
            let _ = std::fs::create_dir_all(&keep);
            let _ = copy_logs(&dir, &keep);
            let _ = std::fs::write(keep.join("case.json"), serde_json::to_string_pretty(&c).unwrap_or_default());
        }
        let _ = std::fs::remove_dir_all(&dir);
        cases.push(c);
    }
    let table = render(&cases, seed0);
    println!("\n{table}");
    let name = if args.quick { "chaos-quick" } else { "chaos" };
    let _ = std::fs::write(args.out.join(format!("{name}.md")), &table);
    let _ = std::fs::write(args.out.join(format!("{name}.json")), serde_json::to_string_pretty(&cases).unwrap_or_default());
    let bad = cases.iter().filter(|c| c.violation.is_some()).count();
    if bad > 0 {
        println!("{bad} violation(s); reproducers in {}", args.out.join("chaos-repro").display());
        if args.strict {
            std::process::exit(1);
        }
    }
}

fn copy_logs(from: &Path, to: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(from)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "log") {
            std::fs::copy(&p, to.join(p.file_name().unwrap_or_default()))?;
        }
    }
    Ok(())
}

fn hmp_status(h: &mut Hmp) -> String {
    h.cmd("info status").unwrap_or_else(|e| format!("monitor error: {e}"))
}

fn mig_status(h: &mut Hmp) -> Option<String> {
    let t = h.cmd("info migrate").ok()?;
    // "failed (reason)" → "failed".
    t.lines()
        .find_map(|l| l.strip_prefix("Migration status: "))
        .and_then(|s| s.split_whitespace().next())
        .map(str::to_string)
}

fn kill(p: &Proc, sig: i32) {
    // SAFETY: signalling a child we spawned and still own.
    unsafe {
        libc::kill(p.pid() as i32, sig);
    }
}

/// Runs one case; errors are harness failures (counted as violations, with the message).
fn run_case(bins: &Bins, dir: &Path, kind: &str, rng: &mut Rng) -> Res<Case> {
    let disk = rng.chance(80) || kind == "proxy-truncate-replies" && rng.chance(50);
    let img = dir.join("vm.qcow2");
    if disk {
        let o = Command::new(&bins.godwit_img)
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("32M")
            .output()
            .map_err(|e| vm::BenchError::Io("godwit-img create".into(), e))?;
        if !o.status.success() {
            return Err(vm::BenchError::Failed(format!("godwit-img create: {}", String::from_utf8_lossy(&o.stderr))));
        }
    }
    // A stream of tens of MiB at a capped rate, so faults land in every phase (setup, the
    // rounds, the switchover, after completion) rather than after a 20 ms migration.
    let rate = [32u64, 64, 128][rng.below(3) as usize];
    let mib = [16u64, 32, 64][rng.below(3) as usize];
    let bw_mib = [64u64, 128, 256][rng.below(3) as usize];
    let expected_ms = mib * 1000 / bw_mib;
    let append = format!(
        "mode=dirty mib={mib} rate={rate} hb_ms=20{}",
        if disk { " disk=on disk_mib=4" } else { "" }
    );
    let dst_port = vm::free_port()?;
    let spec = |mon: &str, incoming: Option<String>| Spec {
        mem_mib: 256,
        smp: 1,
        append: append.clone(),
        monitor: Some(dir.join(mon)),
        incoming,
        disk: disk.then(|| img.clone()),
        ..Default::default()
    };
    let mut dst = Proc::spawn(bins, Vmm::Godwit, &spec("dst.sock", Some(format!("tcp:127.0.0.1:{dst_port}"))), "dst")?;
    dst.wait_stderr("waiting for an incoming migration", Duration::from_secs(20))?;
    let mut src = Proc::spawn(bins, Vmm::Godwit, &spec("src.sock", None), "src")?;
    src.wait_for("GUEST READY", Duration::from_secs(20))?;
    src.wait_line("heartbeat", Duration::from_secs(20), |l| vm::hb_seq(l).is_some())?;
    // The whole region written once: the stream carries `mib` MiB, not a few pages.
    src.wait_dirtied(mib * 256, Duration::from_secs(30))?;
    let mut hsrc = Hmp::connect(&dir.join("src.sock"), Vmm::Godwit, "src", Duration::from_secs(10))?;

    // The fault and where it lands: anywhere from the start to a little after the expected end.
    let _ = hsrc.cmd("migrate_set_parameter max-bandwidth {bw_mib}M".replace("{bw_mib}", &bw_mib.to_string()).as_str())?;
    let at_ms = rng.below(expected_ms + expected_ms / 4 + 20);
    let mut detail = format!("t={at_ms}ms/{expected_ms}ms");
    let mut proxy: Option<Proxy> = None;
    let mut mig_port = dst_port;
    if let Some(rest) = kind.strip_prefix("proxy-") {
        let after = 4096 + rng.below((mib << 20) + (mib << 18));
        let (mischief, dir_) = match rest {
            "truncate" => (Mischief::Truncate, Direction::Forward),
            "truncate-replies" => (Mischief::Truncate, Direction::Back),
            "flip" => (Mischief::Flip, Direction::Forward),
            "duplicate" => (Mischief::Duplicate, Direction::Forward),
            "stall" => (Mischief::Stall { ms: 1000 + rng.below(2000) }, Direction::Forward),
            "delay" => (Mischief::Delay { ms: 1 + rng.below(5) }, Direction::Forward),
            other => return Err(vm::BenchError::Failed(format!("unknown fault kind proxy-{other}"))),
        };
        // Replies are small: fault them early (the 0th..3rd reply).
        let after = if dir_ == Direction::Back { rng.below(64) } else { after };
        detail = format!("after={after}B");
        let p = Proxy::start(dst_port, Fault { mischief, dir: dir_, after })
            .map_err(|e| vm::BenchError::Io("proxy".into(), e))?;
        mig_port = p.port;
        proxy = Some(p);
    }
    let t_start = Instant::now();
    let a = hsrc.cmd(&format!("migrate -d tcp:127.0.0.1:{mig_port}"))?;
    if !a.trim().is_empty() && !a.contains("continuing detached") {
        return Err(vm::BenchError::Failed(format!("migrate refused: {a}")));
    }
    std::thread::sleep(Duration::from_millis(at_ms));
    let t_fault = Instant::now();
    let mut killed_src = false;
    let mut killed_dst = false;
    match kind {
        "kill-src" => {
            kill(&src, libc::SIGKILL);
            killed_src = true;
        }
        "kill-dst" => {
            kill(&dst, libc::SIGKILL);
            killed_dst = true;
        }
        "cancel" => {
            let _ = hsrc.cmd("migrate_cancel");
        }
        "stop-dst" => {
            let ms = 500 + rng.below(1500);
            detail = format!("{detail} stop={ms}ms");
            kill(&dst, libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(ms));
            kill(&dst, libc::SIGCONT);
        }
        "double-migrate" => {
            let a = hsrc.cmd(&format!("migrate -d tcp:127.0.0.1:{mig_port}"))?;
            detail = format!("{detail} second: {}", a.lines().next().unwrap_or("").chars().take(40).collect::<String>());
        }
        "garbage-monitor" => {
            let junk: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
            if let Ok(mut s) = std::os::unix::net::UnixStream::connect(dir.join("src.sock")) {
                use std::io::Write;
                let _ = s.write_all(&junk);
                let _ = s.write_all(b"\nmigrate_set_parameter downtime-limit banana\nnonsense\n");
            }
        }
        _ => {}
    }

    // Settle: the source's migration ends (or the source is gone), the destination decides.
    // A link slowed below the guest's dirty rate never converges: after 20 s the harness
    // cancels, as an operator would, and the case must still end with one clean copy.
    let mut src_final = String::new();
    let mut t_settled = None;
    for (limit, cancel_after) in [(20u64, true), (20, false)] {
        let end = Instant::now() + Duration::from_secs(limit);
        while Instant::now() < end && src_final.is_empty() {
            if killed_src || src.exited() {
                break;
            }
            match mig_status(&mut hsrc) {
                Some(s) if matches!(s.as_str(), "completed" | "failed" | "cancelled") => {
                    src_final = s;
                    t_settled = Some(Instant::now());
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        if !src_final.is_empty() || killed_src || src.exited() || !cancel_after {
            break;
        }
        detail = format!("{detail} (no convergence in {limit} s: cancelled)");
        let _ = hsrc.cmd("migrate_cancel");
    }
    let _ = t_start;
    // Give a destination that will exit (failed incoming) or run the time to do so.
    std::thread::sleep(Duration::from_millis(300));
    if let Some(p) = proxy.take() {
        // A stream shorter than the fault's offset never met the fault: say so.
        if !p.fired.load(std::sync::atomic::Ordering::SeqCst) {
            detail = format!("{detail} (not reached)");
        }
    }

    let src_alive = !src.exited();
    let src_state = if src_alive { hmp_status(&mut hsrc) } else { "gone".into() };
    let src_running = src_state.contains("running");
    let dst_alive = !dst.exited();
    let dst_running = dst_alive && {
        dst.skip_seen();
        dst.wait_line("heartbeat", Duration::from_millis(800), |l| vm::hb_seq(l).is_some()).is_ok()
    };
    let mut c = Case {
        index: 0,
        seed: 0,
        kind: kind.into(),
        detail,
        disk,
        outcome: String::new(),
        runs: String::new(),
        recovery_ms: None,
        violation: None,
        secs: 0.0,
    };
    let mut check_on: Option<&mut Proc> = None;
    match (src_running, dst_running) {
        (true, true) => {
            c.runs = "both".into();
            c.violation = Some(format!("SPLIT BRAIN: source '{}' and destination both run", src_state.trim()));
        }
        (true, false) => {
            c.runs = "source".into();
            // Fault → the source's migration settled with the source running.
            c.recovery_ms = t_settled.map(|t| t.saturating_duration_since(t_fault).as_secs_f64() * 1000.0);
            check_on = Some(&mut src);
        }
        (false, true) => {
            c.runs = "destination".into();
            let first = dst.lines.iter().find(|(t, l)| *t >= t_fault && vm::hb_seq(l).is_some()).map(|(t, _)| *t);
            c.recovery_ms = first.map(|t| t.saturating_duration_since(t_fault).as_secs_f64() * 1000.0);
            check_on = Some(&mut dst);
        }
        (false, false) => {
            c.runs = "none".into();
            if src_alive && !killed_src && src_state.contains("paused") && src_final == "failed" {
                // The fence held the source: the operator sees the destination is not running.
                kill(&dst, libc::SIGKILL);
                let a = hsrc.cmd("cont")?;
                if hmp_status(&mut hsrc).contains("running") {
                    c.outcome = "fenced".into();
                    c.recovery_ms = Some(t_fault.elapsed().as_secs_f64() * 1000.0);
                    check_on = Some(&mut src);
                } else {
                    c.violation = Some(format!("source fenced but 'cont' failed: {a}"));
                }
            } else if killed_src || killed_dst {
                c.outcome = "killed-with-guest".into();
            } else {
                c.violation = Some(format!("NO COPY RUNS: source '{}' ({src_final}), destination alive={dst_alive}", src_state.trim()));
            }
        }
    }
    if let Some(p) = check_on {
        p.skip_seen();
        p.send(b"v")?;
        let (_, l) = p.wait_for("LEDGER ", Duration::from_secs(60))?;
        if !l.starts_with("LEDGER OK") {
            c.violation = Some(format!("{}: {l}", p.name));
        } else if disk {
            match p.wait_for("DISK ", Duration::from_secs(60)) {
                Ok((_, d)) if d.starts_with("DISK OK") => {}
                Ok((_, d)) => c.violation = Some(format!("{}: {d}", p.name)),
                Err(e) => c.violation = Some(format!("{}: no DISK line: {e}", p.name)),
            }
        }
    }
    // Logs for a reproducer, then everything down.
    src.pump();
    dst.pump();
    for (p, n) in [(&src, "src"), (&dst, "dst")] {
        let out: String = p.lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        let _ = std::fs::write(dir.join(format!("{n}.stdout.log")), out);
        let _ = std::fs::write(dir.join(format!("{n}.stderr.log")), p.stderr());
    }
    hsrc.quit();
    let (mut src, mut dst) = (src, dst);
    for p in [&mut src, &mut dst] {
        let _ = p.send(b"q");
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) && !(src.exited() && dst.exited()) {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !(src.exited() && dst.exited()) && c.violation.is_none() {
        c.violation = Some("a VMM did not exit after quit".into());
    }
    drop(src);
    drop(dst);
    if disk && c.violation.is_none() {
        // Leaked clusters (exit 3) are what a killed writer leaves; corruption (2) is not.
        if let Ok(o) = Command::new("qemu-img").args(["check", "-q"]).arg(&img).output() {
            if o.status.code() == Some(2) || o.status.code() == Some(1) && String::from_utf8_lossy(&o.stderr).contains("corrupt") {
                c.violation = Some(format!("qemu-img check: {}", String::from_utf8_lossy(&o.stdout)));
            }
        }
    }
    if c.outcome.is_empty() {
        c.outcome = if c.violation.is_some() { "violation".into() } else { "survived".into() };
    } else if c.violation.is_some() {
        c.outcome = "violation".into();
    }
    Ok(c)
}

fn render(cases: &[Case], seed0: u64) -> String {
    let mut s = String::from("# Chaos campaign: live migrations under random faults\n\n");
    s += &format!(
        "`godwit-chaos --cases {} --seed {seed0}` (`bench/chaos.sh`); every case migrates a 256 MiB test guest \
         (rewriting 16, 32 or 64 MiB at 32-128 MiB/s, `max-bandwidth` 64-256 MiB/s, a qcow2 disk workload in about 80 % of \
         the cases) on loopback and injects one fault. A migration that a fault (or the guest's own rate) keeps from \
         converging is cancelled after 20 s, as an operator would; its recovery time includes those 20 s. \
         Survived = exactly one copy runs with `LEDGER OK` (+ `DISK OK`); fenced = the source kept itself paused \
         because the destination's answer was lost after the final state, and ran again with its ledger intact \
         once the destination was seen not running; killed-with-guest = the fault killed the side that had the guest.\n\n",
        cases.len()
    );
    s += "| fault | cases | survived | fenced | killed with the guest | violations | recovery median (ms) | recovery max (ms) |\n";
    s += "|---|---|---|---|---|---|---|---|\n";
    let mut kinds: Vec<&str> = cases.iter().map(|c| c.kind.as_str()).collect();
    kinds.sort();
    kinds.dedup();
    let mut total = [0usize; 5];
    for k in kinds {
        let cs: Vec<&Case> = cases.iter().filter(|c| c.kind == k).collect();
        let n = |o: &str| cs.iter().filter(|c| c.outcome == o).count();
        let mut rec: Vec<f64> = cs.iter().filter_map(|c| c.recovery_ms).collect();
        rec.sort_by(|a, b| a.total_cmp(b));
        let med = rec.get(rec.len() / 2).map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into());
        let max = rec.last().map(|v| format!("{v:.0}")).unwrap_or_else(|| "–".into());
        let row = [cs.len(), n("survived"), n("fenced"), n("killed-with-guest"), n("violation")];
        for (t, r) in total.iter_mut().zip(row) {
            *t += r;
        }
        s += &format!("| {k} | {} | {} | {} | {} | {} | {med} | {max} |\n", row[0], row[1], row[2], row[3], row[4]);
    }
    s += &format!("| **all** | {} | {} | {} | {} | {} | | |\n", total[0], total[1], total[2], total[3], total[4]);
    let bad: Vec<&Case> = cases.iter().filter(|c| c.violation.is_some()).collect();
    if !bad.is_empty() {
        s += "\n## Violations (replay with `--seed S --cases 1`)\n\n";
        for c in bad {
            s += &format!("- seed {} `{}` {}: {}\n", c.seed, c.kind, c.detail, c.violation.as_deref().unwrap_or(""));
        }
    }
    s
}
