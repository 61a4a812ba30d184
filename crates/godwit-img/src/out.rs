//! Output helpers shared by the subcommands: qemu-img's human size and date formats and a small
//! ordered JSON writer that reproduces qemu-img's pretty-printing (4-space indent, key order).

/// A JSON value with ordered object keys.
pub enum Json {
    Obj(Vec<(&'static str, Json)>),
    Arr(Vec<Json>),
    Int(i128),
    Str(String),
    Bool(bool),
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for ch in s.chars() {
        match ch {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

impl Json {
    /// Pretty-print like QEMU's QJSON (4 spaces per level).
    pub fn pretty(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, 0);
        s
    }
    fn write(&self, s: &mut String, lvl: usize) {
        let ind = |n: usize| "    ".repeat(n);
        match self {
            Json::Obj(kv) if kv.is_empty() => s.push_str("{}"),
            Json::Obj(kv) => {
                s.push_str("{\n");
                for (i, (k, v)) in kv.iter().enumerate() {
                    s.push_str(&ind(lvl + 1));
                    s.push_str(&esc(k));
                    s.push_str(": ");
                    v.write(s, lvl + 1);
                    if i + 1 < kv.len() {
                        s.push(',');
                    }
                    s.push('\n');
                }
                s.push_str(&ind(lvl));
                s.push('}');
            }
            Json::Arr(a) if a.is_empty() => s.push_str("[]"),
            Json::Arr(a) => {
                s.push_str("[\n");
                for (i, v) in a.iter().enumerate() {
                    s.push_str(&ind(lvl + 1));
                    v.write(s, lvl + 1);
                    if i + 1 < a.len() {
                        s.push(',');
                    }
                    s.push('\n');
                }
                s.push_str(&ind(lvl));
                s.push(']');
            }
            Json::Int(n) => s.push_str(&n.to_string()),
            Json::Str(t) => s.push_str(&esc(t)),
            Json::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
        }
    }
}

/// C's `%.3g` for 0 <= x < 1e6.
fn g3(x: f64) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let mag = x.abs().log10().floor() as i32;
    let prec = (2 - mag).max(0) as usize;
    let s = format!("{x:.prec$}");
    // Rounding may reach the next power of ten (999.6 -> "1000"): %g then uses an exponent.
    let digits = s
        .split('.')
        .next()
        .map_or(0, |p| p.trim_start_matches('-').len());
    if digits > 3 {
        let m = (x.abs().log10().round()) as i32;
        return format!("1e+{m:02}");
    }
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// qemu's `size_to_str`: "0 B", "765 B", "623 KiB", "1.5 MiB", "0.977 KiB".
pub fn size_to_str(v: u64) -> String {
    const SUF: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let e = if v == 0 {
        0
    } else {
        (((v as f64) * 1.024).log2().floor() as usize) / 10
    };
    let e = e.min(6);
    let x = v as f64 / (1u128 << (10 * e)) as f64;
    format!("{} {}B", g3(x), SUF[e])
}

/// `%Y-%m-%d %H:%M:%S` of a Unix time in local time.
pub fn local_date(sec: u32) -> String {
    let t = sec as libc::time_t;
    // SAFETY: localtime_r only writes into the tm we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return "????-??-?? ??:??:??".into();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// qemu-img 7.2's snapshot list header.
pub fn snapshot_header() -> String {
    format!(
        "{:<10}{:<17}{:>8}{:>20}{:>13}{:>11}",
        "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"
    )
}

/// One snapshot list row in qemu-img 7.2's format.
pub fn snapshot_row(s: &qcow2::SnapshotInfo) -> String {
    let ns = s.vm_clock_ns;
    let secs = ns / 1_000_000_000;
    let clock = format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (ns / 1_000_000) % 1000
    );
    let icount = s.icount.map(|i| i.to_string()).unwrap_or_default();
    // Widths count bytes in C; pad by bytes so non-ASCII names align the same way.
    let pad = |t: &str, w: usize| {
        let mut o = t.to_string();
        o.push_str(&" ".repeat(w.saturating_sub(t.len())));
        o
    };
    format!(
        "{} {} {:>8}{:>20}{:>13}{:>11}",
        pad(&s.id, 9),
        pad(&s.name, 16),
        size_to_str(s.vm_state_size),
        local_date(s.date_sec),
        clock,
        icount
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes_match_qemu_examples() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(765), "765 B");
        assert_eq!(size_to_str(638072), "623 KiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1572864), "1.5 MiB");
        assert_eq!(size_to_str(64 << 20), "64 MiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
    }
}
