//! Storage migration without shared storage (issue 17), the same HMP sequence for both VMMs:
//! destination `-incoming defer`, `nbd_server_start`, `nbd_server_add -w d0`,
//! `migrate_incoming`; source `drive_mirror -n -f d0 nbd://... raw`, wait until the job has
//! copied everything (`info block-jobs`: completed = total), `migrate -d`, wait for
//! `completed`, `block_job_cancel d0`; destination `nbd_server_stop`. The source disk is a
//! 1 GiB qcow2 image with 256 MiB of data; the destination's is empty; the guest rewrites
//! 64 MiB of RAM and the first 64 MiB of its disk throughout. The NBD connection goes through a
//! counting relay, so the disk bytes on the wire are measured the same way for both.
//!
//! Measured: total (drive_mirror → migration completed), the mirror until ready, the VMM's
//! downtime, the guest-seen heartbeat gap, disk and RAM bytes on the wire; the destination
//! must print `LEDGER OK` and `DISK OK`.
//!
//! `storage-inc` (issue 23, libvirt's `--copy-storage-inc`): the same sequence with
//! `drive_mirror -n` (no `-f`: `sync: top`, in both VMMs) from a qcow2 overlay over that image
//! as base (its top layer holding 64 MiB of data from the start, then the guest's writes),
//! into an empty overlay over the destination's copy of the base (made beforehand): only the
//! top layer crosses the wire.

use crate::vm::{free_port, hb_seq, BenchError, Bins, Hmp, Proc, Res, Spec, Vmm};
use crate::{order, Collect};
use bench::hmptext::{migration_status, number};
use bench::results::Metric;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);
const DISK_GIB: u64 = 1;
const DATA_MIB: u64 = 256;
const WORKLOAD: &str = "mode=dirty mib=64 rate=32 disk=on disk_mib=64 hb=compact hb_ms=2";

/// One storage migration.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub total_ms: f64,
    pub ready_ms: f64,
    pub downtime_ms: f64,
    pub hb_gap_ms: f64,
    pub disk_wire_mib: f64,
    pub ram_mib: f64,
    pub ok: bool,
}

fn sh(prog: &Path, args: &[&str]) -> Res<()> {
    let o = Command::new(prog).args(args).output().map_err(|e| BenchError::Io(prog.display().to_string(), e))?;
    if !o.status.success() {
        return Err(BenchError::Failed(format!("{} {}: {}", prog.display(), args.join(" "), String::from_utf8_lossy(&o.stderr).trim())));
    }
    Ok(())
}

/// The source image: 256 MiB of pseudo-random data at the start of a 1 GiB qcow2 image.
fn populate(img: &Path, dir: &Path) -> Res<PathBuf> {
    let raw = dir.join("storage-data.raw");
    let q = dir.join("storage-src.qcow2");
    crate::disk::write_random(&raw, DATA_MIB as u64, 0x2545_f491_4f6c_dd1d)?;
    let _ = std::fs::remove_file(&q);
    sh(img, &["convert", "-f", "raw", "-O", "qcow2", path(&raw), path(&q)])?;
    sh(img, &["resize", "-f", "qcow2", path(&q), &format!("{DISK_GIB}G")])?;
    let _ = std::fs::remove_file(&raw);
    Ok(q)
}

/// Data already in the overlay's top layer when the VM starts (`storage-inc`).
const TOP_MIB: u64 = 64;

/// A standalone qcow2 image (to become the source overlay) with [`TOP_MIB`] MiB of data
/// at the start.
fn top_template(img: &Path, dir: &Path) -> Res<PathBuf> {
    let raw = dir.join("storage-top.raw");
    let q = dir.join("storage-top.qcow2");
    crate::disk::write_random(&raw, TOP_MIB, 0x9e37_79b9_7f4a_7c15)?;
    let _ = std::fs::remove_file(&q);
    sh(img, &["convert", "-f", "raw", "-O", "qcow2", path(&raw), path(&q)])?;
    sh(img, &["resize", "-f", "qcow2", path(&q), &format!("{DISK_GIB}G")])?;
    let _ = std::fs::remove_file(&raw);
    Ok(q)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or("")
}

/// A TCP relay counting the bytes it forwards (both directions).
fn relay(to: u16, bytes: Arc<AtomicU64>) -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| BenchError::Io("relay".into(), e))?;
    let port = l.local_addr().map_err(|e| BenchError::Io("relay".into(), e))?.port();
    std::thread::spawn(move || {
        for a in l.incoming() {
            let Ok(a) = a else { return };
            let Ok(b) = std::net::TcpStream::connect(("127.0.0.1", to)) else { continue };
            let _ = (a.set_nodelay(true), b.set_nodelay(true));
            for (mut from, mut to) in [(a.try_clone(), b.try_clone()), (b.try_clone(), a.try_clone())]
                .into_iter()
                .filter_map(|(x, y)| Some((x.ok()?, y.ok()?)))
            {
                let n = bytes.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(k) = from.read(&mut buf) {
                        if k == 0 || to.write_all(&buf[..k]).is_err() {
                            break;
                        }
                        n.fetch_add(k as u64, Ordering::Relaxed);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    Ok(port)
}

fn ok_answer(what: &str, a: &str) -> Res<()> {
    if a.trim().is_empty() {
        Ok(())
    } else {
        Err(BenchError::Failed(format!("{what}: {a}")))
    }
}

/// `Completed X of Y bytes` in `info block-jobs` → (X, Y).
fn job_progress(info: &str) -> Option<(u64, u64)> {
    let rest = info.split("Completed ").nth(1)?;
    let mut w = rest.split_whitespace();
    let x = w.next()?.parse().ok()?;
    let _of = w.next()?;
    let y = w.next()?.parse().ok()?;
    Some((x, y))
}

/// One run. `top`: the destination's copy of `src_image`, and an image with the top layer's
/// data; the disks are then overlays (the source's: that image rebased over `src_image`; the
/// destination's: empty over the copy) and the mirror is `sync: top`.
pub fn run(bins: &Bins, vmm: Vmm, src_image: &Path, dir: &Path, top: Option<(&Path, &Path)>) -> Res<Run> {
    let img = bins.qemu_img.clone().unwrap_or_else(|| bins.godwit_img.clone());
    let (si, di) = (dir.join(format!("{}-ssrc.qcow2", vmm.name())), dir.join(format!("{}-sdst.qcow2", vmm.name())));
    let _ = (std::fs::remove_file(&si), std::fs::remove_file(&di));
    match top {
        None => {
            std::fs::copy(src_image, &si).map_err(|e| BenchError::Io(si.display().to_string(), e))?;
            sh(&img, &["create", "-q", "-f", "qcow2", path(&di), &format!("{DISK_GIB}G")])?;
        }
        Some((dst_base, top_data)) => {
            std::fs::copy(top_data, &si).map_err(|e| BenchError::Io(si.display().to_string(), e))?;
            sh(&img, &["rebase", "-u", "-f", "qcow2", "-b", path(src_image), "-F", "qcow2", path(&si)])?;
            sh(&img, &["create", "-q", "-f", "qcow2", "-b", path(dst_base), "-F", "qcow2", path(&di)])?;
        }
    }
    let flags = if top.is_some() { "-n" } else { "-n -f" };
    let (nbd_port, mig_port) = (free_port()?, free_port()?);
    let (dmon, smon) = (dir.join(format!("{}-sdst.sock", vmm.name())), dir.join(format!("{}-ssrc.sock", vmm.name())));
    let _ = (std::fs::remove_file(&dmon), std::fs::remove_file(&smon));
    let spec = |disk: &Path, mon: &Path, incoming: bool| Spec {
        mem_mib: 512,
        smp: 2,
        append: WORKLOAD.into(),
        monitor: Some(mon.to_path_buf()),
        incoming: incoming.then(|| "defer".to_string()),
        disk: Some(disk.to_path_buf()),
        ..Default::default()
    };
    let mut dst = Proc::spawn(bins, vmm, &spec(&di, &dmon, true), &format!("{}-sdst", vmm.name()))?;
    let mut dh = Hmp::connect(&dmon, vmm, "destination monitor", T)?;
    ok_answer("nbd_server_start", &dh.cmd(&format!("nbd_server_start 127.0.0.1:{nbd_port}"))?)?;
    ok_answer("nbd_server_add", &dh.cmd("nbd_server_add -w d0")?)?;
    ok_answer("migrate_incoming", &dh.cmd(&format!("migrate_incoming tcp:127.0.0.1:{mig_port}"))?)?;
    let wire = Arc::new(AtomicU64::new(0));
    let rport = relay(nbd_port, wire.clone())?;

    let mut src = Proc::spawn(bins, vmm, &spec(&si, &smon, false), &format!("{}-ssrc", vmm.name()))?;
    src.wait_for("GUEST READY", T)?;
    let mut sh_ = Hmp::connect(&smon, vmm, "source monitor", T)?;
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    ok_answer("drive_mirror", &sh_.cmd(&format!("drive_mirror {flags} d0 nbd://127.0.0.1:{rport}/d0 raw"))?)?;
    loop {
        let info = sh_.cmd("info block-jobs")?;
        match job_progress(&info) {
            Some((x, y)) if x == y && y > 0 => break,
            Some(_) => {}
            None => return Err(BenchError::Failed(format!("mirror job gone: {info}"))),
        }
        if t0.elapsed() > T {
            return Err(BenchError::Failed(format!("mirror not ready in {T:?}: {info}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
    ok_answer("migrate", &sh_.cmd(&format!("migrate -d tcp:127.0.0.1:{mig_port}"))?)?;
    let info = loop {
        let i = sh_.cmd("info migrate")?;
        match migration_status(&i).and_then(|s| s.split_whitespace().next()).unwrap_or("?") {
            "completed" => break i,
            "failed" | "cancelled" => return Err(BenchError::Failed(format!("migration: {i}"))),
            _ => {}
        }
        if t0.elapsed() > T {
            return Err(BenchError::Failed("migration did not complete".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (t_dst, first) = dst.wait_line("first output after migration", T, |_| true)?;
    ok_answer("block_job_cancel", &sh_.cmd("block_job_cancel d0")?)?;
    let end = Instant::now() + T;
    while !sh_.cmd("info block-jobs")?.contains("No active jobs") {
        if Instant::now() > end {
            return Err(BenchError::Failed("block job did not end after block_job_cancel".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = dh.cmd("nbd_server_stop")?;
    sh_.quit();
    src.finish(Duration::from_secs(10));
    let (t_src, last) = src
        .heartbeats()
        .into_iter()
        .max_by_key(|(_, s)| *s)
        .ok_or_else(|| BenchError::Failed("no heartbeat from the source".into()))?;
    let joined = format!("{}{first}", src.partial.clone().unwrap_or_default());
    let seq_ok = hb_seq(&joined) == Some(last + 1);
    dst.skip_seen();
    dst.send(b"v")?;
    let (_, ledger) = dst.wait_for("LEDGER ", T)?;
    let (_, disk) = dst.wait_for("DISK ", T)?;
    dst.quit();
    drop(src);
    let _ = (std::fs::remove_file(&si), std::fs::remove_file(&di));
    Ok(Run {
        total_ms,
        ready_ms,
        downtime_ms: number(&info, "downtime").unwrap_or(f64::NAN),
        hb_gap_ms: t_dst.saturating_duration_since(t_src).as_secs_f64() * 1000.0,
        disk_wire_mib: wire.load(Ordering::Relaxed) as f64 / (1u64 << 20) as f64,
        ram_mib: number(&info, "transferred ram").unwrap_or(f64::NAN) / 1024.0,
        ok: seq_ok && ledger.starts_with("LEDGER OK") && disk.starts_with("DISK OK"),
    })
}

/// Runs the scenario `runs` times per VMM and appends the rows.
pub fn run_all(runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, c: &mut Collect, metrics: &mut Vec<Metric>) {
    scenario(false, runs, bins, sides, dir, c, metrics)
}

/// `storage-inc`: [`run_all`] with overlays and `sync: top`.
pub fn run_all_top(runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, c: &mut Collect, metrics: &mut Vec<Metric>) {
    scenario(true, runs, bins, sides, dir, c, metrics)
}

fn scenario(inc: bool, runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, c: &mut Collect, metrics: &mut Vec<Metric>) {
    let img = bins.qemu_img.clone().unwrap_or_else(|| bins.godwit_img.clone());
    let k = if inc { "storage-inc" } else { "storage" };
    let src = match populate(&img, dir) {
        Ok(p) => p,
        Err(e) => {
            c.notes.push(format!("{k}: cannot prepare the image: {e}"));
            return;
        }
    };
    // The base as the destination already has it (another file, same bytes), and the data
    // of the source overlay's top layer.
    let dst_base = dir.join("storage-dst-base.qcow2");
    let mut top_data = PathBuf::new();
    if inc {
        let prepared = std::fs::copy(&src, &dst_base).map_err(|e| BenchError::Io(dst_base.display().to_string(), e)).and_then(|_| top_template(&img, dir));
        match prepared {
            Ok(t) => top_data = t,
            Err(e) => {
                c.notes.push(format!("{k}: cannot prepare the images: {e}"));
                return;
            }
        }
    }
    for i in 0..runs {
        for vmm in order(i, sides) {
            eprint!("[{k} migration {}/{runs}] {:<6} ", i + 1, vmm.name());
            match run(bins, vmm, &src, dir, inc.then_some((dst_base.as_path(), top_data.as_path()))) {
                Ok(r) => {
                    eprintln!(
                        "total {:.0} ms (mirror ready after {:.0} ms), downtime {:.1} ms, gap {:.1} ms, disk {:.1} MiB + RAM {:.1} MiB on the wire, {}",
                        r.total_ms, r.ready_ms, r.downtime_ms, r.hb_gap_ms, r.disk_wire_mib, r.ram_mib,
                        if r.ok { "LEDGER OK + DISK OK" } else { "CHECK FAILED" }
                    );
                    for (m, v) in [("total", r.total_ms), ("ready", r.ready_ms), ("downtime", r.downtime_ms), ("gap", r.hb_gap_ms), ("disk", r.disk_wire_mib), ("ram", r.ram_mib)] {
                        c.add(&format!("{k}/{m}"), vmm, v);
                    }
                    c.flag(&format!("{k}/ok"), vmm, r.ok);
                }
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    c.failed(k, vmm, &e);
                }
            }
        }
    }
    let scen = if inc {
        format!("incremental storage migration (sync top): qcow2 overlay with {TOP_MIB} MiB data over a {DISK_GIB} GiB base with {DATA_MIB} MiB data (on both hosts), guest writing RAM and disk")
    } else {
        format!("storage migration: {DISK_GIB} GiB qcow2 disk, {DATA_MIB} MiB data, guest writing RAM and disk")
    };
    for (m, label, unit) in [
        ("total", "drive_mirror → migration completed", "ms"),
        ("ready", "drive_mirror → mirror ready", "ms"),
        ("downtime", "downtime (VMM's report)", "ms"),
        ("gap", "heartbeat gap seen from the guest", "ms"),
        ("disk", "disk bytes on the wire (NBD, both directions)", "MiB"),
        ("ram", "RAM transferred", "MiB"),
    ] {
        let mut r = c.metric(k, m, label, unit);
        r.scenario = scen.clone();
        metrics.push(r);
    }
    let mut r = c.metric(k, "ok", "LEDGER OK + DISK OK on the destination, heartbeats continue", "runs").fraction();
    r.scenario = scen;
    metrics.push(r);
    let _ = (std::fs::remove_file(&src), std::fs::remove_file(&dst_base), std::fs::remove_file(&top_data));
}
