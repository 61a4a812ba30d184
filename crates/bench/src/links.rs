//! `--only links`: live migration across a shaped link, Godwit beside QEMU 7.2 with the same
//! settings. Two network namespaces joined by a veth shaped with `tc tbf` (the tests' link
//! simulator, `crates/godwit/tests/linksim`), a 1 GiB guest rewriting 256 MiB at a rate near
//! the link's, with its pages highly compressible (`entropy=10`) or not (`entropy=100`), moved
//! four ways: plain pre-copy, multifd ×4, multifd ×4 + zstd (level 1), and TLS (x509, peers
//! verified, certificates made here with rcgen). Reported per run: converged (within the
//! budget, else `migrate_cancel`), total time, downtime, bytes on the wire (each VMM's
//! `transferred ram`), CPU seconds of the source and destination VMMs over the migration (utime
//! + stime of every thread but the guest's vCPU threads, from /proc), and `LEDGER OK` on the
//! destination.
//!
//! Both VMMs get: `downtime-limit 30`, `max-bandwidth` unlimited, and for multifd the
//! capability and `multifd-channels 4` (+ `multifd-compression zstd`) on both sides; QEMU's
//! destination uses `-incoming defer` so they are set before it listens (QEMU needs that),
//! Godwit's listens at start and reads its parameters when the source connects.

#[path = "../../godwit/tests/linksim/mod.rs"]
mod linksim;

use crate::vm::{BenchError, Bins, Hmp, Proc, Res, Spec, Vmm};
use bench::hmptext::{migration_status, number};
use linksim::{Link, Shape};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
const PORT: u16 = 7411;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Multifd,
    MultifdZstd,
    Tls,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Multifd => "multifd x4",
            Mode::MultifdZstd => "multifd x4 + zstd",
            Mode::Tls => "TLS",
        }
    }
}

/// One measured migration.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Row {
    pub link_gbit: u64,
    pub entropy: u64,
    pub guest_rate_mibs: u64,
    pub mode: String,
    pub vmm: String,
    pub converged: bool,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub wire_mib: f64,
    pub cpu_src_s: f64,
    pub cpu_dst_s: f64,
    pub ledger_ok: bool,
    pub error: Option<String>,
}

/// utime + stime (fields 14, 15) of a `/proc/.../stat` line, in ticks, and the name in it.
fn stat_ticks(s: &str) -> Option<(&str, f64)> {
    // The name is between the first '(' and the last ')' (it may hold spaces).
    let (open, close) = (s.find('(')?, s.rfind(')')?);
    let f: Vec<&str> = s.get(close + 1..)?.split_whitespace().collect();
    let u: f64 = f.get(11)?.parse().ok()?;
    let k: f64 = f.get(12)?.parse().ok()?;
    Some((s.get(open + 1..close)?, u + k))
}

/// CPU seconds the VMM process spent, leaving out the guest's vCPU threads (Godwit's `vcpuN`,
/// QEMU's `CPU N/KVM`): the process's total (which keeps the time of threads that ended, such
/// as multifd or TLS threads) minus the vCPU threads' own.
fn cpu_s(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Some(total) = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().as_deref().and_then(stat_ticks).map(|(_, t)| t) else {
        return f64::NAN;
    };
    let mut vcpus = 0.0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Some((name, ticks)) = std::fs::read_to_string(t.path().join("stat")).ok().as_deref().and_then(stat_ticks) {
                if name.starts_with("vcpu") || name.starts_with("CPU ") {
                    vcpus += ticks;
                }
            }
        }
    }
    (total - vcpus) / hz
}

/// QEMU's x509 layout for a server (`srv`) and a client (`cli`) under `dir`.
fn certificates(dir: &Path, server_ip: &str) -> Res<()> {
    let err = |e: rcgen::Error| BenchError::Failed(format!("certificates: {e}"));
    let io = |e: std::io::Error| BenchError::Io("writing certificates".into(), e);
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "godwit bench CA");
    let ca = p.self_signed(&ca_key).map_err(err)?;
    for (sub, name, purpose, cert, key) in [
        ("srv", server_ip, ExtendedKeyUsagePurpose::ServerAuth, "server-cert.pem", "server-key.pem"),
        ("cli", "bench-source", ExtendedKeyUsagePurpose::ClientAuth, "client-cert.pem", "client-key.pem"),
    ] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(io)?;
        let k = KeyPair::generate().map_err(err)?;
        let mut p = CertificateParams::new(vec![name.to_string()]).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![purpose];
        let c = p.signed_by(&k, &ca, &ca_key).map_err(err)?;
        std::fs::write(d.join("ca-cert.pem"), ca.pem()).map_err(io)?;
        std::fs::write(d.join(cert), c.pem()).map_err(io)?;
        std::fs::write(d.join(key), k.serialize_pem()).map_err(io)?;
    }
    Ok(())
}

fn ok(h: &mut Hmp, cmd: &str) -> Res<()> {
    let a = h.cmd(cmd)?;
    if !a.trim().is_empty() {
        return Err(BenchError::Failed(format!("{cmd}: {a}")));
    }
    Ok(())
}

/// Monitor commands for `mode` (the same on both sides, both VMMs).
fn settings(mode: Mode) -> Vec<&'static str> {
    match mode {
        Mode::Plain => vec![],
        Mode::Multifd => vec!["migrate_set_capability multifd on", "migrate_set_parameter multifd-channels 4"],
        Mode::MultifdZstd => vec![
            "migrate_set_capability multifd on",
            "migrate_set_parameter multifd-channels 4",
            "migrate_set_parameter multifd-compression zstd",
            "migrate_set_parameter multifd-zstd-level 1",
        ],
        Mode::Tls => vec!["migrate_set_parameter tls-creds tls0"],
    }
}

#[allow(clippy::too_many_arguments)]
fn one(bins: &Bins, vmm: Vmm, link: &Link, gbit: u64, entropy: u64, rate: u64, mode: Mode, dir: &Path, budget: Duration) -> Res<Row> {
    let mut row = Row {
        link_gbit: gbit,
        entropy,
        guest_rate_mibs: rate,
        mode: mode.name().into(),
        vmm: vmm.name().into(),
        ..Default::default()
    };
    let append = format!("mode=dirty mib=256 rate={rate} entropy={entropy} hb=compact hb_ms=2 cpus=2");
    let obj = |end: &str, sub: &str| format!("tls-creds-x509,id=tls0,dir={},endpoint={end}", dir.join(sub).display());
    let tls = mode == Mode::Tls;
    let uri = format!("tcp:{}:{PORT}", link.b_addr);
    let (dmon, smon) = (dir.join(format!("{}-ldst.sock", vmm.name())), dir.join(format!("{}-lsrc.sock", vmm.name())));
    let _ = std::fs::remove_file(&dmon);
    let _ = std::fs::remove_file(&smon);
    let dspec = Spec {
        mem_mib: 1024,
        smp: 2,
        append: append.clone(),
        monitor: Some(dmon.clone()),
        incoming: Some(if vmm == Vmm::Qemu { "defer".into() } else { uri.clone() }),
        netns: Some(link.b.clone()),
        objects: if tls { vec![obj("server", "srv")] } else { vec![] },
        ..Default::default()
    };
    let mut dst = Proc::spawn(bins, vmm, &dspec, &format!("{}-ldst", vmm.name()))?;
    if vmm == Vmm::Godwit {
        dst.wait_stderr("waiting for an incoming migration", T)?;
    }
    let mut dh = Hmp::connect(&dmon, vmm, "destination monitor", T)?;
    for c in settings(mode) {
        ok(&mut dh, c)?;
    }
    if vmm == Vmm::Qemu {
        ok(&mut dh, &format!("migrate_incoming {uri}"))?;
    }
    let sspec = Spec {
        mem_mib: 1024,
        smp: 2,
        append,
        monitor: Some(smon.clone()),
        netns: Some(link.a.clone()),
        objects: if tls { vec![obj("client", "cli")] } else { vec![] },
        ..Default::default()
    };
    let mut src = Proc::spawn(bins, vmm, &sspec, &format!("{}-lsrc", vmm.name()))?;
    src.wait_for("GUEST READY", T)?;
    let mut h = Hmp::connect(&smon, vmm, "source monitor", T)?;
    // The 256 MiB are written once before the migration starts.
    src.wait_dirtied(65536, Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_millis(500));
    for c in ["migrate_set_parameter downtime-limit 30", "migrate_set_parameter max-bandwidth 0M"].into_iter().chain(settings(mode)) {
        ok(&mut h, c)?;
    }
    let (c0s, c0d) = (cpu_s(src.pid()), cpu_s(dst.pid()));
    let t0 = Instant::now();
    ok(&mut h, &format!("migrate -d {uri}"))?;
    let info = loop {
        std::thread::sleep(Duration::from_millis(100));
        let info = h.cmd("info migrate")?;
        let st = migration_status(&info).and_then(|s| s.split_whitespace().next()).unwrap_or("?").to_string();
        if st == "completed" {
            row.converged = true;
            break info;
        }
        if st == "failed" || st == "cancelled" {
            row.error = migration_status(&info).map(str::to_string);
            break info;
        }
        if t0.elapsed() > budget {
            h.cmd("migrate_cancel")?;
            std::thread::sleep(Duration::from_millis(500));
            break info;
        }
    };
    row.cpu_src_s = cpu_s(src.pid()) - c0s;
    row.cpu_dst_s = cpu_s(dst.pid()) - c0d;
    row.total_ms = number(&info, "total time").unwrap_or(f64::NAN);
    row.downtime_ms = if row.converged { number(&info, "downtime").unwrap_or(f64::NAN) } else { f64::NAN };
    row.wire_mib = number(&info, "transferred ram").unwrap_or(f64::NAN) / 1024.0;
    if row.converged {
        dst.wait_line("first output after migration", T, |_| true)?;
        row.ledger_ok = dst.ledger_ok()?;
    }
    h.quit();
    dh.quit();
    src.quit();
    dst.quit();
    Ok(row)
}

/// Runs every case `runs` times for each VMM (alternating) and returns the rows.
/// The link cases, by name (for `--links-cases`).
pub const CASES: &[&str] = &["near1", "max10", "above1"];

/// Mode names for `--links-modes`.
pub const MODES: &[&str] = &["plain", "multifd", "zstd", "tls"];

fn mode_key(m: Mode) -> &'static str {
    match m {
        Mode::Plain => "plain",
        Mode::Multifd => "multifd",
        Mode::MultifdZstd => "zstd",
        Mode::Tls => "tls",
    }
}

#[allow(clippy::too_many_arguments)]
pub fn run_all(runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, budget: Duration, which: &[String], modes_only: &[String]) -> Vec<Row> {
    let mut rows = Vec::new();
    // (link, guest rate, entropies, modes): near the link's rate on 1 Gbit/s (119 MiB/s); on
    // 10 Gbit/s as fast as the guest can under dirty logging on this host (~190 MiB/s, see
    // HOST-KVM.md); and above the 1 Gbit/s link with compressible pages, where plain pre-copy
    // cannot converge and compression can.
    let all = [Mode::Plain, Mode::Multifd, Mode::MultifdZstd, Mode::Tls];
    let cases: [(&str, u64, u64, &[u64], &[Mode]); 3] = [
        ("near1", 1, 100, &[10, 100], &all),
        ("max10", 10, 0, &[10, 100], &all),
        ("above1", 1, 150, &[10], &[Mode::Plain, Mode::MultifdZstd]),
    ];
    for (name, gbit, rate, entropies, modes) in cases {
        if !which.is_empty() && !which.iter().any(|w| w == name) {
            continue;
        }
        let link = Link::new(&format!("bl{gbit}"), Shape { rate_bps: gbit * 1_000_000_000, ..Default::default() });
        if let Err(e) = certificates(dir, &link.b_addr) {
            eprintln!("links: {e}");
            return rows;
        }
        for &entropy in entropies {
            for &mode in modes {
                if !modes_only.is_empty() && !modes_only.iter().any(|m| m == mode_key(mode)) {
                    continue;
                }
                for i in 0..runs {
                    let order: Vec<Vmm> = if i % 2 == 0 { sides.to_vec() } else { sides.iter().rev().copied().collect() };
                    for vmm in order {
                        eprintln!("links: {gbit} Gbit/s, entropy {entropy}, {}, {} (run {})", mode.name(), vmm.name(), i + 1);
                        let r = one(bins, vmm, &link, gbit, entropy, rate, mode, dir, budget).unwrap_or_else(|e| Row {
                            link_gbit: gbit,
                            entropy,
                            guest_rate_mibs: rate,
                            mode: mode.name().into(),
                            vmm: vmm.name().into(),
                            error: Some(e.to_string().lines().next().unwrap_or("").to_string()),
                            ..Default::default()
                        });
                        eprintln!("  -> {r:?}");
                        rows.push(r);
                    }
                }
            }
        }
    }
    rows
}

/// The rows as a Markdown table.
pub fn markdown(rows: &[Row], budget: Duration) -> String {
    let mut s = String::from(
        "| link | guest MiB/s | entropy | mode | VMM | converged | total s | downtime ms | wire MiB | CPU s src | CPU s dst | ledger |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |v: f64, d: usize| if v.is_finite() { format!("{v:.d$}") } else { "–".into() };
    for r in rows {
        let conv = match (&r.error, r.converged) {
            (Some(e), _) => format!("error: {e}"),
            (None, true) => "yes".into(),
            (None, false) => format!("no ({} s budget)", budget.as_secs()),
        };
        s += &format!(
            "| {} Gbit/s | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.link_gbit,
            if r.guest_rate_mibs == 0 { "max".to_string() } else { r.guest_rate_mibs.to_string() },
            r.entropy,
            r.mode,
            r.vmm,
            conv,
            f(r.total_ms / 1000.0, 2),
            f(r.downtime_ms, 0),
            f(r.wire_mib, 0),
            f(r.cpu_src_s, 2),
            f(r.cpu_dst_s, 2),
            if r.ledger_ok { "OK" } else { "–" }
        );
    }
    s
}
