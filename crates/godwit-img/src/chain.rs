//! Backing-chain commands and options: `create -b/-F/-u`, `commit`, `rebase` (safe and `-u`)
//! and `convert -B`, with qemu-img's messages.

use crate::cmds::{fmt_arg, img_err, one_file, R};
use crate::{parse, Args, CliError};
use qcow2::{BlockBackend, CreateOptions, ImageFormat, OpenOptions, Qcow2};

/// `create -b BACKING -F FMT [-u]`: fill the backing fields of `o` (and the size from the
/// backing image when none was given). Returns whether the backing file is to be opened.
pub fn create_backing(
    a: &Args,
    file: &str,
    fmt: ImageFormat,
    o: &mut CreateOptions,
) -> Result<bool, CliError> {
    let Some(b) = a.opt("-b") else {
        if a.opt("-F").is_some() {
            return Err(CliError::Usage("Option -F requires -b".into()));
        }
        return Ok(false);
    };
    if fmt != ImageFormat::Qcow2 {
        return Err(CliError::Usage(format!(
            "{file}: Backing file not supported for file format '{fmt}'"
        )));
    }
    let Some(bf) = fmt_arg(a.opt("-F"))? else {
        return Err(CliError::Usage(format!(
            "{file}: Backing file specified without backing format"
        )));
    };
    o.backing_file = Some(b.to_string());
    o.backing_format = Some(bf);
    let unsafe_ = a.flag("-u");
    if !unsafe_ || o.size == 0 {
        let path = qcow2::backing::resolve_backing_name(b, Some(std::path::Path::new(file)));
        let opts = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let dev = qcow2::open(&path, Some(bf), &opts).map_err(|e| {
            CliError::Usage(format!(
                "{file}: Could not open '{}': {e}\nCould not open backing image.",
                path.display()
            ))
        })?;
        if o.size == 0 {
            o.size = dev.size();
        }
    }
    Ok(!unsafe_)
}

/// Writers are refused on an image another process reads as a backing file (QEMU's lock).
pub fn refuse_if_backing(file: &str, read_only: bool) -> Result<(), CliError> {
    if !read_only && qcow2::backing::in_use_as_backing(std::path::Path::new(file)).unwrap_or(false) {
        return Err(CliError::Usage(format!(
            "Could not open '{file}': Failed to get \"write\" lock\nIs another process using the image [{file}]?"
        )));
    }
    Ok(())
}

pub fn commit(argv: &[String]) -> R {
    let a = parse(argv, &["-f", "-t", "-b", "-r"], &["-q", "-d", "-p"])?;
    let file = one_file(&a.pos)?;
    if let Some(f) = fmt_arg(a.opt("-f"))? {
        if f != ImageFormat::Qcow2 {
            return Err(CliError::Usage(format!(
                "Image '{file}' does not have a backing file"
            )));
        }
    }
    refuse_if_backing(file, false)?;
    let mut img = Qcow2::open(file, &OpenOptions::default())
        .map_err(img_err(format!("Could not open '{file}'")))?;
    if img.backing_file().is_none() {
        return Err(CliError::Usage(format!(
            "Image '{file}' does not have a backing file"
        )));
    }
    // -b BASE: the layer of the chain that is BASE (by resolved path); implies -d, as qemu-img.
    let (depth, keep) = match a.opt("-b") {
        None => (1, a.flag("-d")),
        Some(base) => {
            let want = std::fs::canonicalize(base).unwrap_or_else(|_| base.into());
            let mut depth = 0usize;
            let mut found = None;
            let mut cur: Option<&mut Qcow2> = Some(&mut img);
            while let Some(q) = cur {
                depth += 1;
                let Some(p) = q.backing_path() else { break };
                let same = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()) == want;
                if same {
                    found = Some(depth);
                    break;
                }
                cur = q.backing().and_then(|b| b.as_qcow2());
            }
            match found {
                Some(d) => (d, true),
                None => {
                    return Err(CliError::Usage(format!(
                        "Did not find '{base}' in the backing chain of '{file}'"
                    )))
                }
            }
        }
    };
    img.commit_into(depth, keep)
        .map_err(img_err("Block job failed".into()))?;
    img.close().map_err(img_err(file.to_string()))?;
    if !a.flag("-q") {
        println!("Image committed.");
    }
    Ok(0)
}

pub fn rebase(argv: &[String]) -> R {
    let a = parse(argv, &["-f", "-F", "-b", "-t", "-T", "-o"], &["-q", "-u", "-p", "-U", "-c"])?;
    let file = one_file(&a.pos)?;
    let Some(b) = a.opt("-b") else {
        return Err(CliError::Usage("Must specify backing file (-b)".into()));
    };
    let unsafe_ = a.flag("-u");
    let name = (!b.is_empty()).then_some(b);
    let bf = fmt_arg(a.opt("-F"))?;
    if name.is_some() && bf.is_none() {
        return Err(CliError::Usage(format!(
            "Could not change the backing file to '{b}': backing format must be specified"
        )));
    }
    let opts = OpenOptions {
        no_backing: unsafe_,
        ..Default::default()
    };
    refuse_if_backing(file, false)?;
    let mut img = Qcow2::open(file, &opts).map_err(img_err(format!("Could not open '{file}'")))?;
    img.rebase(name, bf, unsafe_)
        .map_err(img_err(format!("Could not change the backing file to '{b}'")))?;
    img.close().map_err(img_err(file.to_string()))?;
    Ok(0)
}

/// `convert -B BACKING`: copy only what the source's top layer holds into `out`, whose backing
/// file is expected to hold the rest (qemu-img's semantics).
pub fn convert_top_only(inp: &mut dyn BlockBackend, out: &mut dyn BlockBackend) -> Result<(), CliError> {
    let size = inp.size().min(out.size());
    let runs = match inp.as_qcow2() {
        Some(q) => q
            .top_allocation(0, size)
            .map_err(img_err("error while reading the allocation map".into()))?,
        None => vec![(0, size, true)],
    };
    let chunk = 2usize << 20;
    let mut buf = vec![0u8; chunk];
    for (s, l, allocated) in runs {
        if !allocated {
            continue;
        }
        let mut g = s;
        while g < s + l {
            let n = ((s + l - g) as usize).min(chunk);
            inp.read_at(g, &mut buf[..n])
                .map_err(img_err(format!("error while reading at byte {g}")))?;
            let r = if buf[..n].iter().all(|&x| x == 0) {
                out.write_zeroes(g, n as u64)
            } else {
                out.write_at(g, &buf[..n])
            };
            r.map_err(img_err(format!("error while writing at byte {g}")))?;
            g += n as u64;
        }
    }
    Ok(())
}

/// `convert -c`: write the clusters of `buf` (guest offset `off`, cluster aligned) compressed,
/// skipping clusters of zeros.
pub fn write_compressed(out: &mut dyn BlockBackend, off: u64, buf: &[u8]) -> Result<(), CliError> {
    let Some(q) = out.as_qcow2() else {
        return Err(CliError::Usage("Compression not supported for this file format".into()));
    };
    if q.header().compression_type != 1 {
        return Err(CliError::Usage(
            "writing compressed clusters needs -o compression_type=zstd (zlib is read only)".into(),
        ));
    }
    let cs = q.cluster_size() as usize;
    for (i, c) in buf.chunks(cs).enumerate() {
        if c.iter().all(|&x| x == 0) {
            continue;
        }
        let g = off + (i * cs) as u64;
        q.write_compressed(g, c)
            .map_err(img_err(format!("error while compressing at byte {g}")))?;
    }
    Ok(())
}
