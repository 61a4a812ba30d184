//! `godwit-linux-e2e`: the full Linux suite for hosts with hardware KVM (part 5 of issue 15).
//! Linux (the kit of `scripts/linux-kit.sh`) boots to the agent (crates/linux-agent) on
//! `-smp 2` with a disk-ledger disk and an ext4 data disk (qcow2) and a virtio-net card on a
//! tap; then live migrations (pre-copy, post-copy, auto-converge), savevm/loadvm, a cold
//! migration and power-off, each checked through the agent; first under Godwit, then the same
//! under QEMU (`qemu-system-x86_64 -M microvm -enable-kvm`) for the numbers.
//!
//! It prints one table line per part, `PASS numbers`, `FAIL (why)` or `NOT RUN (why)`, and exits
//! 1 if any part failed. On a host whose KVM cannot run Linux user space (the nested
//! `kvm_pvm`, or no vmx/svm) every part is NOT RUN with that reason, and it exits 0.
//! Usage: docs/linux-boot.md, "The full suite on hardware KVM".

mod host;
mod image;
mod moves;
mod net;
#[cfg(test)]
mod plumbing;
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparison_lines_only_for_parts_both_passed() {
        let row = |vmm, part, o| Row { vmm, part, outcome: o };
        let rows = vec![
            row("godwit", "precopy", Outcome::Pass("downtime_ms=3 total_ms=900 vmm_total_ms=880 tcp_gap_ms=20 hb=1->2 (LEDGER OK)".into())),
            row("qemu", "precopy", Outcome::Pass("downtime_ms=5 total_ms=1000".into())),
            row("godwit", "postcopy", Outcome::Pass("downtime_ms=1".into())),
            row("qemu", "postcopy", Outcome::Fail("x".into())),
        ];
        assert_eq!(
            comparison(&rows),
            vec!["compare precopy         godwit: downtime_ms=3 total_ms=900 tcp_gap_ms=20 | qemu: downtime_ms=5 total_ms=1000"]
        );
    }
}
mod suite;
mod vm;

use std::path::PathBuf;
use suite::{Outcome, Row, Setup, PARTS};
use vm::Vmm;

struct Args {
    godwit: Option<PathBuf>,
    qemu: Option<PathBuf>,
    no_qemu: bool,
    kit_script: PathBuf,
    kit_dir: PathBuf,
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    work: PathBuf,
    force: bool,
    host_check: bool,
}

const USAGE: &str = "usage: godwit-linux-e2e [--godwit PATH] [--qemu PATH | --no-qemu] [--kit-script PATH] [--kit DIR] \
[--kernel PATH --initrd PATH --append STRING] [--work DIR] [--force] | --host-check";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn parse_args() -> Result<Args, String> {
    let root = repo_root();
    let mut a = Args {
        godwit: None,
        qemu: None,
        no_qemu: false,
        kit_script: root.join("scripts/linux-kit.sh"),
        kit_dir: root.join("target/linux-kit"),
        kernel: None,
        initrd: None,
        append: None,
        work: std::env::temp_dir().join(format!("godwit-linux-e2e-{}", std::process::id())),
        force: false,
        host_check: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{k} needs a value\n{USAGE}"));
        match k.as_str() {
            "--godwit" => a.godwit = Some(val()?.into()),
            "--qemu" => a.qemu = Some(val()?.into()),
            "--no-qemu" => a.no_qemu = true,
            "--kit-script" => a.kit_script = val()?.into(),
            "--kit" => a.kit_dir = val()?.into(),
            "--kernel" => a.kernel = Some(val()?.into()),
            "--initrd" => a.initrd = Some(val()?.into()),
            "--append" => a.append = Some(val()?),
            "--work" => a.work = val()?.into(),
            "--force" => a.force = true,
            "--host-check" => a.host_check = true,
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {k}\n{USAGE}")),
        }
    }
    Ok(a)
}

fn not_run_all(vmm: &'static str, why: &str) -> Vec<Row> {
    PARTS.iter().map(|(p, _)| Row { vmm, part: p, outcome: Outcome::NotRun(why.to_string()) }).collect()
}

fn print_row(r: &Row) {
    let what = match &r.outcome {
        Outcome::Pass(n) => format!("PASS {n}"),
        Outcome::Fail(why) => format!("FAIL ({why})"),
        Outcome::NotRun(why) => format!("NOT RUN ({why})"),
    };
    println!("{:<7} {:<15} {what}", r.vmm, r.part);
}

/// The numbers side by side: for each part that passed under both VMMs, its timings.
fn comparison(rows: &[Row]) -> Vec<String> {
    const KEYS: [&str; 7] = ["boot_ms", "downtime_ms", "total_ms", "tcp_gap_ms", "savevm_ms", "loadvm_ms", "start_to_heartbeat_ms"];
    let numbers = |vmm: &str, part: &str| -> Option<String> {
        let r = rows.iter().find(|r| r.vmm == vmm && r.part == part)?;
        let Outcome::Pass(n) = &r.outcome else { return None };
        let kv: Vec<&str> = n.split_whitespace().filter(|w| KEYS.iter().any(|k| w.starts_with(&format!("{k}=")))).collect();
        (!kv.is_empty()).then(|| kv.join(" "))
    };
    PARTS
        .iter()
        .filter_map(|(part, _)| Some(format!("compare {part:<15} godwit: {} | qemu: {}", numbers("godwit", part)?, numbers("qemu", part)?)))
        .collect()
}

/// godwit next to this binary (target/<profile>/, or its parent when run from deps/), then the
/// workspace's release build, then PATH.
fn default_godwit() -> Option<PathBuf> {
    let here = std::env::current_exe().ok()?;
    let dir = here.parent()?;
    [dir.join("godwit"), dir.join("../godwit"), repo_root().join("target/release/godwit")]
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| host::which("godwit"))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let blocker = host::this_host_blocker();
    if args.host_check {
        // For scripts: exit 0 when Linux user space can run under KVM here.
        println!("{}", blocker.as_deref().unwrap_or("hardware KVM: Linux user space can run"));
        std::process::exit(if blocker.is_some() { 3 } else { 0 });
    }
    println!("{:<7} {:<15} result", "vmm", "part");
    let mut rows = Vec::new();
    match (&blocker, args.force) {
        (Some(why), false) => {
            eprintln!("linux-e2e: {why}: every part is NOT RUN");
            rows.extend(not_run_all("godwit", why));
            rows.extend(not_run_all("qemu", why));
        }
        _ => {
            if let Some(why) = &blocker {
                eprintln!("linux-e2e: --force on a host where {why}: the parts will fail");
            }
            rows = run_all(&args);
        }
    }
    for r in &rows {
        print_row(r);
    }
    for l in comparison(&rows) {
        println!("{l}");
    }
    let count = |f: fn(&Outcome) -> bool| rows.iter().filter(|r| f(&r.outcome)).count();
    let (pass, fail, skip) = (count(|o| matches!(o, Outcome::Pass(_))), count(|o| matches!(o, Outcome::Fail(_))), count(|o| matches!(o, Outcome::NotRun(_))));
    println!("linux-e2e: {pass} passed, {fail} failed, {skip} not run");
    std::process::exit(if fail > 0 { 1 } else { 0 });
}

fn run_all(args: &Args) -> Vec<Row> {
    let mut rows = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let why = "needs root (network namespaces, taps)";
        rows.extend(PARTS.iter().enumerate().map(|(i, (p, _))| Row {
            vmm: "godwit",
            part: p,
            outcome: if i == 0 { Outcome::Fail(why.into()) } else { Outcome::NotRun(why.into()) },
        }));
        rows.extend(not_run_all("qemu", why));
        return rows;
    }
    let kit = match (&args.kernel, &args.initrd) {
        (Some(k), Some(i)) => Ok(host::Kit { kernel: k.clone(), initrd: i.clone(), append: args.append.clone().unwrap_or_default(), profile: "none".into() }),
        _ => {
            eprintln!("linux-e2e: building the kit: {} {}", args.kit_script.display(), args.kit_dir.display());
            host::build_kit(&args.kit_script, &args.kit_dir)
        }
    };
    let kit = match kit {
        Ok(k) => k,
        Err(e) => {
            for vmm in ["godwit", "qemu"] {
                rows.extend(PARTS.iter().enumerate().map(|(i, (p, _))| Row {
                    vmm,
                    part: p,
                    outcome: if i == 0 { Outcome::Fail(format!("kit: {e}")) } else { Outcome::NotRun("no kit".into()) },
                }));
            }
            return rows;
        }
    };
    eprintln!("linux-e2e: kernel={} initrd={} append={}", kit.kernel.display(), kit.initrd.display(), kit.append);
    let setup = |vmm, bin| Setup { vmm, bin, kernel: kit.kernel.clone(), initrd: kit.initrd.clone(), append: kit.append.clone(), work: args.work.clone() };
    match args.godwit.clone().or_else(default_godwit) {
        Some(g) => rows.extend(suite::run(setup(Vmm::Godwit, g))),
        None => rows.extend(PARTS.iter().enumerate().map(|(i, (p, _))| Row {
            vmm: "godwit",
            part: p,
            outcome: if i == 0 { Outcome::Fail("no godwit binary (build it: cargo build --release -p godwit, or --godwit PATH)".into()) } else { Outcome::NotRun("no godwit".into()) },
        })),
    }
    let qemu = args.qemu.clone().or_else(|| host::which("qemu-system-x86_64"));
    match (args.no_qemu, qemu) {
        (true, _) => rows.extend(not_run_all("qemu", "--no-qemu")),
        (false, None) => rows.extend(not_run_all("qemu", "no qemu-system-x86_64 on PATH")),
        (false, Some(q)) => rows.extend(suite::run(setup(Vmm::Qemu, q))),
    }
    let _ = std::fs::remove_dir_all(&args.work);
    rows
}
