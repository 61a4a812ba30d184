//! Quiesce and save/restore: pause drains and flushes, state moves to a fresh device (as on a
//! migration destination) and the guest carries on where it was, requests queued while paused
//! are served exactly once, mismatched state is refused without changing the device, and the
//! backend can be swapped while paused.

mod common;

use common::*;
use virtio::block::{Block, BlockConfig};
use virtio::device::status;
use virtio::mmio::reg;
use virtio::{Error, MemDisk, MmioTransport, VirtioDevice};
use vm_memory::{Bytes, GuestAddress};
use vmstate::{Section, StateError, Stateful};

const MIB: usize = 1 << 20;

fn cfg() -> BlockConfig {
    BlockConfig { serial: "s0".into(), ..Default::default() }
}

/// A fresh device in the same slot over `disk`, sharing the driver's guest memory.
fn fresh(d: &Driver, disk: &MemDisk) -> MmioTransport<Block> {
    let blk = Block::new(Box::new(disk.clone()), cfg()).unwrap();
    MmioTransport::new(0, blk, d.mem.clone()).unwrap()
}

#[test]
fn save_restore_mid_run_then_carry_on() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), u64::MAX);
    for s in 0..5u64 {
        assert_eq!(d.write(s, pattern(s, 512, 1)), S_OK);
    }
    d.dev.pause().unwrap();
    let saved = d.dev.save_state().unwrap();
    assert_eq!(saved.id, "dev.virtio-blk0");
    assert_eq!(saved.version, 1);

    let mut new = fresh(&d, &disk);
    new.restore_state(&saved).unwrap();
    assert!(new.is_activated());
    assert_eq!(new.save_state().unwrap(), saved, "restored state saves identically");
    drop(std::mem::replace(&mut d.dev, new));

    // The guest goes on with the same rings: indices continue past the wrap of the ring.
    for s in 5..40u64 {
        assert_eq!(d.write(s, pattern(s, 512, 2)), S_OK);
    }
    for s in 0..40u64 {
        let gen = if s < 5 { 1 } else { 2 };
        assert_eq!(d.read(s, 512), (S_OK, pattern(s, 512, gen)));
    }
    assert_eq!(d.r32(reg::STATUS) & status::DRIVER_OK, status::DRIVER_OK);
}

#[test]
fn request_queued_while_paused_is_served_once_after_restore() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    assert_eq!(d.write(0, vec![1; 512]), S_OK);
    d.dev.pause().unwrap();
    let (st, _) = d.queue_request(T_OUT, 9, &Data::Out(vec![9; 512], 1));
    d.notify();
    let saved = d.dev.save_state().unwrap();
    assert_eq!(d.dev.queue_indices(0), Some((1, 1)), "paused device did not take the request");
    let writes = disk.stats().writes;

    let mut new = fresh(&d, &disk);
    new.restore_state(&saved).unwrap();
    drop(std::mem::replace(&mut d.dev, new)); // the source never resumes
    d.wait_used(1);
    d.settle();
    assert_eq!(d.used_idx(), d.used_seen, "served exactly once");
    assert_eq!(d.status_byte(st), S_OK);
    assert_eq!(disk.stats().writes, writes + 1);
    assert_eq!(&disk.contents()[9 * 512..10 * 512], &[9; 512][..]);
}

#[test]
fn pause_waits_flushes_and_resume_serves_the_backlog() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    let flushes = disk.stats().flushes;
    d.dev.pause().unwrap();
    d.dev.pause().unwrap(); // idempotent
    assert!(d.dev.is_paused());
    assert_eq!(disk.stats().flushes, flushes + 2);
    for s in 0..3 {
        d.queue_request(T_OUT, s, &Data::Out(vec![s as u8 + 1; 512], 1));
        d.notify();
    }
    assert_eq!(d.dev.queue_indices(0), Some((0, 0)));
    d.dev.resume();
    assert_eq!(d.wait_used(3).len(), 3);
    assert_eq!(disk.contents()[2 * 512], 3);
    // A paused device stays paused across a restore; resume then serves.
    d.dev.pause().unwrap();
    let saved = d.dev.save_state().unwrap();
    d.queue_request(T_OUT, 5, &Data::Out(vec![5; 512], 1));
    d.notify();
    d.dev.restore_state(&saved).unwrap();
    assert!(d.dev.is_paused());
    assert_eq!(d.dev.queue_indices(0), Some((3, 3)));
    d.dev.resume();
    d.wait_used(1);
    assert_eq!(disk.contents()[5 * 512], 5);
}

#[test]
fn mismatched_state_is_refused_and_changes_nothing() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    d.dev.pause().unwrap();
    let saved = d.dev.save_state().unwrap();
    d.dev.resume();

    // A different disk size.
    let other = MemDisk::new(2 * MIB);
    let mut t = fresh(&d, &other);
    assert!(matches!(t.restore_state(&saved), Err(StateError::Mismatch(_))));
    assert!(!t.is_activated());
    assert_eq!(t.status(), 0);
    // Features the guest negotiated that this device does not offer (read-only disk).
    let mut ro = MmioTransport::new(0, Block::new(Box::new(disk.read_only()), cfg()).unwrap(), d.mem.clone()).unwrap();
    assert!(matches!(ro.restore_state(&saved), Err(StateError::Mismatch(_))));
    // Wrong id, newer version, garbage.
    let mut t = fresh(&d, &disk);
    let wrong = Section { id: "dev.virtio-blk1".into(), ..saved.clone() };
    assert!(matches!(t.restore_state(&wrong), Err(StateError::WrongSection { .. })));
    let newer = Section { version: 2, ..saved.clone() };
    assert!(matches!(t.restore_state(&newer), Err(StateError::NewerVersion { .. })));
    let garbage = Section { data: vec![0xff; 7], ..saved.clone() };
    assert!(matches!(t.restore_state(&garbage), Err(StateError::Malformed { .. })));
    assert!(!t.is_activated());
    // The running device was not disturbed by any of this.
    assert_eq!(d.write(1, vec![4; 512]), S_OK);
}

#[test]
fn restoring_a_fresh_state_resets_a_running_device() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    let boot = fresh(&d, &disk).save_state().unwrap();
    assert_eq!(d.write(0, vec![1; 512]), S_OK);
    d.dev.restore_state(&boot).unwrap();
    assert!(!d.dev.is_activated());
    assert_eq!(d.r32(reg::STATUS), 0);
    d.w32(reg::QUEUE_SEL, 0);
    assert_eq!(d.r32(reg::QUEUE_READY), 0);
}

#[test]
fn interrupt_status_survives_and_is_reasserted() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    assert_eq!(d.write(0, vec![1; 512]), S_OK);
    d.dev.pause().unwrap();
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), 1);
    let saved = d.dev.save_state().unwrap();
    let mut new = fresh(&d, &disk);
    new.restore_state(&saved).unwrap();
    drop(std::mem::replace(&mut d.dev, new));
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), 1);
    assert_eq!(d.dev.irq_evt().read().unwrap(), 1, "line pulsed again after restore");
}

#[test]
fn swap_backend_while_paused() {
    let a = MemDisk::new(MIB);
    let b = MemDisk::new(MIB);
    let mut d = Driver::start(a.clone(), cfg(), !F_EVENT_IDX);
    assert_eq!(d.write(0, vec![1; 512]), S_OK);
    assert!(matches!(d.dev.device_mut().swap_backend(Box::new(b.clone())), Err(Error::NotPaused(_))));
    d.dev.pause().unwrap();
    let small = MemDisk::new(MIB / 2);
    assert!(matches!(d.dev.device_mut().swap_backend(Box::new(small)), Err(Error::BackendMismatch(_))));
    assert!(matches!(d.dev.device_mut().swap_backend(Box::new(b.read_only())), Err(Error::BackendMismatch(_))));
    let flushes = a.stats().flushes;
    let old = d.dev.device_mut().swap_backend(Box::new(b.clone())).unwrap();
    assert_eq!(old.size(), MIB as u64);
    assert_eq!(a.stats().flushes, flushes + 1, "old disk flushed on handover");
    d.dev.resume();
    assert_eq!(d.write(1, vec![2; 512]), S_OK);
    assert_eq!(b.contents()[512], 2);
    assert_eq!(a.contents()[512], 0, "the old disk is no longer written");
    assert_eq!(d.dev.device().with_backend(|bk| bk.size()), MIB as u64);
}

#[test]
fn pause_and_state_before_the_driver_starts() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::raw(disk.clone(), cfg());
    d.dev.pause().unwrap();
    let saved = d.dev.save_state().unwrap();
    d.dev.resume();
    // Activation while paused: nothing is served until resume.
    let f = d.device_features();
    assert!(d.negotiate(f & !F_EVENT_IDX));
    d.setup_queue(Q);
    d.dev.pause().unwrap();
    d.driver_ok();
    assert!(d.dev.is_activated());
    d.queue_request(T_OUT, 0, &Data::Out(vec![8; 512], 1));
    d.notify();
    assert_eq!(d.dev.queue_indices(0), Some((0, 0)));
    d.dev.resume();
    d.wait_used(1);
    assert_eq!(disk.contents()[0], 8);
    let mut t = fresh(&d, &disk);
    t.restore_state(&saved).unwrap();
    assert_eq!(t.status(), 0);
    assert!(!t.device().is_paused());
}

/// A disk whose first write blocks until the test lets it go.
struct Gate {
    disk: MemDisk,
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
    armed: bool,
}

impl virtio::BlockBackend for Gate {
    fn format(&self) -> virtio::backend::ImageFormat {
        virtio::backend::ImageFormat::Raw
    }
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> qcow2::Result<()> {
        self.disk.read_at(off, buf)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> qcow2::Result<()> {
        if std::mem::take(&mut self.armed) {
            self.entered.send(()).unwrap();
            self.release.recv().unwrap();
        }
        self.disk.write_at(off, buf)
    }
    fn flush(&mut self) -> qcow2::Result<()> {
        self.disk.flush()
    }
    fn discard(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        self.disk.discard(off, len)
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        self.disk.write_zeroes(off, len)
    }
}

#[test]
fn pause_waits_for_the_request_in_flight() {
    use virtio::BlockBackend;
    let disk = MemDisk::new(MIB);
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let gate = Gate { disk: disk.clone(), entered: entered_tx, release: release_rx, armed: true };
    let mut d = Driver::start_on(Box::new(gate), cfg(), !F_EVENT_IDX);
    let (st, _) = d.queue_request(T_OUT, 4, &Data::Out(vec![4; 512], 1));
    d.notify();
    entered.recv().unwrap(); // the worker is inside the backend now
    let flushes = disk.stats().flushes;
    let mem = d.mem.clone();
    let dev = &mut d.dev;
    let seen_at_return = std::thread::scope(|s| {
        let pauser = s.spawn(move || {
            dev.pause().unwrap();
            // What the guest would see the moment pause returns.
            (mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), mem.read_obj::<u8>(GuestAddress(st)).unwrap())
        });
        // Give a wrong pause every chance to return early, then let the write finish.
        std::thread::sleep(std::time::Duration::from_millis(50));
        release.send(()).unwrap();
        pauser.join().unwrap()
    });
    assert_eq!(seen_at_return, (1, S_OK), "pause returned before the request completed");
    assert_eq!(disk.stats().flushes, flushes + 1, "flushed after the request");
    assert_eq!(disk.contents()[4 * 512], 4);
    assert_eq!(disk.size(), MIB as u64);
}
