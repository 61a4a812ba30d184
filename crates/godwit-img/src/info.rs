//! `info` (with `--backing-chain`) and `map` (with the layer `depth` of each extent): the same
//! text and JSON as qemu-img, one image or the whole backing chain.

use crate::cmds::{fmt_arg, img_err, one_file, open_any, output_json, R};
use crate::out::{self, Json};
use crate::{parse, CliError};
use qcow2::{BlockBackend, MapKind, Qcow2};
use std::os::unix::fs::MetadataExt;

fn actual_size(file: &str) -> u64 {
    std::fs::metadata(file)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn snapshot_json(s: &qcow2::SnapshotInfo) -> Json {
    let mut v = Vec::new();
    if let Some(i) = s.icount {
        v.push(("icount", Json::Int(i as i128)));
    }
    v.extend([
        (
            "vm-clock-nsec",
            Json::Int((s.vm_clock_ns % 1_000_000_000) as i128),
        ),
        ("name", Json::Str(s.name.clone())),
        ("date-sec", Json::Int(s.date_sec as i128)),
        ("date-nsec", Json::Int(s.date_nsec as i128)),
        (
            "vm-clock-sec",
            Json::Int((s.vm_clock_ns / 1_000_000_000) as i128),
        ),
        ("id", Json::Str(s.id.clone())),
        ("vm-state-size", Json::Int(s.vm_state_size as i128)),
    ]);
    Json::Obj(v)
}

fn compression(q: &Qcow2) -> &'static str {
    if q.header().compression_type == 1 {
        "zstd"
    } else {
        "zlib"
    }
}

/// (backing name, resolved path, format) of a qcow2 layer whose file name is `file`.
fn backing_of(q: &Qcow2, file: &str) -> Option<(String, String, Option<String>)> {
    let name = q.backing_file()?.to_string();
    let full = match q.backing_path() {
        Some(p) => p.display().to_string(),
        // nfs:// overlays resolve their backing names against their URL.
        None => qcow2::backing::Opener::resolve(&nfs::NfsOpener, &name, Some(std::path::Path::new(file)))
            .display()
            .to_string(),
    };
    Some((name, full, q.backing_format()))
}

fn json_of(dev: &mut dyn BlockBackend, file: &str) -> Json {
    let size = dev.size();
    let fmt = dev.format();
    let q = dev.as_qcow2();
    let mut v = Vec::new();
    let back = q.as_ref().and_then(|q| backing_of(q, file));
    if let Some((_, _, Some(f))) = &back {
        v.push(("backing-filename-format", Json::Str(f.clone())));
    }
    if let Some(q) = &q {
        let snaps = q.snapshots();
        if !snaps.is_empty() {
            v.push((
                "snapshots",
                Json::Arr(snaps.iter().map(snapshot_json).collect()),
            ));
        }
    }
    v.push(("virtual-size", Json::Int(size as i128)));
    v.push(("filename", Json::Str(file.into())));
    if let Some(q) = &q {
        v.push(("cluster-size", Json::Int(q.cluster_size() as i128)));
    }
    v.push(("format", Json::Str(fmt.to_string())));
    v.push(("actual-size", Json::Int(actual_size(file) as i128)));
    if let Some(q) = &q {
        let mut d = Vec::new();
        if q.version() >= 3 {
            d.push(("compat", Json::Str("1.1".into())));
            d.push(("compression-type", Json::Str(compression(q).into())));
            d.push(("lazy-refcounts", Json::Bool(q.header().compatible & 1 != 0)));
            d.push(("refcount-bits", Json::Int(q.refcount_bits() as i128)));
            d.push(("corrupt", Json::Bool(q.header().incompatible & 2 != 0)));
            d.push(("extended-l2", Json::Bool(q.extended_l2())));
        } else {
            d.push(("compat", Json::Str("0.10".into())));
            d.push(("compression-type", Json::Str("zlib".into())));
            d.push(("refcount-bits", Json::Int(q.refcount_bits() as i128)));
        }
        v.push((
            "format-specific",
            Json::Obj(vec![
                ("type", Json::Str("qcow2".into())),
                ("data", Json::Obj(d)),
            ]),
        ));
    }
    if let Some((name, full, _)) = back {
        v.push(("full-backing-filename", Json::Str(full)));
        v.push(("backing-filename", Json::Str(name)));
    }
    v.push(("dirty-flag", Json::Bool(false)));
    Json::Obj(v)
}

fn print_text(dev: &mut dyn BlockBackend, file: &str) {
    let size = dev.size();
    println!("image: {file}");
    println!("file format: {}", dev.format());
    println!("virtual size: {} ({size} bytes)", out::size_to_str(size));
    println!("disk size: {}", out::size_to_str(actual_size(file)));
    let Some(q) = dev.as_qcow2() else {
        return;
    };
    println!("cluster_size: {}", q.cluster_size());
    if let Some((name, full, fmt)) = backing_of(q, file) {
        if name == full {
            println!("backing file: {name}");
        } else {
            println!("backing file: {name} (actual path: {full})");
        }
        if let Some(f) = fmt {
            println!("backing file format: {f}");
        }
    }
    let snaps = q.snapshots();
    if !snaps.is_empty() {
        println!("Snapshot list:");
        println!("{}", out::snapshot_header());
        for s in &snaps {
            println!("{}", out::snapshot_row(s));
        }
    }
    println!("Format specific information:");
    if q.version() >= 3 {
        println!("    compat: 1.1");
        println!("    compression type: {}", compression(q));
        println!("    lazy refcounts: {}", q.header().compatible & 1 != 0);
        println!("    refcount bits: {}", q.refcount_bits());
        println!("    corrupt: {}", q.header().incompatible & 2 != 0);
        println!("    extended l2: {}", q.extended_l2());
    } else {
        println!("    compat: 0.10");
        println!("    compression type: zlib");
        println!("    refcount bits: {}", q.refcount_bits());
    }
}

/// The next layer and its file name (QEMU's full backing file name).
fn next_layer(dev: &mut dyn BlockBackend) -> Option<(&mut dyn BlockBackend, String)> {
    let q = dev.as_qcow2()?;
    let name = q.backing_path()?.display().to_string();
    Some((q.backing()?, name))
}

pub fn info(argv: &[String]) -> R {
    let a = parse(
        argv,
        &["-f", "--output"],
        &["-U", "--force-share", "--backing-chain"],
    )?;
    let json = output_json(&a)?;
    let file = one_file(&a.pos)?;
    let chain = a.flag("--backing-chain");
    let fmt = fmt_arg(a.opt("-f"))?;
    // Without --backing-chain, qemu-img info does not need the backing files to exist.
    let mut dev = if chain {
        open_any(file, fmt, true)?
    } else if nfs::is_nfs_url(file) {
        let opts = qcow2::OpenOptions { read_only: true, no_backing: true, ..Default::default() };
        crate::cmds::open_nfs(file, fmt, &opts)?
    } else {
        let opts = qcow2::OpenOptions {
            read_only: true,
            no_backing: true,
            ..Default::default()
        };
        qcow2::open(file, fmt, &opts).map_err(img_err(format!("Could not open '{file}'")))?
    };
    let mut layers: Vec<Json> = Vec::new();
    let mut cur: &mut dyn BlockBackend = dev.as_mut();
    let mut name = file.to_string();
    loop {
        if json {
            layers.push(json_of(cur, &name));
        } else {
            if name != file {
                println!();
            }
            print_text(cur, &name);
        }
        if !chain {
            break;
        }
        match next_layer(cur) {
            Some((next, n)) => {
                cur = next;
                name = n;
            }
            None => break,
        }
    }
    if json {
        let v = if chain {
            Json::Arr(layers)
        } else {
            layers.pop().unwrap_or(Json::Obj(Vec::new()))
        };
        println!("{}", v.pretty());
    }
    Ok(0)
}

/// Guest runs of the whole chain: (start, length, depth, kind).
fn extents(dev: &mut dyn BlockBackend, file: &str) -> Result<Vec<qcow2::ChainExtent>, CliError> {
    let size = dev.size();
    match dev.as_qcow2() {
        Some(q) => q
            .chain_map()
            .map_err(img_err(format!("Could not map '{file}'"))),
        None => Ok(dev
            .layer_map()
            .map_err(img_err(format!("Could not map '{file}'")))?
            .into_iter()
            .map(|e| qcow2::ChainExtent { start: e.start, length: e.length.min(size), depth: 0, kind: e.kind })
            .collect()),
    }
}

pub fn map(argv: &[String]) -> R {
    let a = parse(
        argv,
        &["-f", "--output", "--start-offset", "--max-length"],
        &["-U", "--force-share"],
    )?;
    let json = output_json(&a)?;
    let file = one_file(&a.pos)?;
    let mut dev = open_any(file, fmt_arg(a.opt("-f"))?, true)?;
    let entries = extents(dev.as_mut(), file)?;
    if json {
        let lines: Vec<String> = entries
            .iter()
            .map(|e| {
                let (present, zero, data, off) = match e.kind {
                    MapKind::Unallocated => (false, true, false, None),
                    MapKind::UnallocatedAt(o) => (false, true, false, Some(o)),
                    MapKind::Zero(o) => (true, true, false, o),
                    MapKind::Data(o) => (true, false, true, Some(o)),
                    MapKind::DataHole(o) => (true, true, true, Some(o)),
                    MapKind::Compressed => (true, false, true, None),
                };
                let mut s = format!(
                    "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {present}, \"zero\": {zero}, \"data\": {data}",
                    e.start, e.length, e.depth
                );
                if let Some(o) = off {
                    s.push_str(&format!(", \"offset\": {o}"));
                }
                s.push('}');
                s
            })
            .collect();
        println!("[{}]", lines.join(",\n"));
        return Ok(0);
    }
    if entries.iter().any(|e| e.kind == MapKind::Compressed) {
        return Err(CliError::Usage(
            "File contains external, encrypted or compressed clusters.".into(),
        ));
    }
    // File name of each layer.
    let mut names = vec![file.to_string()];
    let mut cur: &mut dyn BlockBackend = dev.as_mut();
    while let Some((next, n)) = next_layer(cur) {
        names.push(n);
        cur = next;
    }
    println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
    let hx = |v: u64| {
        if v == 0 {
            "0".to_string()
        } else {
            format!("{v:#x}")
        }
    };
    for e in &entries {
        if let MapKind::Data(o) = e.kind {
            let f = names.get(e.depth as usize).map_or(file, |s| s.as_str());
            println!("{:<16}{:<16}{:<16}{f}", hx(e.start), hx(e.length), hx(o));
        }
    }
    Ok(0)
}
