//! The secured channel the migration engine reads and writes: a TLS connection driven in the
//! caller's own thread, straight on the TCP socket.
//!
//! A write seals the caller's bytes into records and sends them; a read takes raw bytes off the
//! socket into a shared buffer, opens the records and copies the plaintext into the caller's
//! buffer. No helper threads and no socket pair in between (an earlier design had both: two
//! extra copies, two extra system calls and a thread wake-up per buffer, which made TLS cost
//! five times plain TCP's CPU per byte; `cargo run --release -p migration --example
//! tls_throughput` measures it).
//!
//! Handles made by `try_clone_box` share one connection, so one thread may read (the return
//! path) while another writes. Locks, always taken in this order: `rx` (the raw bytes and the
//! order they are opened in), `wire` (records leave in the order they were sealed), `conn`
//! (the rustls state, held only for sealing and opening, never across a blocking socket call,
//! so a writer blocked on a full socket never stops a reader and the reverse).

use super::*;
use std::sync::MutexGuard;

/// Raw bytes read off the socket and not yet handed to rustls.
struct Rx {
    raw: Box<[u8]>,
    start: usize,
    end: usize,
}

/// State shared by a secured channel's handles.
struct Shared {
    conn: Mutex<Connection>,
    rx: Mutex<Rx>,
    wire: Mutex<()>,
    tcp: TcpStream,
    error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends every record rustls has queued for the peer to `out`.
fn take_queued(c: &mut Connection, out: &mut Vec<u8>) {
    while c.wants_write() {
        if c.write_tls(out).is_err() {
            break;
        }
    }
}

impl Shared {
    fn fail(&self, e: String) -> std::io::Error {
        let mut g = lock(&self.error);
        if g.is_none() {
            tracing::warn!("migration channel: {e}");
            *g = Some(e.clone());
        }
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
        std::io::Error::other(g.clone().unwrap_or(e))
    }

    fn failed(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    /// Sends what rustls has queued (alerts, post-handshake messages, sealed records).
    /// The caller holds `wire`.
    fn flush_queued(&self, out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        take_queued(&mut lock(&self.conn), out);
        if out.is_empty() {
            return Ok(());
        }
        (&self.tcp).write_all(out).map_err(|e| self.fail(format!("connection: {e}")))
    }

    /// Reads plaintext into `buf`, taking raw bytes off the socket when rustls has none:
    /// blocking (as the socket's read timeout allows) or, with `nonblock`, returning
    /// `WouldBlock` when nothing is there.
    fn read(&self, buf: &mut [u8], nonblock: bool) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        loop {
            let mut got = 0;
            let mut reply = false;
            {
                let mut c = lock(&self.conn);
                loop {
                    match c.reader().read(&mut buf[got..]) {
                        Ok(0) => {
                            // The peer sent close_notify: a clean end of stream.
                            return Ok(got);
                        }
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                            // TCP closed without close_notify. The engine's own framing
                            // says whether the stream was complete.
                            return match self.failed() {
                                Some(m) if got == 0 => Err(std::io::Error::other(m)),
                                _ => Ok(got),
                            };
                        }
                        Err(e) => return Err(e),
                    }
                    if got == buf.len() || rx.start == rx.end {
                        break;
                    }
                    let mut rd = &rx.raw[rx.start..rx.end];
                    let before = rd.len();
                    match c.read_tls(&mut rd) {
                        Ok(_) => {}
                        // Backpressure: the plaintext queue is full; the caller drains it.
                        Err(e) if e.kind() == std::io::ErrorKind::Other && got > 0 => break,
                        Err(e) => {
                            drop(c);
                            return Err(self.fail(format!("TLS: {e}")));
                        }
                    }
                    rx.start += before - rd.len();
                    if let Err(e) = c.process_new_packets() {
                        // rustls queued an alert for the peer: send it, then fail.
                        drop(c);
                        let mut out = Vec::new();
                        {
                            let _w = lock(&self.wire);
                            let _ = self.flush_queued(&mut out);
                        }
                        return Err(self.fail(format!("TLS: {e} (corrupted or forged record)")));
                    }
                    reply |= c.wants_write();
                }
            }
            if reply {
                let _w = lock(&self.wire);
                self.flush_queued(&mut Vec::new())?;
            }
            if got > 0 {
                return Ok(got);
            }
            if let Some(m) = self.failed() {
                return Err(std::io::Error::other(m));
            }
            // Nothing buffered: take more raw bytes off the socket (without the conn lock).
            let Rx { raw, .. } = &mut *rx;
            let n = if nonblock {
                // SAFETY: recv into a buffer we own, on our socket.
                let n = unsafe {
                    libc::recv(self.tcp.as_raw_fd(), raw.as_mut_ptr() as *mut libc::c_void, raw.len(), libc::MSG_DONTWAIT)
                };
                if n < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                n as usize
            } else {
                match (&self.tcp).read(raw) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                // End of the TCP stream: let rustls decide between clean and truncated.
                let mut c = lock(&self.conn);
                let _ = c.read_tls(&mut &[][..]);
                return match c.reader().read(buf) {
                    Ok(n) => Ok(n),
                    Err(_) => match self.failed() {
                        Some(m) => Err(std::io::Error::other(m)),
                        None => Ok(0),
                    },
                };
            }
            rx.start = 0;
            rx.end = n;
        }
    }
}

impl Drop for Shared {
    /// The last handle is gone: end the session with close_notify.
    fn drop(&mut self) {
        if self.failed().is_some() {
            return;
        }
        let mut out = Vec::new();
        {
            let mut c = lock(&self.conn);
            c.send_close_notify();
            take_queued(&mut c, &mut out);
        }
        // Best effort and never blocking: a peer that stopped reading (a hung host) would
        // otherwise hang whoever drops the last handle. No handle is left to share the
        // socket's mode with.
        let _ = self.tcp.set_nonblocking(true);
        let _ = (&self.tcp).write(&out);
        let _ = self.tcp.shutdown(std::net::Shutdown::Write);
    }
}

/// The engine's end of a TLS-secured channel.
pub struct TlsChannel {
    shared: Arc<Shared>,
    /// Sealed records on their way to the socket (reused between writes).
    out: Vec<u8>,
}

impl Read for TlsChannel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.shared.read(buf, false)
    }
}

impl Write for TlsChannel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let sh = &*self.shared;
        if let Some(m) = sh.failed() {
            return Err(std::io::Error::other(m));
        }
        let _w = lock(&sh.wire);
        self.out.clear();
        {
            let mut c = lock(&sh.conn);
            if let Err(e) = c.writer().write_all(buf) {
                drop(c);
                return Err(sh.fail(format!("TLS: {e}")));
            }
            take_queued(&mut c, &mut self.out);
        }
        (&sh.tcp).write_all(&self.out).map_err(|e| sh.fail(format!("connection: {e}")))?;
        if self.out.capacity() > 8 << 20 {
            self.out = Vec::new();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for TlsChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.shared.tcp.as_raw_fd()
    }
}

impl Channel for TlsChannel {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(TlsChannel { shared: self.shared.clone(), out: Vec::new() }))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.shared.tcp.set_read_timeout(t)
    }
    fn shutdown(&self) {
        let _ = self.shared.tcp.shutdown(std::net::Shutdown::Both);
    }
    fn shutdown_read(&self) {
        let _ = self.shared.tcp.shutdown(std::net::Shutdown::Read);
    }
    fn link_error(&self) -> Option<String> {
        self.shared.failed()
    }
    fn try_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.shared.read(buf, true)
    }
}

/// Size of the raw receive buffer: many records per system call.
const RAW_BUF: usize = 256 * 1024;

/// Wraps an established session as a channel.
pub(super) fn pump(mut conn: Connection, tcp: TcpStream) -> Result<TlsChannel> {
    conn.set_buffer_limit(None);
    tracing::debug!(suite = ?conn.negotiated_cipher_suite().map(|s| s.suite()), "TLS migration channel");
    let _ = tcp.set_nodelay(true);
    let rx = Rx { raw: vec![0u8; RAW_BUF].into_boxed_slice(), start: 0, end: 0 };
    let shared = Arc::new(Shared { conn: Mutex::new(conn), rx: Mutex::new(rx), wire: Mutex::new(()), tcp, error: Mutex::new(None) });
    Ok(TlsChannel { shared, out: Vec::with_capacity(1 << 20) })
}
