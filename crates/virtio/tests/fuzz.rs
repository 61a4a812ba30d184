//! Property test: random descriptor tables, random request bytes and random available rings
//! thrown at the device. Whatever the guest writes, the device must not panic or wedge, must
//! return only heads that exist with lengths within the writable buffers it was given, and
//! must serve a valid request after the driver resets it.

mod common;

use common::*;
use proptest::prelude::*;
use virtio::block::BlockConfig;
use virtio::mmio::reg;
use virtio::MemDisk;
use vm_memory::{Bytes, GuestAddress};

/// Where the random request bytes live.
const DATA: u64 = HEAP;
const DATA_LEN: u64 = 0x10000;
const DISK: usize = 64 << 10;

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => DATA..DATA + DATA_LEN,
        1 => any::<u64>(),
        1 => RAM - 0x100..RAM + 0x100,
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 0..64u32, 2 => 0..0x3000u32, 1 => any::<u32>()]
}

fn descriptor() -> impl Strategy<Value = Desc> {
    (addr(), len(), 0..8u16, 0..20u16).prop_map(|(addr, len, flags, next)| Desc { addr, len, flags, next })
}

/// Keeps random buffers off the rings, so the driver's own bookkeeping stays intact (a guest
/// that scribbles over its rings only hurts itself, but the test then cannot tell when the
/// device is done).
fn off_the_rings(mut d: Desc) -> Desc {
    let end = d.addr.saturating_add(u64::from(d.len));
    if d.addr < HEAP && end > DESC {
        d.addr = DATA + d.addr % DATA_LEN;
    }
    d
}

/// Deterministic filler for the request bytes: headers with plausible types and sectors mixed
/// with noise.
fn fill(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(DATA_LEN as usize);
    while out.len() < DATA_LEN as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let kind = [0u32, 1, 4, 8, 11, 13, x as u32][(x % 7) as usize];
        let sector = if x & 0x100 != 0 { (x >> 20) % 160 } else { x.rotate_left(7) };
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&sector.to_le_bytes());
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_descriptor_tables_never_break_the_device(
        descs in proptest::collection::vec(descriptor(), Q as usize),
        heads in proptest::collection::vec(0..20u16, 1..=Q as usize),
        seed in any::<u64>(),
        features in any::<u64>(),
        read_only in any::<bool>(),
    ) {
        let disk = MemDisk::from_bytes(vec![0x11; DISK]);
        let backend = if read_only { disk.read_only() } else { disk.clone() };
        let mut d = Driver::start(backend, BlockConfig { serial: "fuzz".into(), ..Default::default() },
            features | VERSION_1);
        d.mem.write_slice(&fill(seed), GuestAddress(DATA)).unwrap();
        for (i, desc) in descs.iter().enumerate() {
            d.write_desc(i as u16, off_the_rings(*desc));
        }
        for &h in &heads {
            d.push_avail(h);
        }
        d.notify();
        d.drain();

        d.dev.pause().expect("worker alive");
        let used = d.used_idx();
        prop_assert!(usize::from(used) <= heads.len());
        for k in 0..used {
            let e = USED + 4 + 8 * u64::from(k % Q);
            let id: u32 = d.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = d.mem.read_obj(GuestAddress(e + 4)).unwrap();
            prop_assert!(id < u32::from(Q), "returned head {} does not exist", id);
            // At most the whole disk (range-checked IN) plus the status byte.
            prop_assert!(len as usize <= DISK + 1, "used length {}", len);
            // Entry k answers the k-th made-available head that exists.
            let expected = heads.iter().filter(|&&h| h < Q).nth(usize::from(k)).copied();
            prop_assert_eq!(Some(id as u16), expected);
        }
        if read_only {
            prop_assert!(disk.contents().iter().all(|&b| b == 0x11), "read-only disk changed");
        }
        d.dev.resume();

        // The driver resets the device and it works again.
        d.w32(reg::STATUS, 0);
        d.mem.write_slice(&[0u8; 0x3000], GuestAddress(DESC)).unwrap();
        d.avail_idx = 0;
        d.used_seen = 0;
        prop_assert!(d.negotiate(VERSION_1));
        d.setup_queue(Q);
        d.driver_ok();
        let r = d.read(0, 512);
        prop_assert_eq!(r.0, S_OK);
    }
}
