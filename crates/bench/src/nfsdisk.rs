//! Guest disk throughput with the image on an NFS server (`--only nfs`, issue 16): the same
//! `diskbench` workloads as `disk.rs` (4 KiB random and 1 MiB sequential, read and write,
//! queue depth 1), on a fully allocated qcow2 image exported by an nfs-ganesha the benchmark
//! starts in a network namespace of its own (crate `nfs`, module `ganesha`), under Godwit
//! (libnfs, NFSv3) and QEMU (its `nfs` block driver, NFSv3) with the same `nfs://` drive.
//! Then a live migration over loopback TCP of a guest writing that disk (the disk ledger) and
//! dirtying 128 MiB, the image handed over on the NFS server: total time and downtime as each
//! VMM reports them, and the disk ledger verified on the destination (`DISK OK`).
//! Needs root and the Debian packages nfs-ganesha nfs-ganesha-vfs rpcbind libnfs13
//! qemu-block-extra; the scenario is skipped with a note when the server cannot start.

use crate::disk::{run, SPAN_MIB};
use crate::vm::{free_port, BenchError, Bins, Hmp, Proc, Res, Spec, Vmm};
use bench::hmptext::{migration_status, number};
use std::time::Duration;
use crate::{order, Collect};
use bench::results::Metric;
use std::path::{Path, PathBuf};
use std::process::Command;

const OPS: &[&str] = &["randread4k", "randwrite4k", "seqread1m", "seqwrite1m"];

/// A fully allocated qcow2 image of `SPAN_MIB` MiB of pseudo-random data in `export`.
fn populate(bins: &Bins, export: &Path) -> Res<PathBuf> {
    let raw = export.join("nfs-bench.raw");
    let qcow = export.join("nfs-bench.qcow2");
    crate::disk::write_random(&raw, SPAN_MIB as u64, 0x2545_f491_4f6c_dd1d)?;
    let img = bins.qemu_img.clone().unwrap_or_else(|| bins.godwit_img.clone());
    let out = Command::new(&img)
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()
        .map_err(|e| BenchError::Io(img.display().to_string(), e))?;
    let _ = std::fs::remove_file(&raw);
    if !out.status.success() {
        return Err(BenchError::Failed(format!("convert: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(qcow)
}

/// Runs every workload `runs` times per VMM on the NFS image and appends the rows.
pub fn run_all(runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, c: &mut Collect, metrics: &mut Vec<Metric>) {
    let g = match nfs::ganesha::Ganesha::start(dir) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("[nfs] cannot start the NFS server: {e}");
            c.notes.push(format!("nfs: skipped, cannot start the NFS server: {e}"));
            return;
        }
    };
    if let Err(e) = populate(bins, &g.export()) {
        eprintln!("[nfs] cannot prepare the image: {e}");
        c.notes.push(format!("nfs: cannot prepare the image: {e}"));
        return;
    }
    // NFSv3 through the server's rpcbind: what QEMU's driver speaks, and libnfs's default.
    let url = PathBuf::from(g.url("nfs-bench.qcow2", ""));
    for &op in OPS {
        let k = format!("nfs-qcow2-{op}-qd1");
        for i in 0..runs {
            for vmm in order(i, sides) {
                eprint!("[nfs qcow2 {op} qd=1 {}/{runs}] {:<6} ", i + 1, vmm.name());
                match run(bins, vmm, &url, "qcow2", "writeback", op, 1) {
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
        let scen = "disk on NFS: qcow2 over nfs:// (ganesha, NFSv3)".to_string();
        let (mkey, unit) = if op.ends_with("4k") { ("iops", "IOPS") } else { ("mibps", "MiB/s") };
        let mut m = c.metric(&k, mkey, &format!("{op} qd=1"), unit);
        m.scenario = scen.clone();
        metrics.push(m);
        if op.ends_with("4k") {
            let mut l = c.metric(&k, "lat", &format!("{op} qd=1 mean latency"), "µs");
            l.scenario = scen;
            metrics.push(l);
        }
    }
    migrations(runs, bins, sides, dir, &url, c, metrics);
    if let Some(qemu_img) = &bins.qemu_img {
        match Command::new(qemu_img).args(["check"]).arg(&url).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => c.notes.push(format!("nfs: qemu-img check after the runs: {}", String::from_utf8_lossy(&o.stdout).trim())),
            Err(e) => c.notes.push(format!("nfs: qemu-img check: {e}")),
        }
    }
    c.notes.push(format!(
        "nfs: the guest's diskbench, {} s per run over the first {SPAN_MIB} MiB of a populated qcow2 image on an \
         nfs-ganesha in a network namespace (veth + bridge), NFSv3, cache=writeback, the same nfs:// drive for both VMMs",
        crate::disk::SECS
    ));
}

const MIG_WORKLOAD: &str = "mode=dirty mib=128 rate=50 disk=on disk_mib=8 hb_ms=100 cpus=1";
const T: Duration = Duration::from_secs(60);

/// (total ms, downtime ms) of one live migration with the disk at `url`, after checking the
/// destination's disk ledger.
fn migrate_once(bins: &Bins, vmm: Vmm, dir: &Path, url: &Path) -> Res<(f64, f64)> {
    let port = free_port()?;
    let (smon, dmon) = (dir.join(format!("{}-nfs-src.sock", vmm.name())), dir.join(format!("{}-nfs-dst.sock", vmm.name())));
    let _ = std::fs::remove_file(&smon);
    let _ = std::fs::remove_file(&dmon);
    let spec = |mon: &Path, incoming: Option<String>| Spec {
        mem_mib: 512,
        smp: 1,
        append: MIG_WORKLOAD.into(),
        monitor: Some(mon.to_path_buf()),
        incoming,
        disk: Some(url.to_path_buf()),
        disk_format: Some("qcow2".into()),
        ..Default::default()
    };
    let mut dst = Proc::spawn(bins, vmm, &spec(&dmon, Some(format!("tcp:127.0.0.1:{port}"))), &format!("{}-nfs-dst", vmm.name()))?;
    let mut dhmp = Hmp::connect(&dmon, vmm, "destination monitor", T)?;
    let mut src = Proc::spawn(bins, vmm, &spec(&smon, None), &format!("{}-nfs-src", vmm.name()))?;
    src.wait_for("GUEST READY", T)?;
    let mut hmp = Hmp::connect(&smon, vmm, "source monitor", T)?;
    std::thread::sleep(Duration::from_millis(1500));
    let a = hmp.cmd(&format!("migrate -d tcp:127.0.0.1:{port}"))?;
    if a.to_ascii_lowercase().contains("error") {
        return Err(BenchError::Failed(format!("migrate: {a}")));
    }
    let end = std::time::Instant::now() + T;
    let info = loop {
        std::thread::sleep(Duration::from_millis(25));
        let info = hmp.cmd("info migrate")?;
        match migration_status(&info).and_then(|s| s.split_whitespace().next()) {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => return Err(BenchError::Failed(format!("migration: {info}"))),
            _ if std::time::Instant::now() > end => return Err(BenchError::Failed("migration did not finish".into())),
            _ => {}
        }
    };
    let total = number(&info, "total time").unwrap_or(f64::NAN);
    let downtime = number(&info, "downtime").unwrap_or(f64::NAN);
    hmp.quit();
    src.finish(Duration::from_secs(10));
    dst.wait_for("HEARTBEAT", T)?;
    dst.skip_seen();
    dst.send(b"v")?;
    let (_, l) = dst.wait_for("DISK ", T)?;
    let _ = dhmp.cmd("quit");
    dst.finish(Duration::from_secs(10));
    if !l.starts_with("DISK OK") {
        return Err(BenchError::Failed(format!("{}: destination disk ledger: {l}", vmm.name())));
    }
    Ok((total, downtime))
}

/// Live migrations with the disk on the NFS server, `runs` per VMM.
fn migrations(runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, url: &Path, c: &mut Collect, metrics: &mut Vec<Metric>) {
    let k = "nfs-mig-dirty";
    for i in 0..runs {
        for vmm in order(i, sides) {
            eprint!("[nfs live migration {}/{runs}] {:<6} ", i + 1, vmm.name());
            match migrate_once(bins, vmm, dir, url) {
                Ok((t, d)) => {
                    eprintln!("total {t:.0} ms, downtime {d:.0} ms, DISK OK on the destination");
                    c.add(&format!("{k}/total"), vmm, t);
                    c.add(&format!("{k}/downtime"), vmm, d);
                }
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    c.failed(k, vmm, &e);
                }
            }
        }
    }
    let scen = "live migration, disk on NFS (512 MiB, 128 MiB dirtied at 50 MiB/s, disk ledger)".to_string();
    for (m, label) in [("total", "total time"), ("downtime", "downtime (as reported)")] {
        let mut x = c.metric(k, m, label, "ms");
        x.scenario = scen.clone();
        metrics.push(x);
    }
}
