//! Migration status, parameters and statistics, named as QEMU's `query-migrate` names them,
//! plus a per-round record for the migration report.

use serde::{Deserialize, Serialize};

/// QEMU's MigrationStatus names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    #[default]
    None,
    Setup,
    Active,
    Device,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
    /// Post-copy: the guest runs on the destination, pages still move.
    PostcopyActive,
    /// Post-copy: the link failed; waiting for `migrate_recover` / `migrate -r`.
    PostcopyPaused,
    /// Post-copy: reconnecting.
    PostcopyRecover,
    /// `pause-before-switchover`: the source is paused before the final state goes out and
    /// waits for `migrate-continue`.
    PreSwitchover,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Device => "device",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::PostcopyActive => "postcopy-active",
            Status::PostcopyPaused => "postcopy-paused",
            Status::PostcopyRecover => "postcopy-recover",
            Status::PreSwitchover => "pre-switchover",
        }
    }
    pub fn is_running(&self) -> bool {
        matches!(
            self,
            Status::Setup
                | Status::Active
                | Status::Device
                | Status::Cancelling
                | Status::PostcopyActive
                | Status::PostcopyPaused
                | Status::PostcopyRecover
                | Status::PreSwitchover
        )
    }
}

/// Tunables (`migrate_set_parameter`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Params {
    /// Largest pause the switchover may cause, in ms (QEMU's `downtime-limit`).
    pub downtime_limit_ms: u64,
    /// Bytes per second, 0 = unlimited (QEMU's `max-bandwidth`).
    pub max_bandwidth: u64,
    /// The `auto-converge` capability: throttle a guest that dirties faster than the link.
    pub auto_converge: bool,
    /// First throttle step, percent (`cpu-throttle-initial`).
    pub throttle_initial: u8,
    /// Further steps, percent (`cpu-throttle-increment`).
    pub throttle_increment: u8,
    /// Ceiling (`max-cpu-throttle`).
    pub throttle_max: u8,
    /// `strategy auto`: forecast before migrating and turn auto-converge on when plain
    /// pre-copy would not converge.
    pub strategy_auto: bool,
    /// The `postcopy-ram` capability: `migrate_start_postcopy` may switch to post-copy.
    pub postcopy: bool,
    /// Switch to post-copy by itself after the first full pass (`strategy auto` chose it).
    pub postcopy_auto_start: bool,
    /// Bytes per second once post-copy runs, 0 = unlimited (QEMU's `max-postcopy-bandwidth`:
    /// the guest waits on the link from then on, so by default it is not capped).
    #[serde(default)]
    pub max_postcopy_bandwidth: u64,
    /// `tls-creds`: id of a `tls-creds-x509`/`tls-creds-psk` object; empty = plain.
    #[serde(default)]
    pub tls_creds: String,
    /// `tls-hostname`: the name the destination's certificate must carry (default: URI host).
    #[serde(default)]
    pub tls_hostname: String,
    /// `tls-authz`: id of an `authz-simple` object the client's certificate must match.
    #[serde(default)]
    pub tls_authz: String,
    /// The `multifd` capability: RAM pages over `multifd_channels` extra connections.
    #[serde(default)]
    pub multifd: bool,
    /// `multifd-channels` (QEMU's default: 2).
    #[serde(default = "default_channels")]
    pub multifd_channels: u8,
    /// `multifd-compression`.
    #[serde(default)]
    pub multifd_compression: Compression,
    /// `multifd-zlib-level` (0-9, QEMU's default 1).
    #[serde(default = "default_zlib")]
    pub multifd_zlib_level: u8,
    /// `multifd-zstd-level` (0-20, QEMU's default 1).
    #[serde(default = "default_zstd")]
    pub multifd_zstd_level: u8,
    /// The `pause-before-switchover` capability: at switchover the source pauses, reports
    /// `pre-switchover` and waits for `migrate-continue` before sending the final state.
    #[serde(default)]
    pub pause_before_switchover: bool,
}

fn default_channels() -> u8 {
    2
}
fn default_zlib() -> u8 {
    1
}
fn default_zstd() -> u8 {
    1
}

/// How multifd packets are compressed (QEMU's `MultiFDCompression`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    #[default]
    None,
    Zlib,
    Zstd,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Params {
            downtime_limit_ms: 30,
            max_bandwidth: 0,
            auto_converge: false,
            throttle_initial: 20,
            throttle_increment: 10,
            throttle_max: 99,
            strategy_auto: false,
            postcopy: false,
            postcopy_auto_start: false,
            max_postcopy_bandwidth: 0,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
            multifd: false,
            multifd_channels: default_channels(),
            multifd_compression: Compression::None,
            multifd_zlib_level: default_zlib(),
            multifd_zstd_level: default_zstd(),
            pause_before_switchover: false,
        }
    }
}

/// One pre-copy round, for `info migrate` and the report.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct Round {
    pub round: u32,
    /// Pages found dirty when the round started (round 0: populated pages).
    pub dirty_pages: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub elapsed_ms: f64,
    /// Time since the migration started, at the end of the round.
    pub at_ms: f64,
    pub bandwidth_bps: f64,
}

/// Live statistics of the current (or last) migration.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Stats {
    pub status: Status,
    pub error: Option<String>,
    pub total_time_ms: u64,
    pub setup_time_ms: u64,
    pub expected_downtime_ms: u64,
    /// Source paused → destination reported the guest running (includes one network hop).
    pub downtime_ms: f64,
    /// Destination: SWITCHOVER received → guest resumed.
    pub dest_switchover_ms: f64,
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub normal_bytes: u64,
    pub dirty_pages_rate: u64,
    pub dirty_sync_count: u64,
    pub mbps: f64,
    pub pages_per_second: u64,
    pub rounds: Vec<Round>,
    /// Current auto-converge throttle, percent.
    pub cpu_throttle_percentage: u64,
    pub downtime_limit_ms: u64,
    pub max_bandwidth: u64,
    /// When the migration started (to report a live total time between rounds).
    #[serde(skip)]
    pub started: Option<std::time::Instant>,
    /// Post-copy: pages the destination asked for (a guest access waited).
    #[serde(default)]
    pub postcopy_requests: u64,
    /// Post-copy: bytes sent after the guest started on the destination.
    #[serde(default)]
    pub postcopy_bytes: u64,
    /// Post-copy: pages the destination lacked when the guest started there.
    #[serde(default)]
    pub postcopy_pages: u64,
    /// Post-copy: times the link failed and was recovered.
    #[serde(default)]
    pub postcopy_recoveries: u64,
    /// multifd: bytes sent on the extra channels (included in `transferred`).
    #[serde(default)]
    pub multifd_bytes: u64,
    /// multifd compression: data-page bytes before and after compression.
    #[serde(default)]
    pub compress_in: u64,
    #[serde(default)]
    pub compress_out: u64,
}

impl Stats {
    /// Total time so far while running, the final total once settled.
    pub fn live_total_ms(&self) -> u64 {
        match self.started {
            Some(t) if self.status.is_running() => t.elapsed().as_millis() as u64,
            _ => self.total_time_ms,
        }
    }

    /// QEMU's `query-migrate` reply.
    pub fn to_qmp(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "status": self.status.as_str() });
        if self.status == Status::None {
            return v;
        }
        let m = v.as_object_mut().expect("object");
        m.insert("total-time".into(), self.live_total_ms().into());
        m.insert("setup-time".into(), self.setup_time_ms.into());
        if self.status == Status::Completed || self.status == Status::PostcopyActive {
            m.insert("downtime".into(), (self.downtime_ms.round() as u64).into());
            m.insert("x-godwit-downtime-exact-ms".into(), self.downtime_ms.into());
            m.insert("x-godwit-destination-switchover-ms".into(), self.dest_switchover_ms.into());
        } else {
            m.insert("expected-downtime".into(), self.expected_downtime_ms.into());
        }
        m.insert(
            "ram".into(),
            serde_json::json!({
                "transferred": self.transferred,
                "remaining": self.remaining,
                "total": self.total,
                "duplicate": self.duplicate,
                "normal": self.normal,
                "normal-bytes": self.normal_bytes,
                "dirty-pages-rate": self.dirty_pages_rate,
                "dirty-sync-count": self.dirty_sync_count,
                "mbps": self.mbps,
                "pages-per-second": self.pages_per_second,
                "page-size": 4096,
                "postcopy-requests": self.postcopy_requests,
                "postcopy-bytes": self.postcopy_bytes,
                "multifd-bytes": self.multifd_bytes,
            }),
        );
        if let Some(e) = &self.error {
            m.insert("error-desc".into(), e.clone().into());
        }
        v
    }

    /// QEMU-like `info migrate` text.
    pub fn to_hmp(&self) -> String {
        let mut s = format!("Migration status: {}\n", self.status.as_str());
        if self.status == Status::None {
            return s;
        }
        if let Some(e) = &self.error {
            s += &format!("Error: {e}\n");
        }
        s += &format!("total time: {} ms\n", self.live_total_ms());
        if self.status == Status::Completed || self.status == Status::PostcopyActive {
            s += &format!("downtime: {:.2} ms (source paused -> guest running on destination)\n", self.downtime_ms);
            s += &format!("destination switchover: {:.2} ms\n", self.dest_switchover_ms);
        } else {
            s += &format!("expected downtime: {} ms\n", self.expected_downtime_ms);
        }
        s += &format!("setup: {} ms\n", self.setup_time_ms);
        s += &format!("transferred ram: {} kbytes\n", self.transferred / 1024);
        s += &format!("throughput: {:.2} mbps\n", self.mbps);
        s += &format!("remaining ram: {} kbytes\n", self.remaining / 1024);
        s += &format!("total ram: {} kbytes\n", self.total / 1024);
        s += &format!("duplicate: {} pages\n", self.duplicate);
        s += &format!("normal: {} pages\n", self.normal);
        s += &format!("normal bytes: {} kbytes\n", self.normal_bytes / 1024);
        s += &format!("dirty sync count: {}\n", self.dirty_sync_count);
        s += &format!("dirty pages rate: {} pages\n", self.dirty_pages_rate);
        s += &format!("pages-per-second: {}\n", self.pages_per_second);
        if self.postcopy_pages > 0 {
            s += &format!("postcopy request count: {}\n", self.postcopy_requests);
            s += &format!("postcopy ram: {} kbytes\n", self.postcopy_bytes / 1024);
        }
        s
    }
}
