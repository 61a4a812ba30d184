//! What a booting Linux kernel's log is checked for, shared by the Linux boot-and-move tests
//! (`crates/godwit/tests/linux_moves.rs`, which includes this file) and the bench's `linux` rows
//! (`linux.rs`): the milestones a boot passes, the lines that mean something went wrong, and the
//! KEY=VALUE lines `scripts/linux-kit.sh` prints.

use std::collections::HashMap;

pub const BANNER: &str = "Linux version ";
pub const SLUB: &str = "SLUB: HWalign=";
pub const UNPACK: &str = "Trying to unpack rootfs image as initramfs";
pub const UNPACKED: &str = "Freeing initrd memory";
pub const INIT: &str = "Run /init as init process";

/// Kernel log lines that mean something went wrong (up to `Run /init`).
pub const BAD: &[&str] = &[
    "rcu: INFO",
    "detected stall",
    "soft lockup",
    "blocked for more than",
    "hard LOCKUP",
    "clocksource watchdog",
    "timekeeping watchdog",
    "Marking clocksource",
    "Oops",
    "BUG:",
    // A WARN() splat ("WARNING: CPU: 0 PID: 1 at …"), not boot notices such as
    // "RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable …".
    "WARNING: CPU",
    "Call Trace",
];

/// The pattern of [`BAD`] that `line` matches, if any.
pub fn bad(line: &str) -> Option<&'static str> {
    BAD.iter().copied().find(|b| line.contains(b))
}

/// The lines up to and including the first that contains `until` (all of them without one).
pub fn up_to<'a, S: AsRef<str>>(lines: &'a [S], until: Option<&str>) -> &'a [S] {
    let end = until
        .and_then(|u| lines.iter().position(|l| l.as_ref().contains(u)))
        .map_or(lines.len(), |i| i + 1);
    &lines[..end]
}

/// `scripts/linux-kit.sh`'s output as KEY → VALUE (a value runs to the end of its line).
pub fn kit_fields(stdout: &str) -> HashMap<&str, &str> {
    stdout.lines().filter_map(|l| l.split_once('=')).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_and_the_cut_at_init() {
        assert_eq!(bad("[ 93.6] watchdog: BUG: soft lockup - CPU#0 stuck for 26s!"), Some("soft lockup"));
        assert_eq!(bad("[ 74.3] RETBleed: WARNING: Spectre v2 mitigation leaves CPU vulnerable"), None);
        let l = ["a", "Run /init as init process", "Call Trace:"];
        assert_eq!(up_to(&l, Some(INIT)).len(), 2);
        assert_eq!(up_to(&l, Some("nowhere")).len(), 3);
        let k = kit_fields("profile=pvm\nappend=console=ttyS0 a=b\n");
        assert_eq!(k["append"], "console=ttyS0 a=b");
    }
}
