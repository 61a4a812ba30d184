//! Text renderings of replies, laid out as QEMU's HMP prints them (`info status`,
//! `info cpus`, `info snapshots`' table, `info migrate`, `x`/`xp` dumps), plus `help`.
//! Lines end in `\n` here; the session converts to the `\r\n` QEMU sends.

use super::parse::{DumpFormat, HmpEntry, COMMANDS, INFO_COMMANDS};
use crate::migration::{CapabilityStatus, MigrationForecast, MigrationInfo, MigrationParameters};
use crate::types::{CpuInfo, SnapshotInfo, StatusInfo, VersionInfo};
use crate::util::{local_time, size_to_str};
use std::fmt::Write as _;

pub fn status(s: &StatusInfo) -> String {
    let mut out = format!(
        "VM status: {}",
        if s.running { "running" } else { "paused" }
    );
    if s.singlestep {
        out.push_str(" (single step mode)");
    }
    if !s.running && s.status != crate::RunState::Paused {
        let _ = write!(out, " ({})", s.status);
    }
    out.push('\n');
    out
}

pub fn version(v: &VersionInfo) -> String {
    let q = v.qemu;
    if v.package.is_empty() {
        format!("{}.{}.{}\n", q.major, q.minor, q.micro)
    } else {
        format!("{}.{}.{} ({})\n", q.major, q.minor, q.micro, v.package)
    }
}

pub fn cpus(list: &[CpuInfo], selected: u32) -> String {
    let mut out = String::new();
    for c in list {
        let mark = if c.cpu_index == selected { '*' } else { ' ' };
        let _ = writeln!(
            out,
            "{mark} CPU #{}: thread_id={}",
            c.cpu_index, c.thread_id
        );
    }
    out
}

/// QEMU's `info snapshots`: the list of snapshots present on all disks, IDs shown as `--`.
/// `info network`: QEMU's two lines per card (card, then its backend), plus Godwit's counters.
pub fn network(list: &[crate::types::NicInfo]) -> String {
    let mut out = String::new();
    for (i, n) in list.iter().enumerate() {
        let _ = writeln!(out, "{}: index={i},type=nic,model={},macaddr={}", n.name, n.model, n.macaddr);
        let _ = writeln!(out, " \\ {}: index={i},type={},ifname={}", n.name, n.backend, n.ifname);
        let _ = writeln!(
            out,
            "    rx={} tx={} rx_dropped={} tx_dropped={} announced={}",
            n.rx_frames, n.tx_frames, n.rx_dropped, n.tx_dropped, n.announces
        );
    }
    out
}

pub fn snapshots(list: &[SnapshotInfo]) -> String {
    if list.is_empty() {
        return "There is no snapshot available.\n".to_string();
    }
    let mut out = String::from("List of snapshots present on all disks:\n");
    let _ = writeln!(
        out,
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    );
    for s in list {
        let t = local_time(s.date_sec);
        let date = format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year, t.month, t.day, t.hour, t.minute, t.second
        );
        let secs = s.vm_clock_sec.max(0) as u64 + u64::from(s.vm_clock_nsec / 1_000_000_000);
        let clock = format!(
            "{:02}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (s.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<9} {:<16} {:>8}{:>20}{:>13}{:>11}",
            "--",
            s.name,
            size_to_str(s.vm_state_size),
            date,
            clock,
            icount
        );
    }
    out
}

/// QEMU's `info migrate` layout: capabilities line, status block, RAM block.
pub fn migrate(info: &MigrationInfo, caps: Option<&[CapabilityStatus]>) -> String {
    let mut out = String::new();
    if let Some(caps) = caps.filter(|c| !c.is_empty()) {
        out.push_str("capabilities: ");
        for c in caps {
            let _ = write!(
                out,
                "{}: {} ",
                c.capability,
                if c.state { "on" } else { "off" }
            );
        }
        out.push('\n');
    }
    if let Some(status) = info.status {
        let _ = write!(out, "Migration status: {status}");
        match (&info.error_desc, status) {
            (Some(e), crate::MigrationStatus::Failed) => {
                let _ = writeln!(out, " ({e})");
            }
            _ => out.push('\n'),
        }
        let _ = writeln!(out, "total time: {} ms", info.total_time.unwrap_or(0));
        if let Some(v) = info.expected_downtime {
            let _ = writeln!(out, "expected downtime: {v} ms");
        }
        if let Some(v) = info.downtime {
            let _ = writeln!(out, "downtime: {v} ms");
        }
        if let Some(v) = info.setup_time {
            let _ = writeln!(out, "setup: {v} ms");
        }
    }
    if let Some(ram) = &info.ram {
        let _ = writeln!(out, "transferred ram: {} kbytes", ram.transferred >> 10);
        let _ = writeln!(out, "throughput: {:.2} mbps", ram.mbps);
        let _ = writeln!(out, "remaining ram: {} kbytes", ram.remaining >> 10);
        let _ = writeln!(out, "total ram: {} kbytes", ram.total >> 10);
        let _ = writeln!(out, "duplicate: {} pages", ram.duplicate);
        let _ = writeln!(out, "skipped: {} pages", ram.skipped);
        let _ = writeln!(out, "normal: {} pages", ram.normal);
        let _ = writeln!(out, "normal bytes: {} kbytes", ram.normal_bytes >> 10);
        let _ = writeln!(out, "dirty sync count: {}", ram.dirty_sync_count);
        let _ = writeln!(out, "page size: {} kbytes", ram.page_size >> 10);
        let _ = writeln!(out, "multifd bytes: {} kbytes", ram.multifd_bytes >> 10);
        let _ = writeln!(out, "pages-per-second: {}", ram.pages_per_second);
        if ram.dirty_pages_rate != 0 {
            let _ = writeln!(out, "dirty pages rate: {} pages", ram.dirty_pages_rate);
        }
        if ram.postcopy_requests != 0 {
            let _ = writeln!(out, "postcopy request count: {}", ram.postcopy_requests);
        }
        if ram.precopy_bytes != 0 {
            let _ = writeln!(out, "precopy ram: {} kbytes", ram.precopy_bytes >> 10);
        }
        if ram.downtime_bytes != 0 {
            let _ = writeln!(out, "downtime ram: {} kbytes", ram.downtime_bytes >> 10);
        }
        if ram.postcopy_bytes != 0 {
            let _ = writeln!(out, "postcopy ram: {} kbytes", ram.postcopy_bytes >> 10);
        }
    }
    if let Some(p) = info.cpu_throttle_percentage {
        let _ = writeln!(out, "cpu throttle percentage: {p}");
    }
    out
}

pub fn migrate_parameters(p: &MigrationParameters) -> String {
    p.hmp_lines()
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}\n"))
        .collect()
}

pub fn migrate_capabilities(caps: &[CapabilityStatus]) -> String {
    caps.iter()
        .map(|c| format!("{}: {}\n", c.capability, if c.state { "on" } else { "off" }))
        .collect()
}

pub fn forecast(f: &MigrationForecast) -> String {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut out = String::new();
    let _ = writeln!(out, "ram: {:.1} MiB", mib(f.ram_total));
    let _ = writeln!(
        out,
        "dirty rate: {:.1} MiB/s (sampled over {} ms)",
        mib(f.dirty_rate),
        f.sample_time
    );
    let _ = writeln!(out, "bandwidth: {:.1} MiB/s", mib(f.bandwidth));
    for s in &f.strategies {
        let _ = write!(out, "{}: ", s.strategy.as_str());
        if s.converges {
            out.push_str("converges");
            if let Some(t) = s.total_time {
                let _ = write!(out, ", total ~{t} ms");
            }
            if let Some(d) = s.downtime {
                let _ = write!(out, ", downtime ~{d} ms");
            }
            out.push('\n');
        } else {
            out.push_str("does not converge\n");
        }
    }
    if let Some(r) = f.recommended {
        let _ = writeln!(out, "recommended: {}", r.as_str());
    }
    out
}

fn entry_line(prefix: &str, e: &HmpEntry) -> String {
    if e.params.is_empty() {
        format!("{prefix}{}  -- {}\n", e.names, e.help)
    } else {
        format!("{prefix}{} {} -- {}\n", e.names, e.params, e.help)
    }
}

/// `help` (all commands), `help info` (info subcommands), `help CMD` (that command).
pub fn help(topic: Option<&str>) -> Result<String, String> {
    let matches = |e: &HmpEntry, name: &str| e.names.split('|').any(|n| n == name);
    match topic {
        None => Ok(COMMANDS.iter().chain(crate::block::HMP_COMMANDS).map(|e| entry_line("", e)).collect()),
        Some("info") => Ok(INFO_COMMANDS
            .iter()
            .map(|e| entry_line("info ", e))
            .collect()),
        Some(t) => COMMANDS
            .iter()
            .chain(crate::block::HMP_COMMANDS)
            .find(|e| matches(e, t))
            .map(|e| entry_line("", e))
            .ok_or_else(|| format!("unknown command: '{t}'")),
    }
}

/// The body of an `x`/`xp` dump of `data` read at `addr`, QEMU's layout: 16-digit address,
/// 8 units per line for bytes and 16 bytes per line otherwise; `c` shows characters.
pub fn memory_dump(addr: u64, fmt: DumpFormat, data: &[u8]) -> String {
    let wsize = if fmt.format == 'c' {
        1
    } else {
        fmt.size.max(1) as usize
    };
    let line_size = if wsize == 1 { 8 } else { 16 };
    let bits = wsize * 8;
    let max_digits = match fmt.format {
        'o' => bits.div_ceil(3),
        'u' | 'd' => (bits * 10).div_ceil(33),
        _ => bits / 4,
    };
    let mut out = String::new();
    for (line_no, chunk) in data.chunks(line_size).enumerate() {
        let _ = write!(
            out,
            "{:016x}:",
            addr.wrapping_add((line_no * line_size) as u64)
        );
        for unit in chunk.chunks(wsize) {
            let mut raw = [0u8; 8];
            raw[..unit.len()].copy_from_slice(unit);
            let v = u64::from_le_bytes(raw);
            out.push(' ');
            match fmt.format {
                'o' => {
                    let s = if v == 0 {
                        "0".to_string()
                    } else {
                        format!("0{v:o}")
                    };
                    let _ = write!(out, "{s:>max_digits$}");
                }
                'u' => {
                    let _ = write!(out, "{v:>max_digits$}");
                }
                'd' => {
                    let shift = 64 - bits as u32;
                    let signed = ((v << shift) as i64) >> shift;
                    let _ = write!(out, "{signed:>max_digits$}");
                }
                'c' => out.push_str(&printc(v as u8)),
                _ => {
                    let _ = write!(out, "0x{v:0max_digits$x}");
                }
            }
        }
        out.push('\n');
    }
    out
}

fn printc(c: u8) -> String {
    match c {
        b'\'' => "'\\''".into(),
        b'\\' => "'\\\\'".into(),
        b'\n' => "'\\n'".into(),
        b'\r' => "'\\r'".into(),
        32..=126 => format!("'{}'", c as char),
        _ => format!("'\\x{c:02x}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RunState;

    #[test]
    fn status_lines() {
        assert_eq!(
            status(&StatusInfo::from(RunState::Running)),
            "VM status: running\n"
        );
        assert_eq!(
            status(&StatusInfo::from(RunState::Paused)),
            "VM status: paused\n"
        );
        assert_eq!(
            status(&StatusInfo::from(RunState::Postmigrate)),
            "VM status: paused (postmigrate)\n"
        );
    }

    #[test]
    fn dumps_like_qemu() {
        let data: Vec<u8> = (0u8..20).collect();
        let f = |count, format, size| DumpFormat {
            count,
            format,
            size,
        };
        assert_eq!(
            memory_dump(0x1000, f(2, 'x', 4), &data[..8]),
            "0000000000001000: 0x03020100 0x07060504\n"
        );
        assert_eq!(
            memory_dump(0, f(10, 'x', 1), &data[..10]),
            "0000000000000000: 0x00 0x01 0x02 0x03 0x04 0x05 0x06 0x07\n0000000000000008: 0x08 0x09\n"
        );
        assert_eq!(
            memory_dump(0, f(1, 'd', 2), &[0xff, 0xff]),
            "0000000000000000:    -1\n"
        );
        assert_eq!(
            memory_dump(0, f(1, 'u', 2), &[0xff, 0xff]),
            "0000000000000000: 65535\n"
        );
        assert_eq!(
            memory_dump(0, f(2, 'o', 1), &[8, 0]),
            "0000000000000000: 010   0\n"
        );
        assert_eq!(
            memory_dump(0, f(3, 'c', 4), b"A\n\x01"),
            "0000000000000000: 'A' '\\n' '\\x01'\n"
        );
        assert_eq!(
            memory_dump(0, f(1, 'x', 8), &0x1122334455667788u64.to_le_bytes()),
            "0000000000000000: 0x1122334455667788\n"
        );
    }

    #[test]
    fn snapshot_table_layout() {
        let s = SnapshotInfo {
            id: "1".into(),
            name: "snap0".into(),
            vm_state_size: 21_390_950,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_sec: 3723,
            vm_clock_nsec: 456_000_000,
            icount: None,
        };
        let text = snapshots(&[s]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "List of snapshots present on all disks:");
        assert_eq!(
            lines[1],
            "ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT"
        );
        assert!(
            lines[2].starts_with("--        snap0            20.4 MiB "),
            "{}",
            lines[2]
        );
        assert!(
            lines[2].ends_with(" 01:02:03.456           "),
            "{:?}",
            lines[2]
        );
        assert_eq!(snapshots(&[]), "There is no snapshot available.\n");
    }

    #[test]
    fn help_lists_commands() {
        let all = help(None).unwrap();
        assert!(all.contains("cont|c  -- resume emulation\n"));
        assert!(all.contains("x /fmt addr -- virtual memory dump"));
        assert!(help(Some("info"))
            .unwrap()
            .contains("info status  -- show the current VM status"));
        assert_eq!(help(Some("q")).unwrap(), "quit|q  -- quit the emulator\n");
        assert!(help(Some("nope")).is_err());
    }
}
