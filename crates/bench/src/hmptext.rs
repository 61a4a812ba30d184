//! Reading human-monitor answers. QEMU's HMP on a socket echoes what it is sent, redrawing the
//! line with terminal escapes after every character; Godwit answers plainly. [`clean`] turns
//! either into the answer's lines, and [`value`]/[`number`] read `key: value` lines such as
//! `info migrate`'s `downtime: 3 ms` or `transferred ram: 2488 kbytes`.

/// Removes ANSI escape sequences (`ESC [ ... final`) and carriage returns.
pub fn strip_escapes(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut it = raw.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\x1b' => {
                if it.peek() == Some(&'[') {
                    it.next();
                    // Parameters and intermediates, up to the final byte 0x40..=0x7e.
                    for d in it.by_ref() {
                        if ('\x40'..='\x7e').contains(&d) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The answer to `cmd` from the raw bytes read up to (not including) the prompt: escapes and
/// `\r` removed, and a first line that is the echo of the command dropped.
pub fn clean(raw: &str, cmd: &str) -> String {
    let s = strip_escapes(raw);
    let cmd = cmd.trim();
    match s.split_once('\n') {
        Some((first, rest)) if !cmd.is_empty() && first.trim_end().ends_with(cmd) => {
            rest.to_string()
        }
        None if !cmd.is_empty() && s.trim_end().ends_with(cmd) => String::new(),
        _ => s,
    }
}

/// The value of the first line `key: value` (key compared exactly, at the start of the line).
pub fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.trim_start()
            .strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The number at the start of `key`'s value (`downtime: 3.25 ms (...)` → 3.25).
pub fn number(text: &str, key: &str) -> Option<f64> {
    let v = value(text, key)?;
    let end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e' || c == '+'))
        .unwrap_or(v.len());
    v[..end].parse().ok()
}

/// `Migration status: X` → X.
pub fn migration_status(text: &str) -> Option<&str> {
    value(text, "Migration status")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from QEMU 7.2 over `-monitor unix:` (echo shortened to its last redraw).
    const QEMU: &str = "i\x1b[K\x1b[Din\x1b[K\x1b[D\x1b[Dinfo migrate\x1b[K\r\nglobals:\r\nstore-global-state: on\r\n\
Migration status: completed\r\ntotal time: 69 ms\r\ndowntime: 3 ms\r\nsetup: 2 ms\r\n\
transferred ram: 2488 kbytes\r\nthroughput: 307.61 mbps\r\ndirty sync count: 2\r\n";

    const GODWIT: &str = "Migration status: completed\ntotal time: 41 ms\n\
downtime: 1.87 ms (source paused -> guest running on destination)\ntransferred ram: 1200 kbytes\n";

    #[test]
    fn qemu_echo_is_dropped_and_fields_read() {
        let t = clean(QEMU, "info migrate");
        assert!(t.starts_with("globals:"), "{t:?}");
        assert_eq!(migration_status(&t), Some("completed"));
        assert_eq!(number(&t, "total time"), Some(69.0));
        assert_eq!(number(&t, "downtime"), Some(3.0));
        assert_eq!(number(&t, "transferred ram"), Some(2488.0));
        assert_eq!(number(&t, "throughput"), Some(307.61));
        assert_eq!(number(&t, "dirty sync count"), Some(2.0));
        assert_eq!(number(&t, "expected downtime"), None);
    }

    #[test]
    fn godwit_answer_without_echo_is_kept_whole() {
        let t = clean(GODWIT, "info migrate");
        assert_eq!(migration_status(&t), Some("completed"));
        assert_eq!(number(&t, "downtime"), Some(1.87));
        // `downtime` must not match `expected downtime` nor the other way round.
        assert_eq!(value(&t, "expected downtime"), None);
    }

    #[test]
    fn echo_only_answer_is_empty() {
        assert_eq!(clean("quit\x1b[K\r\n", "quit"), "");
        assert_eq!(
            clean(
                "migrate_set_parameter downtime-limit 30",
                "migrate_set_parameter downtime-limit 30"
            ),
            ""
        );
    }
}
