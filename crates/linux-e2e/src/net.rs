//! The network of the suite: a namespace holding bridge `br0` (10.0.2.2/24) with two taps, one
//! for each end of a migration (two hosts on one segment); the VMs run inside it and the
//! runner's TCP connections to the agent (10.0.2.15) are made from it (a thread enters the
//! namespace with setns; the socket stays there). Removed on drop.

use crate::vm::{field, R};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const GUEST_IP: &str = "10.0.2.15";
pub const TAPS: [&str; 2] = ["e2ea", "e2eb"];

pub struct Lan {
    pub ns: String,
}

fn ip(args: &[&str]) -> R<()> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip (Debian iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Lan {
    pub fn new(tag: &str) -> R<Lan> {
        let ns = format!("gwe2e-{tag}-{}", std::process::id());
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        let lan = Lan { ns };
        let n = lan.ns.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "link", "add", "br0", "type", "bridge", "stp_state", "0"])?;
        for t in TAPS {
            ip(&["-n", n, "tuntap", "add", t, "mode", "tap"])?;
            ip(&["-n", n, "link", "set", t, "master", "br0"])?;
            ip(&["-n", n, "link", "set", t, "up"])?;
        }
        ip(&["-n", n, "addr", "add", "10.0.2.2/24", "dev", "br0"])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;
        Ok(lan)
    }

    /// A TCP connection to the agent, made from inside the namespace.
    pub fn connect(&self, port: u16, timeout: Duration) -> R<Client> {
        let path = format!("/run/netns/{}", self.ns);
        let addr: SocketAddr = format!("{GUEST_IP}:{port}").parse().map_err(|e| format!("{e}"))?;
        let s = std::thread::spawn(move || -> R<TcpStream> {
            let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            // SAFETY: a valid namespace fd; setns changes this thread only.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
            }
            let end = Instant::now() + timeout;
            loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() > end => return Err(format!("connect {addr}: {e}")),
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        })
        .join()
        .map_err(|_| "connect thread panicked".to_string())??;
        Client::new(s)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// A line client of the agent's TCP service.
pub struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
    pub conn: u64,
    /// The last `count` answer.
    pub n: u64,
}

impl Client {
    fn new(s: TcpStream) -> R<Client> {
        let _ = s.set_nodelay(true);
        // Long enough to ride out a migration's downtime and TCP's retransmission back-off.
        s.set_read_timeout(Some(Duration::from_secs(60))).map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut c = Client { w, r: BufReader::new(s), conn: 0, n: 0 };
        let hello = c.line()?;
        c.conn = field(&hello, "conn").ok_or_else(|| format!("greeting: {hello}"))?;
        Ok(c)
    }

    fn line(&mut self) -> R<String> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Err("the agent closed the connection".into()),
            Ok(_) => Ok(l.trim_end().to_string()),
            Err(e) => Err(format!("TCP read: {e}")),
        }
    }

    /// One command, `n` answer lines.
    pub fn ask(&mut self, cmd: &str, n: usize) -> R<Vec<String>> {
        self.w.write_all(format!("{cmd}\n").as_bytes()).map_err(|e| format!("TCP write: {e}"))?;
        (0..n).map(|_| self.line()).collect()
    }

    pub fn ask1(&mut self, cmd: &str) -> R<String> {
        Ok(self.ask(cmd, 1)?.remove(0))
    }

    /// `count`: the answer must be the next number on this same connection.
    pub fn count(&mut self) -> R<()> {
        let l = self.ask1("count")?;
        let want = format!("COUNT conn={} n={}", self.conn, self.n + 1);
        if l != want {
            return Err(format!("expected '{want}', got '{l}'"));
        }
        self.n += 1;
        Ok(())
    }
}

/// Sends `count` on `client` every 20 ms until `stop`; returns the client and the longest gap
/// between two answers (ms), or the first error.
pub fn count_while(mut client: Client, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<R<(Client, u64)>> {
    std::thread::spawn(move || {
        let mut last = Instant::now();
        let mut gap = 0;
        while !stop.load(Ordering::Relaxed) {
            client.count()?;
            gap = gap.max(last.elapsed().as_millis() as u64);
            last = Instant::now();
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((client, gap))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A stand-in for the agent inside the namespace: greeting and `count`.
    fn fake_agent(ns: &str) -> std::thread::JoinHandle<()> {
        let path = format!("/run/netns/{ns}");
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: a valid namespace fd; this thread only.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let l = TcpListener::bind((GUEST_IP, 7777)).unwrap();
            tx.send(()).unwrap();
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            w.write_all(b"AGENT HELLO conn=4\n").unwrap();
            let mut n = 0;
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                n += 1;
                let answer = if line == "count" { format!("COUNT conn=4 n={n}\n") } else { "SKIPPED\n".to_string() };
                let _ = w.write_all(answer.as_bytes());
            }
        });
        rx.recv().unwrap();
        h
    }

    #[test]
    fn a_connection_from_inside_the_namespace_counts() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (network namespaces, taps)");
        let lan = Lan::new("n").unwrap();
        ip(&["-n", &lan.ns, "addr", "add", &format!("{GUEST_IP}/32"), "dev", "lo"]).unwrap();
        let server = fake_agent(&lan.ns);
        let mut c = lan.connect(7777, Duration::from_secs(10)).unwrap();
        assert_eq!(c.conn, 4);
        for _ in 0..3 {
            c.count().unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let t = count_while(c, stop.clone());
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::Relaxed);
        let (mut c, _gap) = t.join().unwrap().unwrap();
        assert!(c.n > 3, "counted on in the background: {}", c.n);
        // A number skipped (the fake counted a line the client did not see as a count) is found.
        assert_eq!(c.ask1("skip").unwrap(), "SKIPPED");
        let e = c.count().unwrap_err();
        assert!(e.contains(&format!("expected 'COUNT conn=4 n={}'", c.n + 1)), "{e}");
        // Closing the connection ends the fake.
        drop(c);
        server.join().unwrap();
    }
}
