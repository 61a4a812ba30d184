//! savevm / loadvm / delvm / info snapshots: the whole VM as an internal snapshot of its qcow2
//! disk(s). The VM state (layout v2, `vmstate::snapfile`: a header, guest RAM as checksummed
//! page-aligned chunks, then the machine-state sections and the chunk list) goes into the first
//! qcow2 disk's VM-state area with large writes; loadvm of such a state is lazy (see
//! `snapload`); states written before v2 still load, eagerly. Every writable disk
//! gets a disk snapshot with the same tag at the same instant (vCPUs paused, disk I/O drained
//! and flushed). loadvm checks the saved state against this VM before touching anything, so a
//! mismatched or damaged snapshot leaves the VM as it was.

use crate::drives::SharedDisk;
use crate::machine::Machine;
use monitor::{CommandError, RunState, SnapshotInfo};
use qcow2::NewSnapshot;
use std::io::BufReader;
use vmstate::snapfile;
use std::time::Instant;

const IO_BUF: usize = 8 << 20;

pub(crate) fn err(e: impl std::fmt::Display) -> CommandError {
    CommandError::generic(e.to_string())
}

/// The disks that take part: every writable one must be qcow2; the first qcow2 holds the state.
fn snapshot_disks(m: &Machine) -> Result<(&SharedDisk, Vec<&SharedDisk>), CommandError> {
    let mut all = Vec::new();
    for d in &m.disks {
        if d.spec.read_only {
            continue;
        }
        d.with_qcow2(|_| ()).map_err(err)?;
        all.push(d);
    }
    let first = *all.first().ok_or_else(|| err("No block device can accept snapshots"))?;
    Ok((first, all))
}

/// Runs `f` with the VM quiesced in `during`, then puts the run state back.
fn with_quiesced<R>(m: &Machine, during: RunState, f: impl FnOnce() -> Result<R, CommandError>) -> Result<R, CommandError> {
    let before = m.state.get();
    let restoring_after_error = during == RunState::RestoreVm && before == RunState::InternalError;
    if !matches!(before, RunState::Running | RunState::Paused | RunState::Prelaunch | RunState::Postmigrate) && !restoring_after_error {
        return Err(err(format!("cannot do that while the VM is in state {}", before.as_str())));
    }
    m.state.force(during);
    if let Err(e) = m.vm.quiesce() {
        m.vm.resume();
        m.state.force(before);
        return Err(err(e));
    }
    let res = f();
    if m.state.get() == RunState::InternalError {
        // The load replaced part of RAM and then failed: the VM stays stopped.
        return res;
    }
    if before == RunState::Running {
        m.vm.resume();
    }
    let after = if matches!(before, RunState::Postmigrate | RunState::InternalError) && res.is_ok() && during == RunState::RestoreVm {
        RunState::Paused
    } else {
        before
    };
    m.state.force(after);
    res
}

pub fn save(m: &Machine, tag: &str) -> Result<(), CommandError> {
    let (state_disk, disks) = snapshot_disks(m)?;
    // A lazy loadvm still filling RAM finishes first: the page map must see every page.
    crate::lazyload::settle().map_err(err)?;
    with_quiesced(m, RunState::SaveVm, || {
        let t0 = Instant::now();
        let clock_ns = m.vm.guest_clock_ns();
        let h = m.handle();
        let size = state_disk
            .with_qcow2(|q| -> Result<u64, String> {
                if std::env::var("GODWIT_SAVEVM_LAYOUT").as_deref() == Ok("1") {
                    return save_v1(q, &h);
                }
                q.discard_vmstate().map_err(|e| e.to_string())?;
                let mut sink = crate::savevm_sink::DirectSink::new(q);
                let n = migration::snapshot_v2::save(&h, &mut sink).map(|(n, _)| n).map_err(|e| e.to_string())?;
                tracing::info!("savevm: {} MiB of RAM written directly", sink.direct_bytes >> 20);
                Ok(n)
            })
            .map_err(err)?
            .map_err(|e| err(format!("Error while writing VM state: {e}")))?;
        for d in &disks {
            let mut s = NewSnapshot::new(tag);
            s.vm_clock_ns = clock_ns;
            if std::ptr::eq(*d, state_disk) {
                s.vm_state_size = size;
            }
            d.with_qcow2(|q| q.create_snapshot(&s).map(|_| ()))
                .map_err(err)?
                .map_err(|e| err(format!("Error while creating snapshot on '{}': {e}", d.spec.file.display())))?;
        }
        tracing::info!("savevm {tag}: {} MiB of VM state in {:?}", size >> 20, t0.elapsed());
        Ok(())
    })
}

/// The layout Godwit wrote before v2 (one stream, RAM records inline), for snapshots that an
/// older Godwit must load: `GODWIT_SAVEVM_LAYOUT=1` in savevm's environment.
fn save_v1(q: &mut qcow2::Qcow2, h: &crate::vmglue::VmHandle) -> Result<u64, String> {
    use std::io::Write;
    let w = q.vmstate_writer().map_err(|e| e.to_string())?;
    let mut buf = std::io::BufWriter::with_capacity(IO_BUF, w);
    migration::snapshot::save(h, &mut buf).map_err(|e| e.to_string())?;
    buf.flush().map_err(|e| e.to_string())?;
    let w = buf.into_inner().map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())
}

pub fn load(m: &Machine, tag: &str) -> Result<(), CommandError> {
    let (state_disk, disks) = snapshot_disks(m)?;
    for d in &disks {
        let found = d.with_qcow2(|q| q.find_snapshot(tag).is_some()).map_err(err)?;
        if !found {
            return Err(err(format!(
                "Snapshot '{tag}' does not exist in one or more devices ('{}')",
                d.spec.file.display()
            )));
        }
    }
    crate::lazyload::cancel_if_failed();
    let r = with_quiesced(m, RunState::RestoreVm, || {
        // RAM is about to be replaced: a lazy load still filling it stops here.
        crate::lazyload::cancel();
        let head = state_disk
            .with_qcow2(|q| -> Result<(u64, Vec<u8>), String> {
                let size = q.find_snapshot(tag).map(|s| s.vm_state_size).unwrap_or(0);
                let mut b = vec![0u8; 12];
                let n = q.load_vmstate(tag, 0, &mut b).map_err(|e| e.to_string())?;
                b.truncate(n);
                Ok((size, b))
            })
            .map_err(err)?
            .map_err(|e| err(format!("Error while loading VM state: {e}")))?;
        if snapfile::is_v2(&head.1) {
            crate::snapload::load_v2(m, tag, state_disk, &disks, head.0)
        } else {
            load_v1(m, tag, state_disk, &disks)
        }
    });
    if r.is_ok() {
        // The guest is back as it was on another host, maybe: tell the network where it is.
        m.vm.announce(m.announce_params());
    }
    r
}

/// Reverts every disk to snapshot `tag`.
pub(crate) fn revert_disks(disks: &[&SharedDisk], tag: &str) -> Result<(), CommandError> {
    for d in disks {
        d.with_qcow2(|q| q.goto_snapshot(tag).map(|_| ()))
            .map_err(err)?
            .map_err(|e| err(format!("Error while reverting '{}': {e}", d.spec.file.display())))?;
    }
    Ok(())
}

/// A state written before layout v2 (one stream, RAM read eagerly).
fn load_v1(m: &Machine, tag: &str, state_disk: &SharedDisk, disks: &[&SharedDisk]) -> Result<(), CommandError> {
    let h = m.handle();
    // 1. Read and check the machine state before changing anything.
    let sections = state_disk
        .with_qcow2(|q| -> Result<Vec<vmstate::Section>, String> {
            let r = q.vmstate_reader(tag).map_err(|e| e.to_string())?;
            let mut sr = vmstate::stream::StreamReader::new(BufReader::with_capacity(1 << 20, r))
                .map_err(|e| e.to_string())?;
            migration::snapshot::read_sections(&mut sr).map(|(s, _)| s).map_err(|e| e.to_string())
        })
        .map_err(err)?
        .map_err(|e| err(format!("Error while loading VM state: {e}")))?;
    migration::MigratableVm::check_state(&h, &sections).map_err(|e| err(format!("Error while loading VM state: {e}")))?;
    // 2. Revert the disks, then bring RAM and the machine state back.
    revert_disks(disks, tag)?;
    state_disk
        .with_qcow2(|q| -> Result<(), String> {
            let r = q.vmstate_reader(tag).map_err(|e| e.to_string())?;
            migration::snapshot::load(&h, BufReader::with_capacity(IO_BUF, r)).map(|_| ()).map_err(|e| e.to_string())
        })
        .map_err(err)?
        .map_err(|e| err(format!("Error while loading VM state: {e}")))?;
    Ok(())
}

pub fn delete(m: &Machine, tag: &str) -> Result<(), CommandError> {
    let (_, disks) = snapshot_disks(m)?;
    // A lazy load may still be reading the snapshot's clusters (after a failed one, the
    // chunks' checksums still guard what it reads).
    let _ = crate::lazyload::settle();
    let mut found = false;
    for d in &disks {
        let r = d.with_qcow2(|q| if q.find_snapshot(tag).is_some() { Some(q.delete_snapshot(tag)) } else { None }).map_err(err)?;
        if let Some(r) = r {
            r.map_err(|e| err(format!("Error while deleting snapshot on '{}': {e}", d.spec.file.display())))?;
            found = true;
        }
    }
    if !found {
        return Err(err(format!("Snapshot '{tag}' not found")));
    }
    Ok(())
}

pub fn list(m: &Machine) -> Result<Vec<SnapshotInfo>, CommandError> {
    let (state_disk, _) = snapshot_disks(m)?;
    let snaps = state_disk.with_qcow2(|q| q.snapshots()).map_err(err)?;
    Ok(snaps
        .into_iter()
        .filter(|s| s.vm_state_size > 0)
        .map(|s| SnapshotInfo {
            id: s.id,
            name: s.name,
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec as i64,
            date_nsec: s.date_nsec,
            vm_clock_sec: (s.vm_clock_ns / 1_000_000_000) as i64,
            vm_clock_nsec: (s.vm_clock_ns % 1_000_000_000) as u32,
            icount: s.icount,
        })
        .collect())
}
