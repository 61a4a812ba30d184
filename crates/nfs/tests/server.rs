//! The NFS backend against a real nfs-ganesha started by the test (in a network namespace of
//! its own): I/O, the single-writer lock, hard-mount retries across a server crash, and qcow2
//! on NFS checked by QEMU's own NFS driver.

use nfs::ganesha::Ganesha;
use nfs::{NfsOptions, NfsStorage, NfsUrl};
use qcow2::storage::Storage;
use std::process::Command;
use std::time::Duration;

/// A test NFS server; it removes its own directory when dropped.
fn server(_name: &str) -> Ganesha {
    Ganesha::start(&std::env::temp_dir()).unwrap_or_else(|e| panic!("cannot start the test NFS server: {e}"))
}

fn rw(lock: bool) -> NfsOptions {
    NfsOptions { read_only: false, lock, sync_writes: false }
}

#[test]
fn io_and_single_writer_lock() {
    let g = server("io");
    std::fs::write(g.export().join("raw.img"), vec![0u8; 1 << 20]).unwrap();
    let url = NfsUrl::parse(&g.url("raw.img", "version=4&hard-timeout=5")).unwrap();
    let s = NfsStorage::open(&url, rw(true)).unwrap();
    assert_eq!(s.len().unwrap(), 1 << 20);
    let data: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect();
    s.write_at(&data, 12345).unwrap();
    let mut back = vec![0u8; data.len()];
    s.read_at(&mut back, 12345).unwrap();
    assert!(back == data, "read back differs");
    // Past the end reads as zeros.
    let end = s.len().unwrap();
    assert_eq!(end, 12345 + data.len() as u64);
    let mut tail = vec![1u8; 100];
    s.read_at(&mut tail, end - 10).unwrap();
    assert_eq!(&tail[..10], &data[data.len() - 10..]);
    assert!(tail[10..].iter().all(|&b| b == 0));
    s.punch_hole(12345, 4096).unwrap();
    s.read_at(&mut tail, 12345).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    s.set_len(4096).unwrap();
    s.sync().unwrap();
    assert_eq!(std::fs::metadata(g.export().join("raw.img")).unwrap().len(), 4096);
    // A second writer (another NFS client) is refused while the first holds the image ...
    match NfsStorage::open(&url, rw(true)) {
        Err(nfs::Error::Locked(u)) => assert_eq!(u, url.original),
        Err(e) => panic!("expected a lock refusal, got {e}"),
        Ok(_) => panic!("a second writer was allowed"),
    }
    // ... a reader is not, and once the first closes a new writer gets it.
    NfsStorage::open(&url, NfsOptions { read_only: true, ..Default::default() }).unwrap();
    drop(s);
    NfsStorage::open(&url, rw(true)).unwrap();
    // Errors: a missing file fails at once with the server's answer.
    let missing = NfsUrl::parse(&g.url("nope.img", "version=4&hard-timeout=5")).unwrap();
    let e = NfsStorage::open(&missing, rw(false)).unwrap_err().to_string();
    assert!(e.contains("nope.img"), "{e}");
}

#[test]
fn operations_survive_a_server_crash_and_fail_after_the_deadline() {
    let mut g = server("crash");
    std::fs::write(g.export().join("d.img"), vec![0u8; 65536]).unwrap();
    let url = NfsUrl::parse(&g.url("d.img", "version=4&hard-timeout=60")).unwrap();
    let s = NfsStorage::open(&url, rw(true)).unwrap();
    s.write_at(&[1u8; 4096], 0).unwrap();
    g.kill();
    // The server comes back while a write is retrying: the write completes.
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        g.restart().unwrap();
        g
    });
    s.write_at(&[2u8; 4096], 4096).unwrap();
    s.sync().unwrap();
    let mut g = t.join().unwrap();
    assert!(s.counters().connects.load(std::sync::atomic::Ordering::Relaxed) >= 2);
    let f = std::fs::read(g.export().join("d.img")).unwrap();
    assert!(f[..4096].iter().all(|&b| b == 1) && f[4096..8192].iter().all(|&b| b == 2));
    // The reconnected client holds the lock again.
    assert!(matches!(NfsStorage::open(&url, rw(true)), Err(nfs::Error::Locked(_))));
    // Down for longer than the deadline: the operation fails (EIO), it does not hang.
    let short = NfsUrl::parse(&g.url("d.img", "version=4&hard-timeout=2")).unwrap();
    drop(s);
    let s = NfsStorage::open(&short, rw(true)).unwrap();
    g.kill();
    let e = s.write_at(&[3u8; 512], 0).unwrap_err();
    assert!(e.to_string().contains("gave up"), "{e}");
    g.restart().unwrap();
    s.write_at(&[3u8; 512], 0).unwrap();
}

#[test]
fn qcow2_on_nfs_agrees_with_qemu() {
    let g = server("qcow2");
    let local = g.export().join("vm.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", local.to_str().unwrap(), "64M"])
        .status()
        .expect("qemu-img is needed (Debian qemu-utils)");
    assert!(st.success());
    let url = NfsUrl::parse(&g.url("vm.qcow2", "version=4")).unwrap();
    let opts = qcow2::OpenOptions::default();
    let mut b = nfs::open_image(&url, None, &opts, true).unwrap();
    assert_eq!(b.format(), qcow2::ImageFormat::Qcow2);
    assert_eq!(b.size(), 64 << 20);
    for i in 0..64u64 {
        b.write_at(i * 997 * 512, &[(i as u8) | 1; 8192]).unwrap();
    }
    let q = b.as_qcow2().unwrap();
    q.create_snapshot(&qcow2::NewSnapshot::new("snap1")).unwrap();
    b.flush().unwrap();
    b.as_qcow2().unwrap().close().unwrap();
    drop(b);
    // QEMU's NFS driver (NFSv3, through the server's rpcbind) reads what we wrote.
    let nfs3 = g.url("vm.qcow2", "");
    let out = Command::new("qemu-img").args(["check", "--output=json", &nfs3]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-img check {nfs3}: {text}");
    assert!(!text.contains("\"corruptions\"") && !text.contains("\"leaks\""), "{text}");
    let out = Command::new("qemu-img").args(["snapshot", "-l", &nfs3]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("snap1"), "{out:?}");
    let mut r = nfs::open_image(&url, None, &qcow2::OpenOptions { read_only: true, ..Default::default() }, false).unwrap();
    let mut buf = vec![0u8; 8192];
    r.read_at(5 * 997 * 512, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 5));
}

#[test]
fn repeated_failures_while_the_server_is_down() {
    let mut g = server("down");
    std::fs::write(g.export().join("d.img"), vec![0u8; 65536]).unwrap();
    let url = NfsUrl::parse(&g.url("d.img", "hard-timeout=1")).unwrap();
    let s = NfsStorage::open(&url, rw(true)).unwrap();
    g.kill();
    for i in 0..4 {
        assert!(s.write_at(&[i as u8; 4096], 0).is_err());
        let mut b = [0u8; 512];
        assert!(s.read_at(&mut b, 0).is_err());
        assert!(s.sync().is_err());
    }
    g.restart().unwrap();
    s.write_at(&[9u8; 4096], 0).unwrap();
}
