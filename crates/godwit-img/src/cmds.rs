//! The subcommands.

use crate::out::{self, Json};
use crate::{parse, parse_size, CliError};
use qcow2::{
    BlockBackend, CreateOptions, ImageFormat, NewSnapshot, OpenOptions, Qcow2, RawImage,
    RepairMode,
};
use std::time::SystemTime;

pub(crate) type R = Result<u8, CliError>;

pub(crate) fn img_err(what: String) -> impl FnOnce(qcow2::Error) -> CliError {
    move |e| CliError::Img(what, e)
}

pub(crate) fn fmt_arg(s: Option<&str>) -> Result<Option<ImageFormat>, CliError> {
    match s {
        None => Ok(None),
        Some(f) => f
            .parse::<ImageFormat>()
            .map(Some)
            .map_err(|_| CliError::Usage(format!("Unknown file format '{f}'"))),
    }
}

pub(crate) fn one_file(pos: &[String]) -> Result<&str, CliError> {
    match pos {
        [f] => Ok(f),
        [] => Err(CliError::Usage("Expecting one image file name".into())),
        _ => Err(CliError::Usage(format!("Invalid argument '{}'", pos[1]))),
    }
}

/// The image's `nfs://` URL, when it is on an NFS server (crate `nfs`, through libnfs).
fn nfs_url(file: &str) -> Result<Option<nfs::NfsUrl>, CliError> {
    if !nfs::is_nfs_url(file) {
        return Ok(None);
    }
    nfs::NfsUrl::parse(file)
        .map(Some)
        .map_err(|e| CliError::Nfs(format!("Could not open '{file}': {e}")))
}

fn nfs_err(file: &str) -> impl FnOnce(nfs::OpenError) -> CliError + '_ {
    move |e| CliError::Nfs(format!("Could not open '{file}': {e}"))
}

/// Opens the `nfs://` image `file` with `opts` (no lock: read-only or `opts.no_backing` uses).
pub(crate) fn open_nfs(
    file: &str,
    fmt: Option<ImageFormat>,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockBackend>, CliError> {
    let url = nfs::NfsUrl::parse(file).map_err(|e| CliError::Nfs(format!("Could not open '{file}': {e}")))?;
    nfs::open_image(&url, fmt, opts, !opts.read_only).map_err(nfs_err(file))
}

pub(crate) fn open_any(
    file: &str,
    fmt: Option<ImageFormat>,
    read_only: bool,
) -> Result<Box<dyn BlockBackend>, CliError> {
    let opts = OpenOptions {
        read_only,
        ..Default::default()
    };
    if let Some(url) = nfs_url(file)? {
        return nfs::open_image(&url, fmt, &opts, !read_only).map_err(nfs_err(file));
    }
    crate::chain::refuse_if_backing(file, read_only)?;
    // A local overlay may have its backing file on NFS.
    qcow2::open(file, fmt, &nfs::chain_options(&opts)).map_err(img_err(format!("Could not open '{file}'")))
}

pub(crate) fn open_qcow2(file: &str, read_only: bool) -> Result<Qcow2, CliError> {
    if let Some(url) = nfs_url(file)? {
        let opts = OpenOptions {
            read_only,
            ..Default::default()
        };
        let s = nfs::NfsStorage::open(&url, nfs::nfs_options(&opts, !read_only))
            .map_err(|e| nfs_err(file)(e.into()))?;
        return nfs::open_qcow2(&url, s, &opts).map_err(nfs_err(file));
    }
    crate::chain::refuse_if_backing(file, read_only)?;
    let opts = OpenOptions {
        read_only,
        ..Default::default()
    };
    // A local overlay may have its backing file on NFS.
    Qcow2::open(file, &nfs::chain_options(&opts)).map_err(img_err(format!("Could not open '{file}'")))
}

pub(crate) fn output_json(a: &crate::Args) -> Result<bool, CliError> {
    match a.opt("--output") {
        None | Some("human") => Ok(false),
        Some("json") => Ok(true),
        Some(o) => Err(CliError::Usage(format!(
            "--output must be used with human or json as argument. ('{o}')"
        ))),
    }
}

/// Create options from `-o a=b,c=d`.
pub(crate) fn create_opts(o: Option<&str>, size: u64) -> Result<CreateOptions, CliError> {
    let mut c = CreateOptions {
        size,
        ..Default::default()
    };
    let mut rb_set = false;
    for kv in o.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "cluster_size" => c.cluster_size = parse_size(v)?,
            "compat" => {
                c.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => {
                        return Err(CliError::Usage(format!(
                            "Invalid parameter value for 'compat': '{v}'"
                        )))
                    }
                }
            }
            "refcount_bits" => {
                c.refcount_bits = v
                    .parse()
                    .map_err(|_| CliError::Usage(format!("Invalid refcount_bits '{v}'")))?;
                rb_set = true;
            }
            "size" => c.size = parse_size(v)?,
            "lazy_refcounts" if v == "off" => {}
            "extended_l2" => {
                c.extended_l2 = match v {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => {
                        return Err(CliError::Usage(format!(
                            "Invalid parameter value for 'extended_l2': '{v}'"
                        )))
                    }
                }
            }
            "compression_type" => {
                c.compression_type = match v {
                    "zlib" => 0,
                    "zstd" => 1,
                    _ => {
                        return Err(CliError::Usage(format!(
                            "Invalid parameter value for 'compression_type': '{v}'"
                        )))
                    }
                }
            }
            "preallocation" if v == "off" => {}
            _ => return Err(CliError::Usage(format!("Invalid parameter '{k}'"))),
        }
    }
    if c.version == 2 && rb_set && c.refcount_bits != 16 {
        return Err(CliError::Usage(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)".into(),
        ));
    }
    Ok(c)
}

pub fn create(argv: &[String]) -> R {
    let a = parse(argv, &["-f", "-o", "-F", "-b"], &["-q", "-u"])?;
    let fmt = fmt_arg(a.opt("-f"))?.unwrap_or(ImageFormat::Raw);
    let (file, size) = match a.pos.as_slice() {
        [f, s] => (f.as_str(), parse_size(s)?),
        [f] => (f.as_str(), 0),
        _ => return Err(CliError::Usage("Expecting image file name".into())),
    };
    let quiet = a.flag("-q");
    // qemu-img rounds the size up to whole 512-byte sectors (after printing it).
    let mut o = create_opts(a.opt("-o"), size)?;
    let backing = crate::chain::create_backing(&a, file, fmt, &mut o)?;
    let shown = o.size;
    match fmt {
        ImageFormat::Raw => {
            if !quiet {
                println!("Formatting '{file}', fmt=raw size={shown}");
            }
            o.size = o.size.div_ceil(512) * 512;
            RawImage::create(file, o.size).map_err(img_err(file.to_string()))?;
        }
        ImageFormat::Qcow2 => {
            if !quiet {
                let compat = if o.version == 2 { " compat=0.10" } else { "" };
                let b = match (&o.backing_file, o.backing_format) {
                    (Some(n), Some(f)) => format!(" backing_file={n} backing_fmt={f}"),
                    (Some(n), None) => format!(" backing_file={n}"),
                    _ => String::new(),
                };
                println!(
                    "Formatting '{file}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={} size={}{b}{compat} lazy_refcounts=off refcount_bits={}",
                    o.cluster_size, if o.extended_l2 { "on" } else { "off" }, if o.compression_type == 1 { "zstd" } else { "zlib" }, shown, o.refcount_bits
                );
            }
            o.size = o.size.div_ceil(512) * 512;
            let open = OpenOptions {
                no_backing: !backing,
                ..Default::default()
            };
            let mut img = Qcow2::create_with(file, &o, &open).map_err(img_err(file.to_string()))?;
            img.close().map_err(img_err(file.to_string()))?;
        }
    }
    Ok(0)
}

fn print_check(file: &str, r: &qcow2::CheckReport, json: bool) {
    if json {
        // qemu-img prints its QDict in hash order; this is that order.
        let mut v = vec![("image-end-offset", Json::Int(r.image_end_offset as i128))];
        let nz = |v: &mut Vec<(&'static str, Json)>, k: &'static str, n: u64| {
            if n > 0 {
                v.push((k, Json::Int(n as i128)));
            }
        };
        nz(&mut v, "compressed-clusters", r.compressed_clusters);
        v.push(("total-clusters", Json::Int(r.total_clusters as i128)));
        nz(&mut v, "corruptions", r.corruptions);
        nz(&mut v, "corruptions-fixed", r.corruptions_fixed);
        v.push(("check-errors", Json::Int(r.check_errors as i128)));
        nz(&mut v, "leaks", r.leaks);
        nz(&mut v, "leaks-fixed", r.leaks_fixed);
        nz(&mut v, "allocated-clusters", r.allocated_clusters);
        v.push(("filename", Json::Str(file.into())));
        v.push(("format", Json::Str("qcow2".into())));
        nz(&mut v, "fragmented-clusters", r.fragmented_clusters);
        for m in &r.messages {
            eprintln!("{m}");
        }
        println!("{}", Json::Obj(v).pretty());
        return;
    }
    for m in &r.messages {
        eprintln!("{m}");
    }
    if r.is_clean() {
        println!("No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            println!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            println!(
                "\n{} internal errors have occurred during the check.",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let t = r.total_clusters as f64;
        println!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            r.allocated_clusters as f64 * 100.0 / t,
            r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64,
            r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64,
        );
    }
    if r.image_end_offset > 0 {
        println!("Image end offset: {}", r.image_end_offset);
    }
}

pub fn check(argv: &[String]) -> R {
    let a = parse(
        argv,
        &["-f", "--output", "-r"],
        &["-q", "-U", "--force-share"],
    )?;
    let json = output_json(&a)?;
    let file = one_file(&a.pos)?;
    let mode = match a.opt("-r") {
        None => None,
        Some("leaks") => Some(RepairMode::Leaks),
        Some("all") => Some(RepairMode::All),
        Some(m) => {
            return Err(CliError::Usage(format!(
                "Invalid option for -r: '{m}' (use leaks or all)"
            )))
        }
    };
    let fmt = fmt_arg(a.opt("-f"))?;
    let fmt = match fmt {
        Some(f) => f,
        None => match nfs_url(file)? {
            Some(url) => nfs::probe(&url).map_err(nfs_err(file))?,
            None => qcow2::probe(file).map_err(img_err(format!("Could not open '{file}'")))?,
        },
    };
    if fmt == ImageFormat::Raw {
        eprintln!("godwit-img: This image format does not support checks");
        return Ok(63);
    }
    let mut img = open_qcow2(file, mode.is_none())?;
    let r = match mode {
        None => img.check().map_err(img_err("Check failed".into()))?,
        Some(m) => {
            let (before, after) = img.repair(m).map_err(img_err("Check failed".into()))?;
            if !before.is_clean() && !json {
                for m in &before.messages {
                    eprintln!("{m}");
                }
                if after.leaks_fixed > 0 || after.corruptions_fixed > 0 {
                    println!(
                        "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                        after.leaks_fixed, after.corruptions_fixed
                    );
                }
            }
            after
        }
    };
    if !a.flag("-q") || json {
        print_check(file, &r, json);
    }
    Ok(if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}

pub fn snapshot(argv: &[String]) -> R {
    let a = parse(
        argv,
        &["-c", "-a", "-d", "-f"],
        &["-l", "-q", "-U", "--force-share"],
    )?;
    let file = one_file(&a.pos)?;
    let ops = a.flag("-l") as u8
        + a.opt("-c").is_some() as u8
        + a.opt("-a").is_some() as u8
        + a.opt("-d").is_some() as u8;
    if ops > 1 {
        return Err(CliError::Usage("Cannot mix '-l', '-a', '-c', '-d'".into()));
    }
    if let Some(f) = fmt_arg(a.opt("-f"))? {
        if f != ImageFormat::Qcow2 {
            return Err(CliError::Usage(format!(
                "Could not open '{file}': snapshots need qcow2"
            )));
        }
    }
    if ops == 0 || a.flag("-l") {
        let img = open_qcow2(file, true)?;
        let snaps = img.snapshots();
        if !snaps.is_empty() {
            println!("Snapshot list:");
            println!("{}", out::snapshot_header());
            for s in &snaps {
                println!("{}", out::snapshot_row(s));
            }
        }
        return Ok(0);
    }
    let mut img = open_qcow2(file, false)?;
    if let Some(n) = a.opt("-c") {
        let s = NewSnapshot {
            name: n.to_string(),
            vm_state_size: 0,
            vm_clock_ns: 0,
            date: SystemTime::now(),
            icount: Some(0),
            replace: false,
        };
        img.create_snapshot(&s)
            .map_err(img_err(format!("Could not create snapshot '{n}'")))?;
    } else if let Some(n) = a.opt("-a") {
        img.goto_snapshot(n)
            .map_err(img_err(format!("Could not apply snapshot '{n}'")))?;
    } else if let Some(n) = a.opt("-d") {
        // qemu-img deletes by name only (an id is "not found").
        let info = img
            .select_snapshot(&qcow2::SnapshotSelector::Name(n))
            .ok_or_else(|| {
                CliError::Usage(format!("Could not delete snapshot '{n}': snapshot not found"))
            })?;
        img.delete_snapshot_id(&info.id)
            .map_err(img_err(format!("Could not delete snapshot '{n}'")))?;
    }
    img.close().map_err(img_err(file.to_string()))?;
    Ok(0)
}

pub fn convert(argv: &[String]) -> R {
    let a = parse(
        argv,
        &["-f", "-O", "-o", "-l", "-s", "-t", "-T", "-B", "-F"],
        &["-p", "-q", "-n", "-U", "-c"],
    )?;
    let (src, dst) = match a.pos.as_slice() {
        [s, d] => (s.as_str(), d.as_str()),
        _ => {
            return Err(CliError::Usage(
                "Expecting one input and one output file name".into(),
            ))
        }
    };
    let in_fmt = fmt_arg(a.opt("-f"))?;
    let out_fmt = fmt_arg(a.opt("-O"))?.unwrap_or(ImageFormat::Raw);
    // As qemu-img: `snapshot.id=` matches ids only, `snapshot.name=` names only (both given:
    // both must match), a bare `-l X` / `-s X` an id first, then a name.
    let (mut id, mut name, mut bare) = (None, None, None);
    match (a.opt("-l"), a.opt("-s")) {
        (Some(l), _) => {
            for kv in l.split(',') {
                match kv.split_once('=') {
                    Some(("snapshot.name", v)) => name = Some(v),
                    Some(("snapshot.id", v)) => id = Some(v),
                    Some((k, _)) => {
                        return Err(CliError::Usage(format!("Invalid option '{k}' for -l")))
                    }
                    None => bare = Some(kv),
                }
            }
        }
        (None, Some(s)) => bare = Some(s),
        _ => {}
    }
    let selector = match (id, name, bare) {
        (Some(i), Some(n), _) => Some(qcow2::SnapshotSelector::IdAndName(i, n)),
        (Some(i), None, _) => Some(qcow2::SnapshotSelector::Id(i)),
        (None, Some(n), _) => Some(qcow2::SnapshotSelector::Name(n)),
        (None, None, Some(k)) => Some(qcow2::SnapshotSelector::IdOrName(k)),
        (None, None, None) => None,
    };
    let mut inp = open_any(src, in_fmt, true)?;
    // The chosen snapshot, by its id (ids are unique, and an id is looked up first).
    let mut snap: Option<String> = None;
    let size = match &selector {
        None => inp.size(),
        Some(sel) => {
            let q = inp
                .as_qcow2()
                .ok_or_else(|| CliError::Usage("snapshots need a qcow2 input".into()))?;
            let info = q.select_snapshot(sel).ok_or_else(|| {
                CliError::Usage("Failed to load snapshot: Can't find snapshot".into())
            })?;
            snap = Some(info.id.clone());
            info.disk_size
        }
    };
    let mut outp: Box<dyn BlockBackend> = match out_fmt {
        ImageFormat::Raw => {
            Box::new(RawImage::create(dst, size).map_err(img_err(dst.to_string()))?)
        }
        ImageFormat::Qcow2 => {
            let mut o = create_opts(a.opt("-o"), size)?;
            if let Some(b) = a.opt("-B") {
                o.backing_file = Some(b.to_string());
                o.backing_format = match fmt_arg(a.opt("-F"))? {
                    Some(f) => Some(f),
                    None => {
                        let p = qcow2::backing::resolve_backing_name(b, Some(std::path::Path::new(dst)));
                        Some(qcow2::probe(&p).map_err(img_err(format!("Could not open backing file '{b}'")))?)
                    }
                };
            }
            Box::new(Qcow2::create(dst, &o).map_err(img_err(dst.to_string()))?)
        }
    };
    if a.opt("-B").is_some() {
        if out_fmt != ImageFormat::Qcow2 || snap.is_some() {
            return Err(CliError::Usage("-B needs a qcow2 output and no snapshot".into()));
        }
        crate::chain::convert_top_only(inp.as_mut(), outp.as_mut())?;
        outp.flush().map_err(img_err(dst.to_string()))?;
        if let Some(q) = outp.as_qcow2() {
            q.close().map_err(img_err(dst.to_string()))?;
        }
        return Ok(0);
    }
    let chunk = 2usize << 20;
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(chunk as u64) as usize;
        let b = &mut buf[..n];
        match &snap {
            None => inp.read_at(off, b),
            Some(k) => inp
                .as_qcow2()
                .map_or(Ok(()), |q| q.read_snapshot(k, off, b)),
        }
        .map_err(img_err(format!("error while reading at byte {off}")))?;
        if a.flag("-c") {
            crate::chain::write_compressed(outp.as_mut(), off, b)?;
        } else if b.iter().any(|&x| x != 0) {
            outp.write_at(off, b)
                .map_err(img_err(format!("error while writing at byte {off}")))?;
        }
        off += n as u64;
    }
    outp.flush().map_err(img_err(dst.to_string()))?;
    if let Some(q) = outp.as_qcow2() {
        q.close().map_err(img_err(dst.to_string()))?;
    }
    Ok(0)
}

pub fn resize(argv: &[String]) -> R {
    // A leading "-" of "-SIZE" is a size, not an option: split it off before parsing.
    let (opts, sz): (Vec<String>, Option<String>) = match argv.last() {
        Some(l) if l.starts_with('-') && l[1..].starts_with(|c: char| c.is_ascii_digit()) => {
            (argv[..argv.len() - 1].to_vec(), Some(l.clone()))
        }
        _ => (argv.to_vec(), None),
    };
    let a = parse(&opts, &["-f"], &["-q", "--shrink"])?;
    let mut pos = a.pos.clone();
    if let Some(s) = sz {
        pos.push(s);
    }
    let (file, s) = match pos.as_slice() {
        [f, s] => (f.as_str(), s.as_str()),
        _ => return Err(CliError::Usage("Expecting image file name and size".into())),
    };
    let mut dev = open_any(file, fmt_arg(a.opt("-f"))?, false)?;
    let cur = dev.size();
    let new = if let Some(d) = s.strip_prefix('+') {
        cur.checked_add(parse_size(d)?)
            .ok_or_else(|| CliError::Usage("size overflow".into()))?
    } else if let Some(d) = s.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?)
            .ok_or_else(|| CliError::Usage("New image size must be positive".into()))?
    } else {
        parse_size(s)?
    };
    if new < cur && !a.flag("--shrink") {
        return Err(CliError::Usage(
            "Use the --shrink option to perform a shrink operation.".into(),
        ));
    }
    match dev.as_qcow2() {
        Some(q) => {
            q.resize(new)
                .map_err(img_err("Error resizing image".into()))?;
            q.close().map_err(img_err(file.to_string()))?;
        }
        None => {
            drop(dev);
            let mut r = RawImage::open(file, false).map_err(img_err(file.to_string()))?;
            r.resize(new)
                .map_err(img_err("Error resizing image".into()))?;
        }
    }
    if !a.flag("-q") {
        println!("Image resized.");
    }
    Ok(0)
}
