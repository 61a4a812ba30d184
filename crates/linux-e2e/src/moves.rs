//! The monitor side of one live migration, shared by the suite and its plumbing test: the
//! destination's and the source's capabilities, the bandwidth, `migrate -d`, the switch to
//! post-copy, the wait; then the hand-over of the console (the source's last heartbeat, the
//! destination's first) and the check that the heartbeat sequence carries on.

use crate::vm::{field, Machine, R};
use std::time::{Duration, Instant};

const MIGRATION: Duration = Duration::from_secs(300);
const T: Duration = Duration::from_secs(60);

/// The link each kind gets: plenty for pre-copy; for the others less than the guest dirties, so
/// pre-copy alone would not converge (post-copy and throttling are what finish them).
pub fn bandwidth(kind: &str) -> &'static str {
    if kind == "precopy" {
        "1G"
    } else {
        "128M"
    }
}

/// HMP output that is not an error.
pub fn expect_ok(out: String) -> R<()> {
    let low = out.to_ascii_lowercase();
    if low.contains("error") || low.contains("unknown command") || low.contains("not ") && low.contains("support") {
        Err(out.replace('\n', "; "))
    } else {
        Ok(())
    }
}

/// Migrates `src` to `dst` (started with `-incoming uri`) by `kind`: `precopy`, `postcopy` or
/// `auto-converge`; returns the final `info migrate` of
/// the source and the wall time from `migrate` to completion.
pub fn live_migrate(src: &mut Machine, dst: &mut Machine, uri: &str, kind: &str) -> R<(String, u128)> {
    let on = |c: bool| if c { "on" } else { "off" };
    if kind == "postcopy" {
        expect_ok(dst.hmp()?.cmd("migrate_set_capability postcopy-ram on")?)?;
    }
    let h = src.hmp()?;
    expect_ok(h.cmd(&format!("migrate_set_parameter max-bandwidth {}", bandwidth(kind)))?)?;
    // Both capabilities every time: this VM may have been the destination of a post-copy
    // migration (postcopy-ram on), which a fresh destination would refuse.
    expect_ok(h.cmd(&format!("migrate_set_capability postcopy-ram {}", on(kind == "postcopy")))?)?;
    expect_ok(h.cmd(&format!("migrate_set_capability auto-converge {}", on(kind == "auto-converge")))?)?;
    let t0 = Instant::now();
    expect_ok(h.cmd(&format!("migrate -d {uri}"))?)?;
    if kind == "postcopy" {
        std::thread::sleep(Duration::from_secs(1));
        let info = h.cmd("info migrate")?;
        if !info.contains("Migration status: active") {
            return Err(format!("not active one second in, so never post-copy: {}", info.replace('\n', "; ")));
        }
        expect_ok(h.cmd("migrate_start_postcopy")?)?;
    }
    let info = h.wait_migration(MIGRATION)?;
    Ok((info, t0.elapsed().as_millis()))
}

/// After a completed migration: the source's last heartbeat (if it printed one) and the
/// destination's first line, which must continue the sequence.
pub fn handover(src: &mut Machine, dst: &mut Machine) -> R<(Option<u64>, String)> {
    src.collect(Duration::from_millis(300));
    let last = src.seen.iter().rev().find_map(|(_, l)| l.strip_prefix("HEARTBEAT").and(field(l, "seq")));
    let (_, first) = dst.wait_for("HEARTBEAT", T)?;
    let more = dst.collect(Duration::from_millis(800));
    check_heartbeats(last, &first, &more)?;
    Ok((last, first))
}

/// The destination's heartbeats continue the source's: its first is the next one (or the one
/// after, when a line was cut in half at the switchover), and then one by one.
pub fn check_heartbeats(last_src: Option<u64>, first: &str, more: &[(Instant, String)]) -> R<()> {
    let first_seq = field(first, "seq").ok_or_else(|| format!("bad heartbeat: {first}"))?;
    if let Some(l) = last_src {
        if first_seq <= l || first_seq > l + 2 {
            return Err(format!("heartbeats jumped from {l} (source) to {first_seq} (destination)"));
        }
    }
    let mut prev = first_seq;
    for (_, line) in more.iter().filter(|(_, l)| l.starts_with("HEARTBEAT")) {
        let s = field(line, "seq").ok_or_else(|| format!("bad heartbeat: {line}"))?;
        if s != prev + 1 {
            return Err(format!("heartbeat {s} after {prev} on the destination"));
        }
        prev = s;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_continuity() {
        let hb = |s: u64| (Instant::now(), format!("HEARTBEAT seq={s} mono_ms=1"));
        assert!(check_heartbeats(Some(10), "HEARTBEAT seq=11", &[hb(12), hb(13)]).is_ok());
        assert!(check_heartbeats(Some(10), "HEARTBEAT seq=12", &[hb(13)]).is_ok());
        assert!(check_heartbeats(Some(10), "HEARTBEAT seq=10", &[]).is_err());
        assert!(check_heartbeats(Some(10), "HEARTBEAT seq=13", &[]).is_err());
        assert!(check_heartbeats(Some(10), "HEARTBEAT seq=11", &[hb(13)]).is_err());
        assert!(expect_ok(String::new()).is_ok());
        assert!(expect_ok("Error: no such snapshot".into()).is_err());
    }
}
