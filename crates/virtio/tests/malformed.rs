//! Hostile or broken descriptor chains: the device answers with an error status where it has
//! somewhere to write one, never panics, never writes outside guest RAM or outside the buffers
//! the guest marked writable, and keeps serving valid requests afterwards.

mod common;

use common::*;
use virtio::block::BlockConfig;
use virtio::device::status;
use virtio::mmio::reg;
use virtio::MemDisk;
use vm_memory::{Bytes, GuestAddress};

const MIB: usize = 1 << 20;

fn driver() -> (Driver, MemDisk) {
    let disk = MemDisk::from_bytes(pattern(0, MIB, 9));
    (Driver::start(disk.clone(), BlockConfig::default(), !F_EVENT_IDX), disk)
}

/// A valid request still works (the device survived).
fn still_works(d: &mut Driver) {
    let data = pattern(42, 512, 1);
    assert_eq!(d.write(42, data.clone()), S_OK);
    assert_eq!(d.read(42, 512), (S_OK, data));
}

/// Writes a header for `kind`/`sector` and a status byte (0xff); returns their addresses.
fn hdr_and_status(d: &mut Driver, kind: u32, sector: u64) -> (u64, u64) {
    let h = d.alloc(16);
    d.mem.write_obj(kind, GuestAddress(h)).unwrap();
    d.mem.write_obj(sector, GuestAddress(h + 8)).unwrap();
    let s = d.alloc(1);
    d.mem.write_obj(0xffu8, GuestAddress(s)).unwrap();
    (h, s)
}

/// Makes `descs` available with head `head`, kicks, and waits until the device took it.
fn submit_raw(d: &mut Driver, descs: &[(u16, Desc)], head: u16) {
    for &(i, desc) in descs {
        d.write_desc(i, desc);
    }
    d.push_avail(head);
    d.notify();
    d.drain();
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc { addr, len, flags, next }
}

#[test]
fn zero_length_descriptors_are_skipped() {
    let (mut d, disk) = driver();
    let (h, s) = hdr_and_status(&mut d, T_IN, 1);
    let buf = d.alloc(512);
    submit_raw(
        &mut d,
        &[
            (0, desc(h, 16, F_NEXT, 1)),
            (1, desc(0, 0, F_NEXT, 2)),
            (2, desc(buf, 512, F_NEXT | F_WRITE, 3)),
            (3, desc(0, 0, F_NEXT | F_WRITE, 4)),
            (4, desc(s, 1, F_WRITE, 0)),
        ],
        0,
    );
    assert_eq!(d.wait_used(1), vec![(0, 513)]);
    assert_eq!(d.status_byte(s), S_OK);
    let mut got = vec![0u8; 512];
    d.mem.read_slice(&mut got, GuestAddress(buf)).unwrap();
    assert_eq!(got, disk.contents()[512..1024]);
    // Nothing but zero-length buffers: no status byte to write, returned with length 0.
    submit_raw(&mut d, &[(5, desc(h, 0, F_NEXT, 6)), (6, desc(s, 0, F_WRITE, 0))], 5);
    assert_eq!(d.wait_used(1), vec![(5, 0)]);
    still_works(&mut d);
}

#[test]
fn head_and_next_indices_out_of_range() {
    let (mut d, _) = driver();
    // A head beyond the queue cannot be returned; the device skips it.
    submit_raw(&mut d, &[], Q + 5);
    assert_eq!(d.used_idx(), d.used_seen);
    // `next` beyond the table ends the chain after the header: no status byte.
    let (h, s) = hdr_and_status(&mut d, T_IN, 0);
    submit_raw(&mut d, &[(0, desc(h, 16, F_NEXT, 200))], 0);
    assert_eq!(d.wait_used(1), vec![(0, 0)]);
    assert_eq!(d.status_byte(s), 0xff);
    still_works(&mut d);
}

#[test]
fn buffers_outside_guest_ram() {
    let (mut d, disk) = driver();
    let ram = RAM;
    // Status outside RAM: nothing to write, the request is returned with length 0.
    let (h, _) = hdr_and_status(&mut d, T_OUT, 0);
    let data = d.alloc(512);
    submit_raw(
        &mut d,
        &[(0, desc(h, 16, F_NEXT, 1)), (1, desc(data, 512, F_NEXT, 2)), (2, desc(ram + 0x1000, 1, F_WRITE, 0))],
        0,
    );
    assert_eq!(d.wait_used(1), vec![(0, 0)]);
    // A read whose buffer straddles the end of RAM: IOERR, and not even the in-RAM part is
    // written.
    let (h, s) = hdr_and_status(&mut d, T_IN, 0);
    let edge = ram - 256;
    d.mem.write_slice(&[0xee; 256], GuestAddress(edge)).unwrap();
    submit_raw(
        &mut d,
        &[(3, desc(h, 16, F_NEXT, 4)), (4, desc(edge, 512, F_NEXT | F_WRITE, 5)), (5, desc(s, 1, F_WRITE, 0))],
        3,
    );
    assert_eq!(d.wait_used(1), vec![(3, 1)]);
    assert_eq!(d.status_byte(s), S_IOERR);
    let mut tail = [0u8; 256];
    d.mem.read_slice(&mut tail, GuestAddress(edge)).unwrap();
    assert_eq!(tail, [0xee; 256]);
    // Header outside RAM, and an address that wraps around the address space.
    let (_, s) = hdr_and_status(&mut d, T_IN, 0);
    submit_raw(&mut d, &[(6, desc(ram * 4, 16, F_NEXT, 7)), (7, desc(s, 1, F_WRITE, 0))], 6);
    assert_eq!(d.wait_used(1), vec![(6, 1)]);
    assert_eq!(d.status_byte(s), S_IOERR);
    let (h, s) = hdr_and_status(&mut d, T_OUT, 0);
    submit_raw(
        &mut d,
        &[(8, desc(h, 16, F_NEXT, 9)), (9, desc(u64::MAX - 10, 512, F_NEXT, 10)), (10, desc(s, 1, F_WRITE, 0))],
        8,
    );
    assert_eq!(d.wait_used(1), vec![(8, 1)]);
    assert_eq!(d.status_byte(s), S_IOERR);
    // A 2 GiB buffer: larger than RAM.
    let (h, s) = hdr_and_status(&mut d, T_IN, 0);
    submit_raw(
        &mut d,
        &[(11, desc(h, 16, F_NEXT, 12)), (12, desc(HEAP, 1 << 31, F_NEXT | F_WRITE, 13)), (13, desc(s, 1, F_WRITE, 0))],
        11,
    );
    assert_eq!(d.wait_used(1), vec![(11, 1)]);
    assert_eq!(d.status_byte(s), S_IOERR);
    // Lengths adding up past 4 GiB end the walk (virtio-queue's rule): no status byte.
    let (h, s) = hdr_and_status(&mut d, T_IN, 0);
    submit_raw(
        &mut d,
        &[(14, desc(h, 16, F_NEXT, 15)), (15, desc(HEAP, u32::MAX, F_NEXT | F_WRITE, 0)), (0, desc(s, 1, F_WRITE, 0))],
        14,
    );
    assert_eq!(d.wait_used(1), vec![(14, 0)]);
    assert_eq!(d.status_byte(s), 0xff);
    assert_eq!(disk.contents(), pattern(0, MIB, 9), "no write reached the disk");
    still_works(&mut d);
}

#[test]
fn loops_and_ordering_violations() {
    let (mut d, disk) = driver();
    // 0 -> 1 -> 0 -> ...: the walk stops after a queue's worth of descriptors; the readable
    // header after the writable status makes it malformed.
    let (h, s) = hdr_and_status(&mut d, T_OUT, 0);
    submit_raw(&mut d, &[(0, desc(h, 16, F_NEXT, 1)), (1, desc(s, 1, F_WRITE | F_NEXT, 0))], 0);
    let used = d.wait_used(1);
    assert_eq!(used[0].0, 0);
    assert_eq!(d.status_byte(s), S_IOERR);
    // A descriptor pointing at itself, readable only: no status byte.
    submit_raw(&mut d, &[(2, desc(h, 16, F_NEXT, 2))], 2);
    assert_eq!(d.wait_used(1), vec![(2, 0)]);
    // Readable data after the writable status.
    let (h, s) = hdr_and_status(&mut d, T_OUT, 0);
    let data = d.alloc(512);
    submit_raw(
        &mut d,
        &[(3, desc(h, 16, F_NEXT, 4)), (4, desc(s, 1, F_WRITE | F_NEXT, 5)), (5, desc(data, 512, 0, 0))],
        3,
    );
    d.wait_used(1);
    assert_eq!(d.status_byte(s), S_IOERR);
    // A header shorter than 16 bytes.
    let (h, s) = hdr_and_status(&mut d, T_IN, 0);
    submit_raw(&mut d, &[(6, desc(h, 8, F_NEXT, 7)), (7, desc(s, 1, F_WRITE, 0))], 6);
    assert_eq!(d.wait_used(1), vec![(6, 1)]);
    assert_eq!(d.status_byte(s), S_IOERR);
    assert_eq!(disk.contents(), pattern(0, MIB, 9));
    still_works(&mut d);
}

#[test]
fn indirect_tables() {
    let (mut d, disk) = driver();
    // A valid indirect request: header, data, status in a table.
    let (h, s) = hdr_and_status(&mut d, T_OUT, 3);
    let data = d.alloc(1024);
    d.mem.write_slice(&pattern(3, 1024, 4), GuestAddress(data)).unwrap();
    let table = d.alloc(48);
    let entries = [(h, 16u32, F_NEXT, 1u16), (data, 1024, F_NEXT, 2), (s, 1, F_WRITE, 0)];
    for (k, (a, l, f, n)) in entries.iter().enumerate() {
        let e = table + 16 * k as u64;
        d.mem.write_obj(*a, GuestAddress(e)).unwrap();
        d.mem.write_obj(*l, GuestAddress(e + 8)).unwrap();
        d.mem.write_obj(*f, GuestAddress(e + 12)).unwrap();
        d.mem.write_obj(*n, GuestAddress(e + 14)).unwrap();
    }
    submit_raw(&mut d, &[(0, desc(table, 48, F_INDIRECT, 0))], 0);
    assert_eq!(d.wait_used(1), vec![(0, 1)]);
    assert_eq!(d.status_byte(s), S_OK);
    assert_eq!(&disk.contents()[3 * 512..5 * 512], &pattern(3, 1024, 4)[..]);
    // A table whose entry is itself indirect, a table of odd length, a table outside RAM:
    // the walk stops, nothing is written, the device goes on.
    d.mem.write_obj(F_INDIRECT, GuestAddress(table + 12)).unwrap();
    submit_raw(&mut d, &[(1, desc(table, 48, F_INDIRECT, 0))], 1);
    assert_eq!(d.wait_used(1), vec![(1, 0)]);
    submit_raw(&mut d, &[(2, desc(table, 47, F_INDIRECT, 0))], 2);
    assert_eq!(d.wait_used(1), vec![(2, 0)]);
    submit_raw(&mut d, &[(3, desc(RAM + 4096, 48, F_INDIRECT, 0))], 3);
    assert_eq!(d.wait_used(1), vec![(3, 0)]);
    still_works(&mut d);
}

#[test]
fn runaway_available_index_breaks_only_the_queue() {
    let (mut d, _) = driver();
    // The driver claims 100 new entries in a ring of 16.
    d.mem.write_obj(d.avail_idx.wrapping_add(100), GuestAddress(AVAIL + 2)).unwrap();
    d.notify();
    d.settle();
    assert_eq!(d.used_idx(), d.used_seen, "nothing was returned");
    // A reset brings the device back.
    d.w32(reg::STATUS, 0);
    d.mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
    d.avail_idx = 0;
    d.used_seen = 0;
    assert!(d.negotiate(VERSION_1 | F_FLUSH));
    d.setup_queue(Q);
    d.driver_ok();
    assert_eq!(d.r32(reg::STATUS) & status::DRIVER_OK, status::DRIVER_OK);
    still_works(&mut d);
}
