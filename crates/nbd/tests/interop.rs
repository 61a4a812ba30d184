//! Interoperability: our server read and written by QEMU's client (`qemu-io`, `qemu-img`) and
//! libnbd's tools (`nbdinfo`, `nbdcopy`); our client writing into a real `qemu-nbd` export;
//! and our client against our server. The external tools must be installed (Debian packages
//! `qemu-utils` and `libnbd-bin`): a missing one fails the test with its package name.

use nbd::{Export, NbdClient, NbdServer, NbdTarget, SharedBackend};
use qcow2::{BlockBackend, CreateOptions, Qcow2, RawImage};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

const MIB: u64 = 1 << 20;

/// A scratch directory for one test, removed when the test ends; each test shadows `tmp` with
/// `let tmp = |n: &str| dir.path().join(n);`.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("nbd-interop-").tempdir().expect("scratch directory")
}

fn tool(name: &str, package: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(found, "`{name}` not found: install the Debian package {package} (apt-get install -y {package})");
    Command::new(name)
}

fn run(mut c: Command) -> Output {
    let o = c.output().expect("spawn");
    assert!(
        o.status.success(),
        "{:?} failed: {}\n{}",
        c,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn shared(b: impl BlockBackend + 'static) -> SharedBackend {
    Arc::new(Mutex::new(Box::new(b) as Box<dyn BlockBackend>))
}

fn serve(name: &str, backend: SharedBackend, writable: bool) -> (NbdServer, String) {
    let srv = NbdServer::bind("127.0.0.1:0").unwrap();
    srv.add_export(Export { name: name.into(), description: "test disk".into(), backend, writable }).unwrap();
    let uri = format!("nbd://127.0.0.1:{}/{name}", srv.local_addr().port());
    (srv, uri)
}

fn target(srv: &NbdServer, export: &str) -> NbdTarget {
    NbdTarget { host: "127.0.0.1".into(), port: srv.local_addr().port(), export: export.into() }
}

#[test]
fn our_client_against_our_server() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let img = RawImage::create(tmp("loop.raw"), 8 * MIB).unwrap();
    let backend = shared(img);
    let (srv, _) = serve("d0", backend.clone(), true);
    let ro = shared(RawImage::create(tmp("loop-ro.raw"), MIB).unwrap());
    srv.add_export(Export { name: "ro".into(), description: String::new(), backend: ro, writable: false }).unwrap();
    assert!(srv.add_export(Export { name: "ro".into(), description: String::new(), backend: backend.clone(), writable: false }).is_err());

    let mut c = NbdClient::connect(&target(&srv, "d0")).unwrap();
    assert_eq!(c.size(), 8 * MIB);
    let data = pattern(3 * MIB as usize + 123, 1);
    c.write(4096, &data).unwrap();
    c.write_zeroes(MIB, 64 * 1024).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; data.len()];
    c.read(4096, &mut back).unwrap();
    let mut want = data.clone();
    want[(MIB - 4096) as usize..(MIB - 4096 + 65536) as usize].fill(0);
    assert!(back == want, "read back differs");
    // The server wrote to the backend itself.
    let mut direct = vec![0u8; 16];
    backend.lock().unwrap().read_at(4096, &mut direct).unwrap();
    assert_eq!(&direct[..], &data[..16]);
    // Out of range and read-only are errors, not crashes, and the connection stays usable.
    assert!(c.write(8 * MIB - 10, &[1u8; 20]).is_err());
    c.send_write(0, &[5u8; 512], false).unwrap();
    c.recv_reply().unwrap();
    c.disconnect().unwrap();

    let mut r = NbdClient::connect(&target(&srv, "ro")).unwrap();
    assert!(r.read_only());
    let e = r.write(0, &[1u8; 512]).unwrap_err().to_string();
    assert!(e.contains("EPERM"), "{e}");
    let e = NbdClient::connect(&target(&srv, "nope")).err().unwrap().to_string();
    assert!(e.contains("nope"), "{e}");
    srv.stop();
}

#[test]
fn qemu_io_reads_and_writes_our_export() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let path = tmp("qio.raw");
    let backend = shared(RawImage::create(&path, 4 * MIB).unwrap());
    let (srv, uri) = serve("disk0", backend.clone(), true);
    let mut c = tool("qemu-io", "qemu-utils");
    c.args(["-f", "raw", &uri]);
    for cmd in [
        "write -P 0xab 0 1M",
        "write -P 0xcd 1048576 512",
        "write -z 2M 64k",
        "aio_write -P 0x11 3M 4k",
        "aio_flush",
        "flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1048576 512",
        "read -P 0 2M 64k",
        "read -P 0x11 3M 4k",
        "discard 3200k 64k",
    ] {
        c.args(["-c", cmd]);
    }
    let o = run(c);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(!out.contains("failed") && !out.contains("error"), "{out}");
    let mut b = vec![0u8; 4096];
    backend.lock().unwrap().read_at(3 * MIB, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    backend.lock().unwrap().read_at(1000, &mut b[..8]).unwrap();
    assert!(b[..8].iter().all(|&x| x == 0xab));
    // A pattern that is not there is reported by qemu-io: the check above is not vacuous.
    let mut c = tool("qemu-io", "qemu-utils");
    c.args(["-f", "raw", &uri, "-c", "read -P 0x77 0 4k"]);
    let o = c.output().unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"));
    srv.stop();
}

#[test]
fn qemu_img_convert_compare_and_map_over_our_export() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    // A qcow2 image with data at 1 MiB and 5 MiB, the rest unallocated.
    let src = tmp("src.qcow2");
    let mut q = Qcow2::create(&src, &CreateOptions { size: 8 * MIB, ..Default::default() }).unwrap();
    let a = pattern(MIB as usize, 2);
    let b = pattern(64 * 1024, 3);
    q.write_at(MIB, &a).unwrap();
    q.write_at(5 * MIB, &b).unwrap();
    q.flush().unwrap();
    let (srv, uri) = serve("src", shared(q), false);

    let out = tmp("out.raw");
    run({
        let mut c = tool("qemu-img", "qemu-utils");
        c.args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&out);
        c
    });
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, 8 * MIB);
    assert!(bytes[MIB as usize..2 * MIB as usize] == a[..]);
    assert!(bytes[5 * MIB as usize..5 * MIB as usize + b.len()] == b[..]);
    assert!(bytes[..MIB as usize].iter().all(|&x| x == 0));
    run({
        let mut c = tool("qemu-img", "qemu-utils");
        c.args(["compare", "-f", "raw", "-F", "raw", &uri]).arg(&out);
        c
    });
    // A differing file is found different (exit 1).
    let mut other = bytes.clone();
    other[5 * MIB as usize + 7] ^= 0xff;
    std::fs::write(tmp("other.raw"), &other).unwrap();
    let o = tool("qemu-img", "qemu-utils")
        .args(["compare", "-f", "raw", "-F", "raw", &uri])
        .arg(tmp("other.raw"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));

    // qemu-img map reads our base:allocation block status.
    let o = run({
        let mut c = tool("qemu-img", "qemu-utils");
        c.args(["map", "--output=json", "-f", "raw", &uri]);
        c
    });
    let map: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let data: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(MIB, MIB), (5 * MIB, 64 * 1024)], "{map:?}");
    srv.stop();
}

#[test]
fn libnbd_nbdinfo_and_nbdcopy() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let path = tmp("lib.raw");
    let backend = shared(RawImage::create(&path, 16 * MIB).unwrap());
    let (srv, uri) = serve("lib0", backend.clone(), true);
    let o = run({
        let mut c = tool("nbdinfo", "libnbd-bin");
        c.args(["--json", &uri]);
        c
    });
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let ex = &v["exports"][0];
    assert_eq!(ex["export-name"], "lib0");
    assert_eq!(ex["export-size"], 16 * MIB);
    assert_eq!(ex["is_read_only"], false);
    assert_eq!(ex["can_flush"], true);
    assert_eq!(ex["can_zero"], true);
    assert_eq!(v["protocol"], "newstyle-fixed");
    let o = run({
        let mut c = tool("nbdinfo", "libnbd-bin");
        c.args(["--list", "--json", &format!("nbd://127.0.0.1:{}", srv.local_addr().port())]);
        c
    });
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["exports"].as_array().map(|a| a.len()), Some(1));

    // nbdcopy in (several connections, multi-conn) and back out.
    let src = tmp("copy-src.raw");
    let data = pattern(16 * MIB as usize, 9);
    std::fs::write(&src, &data).unwrap();
    run({
        let mut c = tool("nbdcopy", "libnbd-bin");
        c.arg(&src).arg(&uri);
        c
    });
    let mut got = vec![0u8; data.len()];
    backend.lock().unwrap().read_at(0, &mut got).unwrap();
    assert!(got == data, "nbdcopy into our export lost data");
    let back = tmp("copy-back.raw");
    run({
        let mut c = tool("nbdcopy", "libnbd-bin");
        c.arg(&uri).arg(&back);
        c
    });
    assert!(std::fs::read(&back).unwrap() == data, "nbdcopy out of our export differs");
    srv.stop();
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_connect(t: &NbdTarget) -> NbdClient {
    for _ in 0..200 {
        if let Ok(c) = NbdClient::connect(t) {
            return c;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("qemu-nbd did not come up on {}", t.addr());
}

#[test]
fn our_client_writes_into_qemu_nbd() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let file = tmp("qnbd.qcow2");
    run({
        let mut c = tool("qemu-img", "qemu-utils");
        c.args(["create", "-q", "-f", "qcow2"]).arg(&file).arg("8M");
        c
    });
    let port = free_port();
    let _srv = Child(
        tool("qemu-nbd", "qemu-utils")
            .args(["-f", "qcow2", "-x", "tgt", "-b", "127.0.0.1", "-p", &port.to_string(), "--persistent"])
            .arg(&file)
            .spawn()
            .unwrap(),
    );
    let t = NbdTarget { host: "127.0.0.1".into(), port, export: "tgt".into() };
    let mut c = wait_connect(&t);
    assert_eq!(c.size(), 8 * MIB);
    let data = pattern(2 * MIB as usize, 4);
    // Pipelined writes, as the mirror job sends them.
    for (i, chunk) in data.chunks(256 * 1024).enumerate() {
        c.send_write(MIB + i as u64 * 256 * 1024, chunk, false).unwrap();
    }
    c.drain().unwrap();
    c.write_zeroes(MIB + 64 * 1024, 64 * 1024).unwrap();
    c.flush().unwrap();
    let mut back = vec![0u8; 4096];
    c.read(MIB, &mut back).unwrap();
    assert!(back[..] == data[..4096]);
    c.disconnect().unwrap();
    drop(_srv);
    let mut want = data.clone();
    want[64 * 1024..128 * 1024].fill(0);
    let raw = tmp("qnbd-out.raw");
    run({
        let mut c = tool("qemu-img", "qemu-utils");
        c.args(["convert", "-f", "qcow2", "-O", "raw"]).arg(&file).arg(&raw);
        c
    });
    let got = std::fs::read(&raw).unwrap();
    assert!(got[MIB as usize..3 * MIB as usize] == want[..], "qemu-nbd target content differs");
    run({
        let mut c = tool("qemu-img", "qemu-utils");
        c.args(["check", "-f", "qcow2"]).arg(&file);
        c
    });
    let _ = Path::new(&file);
}

/// Hostile clients: an oversized option, a huge write length, garbage magic. Each ends only
/// its own connection; the server keeps serving.
#[test]
fn hostile_clients_end_their_own_connection() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    use std::io::{Read, Write};
    let (srv, _) = serve("h", shared(RawImage::create(tmp("hostile.raw"), MIB).unwrap()), true);
    let addr = srv.local_addr();
    let greet = |s: &mut std::net::TcpStream| {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
    };
    // 1 GiB option payload: refused (NBD_REP_ERR_TOO_BIG), then closed, nothing allocated.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    greet(&mut s);
    s.write_all(&nbd::proto::option_header(nbd::proto::OPT_GO, 1 << 30)).unwrap();
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    let r = nbd::proto::parse_option_reply_header(&h).unwrap();
    assert_eq!(r.reply, nbd::proto::REP_ERR_TOO_BIG);
    // Bad option magic: closed.
    let mut s2 = std::net::TcpStream::connect(addr).unwrap();
    greet(&mut s2);
    s2.write_all(&[0x55u8; 16]).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s2.read(&mut b).unwrap_or(0), 0);
    // A write request claiming 4 GiB of payload after a proper GO: EOVERFLOW, closed.
    let mut c = NbdClient::connect(&target(&srv, "h")).unwrap();
    c.write(0, &[1u8; 512]).unwrap();
    let mut s3 = std::net::TcpStream::connect(addr).unwrap();
    greet(&mut s3);
    let mut go = Vec::new();
    nbd::proto::put_string(&mut go, "h");
    go.extend_from_slice(&0u16.to_be_bytes());
    s3.write_all(&nbd::proto::option_header(nbd::proto::OPT_GO, go.len() as u32)).unwrap();
    s3.write_all(&go).unwrap();
    loop {
        let mut h = [0u8; 20];
        s3.read_exact(&mut h).unwrap();
        let r = nbd::proto::parse_option_reply_header(&h).unwrap();
        let mut d = vec![0u8; r.len as usize];
        s3.read_exact(&mut d).unwrap();
        if r.reply == nbd::proto::REP_ACK {
            break;
        }
    }
    let req = nbd::proto::Request { flags: 0, cmd: nbd::proto::CMD_WRITE, handle: 9, offset: 0, len: u32::MAX };
    s3.write_all(&nbd::proto::encode_request(&req)).unwrap();
    let mut rep = [0u8; 16];
    s3.read_exact(&mut rep).unwrap();
    assert_eq!(nbd::proto::be32(&rep[4..8]), nbd::proto::EOVERFLOW);
    assert_eq!(s3.read(&mut b).unwrap_or(0), 0, "connection closed after the oversized write");
    // The first client is still served.
    let mut back = [0u8; 512];
    c.read(0, &mut back).unwrap();
    assert_eq!(back, [1u8; 512]);
    srv.stop();
}

/// Random client byte streams after the greeting (a poor man's fuzzer over the whole
/// negotiation and transmission path): no server thread panics, every hostile connection is
/// closed, and a proper client is still served afterwards.
#[test]
fn random_client_bytes_never_panic_the_server() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    static PANICS: AtomicUsize = AtomicUsize::new(0);
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name().is_some_and(|n| n.starts_with("nbd-")) {
            PANICS.fetch_add(1, Ordering::SeqCst);
        }
        prev(info);
    }));
    let (srv, _) = serve("r", shared(RawImage::create(tmp("random.raw"), MIB).unwrap()), true);
    let addr = srv.local_addr();
    for seed in 0..150u64 {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        let mut junk = pattern(64 + (seed as usize * 37) % 2000, seed + 100);
        // Half the streams start like a real client (flags, then an option header) so the
        // later parsers see input too.
        if seed % 2 == 0 {
            let mut head = 3u32.to_be_bytes().to_vec();
            let opt = [nbd::proto::OPT_GO, nbd::proto::OPT_INFO, nbd::proto::OPT_STRUCTURED_REPLY, nbd::proto::OPT_SET_META_CONTEXT, nbd::proto::OPT_LIST][seed as usize % 5];
            head.extend_from_slice(&nbd::proto::option_header(opt, (junk.len() as u32) % 300));
            head.extend_from_slice(&junk);
            junk = head;
        }
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink); // the server answers or hangs up, never stalls
    }
    let mut c = NbdClient::connect(&target(&srv, "r")).unwrap();
    c.write(0, &[7u8; 4096]).unwrap();
    let mut back = [0u8; 4096];
    c.read(0, &mut back).unwrap();
    assert_eq!(back, [7u8; 4096]);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a server thread panicked");
    srv.stop();
}

/// QEMU's NBD client writing into our export: `qemu-img convert -n` of a sparse qcow2 image
/// (data, zero clusters and holes, so it sends writes and zero requests), then
/// `qemu-img compare` of the export against the source.
#[test]
fn qemu_img_convert_into_our_export() {
    let dir = scratch();
    let tmp = |n: &str| dir.path().join(n);
    let src = tmp("into-src.qcow2");
    let mut q = Qcow2::create(&src, &CreateOptions { size: 16 * MIB, ..Default::default() }).unwrap();
    q.write_at(0, &pattern(300_000, 11)).unwrap();
    q.write_at(9 * MIB, &pattern(2 * MIB as usize, 12)).unwrap();
    q.write_zeroes(9 * MIB + 65536, 131072).unwrap();
    q.flush().unwrap();
    drop(q);
    // The target starts full of junk, so holes must really be zeroed.
    let mut dst = RawImage::create(tmp("into-dst.raw"), 16 * MIB).unwrap();
    dst.write_at(0, &vec![0xa5; 16 * MIB as usize]).unwrap();
    let (srv, uri) = serve("in", shared(dst), true);
    run({
        let mut c = tool("qemu-img", "qemu-utils");
        c.args(["convert", "-n", "-f", "qcow2", "-O", "raw"]).arg(&src).arg(&uri);
        c
    });
    run({
        let mut c = tool("qemu-img", "qemu-utils");
        c.args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&src).arg(&uri);
        c
    });
    srv.stop();
    let got = std::fs::read(tmp("into-dst.raw")).unwrap();
    assert!(got[12 * MIB as usize..].iter().all(|&b| b == 0), "a hole was left with junk");
}
