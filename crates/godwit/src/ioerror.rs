//! The VMM's side of the drives' storage error policy (`-drive werror=`/`rerror=`, see
//! `virtio::block::policy`): every failed guest request a disk reports becomes QMP's
//! `BLOCK_IO_ERROR`; with the action `stop` the VM stops in the `io-error` run state
//! (`info status` → `paused (io-error)`, a `STOP` event) and the drive's I/O status (`query-block`
//! `io-status`) becomes `failed` or `nospace`; `cont` resumes, clears the statuses, and the
//! disks retry the requests they kept.
//!
//! One VM per process: the state is process-wide. The disks' hooks only queue the report
//! (they run on the disk's worker thread, which stopping the VM would wait for); a thread of
//! its own acts on it.

use crate::machine::Machine;
use monitor::events::Event;
use monitor::runstate::RunState;
use serde_json::json;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use virtio::{ErrorAction, ErrorHook, IoErrorReport};

/// A drive's I/O status, as QEMU's `query-block` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    Failed,
    Nospace,
}

impl IoStatus {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

struct State {
    status: Mutex<Vec<IoStatus>>,
    tx: Mutex<Sender<(usize, IoErrorReport)>>,
    rx: Mutex<Option<Receiver<(usize, IoErrorReport)>>>,
}

static STATE: OnceLock<State> = OnceLock::new();

fn state() -> &'static State {
    STATE.get_or_init(|| {
        let (tx, rx) = channel();
        State { status: Mutex::new(Vec::new()), tx: Mutex::new(tx), rx: Mutex::new(Some(rx)) }
    })
}

/// The hook to install in disk `index`'s policy.
pub fn hook(index: usize) -> ErrorHook {
    let tx = state().tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let tx = Mutex::new(tx);
    ErrorHook(Arc::new(move |r: &IoErrorReport| {
        let _ = tx.lock().unwrap_or_else(|p| p.into_inner()).send((index, r.clone()));
    }))
}

/// Disk `index`'s I/O status (for `query-block`).
pub fn status(index: usize) -> IoStatus {
    state().status.lock().unwrap_or_else(|p| p.into_inner()).get(index).copied().unwrap_or(IoStatus::Ok)
}

/// `cont`: every drive's I/O status back to `ok`.
pub fn clear() {
    state().status.lock().unwrap_or_else(|p| p.into_inner()).iter_mut().for_each(|s| *s = IoStatus::Ok);
}

/// The drive's name in events: its `id`, else QEMU's automatic `virtioN`.
fn device_name(m: &Machine, index: usize) -> String {
    m.disks.get(index).and_then(|d| d.spec.id.clone()).unwrap_or_else(|| format!("virtio{index}"))
}

fn act(m: &Machine, index: usize, r: &IoErrorReport) {
    let stop = r.action == ErrorAction::Stop;
    if stop {
        let mut st = state().status.lock().unwrap_or_else(|p| p.into_inner());
        if st.len() <= index {
            st.resize(index + 1, IoStatus::Ok);
        }
        st[index] = if r.nospace { IoStatus::Nospace } else { IoStatus::Failed };
    }
    // virtio-blk always keeps an I/O status in QEMU, so `nospace` is always there.
    let data = json!({
        "device": device_name(m, index),
        "node-name": m.disks.get(index).and_then(|d| d.spec.node_name.clone()).unwrap_or_else(|| format!("#block{index}")),
        "operation": if r.write { "write" } else { "read" },
        "action": r.action.name(),
        "nospace": r.nospace,
        "reason": r.reason,
    });
    m.events.emit(Event::Other { name: "BLOCK_IO_ERROR".into(), data: Some(data) });
    if stop {
        let _ = m.state.update(|s| match s {
            RunState::Running => {
                m.vm.pause();
                eprintln!("godwit: disk {} I/O error ({}): VM stopped (io-error); 'cont' retries", device_name(m, index), r.reason);
                Ok::<_, ()>(RunState::IoError)
            }
            other => Ok(other),
        });
    }
}

/// Starts the thread that acts on the disks' reports.
pub fn serve(m: Arc<Machine>) {
    let Some(rx) = state().rx.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
    let _ = std::thread::Builder::new().name("io-errors".into()).spawn(move || {
        while let Ok((i, r)) = rx.recv() {
            act(&m, i, &r);
        }
    });
}
