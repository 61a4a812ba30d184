//! The device over real image files from the `qcow2` crate (raw and qcow2): what the guest
//! wrote and flushed is in the image when it is reopened, read-only images refuse writes, and
//! a migration-style handover (pause, reopen the image, swap, resume) loses nothing.

mod common;

use common::*;
use qcow2::{CreateOptions, ImageFormat, OpenOptions, Qcow2, RawImage};
use std::path::PathBuf;
use virtio::block::BlockConfig;
use virtio::BlockBackend;

const SIZE: u64 = 4 << 20;

/// A file in the temp dir, removed when dropped.
struct TempImage(PathBuf);

impl TempImage {
    fn new(name: &str) -> Self {
        TempImage(std::env::temp_dir().join(format!("godwit-virtio-{}-{name}", std::process::id())))
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open(path: &PathBuf, read_only: bool) -> Box<dyn BlockBackend> {
    qcow2::open(path, None, &OpenOptions { read_only, ..Default::default() }).expect("open image")
}

fn workload(d: &mut Driver) {
    for s in (0..64u64).step_by(8) {
        assert_eq!(d.write(s * 6, pattern(s, 4096, 1)), S_OK);
    }
    let mut zero = 40u64.to_le_bytes().to_vec();
    zero.extend_from_slice(&16u32.to_le_bytes());
    zero.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(d.request(T_WRITE_ZEROES, 0, Data::Out(zero, 1)).status, S_OK);
    assert_eq!(d.request(T_FLUSH, 0, Data::None).status, S_OK);
}

fn check(img: &mut dyn BlockBackend) {
    let mut buf = vec![0u8; 4096];
    for s in (0..64u64).step_by(8) {
        img.read_at(s * 6 * 512, &mut buf).unwrap();
        let mut want = pattern(s, 4096, 1);
        // Sectors 40..56 were zeroed after the write at sector 48 (s = 0..64 step 8 writes at 6*s).
        for (k, b) in want.iter_mut().enumerate() {
            let sector = s * 6 + k as u64 / 512;
            if (40..56).contains(&sector) {
                *b = 0;
            }
        }
        assert_eq!(buf, want, "sector {}", s * 6);
    }
}

#[test]
fn raw_and_qcow2_images_hold_what_the_guest_flushed() {
    for fmt in [ImageFormat::Raw, ImageFormat::Qcow2] {
        let img = TempImage::new(&format!("rw.{fmt}"));
        match fmt {
            ImageFormat::Raw => drop(RawImage::create(&img.0, SIZE).unwrap()),
            ImageFormat::Qcow2 => drop(Qcow2::create(&img.0, &CreateOptions { size: SIZE, ..Default::default() }).unwrap()),
        }
        let mut d = Driver::start_on(open(&img.0, false), BlockConfig::default(), !F_EVENT_IDX);
        assert_eq!(d.r32(virtio::mmio::reg::CONFIG) as u64, SIZE / 512);
        workload(&mut d);
        drop(d);
        let mut back = open(&img.0, true);
        assert_eq!(back.format(), fmt);
        check(&mut *back);
    }
}

#[test]
fn read_only_image_answers_ioerr() {
    let img = TempImage::new("ro.qcow2");
    drop(Qcow2::create(&img.0, &CreateOptions { size: SIZE, ..Default::default() }).unwrap());
    let mut d = Driver::start_on(open(&img.0, true), BlockConfig::default(), !F_EVENT_IDX);
    assert_ne!(d.device_features() & F_RO, 0);
    assert_eq!(d.write(0, vec![1; 512]), S_IOERR);
    assert_eq!(d.read(0, 512), (S_OK, vec![0; 512]));
}

#[test]
fn handover_to_a_reopened_image() {
    let img = TempImage::new("handover.qcow2");
    drop(Qcow2::create(&img.0, &CreateOptions { size: SIZE, ..Default::default() }).unwrap());
    let mut d = Driver::start_on(open(&img.0, false), BlockConfig::default(), !F_EVENT_IDX);
    assert_eq!(d.write(1, pattern(1, 512, 7)), S_OK);
    // Switchover: quiesce (flushes), reopen the image as the destination would, swap.
    d.dev.pause().unwrap();
    d.queue_request(T_OUT, 2, &Data::Out(pattern(2, 512, 7), 1));
    d.notify();
    let reopened = open(&img.0, false);
    let old = d.dev.device_mut().swap_backend(reopened).unwrap();
    drop(old);
    d.dev.resume();
    d.wait_used(1);
    assert_eq!(d.read(1, 1024), (S_OK, [pattern(1, 512, 7), pattern(2, 512, 7)].concat()));
    assert_eq!(d.request(T_FLUSH, 0, Data::None).status, S_OK);
    drop(d);
    let mut back = open(&img.0, true);
    let mut b = vec![0u8; 1024];
    back.read_at(512, &mut b).unwrap();
    assert_eq!(b, [pattern(1, 512, 7), pattern(2, 512, 7)].concat());
}
