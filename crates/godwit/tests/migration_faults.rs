//! Live-migration faults at the process level, through a TCP proxy the test controls: the link
//! cut in the bulk phase, a corrupted byte in the stream (the source resumes by itself), and
//! the destination killed after the final state left (the source fences itself, paused, until
//! `cont`). Each ends with the source running
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
    /// Forward everything but the stream's END record; once the source has sent it (it is
    /// paused and waiting for RUNNING), kill the destination process.
    KillAtEnd(u32),
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
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    // Quiet source: the held bytes were not an END record's start after all
                    // (unless they are the whole END, which arrives in one write).
                    if !tail.is_empty() && tail[0] != 0x0F {
                        let t = std::mem::take(&mut tail);
                        off += t.len() as u64;
                        if b.write_all(&t).is_err() {
                            break;
                        }
                    }
                    continue;
                }
                Err(_) => break,
                Ok(n) => n,
            };
            if let Fault::KillAtEnd(pid) = fault {
                // Forward everything except an END record (tag 0x0F, then the count of bytes
                // before it, then a CRC): when one arrives, the source is paused and waiting
                // for RUNNING — kill the destination instead of letting it finish.
                let mut data = std::mem::take(&mut tail);
                data.extend_from_slice(&buf[..n]);
                let is_end = data.len() >= 13 && {
                    let t = &data[data.len() - 13..];
                    let before = off + (data.len() - 13) as u64;
                    t[0] == 0x0F && u64::from_le_bytes(t[1..9].try_into().unwrap()) == before
                };
                if is_end {
                    let keep = data.len() - 13;
                    let _ = b.write_all(&data[..keep]);
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    let _ = a.shutdown(std::net::Shutdown::Both);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                    break;
                }
                // An END record may straddle reads: hold back a possible start of one.
                let hold = data.len().min(12);
                let keep = data.len() - hold;
                if b.write_all(&data[..keep]).is_err() {
                    break;
                }
                off += keep as u64;
                tail = data[keep..].to_vec();
                // Nothing else is coming for a while (e.g. waiting for READY): flush the rest.
                a.set_read_timeout(Some(Duration::from_millis(50))).ok();
                continue;
            }
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
    let fault = match fault {
        Fault::KillAtEnd(_) => Fault::KillAtEnd(dst.child.id()),
        f => f,
    };
    let (pport, _seen) = proxy(dport, fault);
    let out = hmp.cmd(&format!("migrate tcp:127.0.0.1:{pport}"));
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: failed"), "{out}\n{info}");
    if let Fault::KillAtEnd(_) = fault {
        // The whole final state left the source and no answer came back: the destination
        // might be running the guest, so the source fences itself (stays paused) rather than
        // risk two copies. Once the destination is known dead, `cont` resumes it.
        assert!(info.contains("source stays paused"), "{info}");
        assert!(hmp.cmd("info status").contains("paused"));
        assert_eq!(dst.wait_exit(T), Some(-1), "killed by the test");
        assert!(!dst.seen.iter().any(|l| l.contains("HEARTBEAT")));
        let c = hmp.cmd("cont");
        assert!(c.trim().is_empty(), "cont: {c}");
    }
    assert!(hmp.cmd("info status").contains("running"));
    // The source's guest carries on with every page intact.
    let h1 = src.wait_for("HEARTBEAT", T);
    let h2 = src.wait_for("HEARTBEAT", T);
    assert!(field(&h2, "seq") > field(&h1, "seq"));
    src.send(b"v");
    src.wait_for("LEDGER OK", T);
    // The destination gave up (or was killed) without running the guest.
    let code = dst.wait_exit(T);
    if let Fault::KillAtEnd(_) = fault {
        assert_eq!(code, Some(-1), "killed by the test");
    } else {
        assert_eq!(code, Some(1));
        assert!(dst.stderr.lock().unwrap().contains("incoming migration failed"), "{}", dst.stderr.lock().unwrap());
    }
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

#[test]
fn destination_killed_in_the_final_phase() {
    run_fault("killend", Fault::KillAtEnd(0));
}
