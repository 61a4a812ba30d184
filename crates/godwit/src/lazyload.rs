//! The VMM's side of lazy `loadvm` (`migration::lazy_ram`): the one load in progress (one VM
//! per process, so the state is process-wide), what must wait for it, and what a failed one
//! does to the VM.
//!
//! Everything that needs all of guest RAM as ordinary memory — `savevm`, an outgoing
//! migration (its page-map scan and dirty log), `delvm` (the clusters being read belong to
//! the snapshot) — calls [`settle`] first; a new `loadvm` or a reset calls [`cancel`].
//! A chunk that fails its checksum stops the VM in `internal-error` (a `STOP` event, `cont`
//! refused: "Resetting the Virtual Machine is required") with the reason on stderr and in
//! `settle`'s error; `loadvm` of a good snapshot or `system_reset` brings it back.

use migration::lazy_ram::{ChunkSource, LazyRam};
use monitor::runstate::{RunState, RunStateMachine};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::Vm;

static CURRENT: Mutex<Option<LazyRam>> = Mutex::new(None);

/// Serves chunks straight from the image file.
pub struct FileSource(pub qcow2::VmStateFileMap);

impl ChunkSource for FileSource {
    fn read_at(&self, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(pos, buf)
    }
}

/// Records the load in progress.
pub fn install(l: LazyRam) {
    let old = CURRENT.lock().unwrap_or_else(|p| p.into_inner()).replace(l);
    if let Some(o) = old {
        o.cancel();
    }
}

/// Waits until the load in progress (if any) has all of RAM in; its error if it failed.
pub fn settle() -> Result<(), String> {
    let g = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    let Some(l) = g.as_ref() else { return Ok(()) };
    let r = l.wait();
    if r.is_ok() {
        tracing::info!("lazy loadvm: {:?}", l.stats());
    }
    r.map_err(|e| format!("the VM's RAM was not restored by loadvm: {e}"))
}

/// Stops serving RAM (it is about to be replaced): the VM must be paused.
pub fn cancel() {
    let old = CURRENT.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(o) = old {
        o.cancel();
    }
}

/// After a failed lazy load only: stops serving before the VM is drained, so a device thread
/// waiting on the bad chunk cannot hold the drain up (the VM is already stopped).
pub fn cancel_if_failed() {
    let mut g = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    if g.as_ref().is_some_and(|l| l.is_done() && l.wait().is_err()) {
        if let Some(o) = g.take() {
            o.cancel();
        }
    }
}

/// The `on_error` of a lazy load: stops the VM in `internal-error` from a thread of its own
/// (the caller is the fault thread, which must keep serving while vCPUs are kicked out).
pub fn on_error(vm: Arc<Vm>, state: Arc<RunStateMachine>, tag: String) -> Box<dyn Fn(&str) + Send + Sync> {
    Box::new(move |msg: &str| {
        let (vm, state, msg) = (vm.clone(), state.clone(), format!("loadvm {tag}: {msg}"));
        let _ = std::thread::Builder::new().name("loadvm-error".into()).spawn(move || {
            // Let the loadvm that started this finish switching over first.
            let t0 = Instant::now();
            while matches!(state.get(), RunState::RestoreVm | RunState::Prelaunch) && t0.elapsed() < Duration::from_secs(1) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = state.update(|s| {
                if s.is_running() {
                    vm.pause();
                }
                Ok::<_, ()>(RunState::InternalError)
            });
            eprintln!("godwit: {msg}");
        });
    })
}
