//! Migration data as the monitor sees it: `query-migrate` statistics (QEMU's `MigrationInfo`
//! and `MigrationStats` member names), tunable parameters with their HMP and QMP parsing and
//! range checks, capabilities, and Godwit's own convergence forecast.

use crate::types::MigrationStatus;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::str::FromStr;

/// RAM statistics of a migration (QEMU's `MigrationStats`; sizes in bytes, rates per second).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    /// Zero pages (recorded, not sent).
    pub duplicate: u64,
    pub skipped: u64,
    /// Pages sent whole.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages dirtied per second during the last round.
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub postcopy_requests: u64,
    pub page_size: u64,
    pub multifd_bytes: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
    pub dirty_sync_missed_zero_copy: u64,
}

/// `query-migrate` reply. Every member is optional: with no migration ever started QEMU answers
/// `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<MigrationStatus>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ram: Option<RamStats>,
    /// Milliseconds since the migration started.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub total_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expected_downtime: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub downtime: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub setup_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cpu_throttle_percentage: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_desc: Option<String>,
}

/// How Godwit moves a VM that may not converge (Godwit's own `strategy` parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStrategy {
    Precopy,
    AutoConverge,
    Postcopy,
    /// Pick from the forecast.
    Auto,
}

impl MigrationStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStrategy::Precopy => "precopy",
            MigrationStrategy::AutoConverge => "auto-converge",
            MigrationStrategy::Postcopy => "postcopy",
            MigrationStrategy::Auto => "auto",
        }
    }
}

impl FromStr for MigrationStrategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Self::Precopy,
            Self::AutoConverge,
            Self::Postcopy,
            Self::Auto,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
        .ok_or_else(|| format!("Parameter 'strategy' does not accept value '{s}'"))
    }
}

/// How a parameter's value is written and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    /// A plain count.
    Plain,
    /// Milliseconds (shown as `N ms`).
    Ms,
    /// Bytes per second; HMP takes a size whose default unit is MiB, as QEMU does.
    Bandwidth,
    /// Bytes; HMP takes a size whose default unit is bytes.
    Bytes,
}

/// A value type a parameter can have.
trait ParamValue: Sized + Clone {
    fn parse_hmp(name: &str, unit: Unit, s: &str) -> Result<Self, String>;
    fn from_json(name: &str, v: &Value) -> Result<Self, String>;
    fn show(&self, unit: Unit) -> String;
    fn in_range(&self, _lo: u64, _hi: u64) -> bool {
        true
    }
}

impl ParamValue for u64 {
    fn parse_hmp(name: &str, unit: Unit, s: &str) -> Result<Self, String> {
        let parsed = match unit {
            Unit::Bandwidth => parse_size(s, 1 << 20),
            Unit::Bytes => parse_size(s, 1),
            Unit::Plain | Unit::Ms => s.parse::<u64>().ok(),
        };
        parsed
            .ok_or_else(|| format!("Parameter '{name}' expects a non-negative integer, got '{s}'"))
    }
    fn from_json(name: &str, v: &Value) -> Result<Self, String> {
        v.as_u64()
            .ok_or_else(|| format!("Invalid parameter type for '{name}', expected: integer"))
    }
    fn show(&self, unit: Unit) -> String {
        match unit {
            Unit::Plain => self.to_string(),
            Unit::Ms => format!("{self} ms"),
            Unit::Bandwidth => format!("{self} bytes/second"),
            Unit::Bytes => format!("{self} bytes"),
        }
    }
    fn in_range(&self, lo: u64, hi: u64) -> bool {
        (lo..=hi).contains(self)
    }
}

impl ParamValue for bool {
    fn parse_hmp(name: &str, _unit: Unit, s: &str) -> Result<Self, String> {
        parse_on_off(s).ok_or_else(|| format!("Parameter '{name}' expects 'on' or 'off'"))
    }
    fn from_json(name: &str, v: &Value) -> Result<Self, String> {
        v.as_bool()
            .ok_or_else(|| format!("Invalid parameter type for '{name}', expected: boolean"))
    }
    fn show(&self, _unit: Unit) -> String {
        if *self { "on" } else { "off" }.to_string()
    }
}

impl ParamValue for MigrationStrategy {
    fn parse_hmp(_name: &str, _unit: Unit, s: &str) -> Result<Self, String> {
        s.parse()
    }
    fn from_json(name: &str, v: &Value) -> Result<Self, String> {
        v.as_str()
            .ok_or_else(|| format!("Invalid parameter type for '{name}', expected: string"))?
            .parse()
    }
    fn show(&self, _unit: Unit) -> String {
        self.as_str().to_string()
    }
}

impl ParamValue for String {
    fn parse_hmp(_name: &str, _unit: Unit, s: &str) -> Result<Self, String> {
        Ok(s.to_string())
    }
    /// QEMU's `StrOrNull`: `null` resets the value (to empty, which means "off").
    fn from_json(name: &str, v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(String::new()),
            _ => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("Invalid parameter type for '{name}', expected: string")),
        }
    }
    fn show(&self, _unit: Unit) -> String {
        format!("'{self}'")
    }
}

/// How multifd compresses pages (QEMU's `MultiFDCompression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MultifdCompression {
    None,
    Zlib,
    Zstd,
}

impl MultifdCompression {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

impl ParamValue for MultifdCompression {
    fn parse_hmp(name: &str, _unit: Unit, s: &str) -> Result<Self, String> {
        [Self::None, Self::Zlib, Self::Zstd]
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("Parameter '{name}' does not accept value '{s}'"))
    }
    fn from_json(name: &str, v: &Value) -> Result<Self, String> {
        let s = v
            .as_str()
            .ok_or_else(|| format!("Invalid parameter type for '{name}', expected: string"))?;
        Self::parse_hmp(name, Unit::Plain, s)
    }
    fn show(&self, _unit: Unit) -> String {
        self.as_str().to_string()
    }
}

/// Parses `on`/`off` (and QEMU's other boolean spellings).
pub fn parse_on_off(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" => Some(true),
        "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// Parses a size like QEMU's `qemu_strtosz`: a number (a fraction is allowed with a suffix),
/// then an optional suffix B/K/M/G/T/P/E (binary multiples); no suffix means `default_unit`.
pub fn parse_size(s: &str, default_unit: u64) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() {
        return None;
    }
    let mult: u64 = match suffix.to_ascii_uppercase().as_str() {
        "" => default_unit,
        "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        "P" | "PB" | "PIB" => 1 << 50,
        "E" | "EB" | "EIB" => 1 << 60,
        _ => return None,
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    if mult == 1 {
        return None; // fractions of a byte make no sense
    }
    let f: f64 = num.parse().ok()?;
    let v = f * mult as f64;
    (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

macro_rules! migration_parameters {
    ($( $field:ident : $ty:ty = $name:literal, $unit:ident, $lo:expr, $hi:expr; )*) => {
        /// Migration parameters (`migrate-set-parameters` / `query-migrate-parameters`,
        /// `migrate_set_parameter NAME VALUE` / `info migrate_parameters`). In a set request only
        /// the members to change are present; in a query reply the VMM fills those it supports.
        /// Values are range-checked here, as QEMU checks them, before the VMM sees them.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case", deny_unknown_fields)]
        pub struct MigrationParameters {
            $( #[serde(rename = $name, skip_serializing_if = "Option::is_none", default)]
               pub $field: Option<$ty>, )*
        }

        impl MigrationParameters {
            /// Every parameter name, in display order.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// Sets one parameter from HMP text (`migrate_set_parameter NAME VALUE`).
            pub fn set_from_hmp(&mut self, name: &str, value: &str) -> Result<(), String> {
                match name {
                    $( $name => {
                        let v = <$ty as ParamValue>::parse_hmp($name, Unit::$unit, value)?;
                        check_range($name, &v, $lo, $hi)?;
                        self.$field = Some(v);
                    } )*
                    _ => return Err(format!("Invalid parameter '{name}'")),
                }
                Ok(())
            }

            /// Parses the arguments object of `migrate-set-parameters`.
            pub fn from_qmp(args: &Map<String, Value>) -> Result<Self, String> {
                let mut p = MigrationParameters::default();
                for (key, value) in args {
                    match key.as_str() {
                        $( $name => {
                            let v = <$ty as ParamValue>::from_json($name, value)?;
                            check_range($name, &v, $lo, $hi)?;
                            p.$field = Some(v);
                        } )*
                        _ => return Err(format!("Parameter '{key}' is unexpected")),
                    }
                }
                Ok(p)
            }

            /// `(name, rendered value)` for every parameter that is set, as HMP shows them.
            pub fn hmp_lines(&self) -> Vec<(&'static str, String)> {
                let mut out = Vec::new();
                $( if let Some(v) = &self.$field { out.push(($name, v.show(Unit::$unit))); } )*
                out
            }

            /// Copies every parameter set in `other` into `self`.
            pub fn merge(&mut self, other: &MigrationParameters) {
                $( if other.$field.is_some() { self.$field = other.$field.clone(); } )*
            }

            /// True when no parameter is set.
            pub fn is_empty(&self) -> bool {
                true $( && self.$field.is_none() )*
            }
        }
    };
}

fn check_range<T: ParamValue>(name: &str, v: &T, lo: u64, hi: u64) -> Result<(), String> {
    if v.in_range(lo, hi) {
        Ok(())
    } else {
        Err(format!(
            "Parameter '{name}' expects an integer in the range of {lo} to {hi}"
        ))
    }
}

const ANY: u64 = u64::MAX;

migration_parameters! {
    announce_initial: u64 = "announce-initial", Ms, 0, 100_000;
    announce_max: u64 = "announce-max", Ms, 0, 100_000;
    announce_rounds: u64 = "announce-rounds", Plain, 0, 1000;
    announce_step: u64 = "announce-step", Ms, 1, 10_000;
    throttle_trigger_threshold: u64 = "throttle-trigger-threshold", Plain, 1, 100;
    cpu_throttle_initial: u64 = "cpu-throttle-initial", Plain, 1, 99;
    cpu_throttle_increment: u64 = "cpu-throttle-increment", Plain, 1, 99;
    cpu_throttle_tailslow: bool = "cpu-throttle-tailslow", Plain, 0, 1;
    max_cpu_throttle: u64 = "max-cpu-throttle", Plain, 1, 99;
    max_bandwidth: u64 = "max-bandwidth", Bandwidth, 0, ANY;
    downtime_limit: u64 = "downtime-limit", Ms, 0, 2_000_000;
    max_postcopy_bandwidth: u64 = "max-postcopy-bandwidth", Bandwidth, 0, ANY;
    multifd_channels: u64 = "multifd-channels", Plain, 1, 255;
    multifd_compression: MultifdCompression = "multifd-compression", Plain, 0, ANY;
    multifd_zlib_level: u64 = "multifd-zlib-level", Plain, 0, 9;
    multifd_zstd_level: u64 = "multifd-zstd-level", Plain, 0, 20;
    tls_creds: String = "tls-creds", Plain, 0, ANY;
    tls_hostname: String = "tls-hostname", Plain, 0, ANY;
    tls_authz: String = "tls-authz", Plain, 0, ANY;
    xbzrle_cache_size: u64 = "xbzrle-cache-size", Bytes, 0, ANY;
    strategy: MigrationStrategy = "strategy", Plain, 0, ANY;
}

/// A migration capability (QEMU's `MigrationCapability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCapability {
    Xbzrle,
    RdmaPinAll,
    AutoConverge,
    ZeroBlocks,
    Compress,
    Events,
    PostcopyRam,
    XColo,
    ReleaseRam,
    Block,
    ReturnPath,
    PauseBeforeSwitchover,
    Multifd,
    DirtyBitmaps,
    PostcopyBlocktime,
    LateBlockActivate,
    XIgnoreShared,
    ValidateUuid,
    BackgroundSnapshot,
    ZeroCopySend,
    PostcopyPreempt,
}

impl MigrationCapability {
    pub const ALL: [MigrationCapability; 21] = [
        Self::Xbzrle,
        Self::RdmaPinAll,
        Self::AutoConverge,
        Self::ZeroBlocks,
        Self::Compress,
        Self::Events,
        Self::PostcopyRam,
        Self::XColo,
        Self::ReleaseRam,
        Self::Block,
        Self::ReturnPath,
        Self::PauseBeforeSwitchover,
        Self::Multifd,
        Self::DirtyBitmaps,
        Self::PostcopyBlocktime,
        Self::LateBlockActivate,
        Self::XIgnoreShared,
        Self::ValidateUuid,
        Self::BackgroundSnapshot,
        Self::ZeroCopySend,
        Self::PostcopyPreempt,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Xbzrle => "xbzrle",
            Self::RdmaPinAll => "rdma-pin-all",
            Self::AutoConverge => "auto-converge",
            Self::ZeroBlocks => "zero-blocks",
            Self::Compress => "compress",
            Self::Events => "events",
            Self::PostcopyRam => "postcopy-ram",
            Self::XColo => "x-colo",
            Self::ReleaseRam => "release-ram",
            Self::Block => "block",
            Self::ReturnPath => "return-path",
            Self::PauseBeforeSwitchover => "pause-before-switchover",
            Self::Multifd => "multifd",
            Self::DirtyBitmaps => "dirty-bitmaps",
            Self::PostcopyBlocktime => "postcopy-blocktime",
            Self::LateBlockActivate => "late-block-activate",
            Self::XIgnoreShared => "x-ignore-shared",
            Self::ValidateUuid => "validate-uuid",
            Self::BackgroundSnapshot => "background-snapshot",
            Self::ZeroCopySend => "zero-copy-send",
            Self::PostcopyPreempt => "postcopy-preempt",
        }
    }
}

impl fmt::Display for MigrationCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MigrationCapability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("Invalid capability '{s}'"))
    }
}

/// A capability and whether it is on (`migrate-set-capabilities` element, `query-migrate-capabilities`
/// element).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityStatus {
    pub capability: MigrationCapability,
    pub state: bool,
}

/// Prediction for one strategy in a [`MigrationForecast`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct StrategyForecast {
    pub strategy: MigrationStrategy,
    pub converges: bool,
    /// Expected total time in ms (absent when it does not converge).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub total_time: Option<u64>,
    /// Expected downtime in ms.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub downtime: Option<u64>,
}

/// `query-migrate-forecast` reply (Godwit's own command): the sampled dirty rate and link
/// bandwidth and, per strategy, whether a migration would converge and how long it would take.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationForecast {
    /// Bytes of guest RAM.
    pub ram_total: u64,
    /// Bytes dirtied per second, sampled over `sample-time` ms.
    pub dirty_rate: u64,
    pub sample_time: u64,
    /// Bytes per second the link (or `max-bandwidth`) allows.
    pub bandwidth: u64,
    pub strategies: Vec<StrategyForecast>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recommended: Option<MigrationStrategy>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("100", 1 << 20), Some(100 << 20));
        assert_eq!(parse_size("100M", 1), Some(100 << 20));
        assert_eq!(parse_size("1.5G", 1), Some(3 << 29));
        assert_eq!(parse_size("64k", 1), Some(64 << 10));
        assert_eq!(parse_size("12", 1), Some(12));
        assert_eq!(parse_size("1.5", 1), None);
        assert_eq!(parse_size("x", 1), None);
        assert_eq!(parse_size("99999999999999999999", 1), None);
        assert_eq!(parse_size("20E", 1), None);
    }

    #[test]
    fn hmp_parameters_parse_and_check_ranges() {
        let mut p = MigrationParameters::default();
        p.set_from_hmp("downtime-limit", "30").unwrap();
        p.set_from_hmp("max-bandwidth", "100").unwrap();
        p.set_from_hmp("cpu-throttle-tailslow", "on").unwrap();
        p.set_from_hmp("strategy", "auto").unwrap();
        assert_eq!(p.downtime_limit, Some(30));
        assert_eq!(p.max_bandwidth, Some(100 << 20));
        assert_eq!(p.cpu_throttle_tailslow, Some(true));
        assert_eq!(p.strategy, Some(MigrationStrategy::Auto));
        assert!(p
            .set_from_hmp("cpu-throttle-initial", "100")
            .unwrap_err()
            .contains("range of 1 to 99"));
        assert!(p
            .set_from_hmp("nope", "1")
            .unwrap_err()
            .contains("Invalid parameter 'nope'"));
        assert!(p.set_from_hmp("downtime-limit", "-1").is_err());
        let lines = p.hmp_lines();
        assert!(lines.contains(&("max-bandwidth", "104857600 bytes/second".to_string())));
        assert!(lines.contains(&("downtime-limit", "30 ms".to_string())));
        assert!(lines.contains(&("cpu-throttle-tailslow", "on".to_string())));
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn qmp_parameters_parse_and_serialize() {
        let args = json!({"downtime-limit": 40, "max-bandwidth": 1000});
        let p = MigrationParameters::from_qmp(args.as_object().unwrap()).unwrap();
        assert_eq!(p.downtime_limit, Some(40));
        assert_eq!(serde_json::to_value(&p).unwrap(), args);
        let bad = json!({"downtime-limit": "x"});
        assert_eq!(
            MigrationParameters::from_qmp(bad.as_object().unwrap()).unwrap_err(),
            "Invalid parameter type for 'downtime-limit', expected: integer"
        );
        let unknown = json!({"foo": 1});
        assert!(MigrationParameters::from_qmp(unknown.as_object().unwrap())
            .unwrap_err()
            .contains("unexpected"));
    }

    #[test]
    fn transport_parameters_parse_in_hmp_and_qmp() {
        let mut p = MigrationParameters::default();
        p.set_from_hmp("tls-creds", "tls0").unwrap();
        p.set_from_hmp("multifd-compression", "zstd").unwrap();
        p.set_from_hmp("multifd-zstd-level", "3").unwrap();
        assert!(p.set_from_hmp("multifd-compression", "lz4").unwrap_err().contains("does not accept value 'lz4'"));
        assert!(p.set_from_hmp("multifd-zlib-level", "10").unwrap_err().contains("0 to 9"));
        let lines = p.hmp_lines();
        assert!(lines.contains(&("tls-creds", "'tls0'".to_string())));
        assert!(lines.contains(&("multifd-compression", "zstd".to_string())));
        let args = json!({"tls-creds": "tls1", "tls-hostname": "dst.example", "multifd-compression": "zlib", "multifd-channels": 4});
        let q = MigrationParameters::from_qmp(args.as_object().unwrap()).unwrap();
        assert_eq!(q.tls_creds.as_deref(), Some("tls1"));
        assert_eq!(q.multifd_compression, Some(MultifdCompression::Zlib));
        assert_eq!(serde_json::to_value(&q).unwrap(), args);
        let off = json!({"tls-creds": null});
        assert_eq!(MigrationParameters::from_qmp(off.as_object().unwrap()).unwrap().tls_creds.as_deref(), Some(""));
        let bad = json!({"tls-creds": 5});
        assert!(MigrationParameters::from_qmp(bad.as_object().unwrap()).unwrap_err().contains("expected: string"));
    }

    #[test]
    fn capability_names_round_trip() {
        for c in MigrationCapability::ALL {
            assert_eq!(c.as_str().parse::<MigrationCapability>(), Ok(c));
            assert_eq!(serde_json::to_value(c).unwrap(), json!(c.as_str()));
        }
    }
}
