//! The VMM-facing API: format probing, the BlockBackend trait over raw and qcow2, bounds,
//! read-only handles, metadata refresh (live-migration handover), header extensions kept.

mod common;
use common::*;
use qcow2::storage::MemStorage;
use qcow2::{
    BlockBackend, CreateOptions, Error, ImageFormat, NewSnapshot, OpenOptions, Qcow2, RawImage,
};

#[test]
fn probe_and_open_by_content() {
    let dir = Scratch::new("probe");
    let q = dir.path("d.qcow2");
    let r = dir.path("d.raw");
    drop(
        Qcow2::create(
            &q,
            &CreateOptions {
                size: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    drop(RawImage::create(&r, 1 << 20).unwrap());
    assert_eq!(qcow2::probe(&q).unwrap(), ImageFormat::Qcow2);
    assert_eq!(qcow2::probe(&r).unwrap(), ImageFormat::Raw);
    for (path, fmt) in [(&q, ImageFormat::Qcow2), (&r, ImageFormat::Raw)] {
        let mut d = qcow2::open(path, None, &OpenOptions::default()).unwrap();
        assert_eq!(d.format(), fmt);
        assert_eq!(d.size(), 1 << 20);
        let data = pattern(3, 10_000);
        d.write_at(5000, &data).unwrap();
        let mut back = vec![0u8; 10_000];
        d.read_at(5000, &mut back).unwrap();
        assert_eq!(back, data);
        d.write_zeroes(4096, 8192).unwrap();
        d.read_at(4096, &mut back[..8192]).unwrap();
        assert!(back[..8192].iter().all(|&b| b == 0));
        assert!(matches!(
            d.write_at((1 << 20) - 10, &[0; 20]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(d.read_at(u64::MAX - 5, &mut back[..10]).is_err());
        assert_eq!(d.as_qcow2().is_some(), fmt == ImageFormat::Qcow2);
        d.flush().unwrap();
        drop(d);
        let mut ro = qcow2::open(
            path,
            Some(fmt),
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(ro.is_read_only());
        assert!(matches!(ro.write_at(0, &[1]), Err(Error::ReadOnly)));
        ro.read_at(5000, &mut back[..100]).unwrap();
    }
}

#[test]
fn refresh_sees_another_writer() {
    let mem = MemStorage::new();
    let mut a = Qcow2::create_on(
        Box::new(mem.clone()),
        &CreateOptions {
            size: 8 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let mut b = Qcow2::open_storage(
        Box::new(mem.clone()),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    a.write_at(1 << 20, &pattern(1, 70_000)).unwrap();
    a.create_snapshot(&NewSnapshot::new("handover")).unwrap();
    a.write_at(3 << 20, &pattern(2, 5000)).unwrap();
    a.flush().unwrap();
    assert!(b.snapshots().is_empty(), "stale handle before refresh");
    b.refresh().unwrap();
    assert_eq!(b.snapshots().len(), 1);
    let mut got = vec![0u8; 5000];
    b.read_at(3 << 20, &mut got).unwrap();
    assert_eq!(got, pattern(2, 5000));
}

#[test]
fn unknown_header_extensions_survive() {
    let dir = Scratch::new("ext");
    let img = dir.path("e.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "8M"]);
    // Insert an unknown extension before the end marker (feature table ends at 504).
    let mut v = std::fs::read(&img).unwrap();
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&13u32.to_be_bytes());
    ext.extend_from_slice(b"future stuff!\0\0\0");
    ext.extend_from_slice(&[0u8; 8]);
    v[504..504 + ext.len()].copy_from_slice(&ext);
    std::fs::write(&img, &v).unwrap();
    let mut q = Qcow2::open(&img, &OpenOptions::default()).unwrap();
    assert!(q
        .header()
        .extensions
        .iter()
        .any(|e| e.kind == 0x1234_5678 && e.data == b"future stuff!"));
    q.write_at(0, &pattern(1, 200_000)).unwrap();
    q.create_snapshot(&NewSnapshot::new("a")).unwrap();
    q.write_at(100, &pattern(2, 100)).unwrap();
    q.goto_snapshot("a").unwrap();
    q.delete_snapshot("a").unwrap();
    q.resize(16 << 20).unwrap();
    drop(q);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        &after[504..504 + ext.len()],
        &ext[..],
        "extension bytes changed"
    );
    assert_qemu_clean(&img);
}

#[test]
fn snapshot_lookup_rules() {
    let mem = MemStorage::new();
    let mut q = Qcow2::create_on(
        Box::new(mem),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let mut s = NewSnapshot::new("2");
    s.replace = false;
    q.create_snapshot(&s).unwrap(); // id 1, name "2"
    s.name = "x".into();
    q.create_snapshot(&s).unwrap(); // id 2
    q.create_snapshot(&s).unwrap(); // id 3, duplicate name allowed without replace
    assert_eq!(q.snapshots().len(), 3);
    // goto: id first ("2" is snapshot id 2, named x), then name.
    assert_eq!(q.goto_snapshot("2").unwrap().id, "2");
    // delete: name first ("2" is the name of id 1).
    assert_eq!(q.delete_snapshot("2").unwrap().id, "1");
    // savevm-style create replaces every "x" atomically; the id is max(remaining ids) + 1, as
    // after QEMU's delete-then-create.
    let info = q.create_snapshot(&NewSnapshot::new("x")).unwrap();
    assert_eq!(info.id, "1");
    assert_eq!(q.snapshots().len(), 1);
    assert!(matches!(
        q.goto_snapshot("nope"),
        Err(Error::SnapshotNotFound(_))
    ));
    assert!(
        q.vmstate_reader("x").is_err(),
        "disk-only snapshot has no VM state"
    );
    assert!(q.check().unwrap().is_clean());
}
