//! Live-migration faults at the process level, through a TCP proxy the test controls: the link
//! cut in the bulk phase, a corrupted byte in the stream. Each ends with the source running
//! with its ledger intact, the destination exiting non-zero without ever running the guest,
//! and a clear error.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

#[derive(Clone, Copy)]
enum Fault {
    /// Close both directions after this many bytes from the source.
    CutAfter(u64),
    /// Flip one byte at this offset of the source's stream.
    FlipAt(u64),
}

/// Listens on a free port and forwards one connection to `to`, applying `fault`.
fn proxy(to: u16, fault: Fault) -> (u16, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(AtomicU64::new(0));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut b = TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        // Replies flow back untouched.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match fault {
                Fault::CutAfter(limit) if off + n as u64 >= limit => {
                    let _ = a.shutdown(std::net::Shutdown::Both);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                    break;
                }
                Fault::FlipAt(at) if at >= off && at < off + n as u64 => buf[(at - off) as usize] ^= 0x40,
                _ => {}
            }
            off += n as u64;
            seen2.store(off, Ordering::SeqCst);
            if b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    (port, seen)
}

fn run_fault(name: &str, fault: Fault) {
    let dir = tmpdir(name);
    let sock = dir.join("src.sock");
    let dport = free_port();
    let append = "mode=dirty mib=64 rate=20 hb_ms=100 cpus=1";
    let mut dst = Vm::guest(&["-m", "256", "-incoming", &format!("tcp:127.0.0.1:{dport}")], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut src = Vm::guest(&["-m", "256", "-monitor", &mon], append);
    src.wait_for("GUEST READY", T);
    let mut hmp = Hmp::connect(&sock);
    // Let the guest fill some memory so the stream is a few MiB long.
    for _ in 0..10 {
        src.wait_for("HEARTBEAT", T);
    }
    let (pport, _seen) = proxy(dport, fault);
    let out = hmp.cmd(&format!("migrate tcp:127.0.0.1:{pport}"));
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: failed"), "{out}\n{info}");
    assert!(hmp.cmd("info status").contains("running"));
    // The source's guest carries on with every page intact.
    let h1 = src.wait_for("HEARTBEAT", T);
    let h2 = src.wait_for("HEARTBEAT", T);
    assert!(field(&h2, "seq") > field(&h1, "seq"));
    src.send(b"v");
    src.wait_for("LEDGER OK", T);
    // The destination gave up without running the guest.
    assert_eq!(dst.wait_exit(T), Some(1));
    assert!(dst.stderr.lock().unwrap().contains("incoming migration failed"), "{}", dst.stderr.lock().unwrap());
    assert!(!dst.seen.iter().any(|l| l.contains("HEARTBEAT")));
    let _ = dst.collect_for(Duration::from_millis(100));
    assert!(!dst.seen.iter().any(|l| l.contains("HEARTBEAT")), "destination ran the guest");
}

#[test]
fn link_cut_in_the_bulk_phase() {
    run_fault("cut", Fault::CutAfter(1 << 20));
}

#[test]
fn corrupted_byte_in_the_stream() {
    run_fault("flip", Fault::FlipAt(700_000));
}
