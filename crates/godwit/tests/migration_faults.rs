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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Forward the whole stream, END included, but lose every reply after it (RUNNING): the
    /// destination runs the guest and the source never hears of it.
    LoseRunning,
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
        // Replies flow back untouched, except after END with LoseRunning.
        let end_passed = Arc::new(AtomicBool::new(false));
        let end_seen = end_passed.clone();
        std::thread::spawn(move || {
            let mut r = [0u8; 4096];
            loop {
                let n = match b2.read(&mut r) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if end_seen.load(Ordering::SeqCst) {
                    let _ = a2.shutdown(std::net::Shutdown::Both);
                    break;
                }
                if a2.write_all(&r[..n]).is_err() {
                    break;
                }
            }
        });
        let mut end_done = false;
        let mut buf = vec![0u8; 64 * 1024];
        let mut off = 0u64;
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match a.read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    // Quiet source: the held bytes (at most 12, one less than an END record,
                    // which is written in one piece) were not an END after all. Holding them
                    // would stall a source that waits for an answer to them.
                    if !tail.is_empty() {
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
            if matches!(fault, Fault::KillAtEnd(_) | Fault::LoseRunning) && !end_done {
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
                if is_end && matches!(fault, Fault::LoseRunning) {
                    // The replies from here on are lost; the END itself goes through.
                    end_passed.store(true, Ordering::SeqCst);
                    if b.write_all(&data).is_err() {
                        break;
                    }
                    off += data.len() as u64;
                    end_done = true;
                    a.set_read_timeout(None).ok();
                    continue;
                }
                if let (true, Fault::KillAtEnd(pid)) = (is_end, fault) {
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
    let (mut dst, mut src, mut hmp, dport) = loopback_pair(name, "mode=dirty mib=64 rate=20 hb_ms=100 cpus=1");
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

/// The destination got everything and runs the guest, but its RUNNING answer is lost. With no
/// disk (so no lock to stop a second writer) the source must still not resume: it fences
/// itself, and exactly one copy runs. Found by thinking through the chaos campaign's
/// reply-truncation faults; this is the named regression test for the fence.
#[test]
fn lost_running_answer_fences_the_source_without_a_disk() {
    let (mut dst, mut src, mut hmp, dport) = loopback_pair("lose-running", "mode=dirty mib=32 rate=20 hb_ms=50 cpus=1");
    src.wait_for("HEARTBEAT", T);
    let (pport, _) = proxy(dport, Fault::LoseRunning);
    hmp.cmd(&format!("migrate tcp:127.0.0.1:{pport}"));
    let info = hmp.wait_migration(T);
    assert!(info.contains("Migration status: failed") && info.contains("source stays paused"), "{info}");
    assert!(hmp.cmd("info status").contains("paused"));
    // The destination runs the guest with every page.
    dst.wait_for("HEARTBEAT", T);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    // The source does not: once what it printed before the switchover is read, nothing new.
    src.collect_for(Duration::from_millis(500));
    let before = seqs(&src.seen).into_iter().max();
    src.collect_for(Duration::from_millis(600));
    let after = seqs(&src.seen).into_iter().max();
    assert!(hmp.cmd("info status").contains("paused"));
    assert_eq!(after, before, "the source ran again");
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
}
