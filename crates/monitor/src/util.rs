//! Small helpers the renderers share: local calendar time (through libc's `localtime_r`, so
//! dates match what QEMU prints on the same host) and C-style number formatting.

/// A broken-down local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i32,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
}

/// Converts seconds since the epoch to local time. Falls back to UTC arithmetic if libc fails.
pub fn local_time(secs: i64) -> LocalTime {
    let t: libc::time_t = secs as libc::time_t;
    // SAFETY: `tm` is a plain C struct that localtime_r fills; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if ok {
        return LocalTime {
            year: tm.tm_year + 1900,
            month: (tm.tm_mon + 1) as u32,
            day: tm.tm_mday as u32,
            hour: tm.tm_hour as u32,
            minute: tm.tm_min as u32,
            second: tm.tm_sec as u32,
        };
    }
    // Civil-from-days (UTC).
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    LocalTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u32,
        minute: (rem / 60 % 60) as u32,
        second: (rem % 60) as u32,
    }
}

/// C's `%.3g`: three significant digits, trailing zeros dropped, exponent form when the
/// exponent is < -4 or >= 3.
pub fn format_g3(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return if v == 0.0 {
            "0".to_string()
        } else {
            v.to_string()
        };
    }
    // Round to 3 significant digits first, then decide the form from the rounded exponent.
    let sci = format!("{:.2e}", v); // d.dde±x
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let mant = trim_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let decimals = (2 - exp).max(0) as usize;
    trim_zeros(&format!("{:.*}", decimals, v)).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// QEMU's `size_to_str`: `%0.3g` of the value in the largest binary unit that keeps it below
/// 1000, e.g. `20.4 MiB`, `512 B`.
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let mut i = 0usize;
    // Switch to the next unit once the value reaches 1000 of the current one.
    while i + 1 < SUFFIXES.len() && (val as f64) >= 1000.0 * (1u64 << (10 * i)) as f64 {
        i += 1;
    }
    let div = (1u64 << (10 * i)) as f64;
    format!("{} {}B", format_g3(val as f64 / div), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn g3_matches_c() {
        assert_eq!(format_g3(20.4), "20.4");
        assert_eq!(format_g3(512.0), "512");
        assert_eq!(format_g3(1.5), "1.5");
        assert_eq!(format_g3(1.0), "1");
        assert_eq!(format_g3(999.6), "1e+03");
        assert_eq!(format_g3(0.5), "0.5");
        assert_eq!(format_g3(12.345), "12.3");
    }

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1024), "1 KiB");
        assert_eq!(size_to_str(20 * 1024 * 1024 + 400 * 1024), "20.4 MiB");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(0), "0 B");
    }

    #[test]
    fn utc_fallback_arithmetic() {
        // The libc path depends on TZ; check the conversion on a known instant via TZ=UTC
        // semantics of the fallback by calling it through a date that is the same everywhere
        // within a day: only the date fields of noon UTC are stable across zones ±11h.
        let t = local_time(1_700_000_000 - 1_700_000_000 % 86_400 + 43_200);
        assert_eq!((t.year, t.month, t.day), (2023, 11, 14));
    }
}
