//! virtio-blk over virtio-mmio, driven by a mock guest: registers and feature negotiation,
//! I/O roundtrips against an in-memory disk, error statuses, interrupts and notification paths.

mod common;

use common::*;
use devices::bus::BusDevice;
use virtio::block::BlockConfig;
use virtio::device::status;
use virtio::mmio::{reg, MAGIC};
use virtio::{MemDisk, MMIO_BASE};
use vm_memory::{Bytes, GuestAddress};

const MIB: usize = 1 << 20;

fn cfg() -> BlockConfig {
    BlockConfig { serial: "godwit-disk-0".into(), ..Default::default() }
}

#[test]
fn identity_registers_and_config_space() {
    let mut d = Driver::raw(MemDisk::new(MIB), cfg());
    assert_eq!(d.r32(reg::MAGIC_VALUE), MAGIC);
    assert_eq!(d.r32(reg::VERSION), 2);
    assert_eq!(d.r32(reg::DEVICE_ID), 2);
    assert_eq!(d.dev.mmio_base(), MMIO_BASE);
    assert_eq!(d.dev.gsi(), 16);
    assert_eq!(d.dev.ioevents()[0].addr, MMIO_BASE + 0x50);
    assert_eq!(d.dev.cmdline_arg(), "virtio_mmio.device=0x200@0xfeb00000:16");
    // capacity, as two 32-bit reads and as one 64-bit read
    assert_eq!(d.r32(reg::CONFIG) as u64 | (d.r32(reg::CONFIG + 4) as u64) << 32, (MIB / 512) as u64);
    let mut b = [0u8; 8];
    d.dev.read(reg::CONFIG, &mut b);
    assert_eq!(u64::from_le_bytes(b), (MIB / 512) as u64);
    assert_eq!(d.r32(reg::CONFIG + 0x14), 512, "blk_size");
    assert_eq!(d.r32(reg::CONFIG + 0x0c), 256 - 2, "seg_max");
    // Past the config space: zeros; SHM regions: none
    assert_eq!(d.r32(reg::CONFIG + 0x80), 0);
    assert_eq!(d.r32(reg::SHM_LEN_LOW), u32::MAX);
    // Narrow accesses to 32-bit registers read zero and write nothing.
    let mut one = [0u8; 1];
    d.dev.read(reg::MAGIC_VALUE, &mut one);
    assert_eq!(one[0], 0);
    d.w32(reg::QUEUE_SEL, 0);
    assert_eq!(d.r32(reg::QUEUE_NUM_MAX), 256);
    d.w32(reg::QUEUE_SEL, 1);
    assert_eq!(d.r32(reg::QUEUE_NUM_MAX), 0, "no second queue");
}

#[test]
fn feature_negotiation_requires_version_1() {
    let mut d = Driver::raw(MemDisk::new(MIB), cfg());
    let f = d.device_features();
    for bit in [VERSION_1, F_FLUSH, 1 << 2, 1 << 6, F_DISCARD, F_WRITE_ZEROES, F_EVENT_IDX] {
        assert_ne!(f & bit, 0, "feature {bit:#x} offered");
    }
    assert_eq!(f & F_RO, 0);
    assert!(!d.negotiate(F_FLUSH), "legacy driver (no VERSION_1) refused");
    assert!(!d.negotiate(VERSION_1 | 1 << 40), "feature not offered refused");
    assert!(d.negotiate(VERSION_1 | F_FLUSH));
    // Once FEATURES_OK is set, DriverFeatures writes are ignored.
    d.w32(reg::DRIVER_FEATURES_SEL, 1);
    d.w32(reg::DRIVER_FEATURES, 0);
    d.setup_queue(Q);
    d.driver_ok();
    assert!(d.dev.is_activated());
    assert_eq!(d.r32(reg::STATUS) & status::DRIVER_OK, status::DRIVER_OK);
    assert_eq!(d.dev.acked_features(), VERSION_1 | F_FLUSH);
    // DRIVER_OK without FEATURES_OK does not activate.
    let mut e = Driver::raw(MemDisk::new(MIB), cfg());
    e.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    e.setup_queue(Q);
    e.w32(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert!(!e.dev.is_activated());
    assert_eq!(e.r32(reg::STATUS) & status::DRIVER_OK, 0);
}

#[test]
fn reset_returns_to_initial_state() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), u64::MAX);
    assert_eq!(d.write(0, vec![1; 512]), S_OK);
    d.w32(reg::STATUS, 0);
    assert_eq!(d.r32(reg::STATUS), 0);
    assert!(!d.dev.is_activated());
    d.w32(reg::QUEUE_SEL, 0);
    assert_eq!(d.r32(reg::QUEUE_READY), 0);
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), 0);
    // And it comes up again from scratch (rings restart at index 0).
    d.mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
    d.avail_idx = 0;
    d.used_seen = 0;
    let f = d.device_features();
    assert!(d.negotiate(f & !F_EVENT_IDX));
    d.setup_queue(Q);
    d.driver_ok();
    assert_eq!(d.write(1, vec![2; 512]), S_OK);
    assert_eq!(&disk.contents()[512..1024], &[2; 512][..]);
}

#[test]
fn read_write_flush_get_id_roundtrip() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    let a = pattern(7, 4096, 1);
    let r = d.request(T_OUT, 7, Data::Out(a.clone(), 1));
    assert_eq!((r.status, r.used_len), (S_OK, 1));
    assert_eq!(&disk.contents()[7 * 512..7 * 512 + 4096], &a[..]);
    let r = d.request(T_IN, 7, Data::In(4096, 1));
    assert_eq!((r.status, r.used_len), (S_OK, 4097));
    assert_eq!(r.data, a);
    // Scatter-gather with uneven pieces, both directions.
    let b = pattern(100, 3 * 512, 2);
    assert_eq!(d.request(T_OUT, 100, Data::Out(b.clone(), 5)).status, S_OK);
    let r = d.request(T_IN, 99, Data::In(5 * 512, 7));
    assert_eq!(r.status, S_OK);
    assert_eq!(&r.data[512..512 * 4], &b[..]);
    assert_eq!(&r.data[..512], &disk.contents()[99 * 512..100 * 512]);
    // Flush reaches the backend.
    let before = disk.stats().flushes;
    assert_eq!(d.request(T_FLUSH, 0, Data::None).status, S_OK);
    assert_eq!(disk.stats().flushes, before + 1);
    // GET_ID: the serial, NUL-padded to 20 bytes.
    let r = d.request(T_GET_ID, 0, Data::In(20, 1));
    assert_eq!(r.status, S_OK);
    assert_eq!(r.used_len, 21);
    assert_eq!(&r.data[..13], b"godwit-disk-0");
    assert_eq!(&r.data[13..], &[0; 7]);
    // Last sector of the disk is reachable.
    let last = (MIB / 512 - 1) as u64;
    assert_eq!(d.write(last, vec![9; 512]), S_OK);
    assert_eq!(d.read(last, 512), (S_OK, vec![9; 512]));
}

#[test]
fn large_requests_are_chunked() {
    let disk = MemDisk::new(4 * MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    let big = pattern(3, 2 * MIB + 1024, 3);
    assert_eq!(d.request(T_OUT, 3, Data::Out(big.clone(), 3)).status, S_OK);
    assert_eq!(&disk.contents()[3 * 512..3 * 512 + big.len()], &big[..]);
    let r = d.request(T_IN, 3, Data::In(big.len(), 2));
    assert_eq!(r.status, S_OK);
    assert_eq!(r.data, big);
}

#[test]
fn out_of_range_and_malformed_sizes_are_ioerr() {
    // The disk is one sector and a bit larger than its capacity; the device alone must stop
    // requests past the capacity, before the backend sees them.
    let disk = MemDisk::new(MIB + 1023);
    let (spy, calls) = Spy::new(disk.clone());
    let mut d = Driver::start_on(Box::new(spy), cfg(), !F_EVENT_IDX);
    let sectors = (MIB / 512) as u64 + 1;
    assert_eq!(d.r32(reg::CONFIG), sectors as u32, "capacity rounds down to whole sectors");
    assert_eq!(d.write(sectors, vec![1; 512]), S_IOERR, "first sector past the end");
    assert_eq!(d.write(sectors - 1, vec![1; 1024]), S_IOERR, "straddles the end");
    assert_eq!(d.read(u64::MAX, 512).0, S_IOERR, "sector * 512 overflows");
    assert_eq!(d.read(u64::MAX / 512, 1024).0, S_IOERR, "offset + length overflows");
    assert_eq!(d.request(T_OUT, 0, Data::Out(vec![1; 100], 1)).status, S_IOERR, "not whole sectors");
    assert_eq!(d.request(T_IN, 0, Data::In(513, 1)).status, S_IOERR);
    assert_eq!(d.request(99, 0, Data::None).status, S_UNSUPP, "unknown request type");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0, "the backend saw none of them");
    assert!(disk.contents().iter().all(|&b| b == 0), "nothing was written");
    assert_eq!(d.write(sectors - 1, vec![1; 512]), S_OK, "the last whole sector is fine");
    // A backend failure is an I/O error too, and the device carries on afterwards.
    disk.set_failing(true);
    assert_eq!(d.write(0, vec![1; 512]), S_IOERR);
    assert_eq!(d.request(T_FLUSH, 0, Data::None).status, S_IOERR);
    disk.set_failing(false);
    assert_eq!(d.write(0, vec![1; 512]), S_OK);
}

#[test]
fn read_only_disk_refuses_writes() {
    let disk = MemDisk::from_bytes(pattern(0, MIB, 5));
    let mut d = Driver::start(disk.read_only(), cfg(), !F_EVENT_IDX);
    let f = d.device_features();
    assert_ne!(f & F_RO, 0);
    assert_eq!(f & (F_DISCARD | F_WRITE_ZEROES), 0, "no discard on a read-only disk");
    assert_eq!(d.write(0, vec![1; 512]), S_IOERR);
    assert_eq!(d.read(0, 512), (S_OK, pattern(0, 512, 5)));
    assert_eq!(d.request(T_FLUSH, 0, Data::None).status, S_OK);
    assert_eq!(d.request(T_DISCARD, 0, Data::Out(range(0, 8, 0), 1)).status, S_UNSUPP);
    assert_eq!(disk.contents(), pattern(0, MIB, 5));
    // readonly=on over a writable backend behaves the same.
    let w = MemDisk::new(MIB);
    let mut e = Driver::start(w.clone(), BlockConfig { read_only: true, ..cfg() }, !F_EVENT_IDX);
    assert_ne!(e.device_features() & F_RO, 0);
    assert_eq!(e.write(0, vec![1; 512]), S_IOERR);
    assert!(w.contents().iter().all(|&b| b == 0));
}

fn range(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    let mut v = sector.to_le_bytes().to_vec();
    v.extend_from_slice(&num.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

#[test]
fn discard_and_write_zeroes() {
    let disk = MemDisk::from_bytes(vec![0xaa; MIB]);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    let mut two = range(8, 8, 1);
    two.extend(range(100, 1, 0));
    assert_eq!(d.request(T_WRITE_ZEROES, 0, Data::Out(two, 1)).status, S_OK);
    let c = disk.contents();
    assert!(c[8 * 512..16 * 512].iter().all(|&b| b == 0));
    assert!(c[100 * 512..101 * 512].iter().all(|&b| b == 0));
    assert_eq!(c[16 * 512], 0xaa);
    assert_eq!(c[7 * 512 + 511], 0xaa);
    assert_eq!(disk.stats().write_zeroes, 2);
    assert_eq!(d.request(T_DISCARD, 0, Data::Out(range(200, 16, 0), 1)).status, S_OK);
    assert_eq!(disk.stats().discards, 1);
    // Bad ranges and flags.
    let sectors = (MIB / 512) as u32;
    assert_eq!(d.request(T_DISCARD, 0, Data::Out(range(0, sectors + 1, 0), 1)).status, S_IOERR);
    assert_eq!(d.request(T_DISCARD, 0, Data::Out(range(u64::MAX - 1, 8, 0), 1)).status, S_IOERR);
    assert_eq!(d.request(T_DISCARD, 0, Data::Out(range(0, 8, 1), 1)).status, S_UNSUPP, "unmap flag on discard");
    assert_eq!(d.request(T_WRITE_ZEROES, 0, Data::Out(range(0, 8, 4), 1)).status, S_UNSUPP);
    assert_eq!(d.request(T_DISCARD, 0, Data::Out(vec![0; 15], 1)).status, S_IOERR, "partial range");
    assert_eq!(d.request(T_DISCARD, 0, Data::Out(range(0, 1, 0).repeat(17), 1)).status, S_IOERR, "too many");
    assert_eq!(disk.stats().discards, 1);
    // Not negotiated: unsupported.
    let mut e = Driver::start(disk.clone(), cfg(), !(F_DISCARD | F_WRITE_ZEROES | F_EVENT_IDX));
    assert_eq!(e.request(T_WRITE_ZEROES, 0, Data::Out(range(0, 8, 0), 1)).status, S_UNSUPP);
    assert_eq!(disk.contents()[0], 0xaa);
}

#[test]
fn interrupts_raised_acknowledged_and_suppressed() {
    let mut d = Driver::start(MemDisk::new(MIB), cfg(), !F_EVENT_IDX);
    assert_eq!(d.write(0, vec![1; 512]), S_OK);
    d.settle(); // the worker raises the interrupt after publishing; pause waits for it
    assert_eq!(d.dev.irq_evt().read().unwrap(), 1);
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), 1);
    d.w32(reg::INTERRUPT_ACK, 1);
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), 0);
    // VIRTQ_AVAIL_F_NO_INTERRUPT: the driver polls, the device stays quiet.
    d.mem.write_obj(1u16, GuestAddress(AVAIL)).unwrap();
    assert_eq!(d.write(1, vec![1; 512]), S_OK);
    d.settle();
    assert!(d.dev.irq_evt().read().is_err(), "no interrupt while the driver asked for none");
    assert_eq!(d.r32(reg::INTERRUPT_STATUS), 0);
}

#[test]
fn event_idx_negotiated_and_honoured() {
    let mut d = Driver::start(MemDisk::new(MIB), cfg(), u64::MAX);
    // used_event (after the avail ring) = 0: interrupt after the first completion only.
    d.mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * Q as u64)).unwrap();
    assert_eq!(d.write(0, vec![1; 512]), S_OK);
    d.settle();
    assert_eq!(d.dev.irq_evt().read().unwrap(), 1);
    assert_eq!(d.write(1, vec![1; 512]), S_OK);
    d.settle();
    assert!(d.dev.irq_evt().read().is_err(), "used_event already passed");
    // Device writes avail_event (after the used ring) so the driver knows when to kick.
    let avail_event: u16 = d.mem.read_obj(GuestAddress(USED + 4 + 8 * Q as u64)).unwrap();
    assert_eq!(avail_event, d.avail_idx);
}

#[test]
fn ioeventfd_notification_path() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    let (st, _) = d.queue_request(T_OUT, 2, &Data::Out(vec![7; 512], 1));
    // What KVM does when the guest writes QueueNotify with an ioeventfd registered.
    d.dev.ioevents()[0].fd.write(1).unwrap();
    d.wait_used(1);
    assert_eq!(d.mem.read_obj::<u8>(GuestAddress(st)).unwrap(), S_OK);
    assert_eq!(&disk.contents()[1024..1536], &[7; 512][..]);
}

#[test]
fn device_writes_are_dirty_in_the_bitmap() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryBackend;
    let disk = MemDisk::from_bytes(vec![0x5a; MIB]);
    let mut d = Driver::start(disk, cfg(), !F_EVENT_IDX);
    let mem = d.mem.clone();
    let region = mem.iter().next().unwrap();
    let (st, pieces) = d.queue_request(T_IN, 0, &Data::In(8192, 1));
    region.bitmap().reset();
    let dirty = |a: u64| region.bitmap().dirty_at(a as usize);
    assert!(!dirty(pieces[0].0) && !dirty(USED) && !dirty(st));
    d.notify();
    d.wait_used(1);
    assert!(dirty(pieces[0].0), "data page");
    assert!(dirty(pieces[0].0 + 8191), "last data page");
    assert!(dirty(st), "status byte");
    assert!(dirty(USED), "used ring");
    assert!(!dirty(DESC), "the descriptor table is only read");
}

#[test]
fn queue_setup_rules() {
    let mut d = Driver::raw(MemDisk::new(MIB), cfg());
    assert!(d.negotiate(VERSION_1));
    d.setup_queue(Q);
    // Rings outside guest RAM: activation fails, the device asks for a reset.
    let mut e = Driver::raw(MemDisk::new(MIB), cfg());
    assert!(e.negotiate(VERSION_1));
    e.setup_queue(Q);
    e.w32(reg::QUEUE_DEVICE_HIGH, 0x10); // ignored while the queue is ready
    e.w32(reg::QUEUE_READY, 0);
    assert_eq!(e.r32(reg::QUEUE_READY), 0);
    e.w32(reg::QUEUE_DEVICE_HIGH, 0x10); // used ring at 64 GiB + 0x3000: not RAM
    e.w32(reg::QUEUE_READY, 1);
    e.driver_ok();
    assert!(!e.dev.is_activated());
    assert_ne!(e.r32(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    // Queue writes after DRIVER_OK are ignored.
    d.driver_ok();
    assert!(d.dev.is_activated());
    d.w32(reg::QUEUE_DESC_LOW, 0x8000);
    assert_eq!(d.write(0, vec![3; 512]), S_OK);
}

/// A driver that keeps several requests in flight and queues the next one the moment a
/// completion appears hits the window where the worker has found the ring empty and is
/// re-enabling notifications while a new request arrives. The worker must pick that request
/// up (an earlier version deadlocked on its own queue lock there and the disk stopped).
#[test]
fn requests_queued_while_notifications_are_reenabled_are_served() {
    let disk = MemDisk::new(MIB);
    let mut d = Driver::start(disk.clone(), cfg(), !F_EVENT_IDX);
    const TOTAL: u32 = 20_000;
    const IN_FLIGHT: u16 = 4;
    let (mut queued, mut done) = (0u32, 0u32);
    let mut last_progress = std::time::Instant::now();
    while done < TOTAL {
        while queued < TOTAL && d.avail_idx.wrapping_sub(d.used_seen) < IN_FLIGHT {
            d.queue_request(T_FLUSH, 0, &Data::None);
            d.notify();
            queued += 1;
        }
        let used = d.used_idx();
        if used != d.used_seen {
            done += u32::from(used.wrapping_sub(d.used_seen));
            d.used_seen = used;
            last_progress = std::time::Instant::now();
        } else {
            if last_progress.elapsed() >= PATIENCE {
                // Do not join a stuck worker when the driver is dropped.
                std::mem::forget(d);
                panic!("the device stopped serving requests after {done} of {TOTAL}");
            }
            std::hint::spin_loop();
        }
    }
    assert_eq!(disk.stats().flushes, u64::from(TOTAL));
}
