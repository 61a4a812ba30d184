//! Guest-visible disk throughput (issue 5): the test guest's `diskbench=` workloads (4 KiB
//! random read/write, 1 MiB sequential read/write, at queue depth 1 and 8) against a raw and
//! a qcow2 image, with `cache=writeback` and `cache=none`, under Godwit and QEMU with the same
//! image, guest, `-m` and `-drive` options. The images are populated before the first run
//! (random data written to the raw image, the qcow2 image converted from it, so every cluster
//! is allocated and reads read data); write workloads overwrite in place. The guest prints one
//! `DISKBENCH` line after `SECS` seconds (docs/guest.md); 4 KiB rows report IOPS, 1 MiB rows
//! MiB/s. After the runs the qcow2 image is checked with `qemu-img check`.

use crate::vm::{field, BenchError, Bins, Proc, Res, Spec, Vmm};
use crate::{order, Collect};
use bench::results::Metric;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Length of each workload in the guest.
pub const SECS: u64 = 3;
/// The disk region the workloads cover (and the image size).
pub const SPAN_MIB: u64 = 256;
const OPS: &[&str] = &["randread4k", "randwrite4k", "seqread1m", "seqwrite1m"];
const QDS: &[u64] = &[1, 8];
const CACHES: &[&str] = &["writeback", "none"];
const FORMATS: &[&str] = &["raw", "qcow2"];

/// One DISKBENCH result.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub iops: f64,
    pub mibps: f64,
    pub lat_us: f64,
}

fn run_cmd(prog: &Path, args: &[&str]) -> Res<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| BenchError::Io(format!("{} {}", prog.display(), args.join(" ")), e))?;
    if !out.status.success() {
        return Err(BenchError::Failed(format!(
            "{} {}: {}",
            prog.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Writes `mib` MiB of xorshift pseudo-random bytes (incompressible, never zero pages) from
/// `seed` to a new file at `raw`: the data the disk and storage scenarios start from.
pub(crate) fn write_random(raw: &Path, mib: u64, seed: u64) -> Res<()> {
    let mut f = std::fs::File::create(raw).map_err(|e| BenchError::Io(raw.display().to_string(), e))?;
    let mut x = seed;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for w in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk).map_err(|e| BenchError::Io(raw.display().to_string(), e))?;
    }
    f.sync_all().map_err(|e| BenchError::Io(raw.display().to_string(), e))
}

/// The raw image filled with pseudo-random bytes and a fully allocated qcow2 copy.
fn populate(bins: &Bins, dir: &Path) -> Res<(PathBuf, PathBuf)> {
    let raw = dir.join("disk.raw");
    let qcow = dir.join("disk.qcow2");
    write_random(&raw, SPAN_MIB as u64, 0x9e37_79b9_7f4a_7c15)?;
    let img = bins.qemu_img.clone().unwrap_or_else(|| bins.godwit_img.clone());
    let _ = std::fs::remove_file(&qcow);
    run_cmd(&img, &["convert", "-f", "raw", "-O", "qcow2", raw.to_str().unwrap_or(""), qcow.to_str().unwrap_or("")])?;
    Ok((raw, qcow))
}

/// One boot: run `op` at `qd` and parse the guest's DISKBENCH line.
pub fn run(bins: &Bins, vmm: Vmm, image: &Path, format: &str, cache: &str, op: &str, qd: u64) -> Res<Run> {
    let spec = Spec {
        mem_mib: 256,
        smp: 1,
        append: format!("mode=idle mib=32 diskbench={op} disk_mib={SPAN_MIB} secs={SECS} qd={qd}"),
        disk: Some(image.to_path_buf()),
        disk_format: Some(format.into()),
        disk_cache: Some(cache.into()),
        ..Default::default()
    };
    let mut p = Proc::spawn(bins, vmm, &spec, &format!("{}-disk", vmm.name()))?;
    let (_, line) = p.wait_for("DISKBENCH ", Duration::from_secs(SECS + 60))?;
    p.quit();
    if field(&line, "errors").unwrap_or(1) != 0 {
        return Err(BenchError::Failed(format!("{}: I/O errors: {line}", vmm.name())));
    }
    let f = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('=')?.parse::<f64>().ok())
            .ok_or_else(|| BenchError::Failed(format!("no {k}= in {line:?}")))
    };
    Ok(Run { iops: f("iops")?, mibps: f("mibps")?, lat_us: f("lat_us")? })
}

fn key(format: &str, cache: &str, op: &str, qd: u64) -> String {
    format!("disk-{format}-{cache}-{op}-qd{qd}")
}

/// Runs every combination `runs` times per VMM and appends the rows.
pub fn run_all(runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, c: &mut Collect, metrics: &mut Vec<Metric>) {
    let (raw, qcow) = match populate(bins, dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("[disk] cannot prepare the images: {e}");
            c.notes.push(format!("disk: cannot prepare the images: {e}"));
            return;
        }
    };
    for &format in FORMATS {
        let image = if format == "raw" { &raw } else { &qcow };
        for &cache in CACHES {
            for &op in OPS {
                for &qd in QDS {
                    let k = key(format, cache, op, qd);
                    for i in 0..runs {
                        for vmm in order(i, sides) {
                            eprint!("[disk {format} cache={cache} {op} qd={qd} {}/{runs}] {:<6} ", i + 1, vmm.name());
                            match run(bins, vmm, image, format, cache, op, qd) {
                                Ok(r) => {
                                    eprintln!("{:.0} IOPS, {:.1} MiB/s, {:.0} µs per request", r.iops, r.mibps, r.lat_us);
                                    c.add(&format!("{k}/iops"), vmm, r.iops);
                                    c.add(&format!("{k}/mibps"), vmm, r.mibps);
                                    c.add(&format!("{k}/lat"), vmm, r.lat_us);
                                }
                                Err(e) => {
                                    eprintln!("FAILED: {e}");
                                    c.failed(&k, vmm, &e);
                                }
                            }
                        }
                    }
                    let scen = format!("disk: {format}, cache={cache}");
                    let (mkey, label, unit) = if op.ends_with("4k") {
                        ("iops", format!("{op} qd={qd}"), "IOPS")
                    } else {
                        ("mibps", format!("{op} qd={qd}"), "MiB/s")
                    };
                    let mut m = c.metric(&k, mkey, &label, unit);
                    m.scenario = scen.clone();
                    let mut l = c.metric(&k, "lat", &format!("{op} qd={qd} mean latency"), "µs");
                    l.scenario = scen;
                    metrics.push(m);
                    if qd == 1 && op.ends_with("4k") {
                        metrics.push(l);
                    }
                }
            }
        }
    }
    if let Some(qemu_img) = &bins.qemu_img {
        let out = Command::new(qemu_img).args(["check", "-U"]).arg(&qcow).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => c.notes.push(format!(
                "disk: qemu-img check of the qcow2 image after the runs: {}",
                String::from_utf8_lossy(&o.stdout).trim()
            )),
            Err(e) => c.notes.push(format!("disk: qemu-img check: {e}")),
        }
    }
    c.notes.push(format!(
        "disk: the guest's diskbench (docs/guest.md), {SECS} s per run over the first {SPAN_MIB} MiB of a populated image, \
         1 vCPU, polled (no interrupts), same -drive format/cache for both VMMs"
    ));
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&qcow);
}
