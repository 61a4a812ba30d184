//! The secured channel the migration engine reads and writes: a TLS connection driven by its
//! own pump threads behind a local socket pair, so the engine keeps plain blocking reads and
//! writes (and its poll/spin logic) whatever the record layer does.

use super::*;

/// State shared by a secured channel's handles and its pumps.
struct Shared {
    conn: Mutex<Connection>,
    /// Serialises writes to the TCP stream (records must leave in the order they were sealed).
    wire: Mutex<TcpStream>,
    error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, e: String) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            tracing::warn!("migration channel: {e}");
            *g = Some(e);
        }
    }
}

/// The engine's end of a TLS-secured channel.
pub struct TlsChannel {
    local: UnixStream,
    shared: Arc<Shared>,
    tcp: Arc<TcpStream>,
}

impl TlsChannel {
    fn err(&self, e: std::io::Error) -> std::io::Error {
        match self.shared.error.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(m) => std::io::Error::other(m.clone()),
            None => e,
        }
    }
}

impl Read for TlsChannel {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.local.read(buf) {
            Ok(0) if !buf.is_empty() => match self.link_error() {
                Some(m) => Err(std::io::Error::other(m)),
                None => Ok(0),
            },
            Ok(n) => Ok(n),
            Err(e) => Err(self.err(e)),
        }
    }
}

impl Write for TlsChannel {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.local.write(buf).map_err(|e| self.err(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for TlsChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.local.as_raw_fd()
    }
}

impl Channel for TlsChannel {
    fn try_clone_box(&self) -> std::io::Result<Box<dyn Channel>> {
        Ok(Box::new(TlsChannel { local: self.local.try_clone()?, shared: self.shared.clone(), tcp: self.tcp.clone() }))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.local.set_read_timeout(t)
    }
    fn shutdown(&self) {
        let _ = self.local.shutdown(std::net::Shutdown::Both);
        let _ = self.tcp.shutdown(std::net::Shutdown::Both);
    }
    fn shutdown_read(&self) {
        let _ = self.local.shutdown(std::net::Shutdown::Read);
    }
    fn link_error(&self) -> Option<String> {
        self.shared.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn spin_helps(&self) -> bool {
        false
    }
}

const PUMP_BUF: usize = 256 * 1024;

fn set_buffers(s: &UnixStream) {
    let sz: libc::c_int = 4 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a valid int option on our socket.
        unsafe {
            libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, opt, &sz as *const _ as *const libc::c_void, std::mem::size_of::<libc::c_int>() as u32);
        }
    }
}

/// Starts the two pump threads of an established session.
pub(super) fn pump(mut conn: Connection, tcp: TcpStream) -> Result<TlsChannel> {
    conn.set_buffer_limit(None);
    let (engine, ours) = UnixStream::pair()?;
    set_buffers(&engine);
    set_buffers(&ours);
    let tcp_read = tcp.try_clone()?;
    let tcp_shut = Arc::new(tcp.try_clone()?);
    let shared = Arc::new(Shared { conn: Mutex::new(conn), wire: Mutex::new(tcp), error: Mutex::new(None) });
    // Engine -> network: seal and send.
    let (sh, mut from_engine, shut) = (shared.clone(), ours.try_clone()?, tcp_shut.clone());
    std::thread::Builder::new().name("tls-send".into()).spawn(move || {
        let mut buf = vec![0u8; PUMP_BUF];
        let mut out = Vec::with_capacity(PUMP_BUF + 4096);
        loop {
            let n = match from_engine.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // The engine is done: close the session cleanly.
                    let mut wire = sh.wire.lock().unwrap_or_else(|p| p.into_inner());
                    let mut c = sh.conn.lock().unwrap_or_else(|p| p.into_inner());
                    c.send_close_notify();
                    out.clear();
                    while c.wants_write() && c.write_tls(&mut out).is_ok() {}
                    drop(c);
                    let _ = wire.write_all(&out);
                    let _ = wire.shutdown(std::net::Shutdown::Write);
                    return;
                }
                Ok(n) => n,
            };
            let mut wire = sh.wire.lock().unwrap_or_else(|p| p.into_inner());
            out.clear();
            {
                let mut c = sh.conn.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = c.writer().write_all(&buf[..n]) {
                    sh.fail(format!("TLS: {e}"));
                }
                while c.wants_write() {
                    if c.write_tls(&mut out).is_err() {
                        break;
                    }
                }
            }
            if let Err(e) = wire.write_all(&out) {
                sh.fail(format!("connection: {e}"));
                let _ = from_engine.shutdown(std::net::Shutdown::Both);
                let _ = shut.shutdown(std::net::Shutdown::Both);
                return;
            }
        }
    })?;
    // Network -> engine: open and deliver.
    let (sh, mut to_engine, mut tcp_read, shut) = (shared.clone(), ours, tcp_read, tcp_shut.clone());
    std::thread::Builder::new().name("tls-recv".into()).spawn(move || {
        let mut raw = vec![0u8; PUMP_BUF];
        let mut plain = vec![0u8; PUMP_BUF];
        let mut fill = Vec::with_capacity(PUMP_BUF);
        let stop = |sh: &Shared, to_engine: &UnixStream, why: Option<String>| {
            if let Some(w) = why {
                sh.fail(w);
                let _ = shut.shutdown(std::net::Shutdown::Both);
                let _ = to_engine.shutdown(std::net::Shutdown::Both);
            } else {
                let _ = to_engine.shutdown(std::net::Shutdown::Write);
            }
        };
        loop {
            let n = match tcp_read.read(&mut raw) {
                Ok(0) => return stop(&sh, &to_engine, None),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return stop(&sh, &to_engine, Some(format!("connection: {e}"))),
            };
            fill.clear();
            let mut closed = false;
            let mut failure = None;
            let mut reply = false;
            {
                let mut c = sh.conn.lock().unwrap_or_else(|p| p.into_inner());
                let mut rd = &raw[..n];
                while !rd.is_empty() && failure.is_none() {
                    if let Err(e) = c.read_tls(&mut rd) {
                        failure = Some(format!("TLS: {e}"));
                        break;
                    }
                    if let Err(e) = c.process_new_packets() {
                        failure = Some(format!("TLS: {e} (corrupted or forged record)"));
                        break;
                    }
                    loop {
                        match c.reader().read(&mut plain) {
                            Ok(0) => {
                                closed = true;
                                break;
                            }
                            Ok(k) => fill.extend_from_slice(&plain[..k]),
                            Err(_) => break,
                        }
                    }
                }
                reply = reply || c.wants_write();
            }
            if reply {
                // Alerts and post-handshake messages go out in order with the data.
                let mut wire = sh.wire.lock().unwrap_or_else(|p| p.into_inner());
                let mut out = Vec::new();
                let mut c = sh.conn.lock().unwrap_or_else(|p| p.into_inner());
                while c.wants_write() && c.write_tls(&mut out).is_ok() {}
                drop(c);
                let _ = wire.write_all(&out);
            }
            if !fill.is_empty() && to_engine.write_all(&fill).is_err() {
                // The engine hung up.
                let _ = shut.shutdown(std::net::Shutdown::Read);
                return;
            }
            if failure.is_some() {
                return stop(&sh, &to_engine, failure);
            }
            if closed {
                return stop(&sh, &to_engine, None);
            }
        }
    })?;
    Ok(TlsChannel { local: engine, shared, tcp: tcp_shut })
}
