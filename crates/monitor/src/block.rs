//! Block-layer commands for storage migration: block nodes (`query-block`,
//! `query-named-block-nodes`, `blockdev-add`/`-del`), the NBD server (`nbd-server-start`,
//! `nbd-server-add`, `block-export-add`, `nbd-server-stop`, ...), and mirror jobs
//! (`drive-mirror`, `blockdev-mirror`, `query-block-jobs`, `block-job-cancel`/`-complete`/
//! `-set-speed`). QMP and HMP parse into [`BlockCommand`]; the job verbs go to the monitor's
//! job registry, the rest to [`Backend::block`](crate::Backend::block), which answers QMP
//! JSON (HMP renders it here).

use crate::error::CommandError;
use crate::qmp::commands::Args;
use serde_json::{json, Map, Value};

/// QMP names of the block commands, for `query-commands`.
pub const QMP_COMMANDS: &[&str] = &[
    "query-block",
    "query-named-block-nodes",
    "blockdev-add",
    "blockdev-del",
    "nbd-server-start",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
    "drive-mirror",
    "blockdev-mirror",
    "query-block-jobs",
    "block-job-cancel",
    "block-job-complete",
    "block-job-set-speed",
];

/// HMP commands of this module, for `help`.
pub const HMP_COMMANDS: &[crate::hmp::parse::HmpEntry] = &[
    crate::hmp::parse::HmpEntry { names: "nbd_server_start", params: "[-a] [-w] host:port", help: "serve block devices on the given host and port" },
    crate::hmp::parse::HmpEntry { names: "nbd_server_add", params: "[-w] device [name]", help: "export a block device via NBD" },
    crate::hmp::parse::HmpEntry { names: "nbd_server_remove", params: "[-f] name", help: "remove an export previously exposed via NBD" },
    crate::hmp::parse::HmpEntry { names: "nbd_server_stop", params: "", help: "stop serving block devices using the NBD protocol" },
    crate::hmp::parse::HmpEntry { names: "drive_mirror", params: "[-n] [-f] device target [format]", help: "initiates live storage migration for a device (-f: full disk; without it only the top image, the target already having the backing chain)" },
    crate::hmp::parse::HmpEntry { names: "block_job_cancel", params: "[-f] device", help: "stop an active background block operation" },
    crate::hmp::parse::HmpEntry { names: "block_job_complete", params: "device", help: "stop an active background block operation" },
    crate::hmp::parse::HmpEntry { names: "block_job_set_speed", params: "device speed", help: "set maximum speed for a background block operation" },
];

/// Where a mirror writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MirrorTargetSpec {
    /// `drive-mirror`: a URI (`nbd://HOST:PORT/EXPORT`, `nbd:HOST:PORT:exportname=E`).
    Uri(String),
    /// `blockdev-mirror`: a node added with `blockdev-add`.
    Node(String),
}

/// What a mirror's first pass copies (QMP `sync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MirrorSync {
    /// The whole disk, backing chain included.
    #[default]
    Full,
    /// Only what the top image holds (the target has the backing chain already).
    Top,
    /// Only the writes made while the job runs.
    None,
}

/// Arguments of `drive-mirror` / `blockdev-mirror` / `drive_mirror`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorArgs {
    /// The job's id (default: `device`).
    pub job_id: Option<String>,
    /// Drive id or node name of the source.
    pub device: String,
    pub target: MirrorTargetSpec,
    /// Bytes per second, 0 = unlimited.
    pub speed: u64,
    pub sync: MirrorSync,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

impl MirrorArgs {
    pub fn id(&self) -> String {
        self.job_id.clone().unwrap_or_else(|| self.device.clone())
    }
}

/// A `blockdev-add` node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockdevSpec {
    /// `driver: nbd`, `server: {type: inet, host, port}`, `export`.
    Nbd { node_name: String, host: String, port: u16, export: String },
    /// `driver: raw` over another node (`file`).
    Raw { node_name: String, file: String },
}

/// A block command.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockCommand {
    QueryBlock,
    QueryNamedBlockNodes,
    BlockdevAdd(BlockdevSpec),
    BlockdevDel { node_name: String },
    NbdServerStart { host: String, port: u16 },
    /// `nbd-server-add` / `block-export-add` (`id` for the latter).
    NbdServerAdd { device: String, name: Option<String>, writable: bool, id: Option<String> },
    NbdServerRemove { name: String },
    BlockExportDel { id: String },
    QueryBlockExports,
    NbdServerStop,
    Mirror(MirrorArgs),
    QueryBlockJobs,
    BlockJobCancel { device: String, force: bool },
    BlockJobComplete { device: String },
    BlockJobSetSpeed { device: String, speed: u64 },
}

impl BlockCommand {
    pub fn qmp_name(&self) -> &'static str {
        match self {
            BlockCommand::QueryBlock => "query-block",
            BlockCommand::QueryNamedBlockNodes => "query-named-block-nodes",
            BlockCommand::BlockdevAdd(_) => "blockdev-add",
            BlockCommand::BlockdevDel { .. } => "blockdev-del",
            BlockCommand::NbdServerStart { .. } => "nbd-server-start",
            BlockCommand::NbdServerAdd { .. } => "nbd-server-add",
            BlockCommand::NbdServerRemove { .. } => "nbd-server-remove",
            BlockCommand::BlockExportDel { .. } => "block-export-del",
            BlockCommand::QueryBlockExports => "query-block-exports",
            BlockCommand::NbdServerStop => "nbd-server-stop",
            BlockCommand::Mirror(_) => "blockdev-mirror",
            BlockCommand::QueryBlockJobs => "query-block-jobs",
            BlockCommand::BlockJobCancel { .. } => "block-job-cancel",
            BlockCommand::BlockJobComplete { .. } => "block-job-complete",
            BlockCommand::BlockJobSetSpeed { .. } => "block-job-set-speed",
        }
    }
}

fn generic(s: impl Into<String>) -> CommandError {
    CommandError::generic(s)
}

/// A port given as a number or (QEMU's `InetSocketAddress`) a string.
fn port_of(v: Option<&Value>) -> Result<u16, CommandError> {
    match v {
        Some(Value::String(s)) => s.parse().map_err(|_| generic(format!("Invalid port '{s}'"))),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .ok_or_else(|| generic(format!("Invalid port {n}"))),
        Some(_) => Err(generic("Invalid parameter type for 'port', expected: string")),
        None => Err(generic("Parameter 'port' is missing")),
    }
}

/// `{type: inet, host, port}` or the legacy `{type: inet, data: {host, port}}`.
fn inet_addr(v: &Value, what: &str) -> Result<(String, u16), CommandError> {
    let o = v.as_object().ok_or_else(|| generic(format!("Invalid parameter type for '{what}', expected: object")))?;
    let ty = o.get("type").and_then(Value::as_str).unwrap_or("inet");
    if ty != "inet" {
        return Err(generic(format!("'{what}': address type '{ty}' is not supported (inet only)")));
    }
    let d = match o.get("data") {
        Some(Value::Object(d)) => d,
        _ => o,
    };
    let host = d.get("host").and_then(Value::as_str).ok_or_else(|| generic("Parameter 'host' is missing"))?;
    Ok((host.to_string(), port_of(d.get("port"))?))
}

/// Members QEMU accepts that change nothing here.
const IGNORED_BLOCKDEV_KEYS: &[&str] =
    &["read-only", "auto-read-only", "discard", "cache", "detect-zeroes", "force-share", "reconnect-delay", "open-timeout"];

fn blockdev_add(args: &Map<String, Value>) -> Result<BlockdevSpec, CommandError> {
    let node_name = args
        .get("node-name")
        .and_then(Value::as_str)
        .ok_or_else(|| generic("A top-level node-name is required for blockdev-add"))?
        .to_string();
    let driver = args.get("driver").and_then(Value::as_str).ok_or_else(|| generic("Parameter 'driver' is missing"))?;
    let allowed: &[&str] = match driver {
        "nbd" => &["server", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap"],
        "raw" => &["file", "offset", "size"],
        other => return Err(generic(format!("Driver '{other}' is not supported by blockdev-add (nbd or raw)"))),
    };
    if let Some(k) = args.keys().find(|k| {
        !matches!(k.as_str(), "node-name" | "driver") && !allowed.contains(&k.as_str()) && !IGNORED_BLOCKDEV_KEYS.contains(&k.as_str())
    }) {
        return Err(generic(format!("Parameter '{k}' is unexpected")));
    }
    for k in ["tls-creds", "x-dirty-bitmap", "offset", "size"] {
        if args.get(k).is_some_and(|v| !v.is_null() && v != "") {
            return Err(generic(format!("blockdev-add: '{k}' is not supported")));
        }
    }
    match driver {
        "nbd" => {
            let server = args.get("server").ok_or_else(|| generic("Parameter 'server' is missing"))?;
            let (host, port) = inet_addr(server, "server")?;
            let export = args.get("export").and_then(Value::as_str).unwrap_or("").to_string();
            Ok(BlockdevSpec::Nbd { node_name, host, port, export })
        }
        _ => {
            let file = match args.get("file") {
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(generic("blockdev-add raw: 'file' must name a node added before")),
                None => return Err(generic("Parameter 'file' is missing")),
            };
            Ok(BlockdevSpec::Raw { node_name, file })
        }
    }
}

/// The `sync` mode, and the optional members we accept and ignore.
fn no_fancy_mirror(a: &mut Args<'_>) -> Result<MirrorSync, CommandError> {
    let sync = match a.str("sync")?.as_str() {
        "full" => MirrorSync::Full,
        "top" => MirrorSync::Top,
        "none" => MirrorSync::None,
        other => return Err(generic(format!("sync mode '{other}' is not supported (full, top, none)"))),
    };
    for k in ["granularity", "buf-size"] {
        let _ = a.opt_u64(k)?;
    }
    for k in ["on-source-error", "on-target-error", "filter-node-name", "copy-mode", "replaces"] {
        let _ = a.opt_str(k)?;
    }
    let _ = a.opt_bool("unmap")?;
    Ok(sync)
}

/// Parses a QMP block command; `Ok(None)`: not one.
pub fn parse_qmp(name: &str, args: &Map<String, Value>) -> Result<Option<BlockCommand>, CommandError> {
    let mut a = Args::new(args);
    let cmd = match name {
        "query-block" => BlockCommand::QueryBlock,
        "query-named-block-nodes" => {
            let _ = a.opt_bool("flat")?;
            BlockCommand::QueryNamedBlockNodes
        }
        "blockdev-add" => return blockdev_add(args).map(|s| Some(BlockCommand::BlockdevAdd(s))),
        "blockdev-del" => BlockCommand::BlockdevDel { node_name: a.str("node-name")? },
        "nbd-server-start" => {
            let addr = args.get("addr").ok_or_else(|| generic("Parameter 'addr' is missing"))?;
            let (host, port) = inet_addr(addr, "addr")?;
            let mut rest = args.clone();
            rest.remove("addr");
            let mut b = Args::new(&rest);
            for k in ["tls-creds", "tls-authz"] {
                if b.opt_str(k)?.is_some_and(|s| !s.is_empty()) {
                    return Err(generic("TLS is not supported by Godwit's NBD server"));
                }
            }
            let _ = b.opt_u64("max-connections")?;
            b.finish()?;
            return Ok(Some(BlockCommand::NbdServerStart { host, port }));
        }
        "nbd-server-add" => {
            let device = a.str("device")?;
            let name = a.opt_str("name")?;
            let writable = a.opt_bool("writable")?.unwrap_or(false);
            let _ = a.opt_str("description")?;
            if a.opt_str("bitmap")?.is_some() {
                return Err(generic("nbd-server-add: 'bitmap' is not supported"));
            }
            BlockCommand::NbdServerAdd { device, name, writable, id: None }
        }
        "block-export-add" => {
            let ty = a.str("type")?;
            if ty != "nbd" {
                return Err(generic(format!("Export type '{ty}' is not supported (nbd)")));
            }
            let id = a.str("id")?;
            let device = a.str("node-name")?;
            let name = a.opt_str("name")?;
            let writable = a.opt_bool("writable")?.unwrap_or(false);
            let _ = a.opt_bool("writethrough")?;
            let _ = a.opt_bool("allocation-depth")?;
            let _ = a.opt_bool("fixed-iothread")?;
            let _ = a.opt_str("iothread")?;
            let _ = a.opt_str("description")?;
            if a.opt_str_list("bitmaps")?.is_some_and(|b| !b.is_empty()) {
                return Err(generic("block-export-add: 'bitmaps' is not supported"));
            }
            BlockCommand::NbdServerAdd { device, name, writable, id: Some(id) }
        }
        "nbd-server-remove" => {
            let name = a.str("name")?;
            let _ = a.opt_str("mode")?;
            BlockCommand::NbdServerRemove { name }
        }
        "block-export-del" => {
            let id = a.str("id")?;
            let _ = a.opt_str("mode")?;
            BlockCommand::BlockExportDel { id }
        }
        "query-block-exports" => BlockCommand::QueryBlockExports,
        "nbd-server-stop" => BlockCommand::NbdServerStop,
        "drive-mirror" => {
            let device = a.str("device")?;
            let target = a.str("target")?;
            let format = a.opt_str("format")?;
            if format.as_deref().is_some_and(|f| f != "raw") {
                return Err(generic("drive-mirror: only format 'raw' targets are supported"));
            }
            let mode = a.opt_str("mode")?;
            if mode.as_deref().is_some_and(|m| m != "existing") && !target.starts_with("nbd:") {
                return Err(generic("drive-mirror: only mode 'existing' is supported"));
            }
            let sync = no_fancy_mirror(&mut a)?;
            let _ = a.opt_str("node-name")?;
            MirrorCmd(MirrorArgs {
                job_id: a.opt_str("job-id")?,
                device,
                target: MirrorTargetSpec::Uri(target),
                speed: a.opt_u64("speed")?.unwrap_or(0),
                sync,
                auto_finalize: a.opt_bool("auto-finalize")?.unwrap_or(true),
                auto_dismiss: a.opt_bool("auto-dismiss")?.unwrap_or(true),
            })
            .into()
        }
        "blockdev-mirror" => {
            let device = a.str("device")?;
            let target = a.str("target")?;
            let sync = no_fancy_mirror(&mut a)?;
            MirrorCmd(MirrorArgs {
                job_id: a.opt_str("job-id")?,
                device,
                target: MirrorTargetSpec::Node(target),
                speed: a.opt_u64("speed")?.unwrap_or(0),
                sync,
                auto_finalize: a.opt_bool("auto-finalize")?.unwrap_or(true),
                auto_dismiss: a.opt_bool("auto-dismiss")?.unwrap_or(true),
            })
            .into()
        }
        "query-block-jobs" => BlockCommand::QueryBlockJobs,
        "block-job-cancel" => BlockCommand::BlockJobCancel { device: a.str("device")?, force: a.opt_bool("force")?.unwrap_or(false) },
        "block-job-complete" => BlockCommand::BlockJobComplete { device: a.str("device")? },
        "block-job-set-speed" => {
            let device = a.str("device")?;
            let speed = a.opt_u64("speed")?.ok_or_else(|| generic("Parameter 'speed' is missing"))?;
            BlockCommand::BlockJobSetSpeed { device, speed }
        }
        _ => return Ok(None),
    };
    a.finish()?;
    Ok(Some(cmd))
}

/// Wraps mirror arguments (keeps the parse arms short).
struct MirrorCmd(MirrorArgs);

impl From<MirrorCmd> for BlockCommand {
    fn from(c: MirrorCmd) -> Self {
        BlockCommand::Mirror(c.0)
    }
}

/// `HOST:PORT` with IPv6 as `[::]:PORT`.
fn host_port(s: &str) -> Result<(String, u16), String> {
    let (h, p) = if let Some(r) = s.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or("unterminated '['")?;
        (h, after.strip_prefix(':').ok_or("missing port")?)
    } else {
        s.rsplit_once(':').ok_or("expected HOST:PORT")?
    };
    let port = p.parse().map_err(|_| format!("invalid port '{p}'"))?;
    Ok((h.to_string(), port))
}

/// Parses an HMP block command line (already tokenized). `None`: not one.
pub fn parse_hmp(name: &str, args: &[String]) -> Option<Result<BlockCommand, String>> {
    let (flags, pos): (Vec<&String>, Vec<&String>) = args.iter().partition(|a| a.starts_with('-') && a.len() > 1);
    let has = |f: char| flags.iter().any(|a| a[1..].contains(f));
    let bad_flag = |ok: &str| flags.iter().find(|a| a[1..].chars().any(|c| !ok.contains(c))).map(|a| format!("{name}: unsupported option {a}"));
    let arity = |min: usize, max: usize| -> Result<(), String> {
        if pos.len() > max {
            Err(format!("{name}: extraneous characters at the end of line"))
        } else if pos.len() < min {
            Err(format!("{name}: missing argument"))
        } else {
            Ok(())
        }
    };
    let r = (|| -> Result<BlockCommand, String> {
        let ok_flags = match name {
            "nbd_server_start" => "aw",
            "nbd_server_add" => "w",
            "nbd_server_remove" => "f",
            "drive_mirror" => "nf",
            "block_job_cancel" => "f",
            _ => "",
        };
        if let Some(e) = bad_flag(ok_flags) {
            return Err(e);
        }
        Ok(match name {
            "nbd_server_start" => {
                arity(1, 1)?;
                if has('a') {
                    return Err("nbd_server_start: -a is not supported; add exports with nbd_server_add".into());
                }
                let (host, port) = host_port(pos[0]).map_err(|e| format!("nbd_server_start: {e}"))?;
                BlockCommand::NbdServerStart { host, port }
            }
            "nbd_server_add" => {
                arity(1, 2)?;
                BlockCommand::NbdServerAdd { device: pos[0].clone(), name: pos.get(1).map(|s| s.to_string()), writable: has('w'), id: None }
            }
            "nbd_server_remove" => {
                arity(1, 1)?;
                BlockCommand::NbdServerRemove { name: pos[0].clone() }
            }
            "nbd_server_stop" => {
                arity(0, 0)?;
                BlockCommand::NbdServerStop
            }
            "drive_mirror" => {
                arity(2, 3)?;
                if pos.get(2).is_some_and(|f| f.as_str() != "raw") {
                    return Err("drive_mirror: only format raw is supported".into());
                }
                // As QEMU's HMP: `-f` mirrors the full disk, without it only the top image.
                BlockCommand::Mirror(MirrorArgs {
                    job_id: None,
                    device: pos[0].clone(),
                    target: MirrorTargetSpec::Uri(pos[1].clone()),
                    speed: 0,
                    sync: if has('f') { MirrorSync::Full } else { MirrorSync::Top },
                    auto_finalize: true,
                    auto_dismiss: true,
                })
            }
            "block_job_cancel" => {
                arity(1, 1)?;
                BlockCommand::BlockJobCancel { device: pos[0].clone(), force: has('f') }
            }
            "block_job_complete" => {
                arity(1, 1)?;
                BlockCommand::BlockJobComplete { device: pos[0].clone() }
            }
            "block_job_set_speed" => {
                arity(2, 2)?;
                let speed = crate::hmp::parse::parse_number(pos[1]).ok_or_else(|| format!("block_job_set_speed: invalid speed '{}'", pos[1]))?;
                BlockCommand::BlockJobSetSpeed { device: pos[0].clone(), speed }
            }
            _ => return Err(String::new()),
        })
    })();
    match r {
        Err(e) if e.is_empty() => None,
        other => Some(other),
    }
}

/// `info block`, `info block-jobs`, `info block-export`. `None`: not one.
pub fn parse_hmp_info(sub: &str) -> Option<BlockCommand> {
    match sub {
        "block" => Some(BlockCommand::QueryBlock),
        "block-jobs" => Some(BlockCommand::QueryBlockJobs),
        "block-export" | "nbd" => Some(BlockCommand::QueryBlockExports),
        _ => None,
    }
}

/// HMP text for a block command's JSON answer.
pub fn render_hmp(cmd: &BlockCommand, v: &Value) -> String {
    let items = v.as_array().cloned().unwrap_or_default();
    match cmd {
        BlockCommand::QueryBlockJobs if items.is_empty() => "No active jobs\n".into(),
        BlockCommand::QueryBlockJobs => items
            .iter()
            .map(|j| {
                format!(
                    "Type {}, device {}: Completed {} of {} bytes, speed limit {} bytes/s{}\n",
                    j["type"].as_str().unwrap_or("mirror"),
                    j["device"].as_str().unwrap_or(""),
                    j["offset"],
                    j["len"],
                    j["speed"],
                    if j["ready"] == true { " (ready)" } else { "" }
                )
            })
            .collect(),
        BlockCommand::QueryBlock => items
            .iter()
            .map(|d| {
                let ins = &d["inserted"];
                let mut s = format!(
                    "{} ({}): {} ({}{})\n",
                    d["device"].as_str().unwrap_or(""),
                    ins["node-name"].as_str().unwrap_or(""),
                    ins["file"].as_str().unwrap_or(""),
                    ins["drv"].as_str().unwrap_or(""),
                    if ins["ro"] == true { ", read-only" } else { "" }
                );
                // As QEMU: the I/O status only when a stop policy stopped the VM on an error.
                if let Some(st) = d["io-status"].as_str().filter(|s| *s != "ok") {
                    s.push_str(&format!("    I/O status:       {st}\n"));
                }
                s
            })
            .collect(),
        BlockCommand::QueryBlockExports => items
            .iter()
            .map(|e| format!("{}: node {}\n", e["id"].as_str().unwrap_or(""), e["node-name"].as_str().unwrap_or("")))
            .collect(),
        _ => String::new(),
    }
}

/// The `query-block-jobs` element for a mirror job.
pub fn block_job_info(id: &str, status: &str, p: &crate::jobs::BlockJobProgress, auto_finalize: bool, auto_dismiss: bool, error: Option<&str>) -> Value {
    let mut v = json!({
        "type": "mirror", "device": id, "len": p.len, "offset": p.offset, "busy": p.busy,
        "paused": false, "speed": p.speed, "io-status": "ok", "ready": p.ready, "status": status,
        "auto-finalize": auto_finalize, "auto-dismiss": auto_dismiss,
    });
    if let Some(e) = error {
        v["error"] = json!(e);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, v: Value) -> Result<Option<BlockCommand>, CommandError> {
        parse_qmp(name, v.as_object().unwrap())
    }

    #[test]
    fn libvirt_forms_parse() {
        // As libvirt 9.0 sends them (traced against QEMU 7.2).
        assert_eq!(
            parse("nbd-server-start", json!({"addr": {"type": "inet", "data": {"host": "::", "port": "49153"}}})).unwrap(),
            Some(BlockCommand::NbdServerStart { host: "::".into(), port: 49153 })
        );
        assert_eq!(
            parse("block-export-add", json!({"type": "nbd", "id": "libvirt-nbd-libvirt-1-format", "node-name": "libvirt-1-format", "name": "drive-virtio-disk0", "writable": true})).unwrap(),
            Some(BlockCommand::NbdServerAdd { device: "libvirt-1-format".into(), name: Some("drive-virtio-disk0".into()), writable: true, id: Some("libvirt-nbd-libvirt-1-format".into()) })
        );
        assert_eq!(
            parse("blockdev-add", json!({"driver": "nbd", "server": {"type": "inet", "host": "127.0.0.1", "port": "49153"}, "export": "drive-virtio-disk0", "node-name": "migration-vda-storage", "read-only": false, "discard": "unmap"})).unwrap(),
            Some(BlockCommand::BlockdevAdd(BlockdevSpec::Nbd { node_name: "migration-vda-storage".into(), host: "127.0.0.1".into(), port: 49153, export: "drive-virtio-disk0".into() }))
        );
        assert_eq!(
            parse("blockdev-add", json!({"node-name": "migration-vda-format", "read-only": false, "driver": "raw", "file": "migration-vda-storage"})).unwrap(),
            Some(BlockCommand::BlockdevAdd(BlockdevSpec::Raw { node_name: "migration-vda-format".into(), file: "migration-vda-storage".into() }))
        );
        let m = parse("blockdev-mirror", json!({"job-id": "drive-virtio-disk0", "device": "libvirt-1-format", "target": "migration-vda-format", "speed": 9223372036853727232u64, "sync": "full", "auto-finalize": true, "auto-dismiss": false})).unwrap();
        let Some(BlockCommand::Mirror(m)) = m else { panic!() };
        assert_eq!(m.target, MirrorTargetSpec::Node("migration-vda-format".into()));
        assert!(!m.auto_dismiss && m.auto_finalize);
        assert_eq!(m.id(), "drive-virtio-disk0");
        let Some(BlockCommand::Mirror(d)) = parse("drive-mirror", json!({"device": "drive0", "target": "nbd://h:1/e", "sync": "full", "mode": "existing", "format": "raw"})).unwrap() else { panic!() };
        assert_eq!((d.id(), d.target), ("drive0".to_string(), MirrorTargetSpec::Uri("nbd://h:1/e".into())));
        assert_eq!((m.sync, d.sync), (MirrorSync::Full, MirrorSync::Full));
        for (word, want) in [("top", MirrorSync::Top), ("none", MirrorSync::None), ("full", MirrorSync::Full)] {
            let r = parse("blockdev-mirror", json!({"job-id": "j", "device": "libvirt-1-format", "target": "t", "sync": word})).unwrap();
            assert!(matches!(r, Some(BlockCommand::Mirror(ref a)) if a.sync == want), "{word}: {r:?}");
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(parse("blockdev-add", json!({"driver": "nbd", "server": {"type": "inet", "host": "h", "port": "x"}, "node-name": "n"})).is_err());
        assert!(parse("blockdev-add", json!({"driver": "qcow2", "node-name": "n", "file": "f"})).is_err());
        assert!(parse("blockdev-add", json!({"driver": "raw", "file": "f"})).is_err());
        assert!(parse("blockdev-add", json!({"driver": "raw", "file": "f", "node-name": "n", "bogus": 1})).is_err());
        assert!(parse("blockdev-mirror", json!({"device": "a", "target": "b", "sync": "incremental"})).is_err());
        assert!(parse("nbd-server-start", json!({"addr": {"type": "unix", "data": {"path": "/x"}}})).is_err());
        assert!(parse("block-export-add", json!({"type": "fuse", "id": "i", "node-name": "n"})).is_err());
        assert!(parse("block-job-set-speed", json!({"device": "j"})).is_err());
        assert_eq!(parse("frobnicate", json!({})).unwrap(), None);
    }

    #[test]
    fn hmp_forms_parse() {
        let p = |s: &str| {
            let t: Vec<String> = s.split_whitespace().map(String::from).collect();
            parse_hmp(&t[0], &t[1..]).unwrap()
        };
        assert_eq!(p("nbd_server_start [::]:10809").unwrap(), BlockCommand::NbdServerStart { host: "::".into(), port: 10809 });
        assert_eq!(p("nbd_server_start 0.0.0.0:5000").unwrap(), BlockCommand::NbdServerStart { host: "0.0.0.0".into(), port: 5000 });
        assert_eq!(
            p("nbd_server_add -w drive0 exp").unwrap(),
            BlockCommand::NbdServerAdd { device: "drive0".into(), name: Some("exp".into()), writable: true, id: None }
        );
        assert!(matches!(p("drive_mirror -n -f drive0 nbd://h:1/e").unwrap(), BlockCommand::Mirror(m) if m.device == "drive0" && m.sync == MirrorSync::Full));
        assert!(matches!(p("drive_mirror -n drive0 nbd://h:1/e").unwrap(), BlockCommand::Mirror(m) if m.sync == MirrorSync::Top), "without -f: top, as QEMU");
        assert!(p("drive_mirror -x d t").is_err());
        assert!(p("nbd_server_start nohost").is_err());
        assert_eq!(p("block_job_cancel -f j").unwrap(), BlockCommand::BlockJobCancel { device: "j".into(), force: true });
        assert!(parse_hmp("cont", &[]).is_none());
    }
}
