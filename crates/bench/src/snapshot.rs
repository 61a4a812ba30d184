//! savevm / loadvm (issue 7) on a 1 GiB guest that has touched 16 or 512 MiB, with a qcow2 image
//! on a virtio-blk device: `savevm` time (command → answer) and how much the image grew; HMP
//! `loadvm` time (command → the guest's first heartbeat from the snapshot, recognised by its
//! sequence number going back); and a cold start with `-loadvm TAG` (process start → first
//! heartbeat). The guest's ledger is verified after each load. A VMM that answers "not
//! supported" gives n/a, not a failure.

use crate::vm::{hb_seq, unsupported, BenchError, Bins, Hmp, Proc, Res, Spec, Vmm};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);
const TAG: &str = "bench";

#[derive(Debug, Clone, Default)]
pub struct Run {
    pub savevm_ms: f64,
    pub growth_mib: f64,
    pub loadvm_ms: f64,
    pub cold_loadvm_ms: f64,
    pub ledger_ok: bool,
}

fn create_image(bins: &Bins, path: &Path) -> Res<()> {
    let _ = std::fs::remove_file(path);
    let prog = bins
        .qemu_img
        .clone()
        .unwrap_or_else(|| bins.godwit_img.clone());
    let out = Command::new(&prog)
        .args(["create", "-f", "qcow2"])
        .arg(path)
        .arg("64M")
        .output()
        .map_err(|e| BenchError::Io(format!("{} create", prog.display()), e))?;
    if !out.status.success() {
        return Err(BenchError::Failed(format!(
            "{} create: {}",
            prog.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn size(path: &Path) -> Res<f64> {
    let m = std::fs::metadata(path).map_err(|e| BenchError::Io(path.display().to_string(), e))?;
    Ok(m.len() as f64 / (1024.0 * 1024.0))
}

/// Checks a monitor answer: unsupported → `Unsupported`, an error → `Failed`.
fn check(vmm: Vmm, cmd: &str, answer: &str) -> Res<()> {
    if unsupported(answer) {
        return Err(BenchError::Unsupported(format!(
            "{}: {cmd}: {}",
            vmm.name(),
            answer.trim()
        )));
    }
    if answer.to_ascii_lowercase().contains("error") {
        return Err(BenchError::Failed(format!(
            "{}: {cmd}: {}",
            vmm.name(),
            answer.trim()
        )));
    }
    Ok(())
}

/// Turns a VMM that would not even start with a disk/`-loadvm` into n/a when it says why.
fn spawn_checked(bins: &Bins, vmm: Vmm, spec: &Spec, name: &str) -> Res<Proc> {
    let mut p = Proc::spawn(bins, vmm, spec, name)?;
    std::thread::sleep(Duration::from_millis(50));
    if p.exited() {
        std::thread::sleep(Duration::from_millis(50));
        let err = p.stderr();
        if unsupported(&err) {
            return Err(BenchError::Unsupported(format!(
                "{}: {}",
                vmm.name(),
                err.trim()
            )));
        }
        return Err(BenchError::Failed(format!(
            "{name} exited at once: {}",
            err.trim()
        )));
    }
    Ok(p)
}

pub fn run(bins: &Bins, vmm: Vmm, touch_mib: u64, dir: &Path) -> Res<Run> {
    let img = dir.join(format!("{}-{touch_mib}.qcow2", vmm.name()));
    create_image(bins, &img)?;
    let mon = dir.join(format!("{}-snap.sock", vmm.name()));
    let _ = std::fs::remove_file(&mon);
    let smp = 2;
    let spec = Spec {
        mem_mib: 1024,
        smp,
        append: format!(
            "mode=dirty mib={touch_mib} rate={} hb=compact hb_ms=2 cpus={smp}",
            touch_mib.max(64)
        ),
        monitor: Some(mon.clone()),
        disk: Some(img.clone()),
        ..Default::default()
    };
    let mut p = spawn_checked(bins, vmm, &spec, &format!("{}-snap", vmm.name()))?;
    p.wait_for("GUEST READY", Duration::from_secs(60))?;
    let mut hmp = Hmp::connect(
        &mon,
        vmm,
        &format!("{}-snap monitor", vmm.name()),
        Duration::from_secs(30),
    )?;
    p.wait_dirtied(touch_mib * 256, Duration::from_secs(60))?;
    let mut out = Run::default();

    let before = size(&img)?;
    let cmd = format!("savevm {TAG}");
    let t = Instant::now();
    let a = hmp.cmd(&cmd)?;
    out.savevm_ms = t.elapsed().as_secs_f64() * 1000.0;
    check(vmm, &cmd, &a)?;
    out.growth_mib = size(&img)? - before;

    // Let the guest run on past the snapshot, so a heartbeat from the snapshot is recognisable.
    std::thread::sleep(Duration::from_millis(300));
    let newest = p
        .heartbeats()
        .into_iter()
        .map(|(_, s)| s)
        .max()
        .unwrap_or(0);
    p.skip_seen();
    let cmd = format!("loadvm {TAG}");
    let t = Instant::now();
    let a = hmp.cmd(&cmd)?;
    check(vmm, &cmd, &a)?;
    let (t_hb, _) = p.wait_line("first heartbeat after loadvm", T, |l| {
        hb_seq(l).is_some_and(|s| s < newest)
    })?;
    out.loadvm_ms = t_hb.duration_since(t).as_secs_f64() * 1000.0;
    let ledger_hot = p.ledger_ok()?;
    hmp.quit();
    let end = Instant::now() + Duration::from_secs(10);
    while !p.exited() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(p);

    // Cold: a new process straight from the snapshot.
    let spec = Spec {
        monitor: None,
        loadvm: Some(TAG.into()),
        ..spec
    };
    let mut p = spawn_checked(bins, vmm, &spec, &format!("{}-loadvm", vmm.name()))?;
    let (t_hb, _) = p.wait_line("first heartbeat with -loadvm", T, |l| hb_seq(l).is_some())?;
    out.cold_loadvm_ms = t_hb.duration_since(p.started).as_secs_f64() * 1000.0;
    out.ledger_ok = ledger_hot && p.ledger_ok()?;
    p.quit();
    let _ = std::fs::remove_file(&img);
    Ok(out)
}
