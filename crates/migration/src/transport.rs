//! Migration URIs (`tcp:HOST:PORT`, `tcp:0:PORT` = all addresses, `unix:PATH`, `fd:N` = a
//! connected socket the caller owns, outgoing only), connecting,
//! listening (plain or TLS-secured, see [`crate::tls`]), and a bandwidth limiter for
//! `max-bandwidth`.

use crate::tls::TlsSetup;
use crate::{MigrationError, Result};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    Tcp { host: String, port: u16 },
    Unix(String),
    /// An already connected stream socket (the VMM resolved `fd:NAME` to its number and keeps
    /// the descriptor open while the migration runs); each connect takes a duplicate.
    Fd(i32),
}

impl Uri {
    pub fn parse(s: &str) -> Result<Uri> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| MigrationError::Uri(s.into()))?;
            let port: u16 = port.parse().map_err(|_| MigrationError::Uri(s.into()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let host = if host.is_empty() || host == "0" { "0.0.0.0".to_string() } else { host.to_string() };
            Ok(Uri::Tcp { host, port })
        } else if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(MigrationError::Uri(s.into()));
            }
            Ok(Uri::Unix(p.to_string()))
        } else if let Some(n) = s.strip_prefix("fd:") {
            match n.parse::<i32>() {
                Ok(n) if n >= 0 => Ok(Uri::Fd(n)),
                _ => Err(MigrationError::Uri(s.into())),
            }
        } else {
            Err(MigrationError::Uri(s.into()))
        }
    }
}

/// Capacity of the buffered reader in front of an incoming stream. Small on purpose: a read
/// at least this large that finds the buffer empty goes straight from the socket into its
/// destination (guest memory), so page data is copied once, not twice; headers and control
/// records still arrive in batches.
pub const RECV_BUF: usize = 64 << 10;

/// A connected migration channel (both directions).
pub trait Channel: Read + Write + Send + AsRawFd {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Channel>>;
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    fn shutdown(&self);
    /// Ends reads only (a blocked reader sees end of stream); writes still go out.
    fn shutdown_read(&self) {
        self.shutdown()
    }
    /// Why the link under this channel failed, when it is more than a closed socket (a TLS
    /// error): reported instead of a bare end of stream.
    fn link_error(&self) -> Option<String> {
        None
    }
    /// Whether busy-polling this channel can save a wakeup.
    fn spin_helps(&self) -> bool {
        true
    }
    /// A read that never blocks (`WouldBlock` when nothing is there), leaving the socket itself
    /// blocking for the other handles. After `WouldBlock`, polling `as_raw_fd` for input
    /// tells when to try again.
    fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: recv into a buffer we own, on our socket.
        let n = unsafe { libc::recv(self.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// A reader that, when told to, busy-polls a quiet socket for a while before sleeping in the
/// kernel. Waking a sleeping thread costs milliseconds on some (nested) hosts; at the
/// switchover every millisecond is guest downtime, so the two sides spin briefly there.
pub struct SpinReader {
    inner: Box<dyn Channel>,
    spin: Duration,
    timeout: Option<Duration>,
}

impl SpinReader {
    pub fn new(inner: Box<dyn Channel>, timeout: Option<Duration>) -> std::io::Result<Self> {
        Ok(SpinReader { inner, spin: Duration::ZERO, timeout })
    }

    /// Spin up to `d` before blocking, for the following reads (ZERO: never spin; channels
    /// that gain nothing from it never spin).
    pub fn set_spin(&mut self, d: Duration) {
        self.spin = if self.inner.spin_helps() { d } else { Duration::ZERO };
    }
}

impl Read for SpinReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = Instant::now();
        loop {
            match self.inner.try_read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if start.elapsed() < self.spin {
                        std::hint::spin_loop();
                        continue;
                    }
                    let left = match self.timeout {
                        Some(t) => match t.checked_sub(start.elapsed()) {
                            Some(l) => l.as_millis().max(1) as i32,
                            None => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "peer silent")),
                        },
                        None => -1,
                    };
                    let mut p = libc::pollfd { fd: self.inner.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut p, 1, left) };
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) if !buf.is_empty() => {
                    return match self.inner.link_error() {
                        Some(m) => Err(std::io::Error::other(m)),
                        None => Ok(0),
                    }
                }
                r => return r,
            }
        }
    }
}

impl Channel for TcpStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn shutdown_read(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Read);
    }
}

impl Channel for UnixStream {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn shutdown_read(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Read);
    }
}

/// Connects to a destination.
pub fn connect(uri: &Uri) -> Result<Box<dyn Channel>> {
    connect_secure(uri, None)
}

fn no_unix_tls() -> MigrationError {
    MigrationError::Tls("TLS migration needs a tcp: URI (not unix:)".into())
}

/// Connects to a destination, securing the connection with TLS when `tls` is given.
pub fn connect_secure(uri: &Uri, tls: Option<&TlsSetup>) -> Result<Box<dyn Channel>> {
    match uri {
        Uri::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port).to_socket_addrs()?.collect();
            let mut last = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, Duration::from_secs(10)) {
                    Ok(s) => {
                        s.set_nodelay(true)?;
                        return match tls {
                            Some(t) => crate::tls::client(t, s, host)
                                .map_err(|e| MigrationError::Tls(format!("securing the connection to {host}:{port}: {e}"))),
                            None => Ok(Box::new(s)),
                        };
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(MigrationError::Io(last.unwrap_or_else(|| std::io::Error::other("no address"))))
        }
        Uri::Unix(_) if tls.is_some() => Err(no_unix_tls()),
        Uri::Unix(p) => Ok(Box::new(UnixStream::connect(p)?)),
        Uri::Fd(_) if tls.is_some() => Err(MigrationError::Tls("TLS migration needs a tcp: URI (not fd:)".into())),
        Uri::Fd(n) => connect_fd(*n),
    }
}

/// A duplicate of the connected socket `n`, as a unix or TCP stream.
fn connect_fd(n: i32) -> Result<Box<dyn Channel>> {
    use std::os::fd::FromRawFd;
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `domain`.
    let r = unsafe { libc::getsockopt(n, libc::SOL_SOCKET, libc::SO_DOMAIN, (&mut domain as *mut libc::c_int).cast(), &mut len) };
    if r != 0 {
        return Err(MigrationError::Io(std::io::Error::other(format!("fd:{n} is not a socket: {}", std::io::Error::last_os_error()))));
    }
    // SAFETY: duplicating a descriptor the caller keeps open; the duplicate is owned below.
    let fd = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(MigrationError::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh duplicate nobody else owns.
    Ok(if domain == libc::AF_UNIX {
        Box::new(unsafe { UnixStream::from_raw_fd(fd) })
    } else {
        let s = unsafe { TcpStream::from_raw_fd(fd) };
        let _ = s.set_nodelay(true);
        Box::new(s)
    })
}

/// A bound listener waiting for one source.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, String),
}

impl Listener {
    pub fn bind(uri: &Uri) -> Result<Listener> {
        match uri {
            Uri::Tcp { host, port } => Ok(Listener::Tcp(TcpListener::bind((host.as_str(), *port))?)),
            Uri::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Ok(Listener::Unix(UnixListener::bind(p)?, p.clone()))
            }
            Uri::Fd(_) => Err(MigrationError::Io(std::io::Error::other("an incoming migration on fd: is not supported"))),
        }
    }

    /// Waits up to `t` for a peer to connect; false on timeout.
    pub fn wait_readable(&self, t: Duration) -> bool {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, t.as_millis().min(i32::MAX as u128) as i32) > 0 }
    }

    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    /// Accepts exactly one peer.
    pub fn accept(&self) -> Result<Box<dyn Channel>> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Box::new(s))
            }
            Listener::Unix(l, _) => Ok(Box::new(l.accept()?.0)),
        }
    }

    /// Accepts one peer and, when `tls` (asked once the peer is there: parameters may change
    /// while we wait) gives credentials, runs the TLS server handshake. A peer that fails the
    /// handshake gives [`MigrationError::Tls`] (the caller may keep listening).
    pub fn accept_secure(&self, tls: &dyn Fn() -> Result<Option<TlsSetup>>) -> Result<Box<dyn Channel>> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                s.set_nodelay(true)?;
                match tls()? {
                    Some(t) => crate::tls::server(&t, s).map_err(|e| MigrationError::Tls(format!("refused a connection from {peer}: {e}"))),
                    None => Ok(Box::new(s)),
                }
            }
            Listener::Unix(l, _) => {
                let s = l.accept()?.0;
                match tls()? {
                    Some(_) => Err(no_unix_tls()),
                    None => Ok(Box::new(s)),
                }
            }
        }
    }

    /// Accepts until a peer passes the TLS handshake (plain: the first peer), reporting each
    /// refused one on stderr and through `refused`.
    pub fn accept_until_secure(&self, tls: &dyn Fn() -> Result<Option<TlsSetup>>, refused: &dyn Fn(&str)) -> Result<Box<dyn Channel>> {
        loop {
            match self.accept_secure(tls) {
                Err(MigrationError::Tls(m)) if matches!(self, Listener::Tcp(_)) => {
                    eprintln!("godwit: incoming migration: TLS: {m}; still waiting");
                    tracing::warn!("incoming migration: {m}");
                    refused(&m);
                }
                r => return r,
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A writer that never exceeds `limit` bytes per second on average (0 = unlimited), counting
/// what it wrote.
pub struct Limited<W: Write> {
    inner: W,
    pub limit: u64,
    pub written: u64,
    window_start: Instant,
    window_bytes: u64,
}

impl<W: Write> Limited<W> {
    pub fn new(inner: W, limit: u64) -> Self {
        Limited { inner, limit, written: 0, window_start: Instant::now(), window_bytes: 0 }
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    fn throttle(&mut self) {
        if self.limit == 0 {
            return;
        }
        let elapsed = self.window_start.elapsed();
        let allowed = Duration::from_secs_f64(self.window_bytes as f64 / self.limit as f64);
        if allowed > elapsed {
            std::thread::sleep(allowed - elapsed);
        }
        if self.window_start.elapsed() > Duration::from_millis(200) {
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Bound each write so the limiter can pace large buffers.
        let chunk = if self.limit == 0 { buf.len() } else { buf.len().min((self.limit / 50).max(4096) as usize) };
        let n = self.inner.write(&buf[..chunk])?;
        self.written += n as u64;
        self.window_bytes += n as u64;
        self.throttle();
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(Uri::parse("tcp:0:6666").unwrap(), Uri::Tcp { host: "0.0.0.0".into(), port: 6666 });
        assert_eq!(Uri::parse("tcp:127.0.0.1:1").unwrap(), Uri::Tcp { host: "127.0.0.1".into(), port: 1 });
        assert_eq!(Uri::parse("tcp:[::1]:5").unwrap(), Uri::Tcp { host: "::1".into(), port: 5 });
        assert_eq!(Uri::parse("unix:/tmp/x").unwrap(), Uri::Unix("/tmp/x".into()));
        assert_eq!(Uri::parse("fd:3").unwrap(), Uri::Fd(3));
        for bad in ["tcp:host", "tcp:h:99999", "exec:cat", "unix:", "fd:", "fd:-1", "fd:migrate"] {
            assert!(Uri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limiter_counts() {
        let mut l = Limited::new(Vec::new(), 0);
        l.write_all(&[0u8; 10000]).unwrap();
        assert_eq!(l.written, 10000);
    }

    #[test]
    fn fd_uri_connects_through_a_duplicate_of_the_socket() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut c = connect(&Uri::Fd(a.as_raw_fd())).unwrap();
        assert_ne!(c.as_raw_fd(), a.as_raw_fd());
        c.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(connect(&Uri::Fd(f.as_raw_fd())).is_err(), "not a socket");
        assert!(Listener::bind(&Uri::Fd(3)).is_err());
    }
}
