//! The HMP front end: a per-connection [`HmpSession`] that parses a line, runs it through the
//! shared [`Monitor`], and writes QEMU-style text. Transports feed it lines (see
//! [`LineEditor`]); `human-monitor-command` runs a fresh non-interactive session per call.

pub mod line;
pub mod parse;
pub mod render;
pub mod table;

pub use line::{LineEditor, LineEvent, MAX_LINE};
pub use parse::{DumpDefaults, DumpFormat, HmpCommand};

use crate::command::{Command, MigrateArgs, Reply};
use crate::error::CommandError;
use crate::monitor::Monitor;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The prompt, as QEMU's `(qemu) `.
pub const PROMPT: &str = "(qemu) ";

/// How often a foreground `migrate` polls `query-migrate`, and how often it prints progress.
const MIGRATE_POLL: Duration = Duration::from_millis(50);
const MIGRATE_PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// On a terminal the progress line is redrawn in place this often.
const MIGRATE_LIVE_EVERY: Duration = Duration::from_millis(100);

/// The banner a new HMP connection sees before the first prompt.
pub fn banner(monitor: &Monitor) -> String {
    let v = monitor.backend().version();
    format!(
        "Godwit {} monitor (QEMU {}.{}.{} compatible) - type 'help' for more information\r\n",
        env!("CARGO_PKG_VERSION"),
        v.qemu.major,
        v.qemu.minor,
        v.qemu.micro
    )
}

/// Writes `text` converting `\n` to `\r\n`, as QEMU's monitor output does.
pub fn write_crlf(out: &mut dyn Write, text: &str) -> io::Result<()> {
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' && (i == 0 || bytes[i - 1] != b'\r') {
            out.write_all(&bytes[start..i])?;
            out.write_all(b"\r\n")?;
            start = i + 1;
        }
    }
    out.write_all(&bytes[start..])
}

/// One HMP conversation: remembers the selected CPU and the last `x` format.
pub struct HmpSession {
    monitor: Arc<Monitor>,
    dump: DumpDefaults,
    cpu: u32,
    interactive: bool,
    /// The session is a terminal: a foreground `migrate` redraws one progress line in place.
    live: bool,
}

impl HmpSession {
    /// `interactive` sessions (a terminal or socket) may block on a foreground `migrate`;
    /// others (`human-monitor-command`) run it detached, as QEMU does.
    pub fn new(monitor: Arc<Monitor>, interactive: bool) -> Self {
        HmpSession {
            monitor,
            dump: DumpDefaults::default(),
            cpu: 0,
            interactive,
            live: false,
        }
    }

    /// Marks the session as a terminal (the stdio monitor on a tty): a foreground `migrate`
    /// then shows a live progress line (sent, remaining, rate, round, expected downtime).
    pub fn set_live_progress(&mut self, live: bool) {
        self.live = live;
    }

    /// Selects the default CPU (QMP `human-monitor-command`'s `cpu-index`).
    pub fn set_cpu(&mut self, cpu: u32) {
        self.cpu = cpu;
    }

    /// Runs one command line and writes its output (CRLF line ends). Errors of the command
    /// are output too; only errors writing to `out` are returned.
    pub fn execute_line(&mut self, line: &str, out: &mut dyn Write) -> io::Result<()> {
        let text = match parse::parse_line(line, &mut self.dump) {
            Err(e) => format!("{e}\n"),
            Ok(cmd) => match self.run(cmd, out)? {
                Ok(text) => text,
                Err(e) => format!("Error: {}\n", e.desc),
            },
        };
        write_crlf(out, &text)?;
        out.flush()
    }

    fn run(
        &mut self,
        cmd: HmpCommand,
        out: &mut dyn Write,
    ) -> io::Result<Result<String, CommandError>> {
        let m = &self.monitor;
        Ok(match cmd {
            HmpCommand::Nothing => Ok(String::new()),
            HmpCommand::Help(topic) => {
                Ok(render::help(topic.as_deref()).unwrap_or_else(|e| format!("{e}\n")))
            }
            HmpCommand::SelectCpu(n) => match m.execute(Command::QueryCpus) {
                Ok(Reply::Cpus(list)) if !list.iter().any(|c| c.cpu_index == n) => {
                    Err(CommandError::generic("invalid CPU index"))
                }
                _ => {
                    self.cpu = n;
                    Ok(String::new())
                }
            },
            HmpCommand::InfoCpus => m.execute(Command::QueryCpus).map(|r| match r {
                Reply::Cpus(list) => render::cpus(&list, self.cpu),
                _ => String::new(),
            }),
            HmpCommand::InfoMigrate => m.execute(Command::QueryMigrate).map(|r| {
                let caps = match m.execute(Command::QueryMigrateCapabilities) {
                    Ok(Reply::MigrationCapabilities(c)) => Some(c),
                    _ => None,
                };
                match r {
                    Reply::Migration(info) => render::migrate(&info, caps.as_deref()),
                    _ => String::new(),
                }
            }),
            HmpCommand::Dump {
                physical,
                fmt,
                addr,
            } => {
                let size = if fmt.format == 'c' {
                    1
                } else {
                    u64::from(fmt.size)
                };
                let Some(len) = fmt
                    .count
                    .checked_mul(size)
                    .filter(|l| *l <= crate::command::MAX_MEMORY_DUMP)
                else {
                    return Ok(Ok(format!(
                        "{}: too much memory requested (at most {} bytes)\n",
                        if physical { "xp" } else { "x" },
                        crate::command::MAX_MEMORY_DUMP
                    )));
                };
                let space = if physical {
                    crate::MemorySpace::Physical
                } else {
                    crate::MemorySpace::Virtual { cpu: self.cpu }
                };
                Ok(self.dump(space, addr, len, fmt))
            }
            HmpCommand::Migrate(args) => return self.migrate(args, out),
            HmpCommand::Vm(cmd) => m.execute(cmd).map(|r| render_reply(&r)),
        })
    }

    /// Reads in 16-byte lines as QEMU does, so a fault part-way still prints what was readable
    /// followed by "Cannot access memory".
    fn dump(&self, space: crate::MemorySpace, addr: u64, len: u64, fmt: DumpFormat) -> String {
        let wsize = if fmt.format == 'c' {
            1
        } else {
            u64::from(fmt.size)
        };
        let line = if wsize == 1 { 8 } else { 16 };
        let mut out = String::new();
        let mut off = 0u64;
        while off < len {
            let n = line.min(len - off);
            let at = addr.wrapping_add(off);
            match self.monitor.execute(Command::ReadMemory {
                space,
                addr: at,
                len: n,
            }) {
                Ok(Reply::Memory(data)) => out.push_str(&render::memory_dump(at, fmt, &data)),
                Ok(_) => break,
                Err(e) if e == CommandError::unsupported("x") => {
                    return format!("Error: {}\n", e.desc)
                }
                Err(_) => {
                    out.push_str(&format!("{at:016x}: Cannot access memory\n"));
                    break;
                }
            }
            off += n;
        }
        out
    }

    /// `migrate`: start it, then (foreground, interactive) wait until it settles, printing
    /// progress once a second.
    fn migrate(
        &self,
        args: MigrateArgs,
        out: &mut dyn Write,
    ) -> io::Result<Result<String, CommandError>> {
        let mut args = args;
        let mut prefix = String::new();
        if !args.detach && !self.interactive {
            prefix.push_str("terminal does not allow synchronous migration, continuing detached\n");
            args.detach = true;
        }
        let detach = args.detach;
        if let Err(e) = self.monitor.execute(Command::Migrate(args)) {
            return Ok(Err(e));
        }
        if detach {
            return Ok(Ok(prefix));
        }
        let mut last_progress = Instant::now();
        let mut drawn = false;
        loop {
            let info = match self.monitor.execute(Command::QueryMigrate) {
                Ok(Reply::Migration(info)) => info,
                Ok(_) => return Ok(Ok(String::new())),
                Err(e) => return Ok(Err(e)),
            };
            let status = info.status.unwrap_or(crate::MigrationStatus::None);
            if status.is_settled() {
                if drawn {
                    // Leave the last progress line on screen, then the result below it.
                    out.write_all(b"\r\n")?;
                }
                return Ok(Ok(migrate_result(&info)));
            }
            if self.live {
                if !drawn || last_progress.elapsed() >= MIGRATE_LIVE_EVERY {
                    last_progress = Instant::now();
                    drawn = true;
                    out.write_all(live_progress(&info).as_bytes())?;
                    out.flush()?;
                }
            } else if last_progress.elapsed() >= MIGRATE_PROGRESS_EVERY {
                last_progress = Instant::now();
                write_crlf(out, &migrate_progress(&info))?;
                out.flush()?;
            }
            std::thread::sleep(MIGRATE_POLL);
        }
    }
}

/// One progress line redrawn in place (`\r`, cleared to the end of the line).
fn live_progress(info: &crate::MigrationInfo) -> String {
    let status = info.status.map(|s| s.as_str()).unwrap_or("none");
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    match &info.ram {
        Some(ram) => format!(
            "\r\x1b[Kmigrate: {status} | sent {:.1} MiB | remaining {:.1} MiB | {:.0} MB/s | round {} | expected downtime {} ms",
            mib(ram.transferred),
            mib(ram.remaining),
            ram.mbps / 8.0,
            ram.dirty_sync_count,
            info.expected_downtime.unwrap_or(0)
        ),
        None => format!("\r\x1b[Kmigrate: {status}"),
    }
}

fn migrate_progress(info: &crate::MigrationInfo) -> String {
    let status = info.status.map(|s| s.as_str()).unwrap_or("none");
    match &info.ram {
        Some(ram) => format!(
            "migrate: {status}, transferred {} MiB, remaining {} MiB, {:.1} mbps, dirty sync count {}\n",
            ram.transferred >> 20,
            ram.remaining >> 20,
            ram.mbps,
            ram.dirty_sync_count
        ),
        None => format!("migrate: {status}\n"),
    }
}

fn migrate_result(info: &crate::MigrationInfo) -> String {
    use crate::MigrationStatus as S;
    match info.status {
        Some(S::Completed) => format!(
            "migrate: completed, total time {} ms, downtime {} ms\n",
            info.total_time.unwrap_or(0),
            info.downtime.unwrap_or(0)
        ),
        Some(S::Failed) => {
            format!(
                "migrate: {}\n",
                info.error_desc.as_deref().unwrap_or("Migration failed")
            )
        }
        Some(S::Cancelled) => "migrate: cancelled\n".to_string(),
        Some(S::PostcopyPaused) => {
            "migrate: post-copy paused; resume with migrate -r URI\n".to_string()
        }
        _ => String::new(),
    }
}

/// HMP text for a reply that needs no session context.
pub fn render_reply(r: &Reply) -> String {
    match r {
        Reply::Empty => String::new(),
        Reply::Status(s) => render::status(s),
        Reply::Version(v) => render::version(v),
        Reply::Cpus(c) => render::cpus(c, 0),
        Reply::Memory(_) => String::new(),
        Reply::Snapshots(s) => render::snapshots(s),
        Reply::Jobs(j) => j
            .iter()
            .map(|j| {
                format!(
                    "{}: {} ({}/{})\n",
                    j.id,
                    j.status.as_str(),
                    j.current_progress,
                    j.total_progress
                )
            })
            .collect(),
        Reply::Migration(m) => render::migrate(m, None),
        Reply::MigrationParameters(p) => render::migrate_parameters(p),
        Reply::MigrationCapabilities(c) => render::migrate_capabilities(c),
        Reply::Forecast(f) => render::forecast(f),
        Reply::Network(n) => render::network(n),
        Reply::Block { text, .. } => text.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_conversion() {
        let mut v = Vec::new();
        write_crlf(&mut v, "a\nb\r\nc\n").unwrap();
        assert_eq!(v, b"a\r\nb\r\nc\r\n");
    }

    #[test]
    fn live_progress_redraws_one_line_with_every_figure() {
        let info = crate::MigrationInfo {
            status: Some(crate::MigrationStatus::Active),
            expected_downtime: Some(7),
            ram: Some(crate::migration::RamStats {
                transferred: 3 << 20,
                remaining: 5 << 20,
                mbps: 800.0,
                dirty_sync_count: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let l = live_progress(&info);
        assert!(l.starts_with("\r\x1b[K") && !l.contains('\n'), "{l:?}");
        for part in ["active", "sent 3.0 MiB", "remaining 5.0 MiB", "100 MB/s", "round 2", "expected downtime 7 ms"] {
            assert!(l.contains(part), "{part} missing in {l:?}");
        }
    }
}
