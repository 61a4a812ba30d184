//! A TCP proxy between a migration source and its destination that misbehaves on purpose, for
//! the chaos campaign: after a chosen number of bytes in one direction it truncates the
//! connection, flips a byte, duplicates a chunk, stalls, or slows every chunk down. Each
//! connection the source opens (the main channel, extra channels) goes through it.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the proxy does once `after` bytes have passed in the faulted direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mischief {
    /// Close both connections.
    Truncate,
    /// Invert one byte.
    Flip,
    /// Send one chunk twice.
    Duplicate,
    /// Forward nothing for `ms`, then close (a link that went dark).
    Stall { ms: u64 },
    /// Sleep `ms` before every chunk from then on (a slow, still-working link).
    Delay { ms: u64 },
}

/// Which way the fault applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Source → destination (the migration stream).
    Forward,
    /// Destination → source (the replies).
    Back,
}

#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub mischief: Mischief,
    pub dir: Direction,
    /// Bytes that pass untouched first.
    pub after: u64,
}

/// A running proxy: accepts on `port`, forwards to the destination.
pub struct Proxy {
    pub port: u16,
    /// Set once the fault was applied.
    pub fired: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn start(dest_port: u16, fault: Fault) -> std::io::Result<Proxy> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let fired = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        l.set_nonblocking(true)?;
        let (f2, s2) = (fired.clone(), stop.clone());
        std::thread::spawn(move || {
            // Only the first connection (the main channel) carries the fault.
            let mut first = true;
            while !s2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let Ok(d) = TcpStream::connect(("127.0.0.1", dest_port)) else {
                            continue;
                        };
                        let fault = first.then_some(fault);
                        first = false;
                        pipe_pair(c, d, fault, f2.clone());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Proxy { port, fired, stop })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn pipe_pair(src: TcpStream, dst: TcpStream, fault: Option<Fault>, fired: Arc<AtomicBool>) {
    let (Ok(src2), Ok(dst2)) = (src.try_clone(), dst.try_clone()) else {
        return;
    };
    let fwd = fault.filter(|f| f.dir == Direction::Forward);
    let back = fault.filter(|f| f.dir == Direction::Back);
    let f1 = fired.clone();
    std::thread::spawn(move || pump(src, dst, fwd, f1));
    std::thread::spawn(move || pump(dst2, src2, back, fired));
}

fn pump(mut from: TcpStream, mut to: TcpStream, fault: Option<Fault>, fired: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut passed = 0u64;
    let mut slow: Option<u64> = None;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        if let Some(ms) = slow {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if let Some(f) = fault {
            if !fired.load(Ordering::SeqCst) && passed + n as u64 > f.after {
                fired.store(true, Ordering::SeqCst);
                let at = (f.after.saturating_sub(passed) as usize).min(n - 1);
                match f.mischief {
                    Mischief::Truncate => {
                        let _ = to.write_all(&chunk[..at]);
                        break;
                    }
                    Mischief::Flip => chunk[at] ^= 0xff,
                    Mischief::Duplicate => {
                        if to.write_all(chunk).is_err() {
                            break;
                        }
                    }
                    Mischief::Stall { ms } => {
                        std::thread::sleep(Duration::from_millis(ms));
                        break;
                    }
                    Mischief::Delay { ms } => slow = Some(ms),
                }
            }
        }
        passed += n as u64;
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
