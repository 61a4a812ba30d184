//! Storage migration in the VMM: QEMU-style names for the drives (`query-block`,
//! `query-named-block-nodes`), the NBD server exporting drives (`nbd-server-start`,
//! `nbd-server-add`, `block-export-add`, ...), `blockdev-add` nodes naming a mirror target
//! (an `nbd` node and a `raw` node over it), and the glue between a drive, the mirror engine
//! (crate `mirror`) and the monitor's job registry.
//!
//! Names: a drive is found by its `id=` (QEMU's device name; `virtioN` without one), by its
//! `node-name=` or by its default node name `#blockN` (N = the drive's index).
//!
//! One VM per process, so the server, its exports and the added nodes live in one
//! process-wide [`State`].

use crate::drives::{MirrorMark, SharedDisk};
use crate::machine::Machine;
use monitor::block::{BlockCommand, BlockdevSpec, MirrorArgs, MirrorSync, MirrorTargetSpec};
use monitor::error::{CommandError, ErrorClass};
use monitor::jobs::{BlockJobDriver, BlockJobEnd, BlockJobProgress};
use nbd::{Export, NbdClient, NbdServer};
use qcow2::BlockBackend;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

struct ExportEntry {
    id: String,
    name: String,
    node: String,
}

enum Node {
    Nbd { name: String, target: nbd::NbdTarget, busy: Arc<AtomicBool> },
    Raw { name: String, file: String },
}

impl Node {
    fn name(&self) -> &str {
        match self {
            Node::Nbd { name, .. } | Node::Raw { name, .. } => name,
        }
    }
}

/// The NBD server, its exports and the `blockdev-add` nodes.
#[derive(Default)]
struct State {
    server: Option<NbdServer>,
    exports: Vec<ExportEntry>,
    nodes: Vec<Node>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn err(s: impl Into<String>) -> CommandError {
    CommandError::generic(s)
}

/// QEMU's device name of drive `i`.
fn device_name(i: usize, d: &SharedDisk) -> String {
    d.spec.id.clone().unwrap_or_else(|| format!("virtio{i}"))
}

/// The drive's format node name.
fn node_name(i: usize, d: &SharedDisk) -> String {
    d.spec.node_name.clone().unwrap_or_else(|| format!("#block{i}"))
}

fn find_disk<'a>(m: &'a Machine, name: &str) -> Result<(usize, &'a SharedDisk), CommandError> {
    m.disks
        .iter()
        .enumerate()
        .find(|(i, d)| device_name(*i, d) == name || node_name(*i, d) == name)
        .ok_or_else(|| CommandError::new(ErrorClass::DeviceNotFound, format!("Cannot find device='{name}' nor node-name='{name}'")))
}

fn image_json(d: &SharedDisk) -> Value {
    json!({
        "filename": d.spec.file.display().to_string(),
        "format": d.spec.format.map(|f| f.to_string()).unwrap_or_else(|| "raw".into()),
        "virtual-size": d.size(),
        "dirty-flag": false,
    })
}

fn node_json(node: &str, drv: &str, file: &str, ro: bool, image: Value) -> Value {
    json!({
        "node-name": node, "drv": drv, "file": file, "ro": ro, "encrypted": false,
        "encryption_key_missing": false, "backing_file_depth": 0, "detect_zeroes": "off",
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0, "image": image,
        "cache": {"writeback": true, "direct": false, "no-flush": false},
    })
}

fn query_block(m: &Machine) -> Value {
    Value::Array(
        m.disks
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let file = d.spec.file.display().to_string();
                let fmt = d.spec.format.map(|f| f.to_string()).unwrap_or_else(|| "raw".into());
                json!({
                    "device": device_name(i, d), "qdev": format!("/machine/peripheral-anon/device[{i}]"),
                    "locked": false, "removable": false, "type": "unknown",
                    "io-status": crate::ioerror::status(i).name(),
                    "inserted": node_json(&node_name(i, d), &fmt, &file, d.spec.read_only, image_json(d)),
                })
            })
            .collect(),
    )
}

fn query_named_nodes(m: &Machine, st: &State) -> Value {
    let mut out = Vec::new();
    for (i, d) in m.disks.iter().enumerate() {
        let file = d.spec.file.display().to_string();
        let fmt = d.spec.format.map(|f| f.to_string()).unwrap_or_else(|| "raw".into());
        out.push(node_json(&node_name(i, d), &fmt, &file, d.spec.read_only, image_json(d)));
        let mut img = image_json(d);
        // The protocol node: a host file, or QEMU's `nfs` driver for an nfs:// URL.
        let proto = if nfs::is_nfs_url(&file) { "nfs" } else { "file" };
        img["format"] = json!(proto);
        out.push(node_json(&format!("{}-file", node_name(i, d)), proto, &file, d.spec.read_only, img));
    }
    for n in &st.nodes {
        match n {
            Node::Nbd { name, target, .. } => {
                let uri = format!("nbd://{}/{}", target.addr(), target.export);
                out.push(node_json(name, "nbd", &uri, false, json!({"filename": uri, "format": "nbd"})));
            }
            Node::Raw { name, file } => {
                out.push(node_json(name, "raw", file, false, json!({"filename": file, "format": "raw"})));
            }
        }
    }
    Value::Array(out)
}

/// Every block command but the mirror and the job verbs.
pub fn block(m: &Arc<Machine>, cmd: &BlockCommand) -> Result<Value, CommandError> {
    let mut g = state();
    let st = g.get_or_insert_with(State::default);
    let ok = Ok(json!({}));
    match cmd {
        BlockCommand::QueryBlock => Ok(query_block(m)),
        BlockCommand::QueryNamedBlockNodes => Ok(query_named_nodes(m, st)),
        BlockCommand::NbdServerStart { host, port } => {
            if st.server.is_some() {
                return Err(err("NBD server already running"));
            }
            let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            let srv = NbdServer::bind(addr.as_str()).map_err(|e| err(format!("Failed to start the NBD server on {addr}: {e}")))?;
            st.server = Some(srv);
            ok
        }
        BlockCommand::NbdServerAdd { device, name, writable, id } => {
            let Some(srv) = &st.server else { return Err(err("NBD server not running")) };
            let (i, d) = find_disk(m, device)?;
            let name = name.clone().unwrap_or_else(|| device.clone());
            let id = id.clone().unwrap_or_else(|| name.clone());
            if st.exports.iter().any(|e| e.id == id) {
                return Err(err(format!("Block export id '{id}' is already in use")));
            }
            if *writable && d.spec.read_only {
                return Err(err(format!("Cannot export '{device}' writable: the drive is read-only")));
            }
            // On an incoming VM the image is opened now: it receives the mirror before RAM.
            d.reacquire().map_err(err)?;
            let backend: Box<dyn BlockBackend> = d.device_backend();
            srv.add_export(Export {
                name: name.clone(),
                description: format!("Godwit drive {}", device_name(i, d)),
                backend: Arc::new(Mutex::new(backend)),
                writable: *writable,
            })
            .map_err(|e| err(e.to_string()))?;
            st.exports.push(ExportEntry { id, name, node: node_name(i, d) });
            ok
        }
        BlockCommand::NbdServerRemove { name } => {
            let pos = st.exports.iter().position(|e| &e.name == name).ok_or_else(|| err(format!("Export '{name}' is not found")))?;
            remove_export(st, pos)
        }
        BlockCommand::BlockExportDel { id } => {
            let pos = st.exports.iter().position(|e| &e.id == id).ok_or_else(|| err(format!("Export '{id}' is not found")))?;
            remove_export(st, pos)
        }
        BlockCommand::QueryBlockExports => Ok(Value::Array(
            st.exports
                .iter()
                .map(|e| json!({"type": "nbd", "id": e.id, "node-name": e.node, "shutting-down": false}))
                .collect(),
        )),
        BlockCommand::NbdServerStop => {
            let srv = st.server.take().ok_or_else(|| err("NBD server not running"))?;
            srv.stop();
            st.exports.clear();
            ok
        }
        BlockCommand::BlockdevAdd(spec) => blockdev_add(m, st, spec).map(|()| json!({})),
        BlockCommand::BlockdevDel { node_name } => {
            let pos = st.nodes.iter().position(|n| n.name() == node_name).ok_or_else(|| {
                CommandError::new(ErrorClass::DeviceNotFound, format!("Failed to find node with node-name='{node_name}'"))
            })?;
            let users = st.nodes.iter().any(|n| matches!(n, Node::Raw { file, .. } if file == node_name));
            let busy = match &st.nodes[pos] {
                Node::Nbd { busy, .. } => busy.load(Ordering::SeqCst),
                Node::Raw { file, .. } => st.nodes.iter().any(|n| matches!(n, Node::Nbd { name, busy, .. } if name == file && busy.load(Ordering::SeqCst))),
            };
            if users || busy {
                return Err(err(format!("Node '{node_name}' is busy: node is used as the target of a block job or by another node")));
            }
            st.nodes.remove(pos);
            ok
        }
        other => Err(CommandError::unsupported(other.qmp_name())),
    }
}

fn remove_export(st: &mut State, pos: usize) -> Result<Value, CommandError> {
    let e = st.exports.remove(pos);
    if let Some(srv) = &st.server {
        srv.remove_export(&e.name).map_err(|x| err(x.to_string()))?;
    }
    Ok(json!({}))
}

fn blockdev_add(m: &Machine, st: &mut State, spec: &BlockdevSpec) -> Result<(), CommandError> {
    let name = match spec {
        BlockdevSpec::Nbd { node_name, .. } | BlockdevSpec::Raw { node_name, .. } => node_name,
    };
    let taken = st.nodes.iter().any(|n| n.name() == name)
        || m.disks.iter().enumerate().any(|(i, d)| node_name(i, d) == *name || device_name(i, d) == *name);
    if taken {
        return Err(err(format!("node-name '{name}' is already in use")));
    }
    match spec {
        BlockdevSpec::Nbd { node_name, host, port, export } => {
            let target = nbd::NbdTarget { host: host.clone(), port: *port, export: export.clone() };
            // As QEMU does, connect now so a wrong address fails here, not in the mirror.
            let c = NbdClient::connect(&target)
                .map_err(|e| err(format!("Failed to connect to 'nbd://{}/{}': {e}", target.addr(), target.export)))?;
            let _ = c.disconnect();
            st.nodes.push(Node::Nbd { name: node_name.clone(), target, busy: Arc::new(AtomicBool::new(false)) });
        }
        BlockdevSpec::Raw { node_name, file } => {
            if !st.nodes.iter().any(|n| matches!(n, Node::Nbd { name, .. } if name == file)) {
                return Err(CommandError::new(ErrorClass::DeviceNotFound, format!("Cannot find device='' nor node-name='{file}'")));
            }
            st.nodes.push(Node::Raw { name: node_name.clone(), file: file.clone() });
        }
    }
    Ok(())
}

/// The NBD export a mirror target names, and the busy flag of its node.
fn resolve_target(t: &MirrorTargetSpec) -> Result<(nbd::NbdTarget, Option<Arc<AtomicBool>>), CommandError> {
    match t {
        MirrorTargetSpec::Uri(uri) => {
            if !uri.starts_with("nbd:") {
                return Err(err(format!("drive-mirror: target '{uri}' is not supported (nbd://HOST:PORT/EXPORT with mode existing)")));
            }
            Ok((nbd::parse_nbd_uri(uri).map_err(|e| err(e.to_string()))?, None))
        }
        MirrorTargetSpec::Node(node) => {
            let g = state();
            let st = g.as_ref().ok_or_else(|| err(format!("Cannot find device='{node}' nor node-name='{node}'")))?;
            let mut name = node.as_str();
            for _ in 0..4 {
                match st.nodes.iter().find(|n| n.name() == name) {
                    Some(Node::Raw { file, .. }) => name = file,
                    Some(Node::Nbd { target, busy, .. }) => return Ok((target.clone(), Some(busy.clone()))),
                    None => break,
                }
            }
            Err(CommandError::new(ErrorClass::DeviceNotFound, format!("Cannot find device='{node}' nor node-name='{node}'")))
        }
    }
}

/// `drive-mirror` / `blockdev-mirror`: connects the target, hooks the mirror into the drive
/// and hands the job to the registry.
pub fn start_mirror(m: &Arc<Machine>, args: &MirrorArgs) -> Result<Arc<dyn BlockJobDriver>, CommandError> {
    let (_, d) = find_disk(m, &args.device)?;
    if d.backend().is_none() {
        return Err(err(format!("Device '{}' has no medium open (incoming migration?)", args.device)));
    }
    let (target, busy) = resolve_target(&args.target)?;
    if busy.as_ref().is_some_and(|b| b.load(Ordering::SeqCst)) {
        return Err(err("The target node is in use by another block job"));
    }
    let client = NbdClient::connect(&target)
        .map_err(|e| err(format!("Failed to connect to 'nbd://{}/{}': {e}", target.addr(), target.export)))?;
    if client.read_only() {
        return Err(err("The mirror target is read-only (export it with writable: true)"));
    }
    let sync = match args.sync {
        MirrorSync::Full => mirror::SyncMode::Full,
        MirrorSync::Top => mirror::SyncMode::Top,
        MirrorSync::None => mirror::SyncMode::None,
    };
    let mirror = mirror::Mirror::with_sync(d.size(), Box::new(mirror::NbdTarget(client)), sync).map_err(|e| err(e.to_string()))?;
    mirror.set_speed(args.speed);
    d.set_mirror(Some(mirror.clone())).map_err(err)?;
    if let Some(b) = &busy {
        b.store(true, Ordering::SeqCst);
    }
    Ok(Arc::new(MirrorJob { mirror, disk: d.clone(), busy, pivot: AtomicBool::new(false) }))
}

/// A mirror job as the monitor's registry drives it.
struct MirrorJob {
    mirror: mirror::Mirror,
    disk: SharedDisk,
    busy: Option<Arc<AtomicBool>>,
    /// `block-job-complete` was asked: the drive moves onto the target.
    pivot: AtomicBool,
}

/// The drive, as the mirror engine reads it.
struct DiskSource(SharedDisk);

impl mirror::SourceDisk for DiskSource {
    fn locked(&self, f: &mut dyn FnMut(&mut dyn BlockBackend) -> qcow2::Result<()>) -> qcow2::Result<()> {
        let mut g = self.0.backend();
        match g.as_mut() {
            Some(b) => f(&mut **b),
            None => Err(qcow2::Error::Io {
                context: "reading a drive handed over to a migration destination",
                source: std::io::Error::other("image not open"),
            }),
        }
    }
    fn detach(&self) {
        let _ = self.0.set_mirror(None);
    }
    fn pivot(&self, take: &mut dyn FnMut() -> Option<Box<dyn BlockBackend>>) -> Result<(), String> {
        self.0.pivot(take)
    }
}

impl BlockJobDriver for MirrorJob {
    fn run(&self, on_ready: &mut dyn FnMut()) -> BlockJobEnd {
        let end = self.mirror.run(&DiskSource(self.disk.clone()), on_ready);
        if let Some(b) = &self.busy {
            b.store(false, Ordering::SeqCst);
        }
        match end {
            mirror::JobEnd::Completed => {
                // Cancelled when ready: the target is a copy as of now (stale after the next
                // guest write). Completed: the drive runs on the target itself.
                let pivoted = self.pivot.load(Ordering::SeqCst);
                self.disk.set_mirror_mark(if pivoted { MirrorMark::None } else { MirrorMark::Synced });
                BlockJobEnd::Completed
            }
            mirror::JobEnd::Cancelled => {
                self.disk.set_mirror_mark(MirrorMark::Broken("the mirror was cancelled before it was ready".into()));
                BlockJobEnd::Cancelled
            }
            mirror::JobEnd::Failed(e) => {
                tracing::warn!("mirror of '{}' failed: {e}", self.disk.spec.file.display());
                self.disk.set_mirror_mark(MirrorMark::Broken(e.clone()));
                BlockJobEnd::Failed(e)
            }
        }
    }
    fn cancel(&self, force: bool) {
        self.mirror.cancel(force);
    }
    fn complete(&self) -> Result<(), CommandError> {
        // Marked first: the job may end as soon as `complete` is accepted.
        self.pivot.store(true, Ordering::SeqCst);
        self.mirror.complete().map_err(|e| {
            self.pivot.store(false, Ordering::SeqCst);
            err(e)
        })
    }
    fn set_speed(&self, bps: u64) {
        self.mirror.set_speed(bps);
    }
    fn progress(&self) -> BlockJobProgress {
        let p = self.mirror.progress();
        BlockJobProgress { offset: p.offset, len: p.len, speed: p.speed, ready: p.ready, busy: p.busy }
    }
}
