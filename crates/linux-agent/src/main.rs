//! `godwit-agent`: PID 1 of the Linux test initramfs (started by its /init with
//! `godwit.workload=agent`), and an ordinary program on a host for its tests. It does in Linux
//! user space what the test guest (crates/guest) does on bare vCPUs: heartbeats, a memory
//! ledger, a disk ledger (O_DIRECT on /dev/vda), a file workload on ext4 (/dev/vdb on /mnt), a
//! TCP line service on the NIC, and power-off. The protocol is in docs/linux-agent.md.
//!
//! As PID 1 it must never exit (the kernel panics): errors become `AGENT WARN` lines and the
//! agent carries on with what works; orphans are reaped.

mod agent;
mod config;
mod disk;
mod files;
mod memory;
mod pattern;
mod server;
mod sys;

use agent::{Agent, Conn};
use config::Config;
use std::io::{BufRead, Read};
use std::sync::Arc;
use std::time::Duration;

fn main() {
    let pid1 = sys::is_pid1();
    if pid1 {
        sys::spawn_reaper();
    }
    let mut warn = Vec::new();
    let cfg = match configure(pid1, &mut warn) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("godwit-agent: {e}");
            std::process::exit(2);
        }
    };
    if pid1 {
        // The block devices' nodes come from drivers /init loaded just before: give them a
        // moment to appear rather than run without them.
        for p in [&cfg.disk, &cfg.fs_dev].into_iter().flatten() {
            let end = sys::mono_ms() + 5000;
            while !p.exists() && sys::mono_ms() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let nonce = sys::nonce();
    // The region is written for real: more than half the RAM would invite the OOM killer,
    // and as PID 1 that is a kernel panic.
    let mut cfg = cfg;
    let total = mem_total_mib();
    if total > 0 && cfg.mib > total / 2 {
        warn.push(format!("memory region reduced from {} MiB to {} MiB (half of MemTotal)", cfg.mib, total / 2));
        cfg.mib = total / 2;
    }
    let mem = if cfg.mib > 0 {
        match memory::Memory::new(cfg.mib, cfg.rate, nonce) {
            Ok(m) => Some(m),
            Err(e) => {
                warn.push(format!("memory ledger off: {e}"));
                None
            }
        }
    } else {
        None
    };
    let disk = match &cfg.disk {
        None => Ok(None),
        Some(p) => match disk::Disk::open(p, cfg.disk_mib, cfg.disk_rate, nonce) {
            Ok((d, w)) => {
                warn.extend(w);
                Ok(Some(d))
            }
            Err(e) => {
                warn.push(format!("disk ledger off: {e}"));
                Err(e)
            }
        },
    };
    let files = match &cfg.fs_dir {
        None => Ok(None),
        Some(dir) => match files::Files::open(cfg.fs_dev.as_deref(), dir, cfg.fs_files, cfg.fs_ms, nonce) {
            Ok(f) => Ok(Some(f)),
            Err(e) => {
                warn.push(format!("file workload off: {e}"));
                Err(e)
            }
        },
    };
    let listener = match std::net::TcpListener::bind((cfg.listen.as_str(), cfg.port)) {
        Ok(l) => Some(l),
        Err(e) => {
            warn.push(format!("TCP service off: {}:{}: {e}", cfg.listen, cfg.port));
            None
        }
    };
    let port = listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port()).unwrap_or(0);
    sys::console_no_echo();
    let agent = Arc::new(Agent::new(mem, disk, files, port));
    for w in &warn {
        agent.say(&format!("AGENT WARN {w}"));
    }
    if let Some(m) = &agent.mem {
        m.start();
    }
    if let Some(d) = &agent.disk {
        d.start();
    }
    if let Some(f) = &agent.files {
        f.start();
    }
    if let Some(l) = listener {
        server::serve(agent.clone(), l);
    }
    agent.say(&ready_line(&cfg, &agent));
    let a = agent.clone();
    let hb = cfg.hb_ms;
    let _ = std::thread::Builder::new().name("heartbeat".into()).spawn(move || heartbeats(&a, hb));
    console(&agent);
    // Console closed: keep serving (and, as PID 1, never exit).
    loop {
        std::thread::park();
    }
}

fn configure(pid1: bool, warn: &mut Vec<String>) -> Result<Config, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !pid1 && args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: godwit-agent [--cmdline FILE] [--KEY VALUE]...  (keys and protocol: docs/linux-agent.md)");
        std::process::exit(0);
    }
    let mut cfg = Config::defaults(pid1);
    let (cmdline, sets) = match config::parse_args(&args) {
        Ok(x) => x,
        Err(e) if !pid1 => return Err(e),
        Err(e) => {
            warn.push(e);
            (None, Vec::new())
        }
    };
    let cl_path = cmdline.or_else(|| pid1.then(|| "/proc/cmdline".into()));
    if let Some(p) = cl_path {
        match std::fs::read_to_string(&p) {
            Ok(s) => warn.extend(cfg.apply_cmdline(&s)),
            Err(e) => warn.push(format!("{}: {e}", p.display())),
        }
    }
    warn.extend(cfg.apply_env(std::env::vars()));
    for (k, v) in sets {
        match cfg.set(&k, &v) {
            Ok(()) => {}
            Err(e) if !pid1 => return Err(e),
            Err(e) => warn.push(e),
        }
    }
    Ok(cfg)
}

fn ready_line(cfg: &Config, agent: &Agent) -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = mem_total_mib();
    let disk = match (&agent.disk, &cfg.disk) {
        (Some(d), Some(p)) => format!("{} blocks={} direct={}", p.display(), d.blocks(), d.direct as u8),
        _ => "none blocks=0 direct=0".into(),
    };
    let fs = match &agent.files {
        Some(f) => format!("{} mounted={}", f.root.display(), f.mounted as u8),
        None => "none mounted=0".into(),
    };
    format!(
        "AGENT READY cpus={cpus} mem={mem} pid={} pages={} disk={disk} fs={fs} port={} hb_ms={} uptime_ms={}",
        std::process::id(),
        agent.mem.as_ref().map(|m| m.pages()).unwrap_or(0),
        agent.port,
        cfg.hb_ms,
        sys::clock_ms(libc::CLOCK_BOOTTIME)
    )
}

/// MemTotal of /proc/meminfo in MiB (0 if unknown).
fn mem_total_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("MemTotal:")).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok()))
        .map(|kib| (kib + 512) / 1024)
        .unwrap_or(0)
}

/// One line every `hb_ms` of CLOCK_MONOTONIC; after a pause (migration downtime) the next line
/// comes at once and the period restarts there: no burst of catch-up lines.
fn heartbeats(agent: &Agent, hb_ms: u64) {
    let mut due = sys::mono_ms() + hb_ms;
    loop {
        let now = sys::mono_ms();
        if now < due {
            std::thread::sleep(Duration::from_millis(due - now));
            continue;
        }
        agent.say(&agent.heartbeat());
        due = if now - due > hb_ms { now + hb_ms } else { due + hb_ms };
    }
}

/// Commands from the console (stdin) until it closes.
fn console(agent: &Agent) {
    let mut conn = Conn { id: 0, count: 0 };
    let stdin = std::io::stdin();
    let mut buf = Vec::new();
    let mut lock = stdin.lock();
    loop {
        buf.clear();
        match (&mut lock).take(65536).read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // A serial console sends \r for Enter; accept both.
        let text = String::from_utf8_lossy(&buf).into_owned();
        for line in text.split(['\r', '\n']) {
            agent.command(line, &mut conn, &mut |l: &str| agent.say(l));
        }
    }
}
