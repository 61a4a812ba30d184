//! The drive's storage error policy (`werror`/`rerror`) in the virtio-blk device, driven by a
//! mock guest: `stop` keeps the failed request (not completed, back in the available ring)
//! and runs it again on resume; `report` completes it with IOERR; `ignore` with OK; `enospc`
//! stops only when the backend is out of space. Every failure reaches the VMM's hook.

mod common;

use common::*;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use virtio::block::BlockConfig;
use virtio::{ErrorAction, ErrorHook, ErrorPolicy, IoErrorReport, MemDisk};

const MIB: usize = 1 << 20;

fn policy(werror: ErrorAction, rerror: ErrorAction) -> (BlockConfig, Receiver<IoErrorReport>) {
    let (tx, rx) = channel();
    let tx = Mutex::new(tx);
    let hook = ErrorHook(Arc::new(move |r: &IoErrorReport| {
        let _ = tx.lock().unwrap().send(r.clone());
    }));
    let cfg = BlockConfig { policy: ErrorPolicy { werror, rerror, hook: Some(hook) }, ..Default::default() };
    (cfg, rx)
}

fn report(rx: &Receiver<IoErrorReport>) -> IoErrorReport {
    rx.recv_timeout(Duration::from_secs(30)).expect("the hook heard of the failure")
}

#[test]
fn stop_keeps_the_request_and_resume_runs_it_again() {
    let disk = MemDisk::new(MIB);
    let (cfg, rx) = policy(ErrorAction::Stop, ErrorAction::Stop);
    let mut d = Driver::start(disk.clone(), cfg, !F_EVENT_IDX);
    assert_eq!(d.write(0, pattern(0, 512, 1)), S_OK);
    disk.set_failing(true);
    let (st, _) = d.queue_request(T_OUT, 1, &Data::Out(pattern(1, 512, 2), 1));
    d.notify();
    let r = report(&rx);
    assert!(r.write && r.action == ErrorAction::Stop && !r.nospace, "{r:?}");
    wait_for("the device to stop on the error", || d.device().stopped_on_error());
    assert!(d.paused());
    // Not completed, and back in the ring: next_avail is where it was before the request.
    assert_eq!(d.used_idx(), d.used_seen);
    assert_eq!(d.status_byte(st), 0xff, "no status written");
    let (next_avail, _) = d.dev.queue_indices(0).unwrap();
    assert_eq!(next_avail, d.avail_idx.wrapping_sub(1));
    // A pause while stopped does not touch the failing backend (no flush).
    d.dev.pause().expect("pausing a device stopped on an error");
    disk.set_failing(false);
    d.dev.resume();
    assert!(!d.device().stopped_on_error());
    d.wait_used(1);
    assert_eq!(d.status_byte(st), S_OK);
    assert_eq!(&disk.contents()[512..1024], &pattern(1, 512, 2)[..]);
    assert!(rx.try_recv().is_err(), "one failure, one report");
    // A read fails the same way and is retried too.
    disk.set_failing(true);
    let (st, pieces) = d.queue_request(T_IN, 1, &Data::In(512, 1));
    d.notify();
    let r = report(&rx);
    assert!(!r.write && r.action == ErrorAction::Stop, "{r:?}");
    wait_for("the device to stop on the error", || d.device().stopped_on_error());
    disk.set_failing(false);
    d.dev.resume();
    d.wait_used(1);
    assert_eq!(d.status_byte(st), S_OK);
    let mut b = vec![0u8; 512];
    vm_memory::Bytes::read_slice(&d.mem, &mut b, vm_memory::GuestAddress(pieces[0].0)).unwrap();
    assert_eq!(b, pattern(1, 512, 2));
}

#[test]
fn report_and_ignore_complete_the_request() {
    let disk = MemDisk::new(MIB);
    let (cfg, rx) = policy(ErrorAction::Ignore, ErrorAction::Report);
    let mut d = Driver::start(disk.clone(), cfg, !F_EVENT_IDX);
    disk.set_failing(true);
    assert_eq!(d.write(0, pattern(0, 512, 1)), S_OK, "werror=ignore: the guest sees success");
    let r = report(&rx);
    assert!(r.write && r.action == ErrorAction::Ignore, "{r:?}");
    assert_eq!(d.read(0, 512).0, S_IOERR, "rerror=report");
    let r = report(&rx);
    assert!(!r.write && r.action == ErrorAction::Report, "{r:?}");
    assert!(!d.device().stopped_on_error() && !d.paused());
    disk.set_failing(false);
    assert_eq!(d.write(0, pattern(0, 512, 3)), S_OK);
}

#[test]
fn enospc_stops_only_when_out_of_space() {
    use qcow2::storage::MemStorage;
    // A qcow2 image in memory whose storage cannot grow: a write to a new cluster fails with
    // ENOSPC.
    let mem = MemStorage::new();
    let q = qcow2::Qcow2::create_on(Box::new(mem.clone()), &qcow2::CreateOptions { size: 8 << 20, ..Default::default() })
        .unwrap();
    mem.set_space_limit(mem.to_vec().len() as u64);
    let (cfg, rx) = policy(ErrorAction::Enospc, ErrorAction::Report);
    let mut d = Driver::start_on(Box::new(q), cfg, !F_EVENT_IDX);
    let (st, _) = d.queue_request(T_OUT, 0, &Data::Out(pattern(0, 4096, 1), 1));
    d.notify();
    let r = report(&rx);
    assert!(r.write && r.nospace && r.action == ErrorAction::Stop, "{r:?}");
    wait_for("the device to stop on the error", || d.device().stopped_on_error());
    assert_eq!(d.status_byte(st), 0xff);
    mem.set_space_limit(u64::MAX);
    d.dev.resume();
    d.wait_used(1);
    assert_eq!(d.status_byte(st), S_OK);
    assert_eq!(d.read(0, 4096), (S_OK, pattern(0, 4096, 1)));
    // Any other failure is reported (enospc = report for everything else).
    let disk = MemDisk::new(MIB);
    let (cfg, rx) = policy(ErrorAction::Enospc, ErrorAction::Report);
    let mut d = Driver::start(disk.clone(), cfg, !F_EVENT_IDX);
    disk.set_failing(true);
    assert_eq!(d.write(0, pattern(0, 512, 1)), S_IOERR);
    assert_eq!(report(&rx).action, ErrorAction::Report);
}
