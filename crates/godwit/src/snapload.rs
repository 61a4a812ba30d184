//! loadvm of a layout-v2 VM state (`vmstate::snapfile`): everything but RAM contents is read
//! and checked first — header, meta block, machine-state sections against this VM, the chunk
//! list against its RAM — so a bad snapshot leaves the VM as it was. Then the disks revert, RAM
//! is dropped and served lazily from the image file (`migration::lazy_ram`, see `lazyload`),
//! the machine state is restored and the guest resumes before RAM is read. Where the state
//! cannot be read straight from the file (compressed clusters, remote storage) or userfaultfd
//! is not available, RAM is read eagerly, chunk by chunk, each checked.

use crate::drives::SharedDisk;
use crate::machine::Machine;
use crate::snapshots::{err, revert_disks};
use migration::lazy_ram::LazyRam;
use migration::snapshot_v2;
use migration::MigratableVm;
use monitor::CommandError;

fn read_exact(q: &mut qcow2::Qcow2, tag: &str, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let n = q.load_vmstate(tag, pos, buf).map_err(std::io::Error::other)?;
    if n != buf.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "VM state truncated"));
    }
    Ok(())
}

pub fn load_v2(m: &Machine, tag: &str, state_disk: &SharedDisk, disks: &[&SharedDisk], size: u64) -> Result<(), CommandError> {
    let h = m.handle();
    let loading = |e: String| err(format!("Error while loading VM state: {e}"));
    // 1. Everything but RAM contents, checked; nothing changed yet.
    let (plan, map) = state_disk
        .with_qcow2(|q| -> Result<_, String> {
            let plan = snapshot_v2::read_plan(&h, size, &mut |pos, buf| read_exact(q, tag, pos, buf)).map_err(|e| e.to_string())?;
            let map = match q.vmstate_file_map(tag) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("loadvm {tag}: VM state not mappable ({e}); loading RAM eagerly");
                    None
                }
            };
            Ok((plan, map))
        })
        .map_err(err)?
        .map_err(loading)?;
    // 2. Switch over.
    revert_disks(disks, tag)?;
    if let Some(map) = map {
        let src = Box::new(crate::lazyload::FileSource(map));
        let on_error = crate::lazyload::on_error(m.vm.clone(), m.state.clone(), tag.to_string());
        match LazyRam::begin(&h, &plan, src, on_error) {
            Ok(mut lazy) => {
                if let Err(e) = h.restore_state(&plan.sections) {
                    lazy.cancel();
                    return Err(loading(e));
                }
                lazy.start_fill().map_err(|e| loading(e.to_string()))?;
                tracing::info!("loadvm {tag}: lazy, {} chunks ({} MiB) served from the image", plan.chunks.len(), plan.header.data_len >> 20);
                crate::lazyload::install(lazy);
                return Ok(());
            }
            Err(e) => tracing::warn!("loadvm {tag}: lazy RAM not available ({e}); loading RAM eagerly"),
        }
    }
    state_disk
        .with_qcow2(|q| snapshot_v2::load_eager(&h, &plan, &mut |pos, buf| read_exact(q, tag, pos, buf)).map(|_| ()))
        .map_err(err)?
        .map_err(|e| {
            // RAM is partly replaced: the VM must not run on it.
            m.vm.pause();
            m.state.force(monitor::RunState::InternalError);
            loading(e.to_string())
        })
}
