//! Transports: an HMP or QMP conversation over any byte streams ([`run_hmp_stream`],
//! [`run_qmp_stream`]), and [`MonitorServer`], which listens on a unix or TCP socket and runs
//! one conversation per client on a thread of its own.
//!
//! Isolation rules: a client's garbage, over-long lines, slowness or disconnection only ever
//! affect that client. QMP replies and events go through a per-client writer thread fed by a
//! bounded queue; the event bus never blocks on it (a client that lets its queue fill up is
//! disconnected), so a long command on one client never delays events to another.

use crate::chardev::ChardevSpec;
use crate::error::MonitorError;
use crate::events::{Delivery, EventRecord};
use crate::flush::Pending;
use crate::hmp::{self, HmpSession, LineEditor, LineEvent};
use crate::monitor::Monitor;
use crate::qmp::{JsonStreamer, QmpSession};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Which front end a transport speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Hmp,
    Qmp,
}

/// Limits of a transport.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Longest HMP line / QMP message, in bytes.
    pub max_line: usize,
    /// Most clients connected at once to one server; more are told so and closed.
    pub max_clients: usize,
    /// Replies and events queued for one QMP client before it counts as stuck.
    pub queue: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_line: hmp::MAX_LINE,
            max_clients: 64,
            queue: 1024,
        }
    }
}

/// Runs an HMP conversation: banner, prompt, one command per line, until EOF. `echo` is for
/// raw terminals (typed characters are echoed and backspace edits the line).
pub fn run_hmp_stream(
    monitor: Arc<Monitor>,
    input: &mut dyn Read,
    output: &mut dyn Write,
    echo: bool,
    max_line: usize,
) -> io::Result<()> {
    let mut session = HmpSession::new(monitor.clone(), true);
    let mut editor = LineEditor::new(max_line, echo);
    output.write_all(hmp::banner(&monitor).as_bytes())?;
    output.write_all(hmp::PROMPT.as_bytes())?;
    output.flush()?;
    let mut buf = vec![0u8; 8192];
    let (mut events, mut echo_bytes) = (Vec::new(), Vec::new());
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        editor.feed(&buf[..n], &mut events, &mut echo_bytes);
        if !echo_bytes.is_empty() {
            output.write_all(&echo_bytes)?;
            echo_bytes.clear();
        }
        for ev in events.drain(..) {
            match ev {
                LineEvent::Line(line) => session.execute_line(&line, output)?,
                LineEvent::TooLong => hmp::write_crlf(
                    output,
                    &format!("line too long (more than {max_line} bytes), ignored\n"),
                )?,
            }
            output.write_all(hmp::PROMPT.as_bytes())?;
        }
        output.flush()?;
    }
}

enum Outgoing {
    Line(Vec<u8>),
    /// A command's reply; its [`Pending`] was taken before the command ran.
    Reply(Vec<u8>, Pending),
    Event(Arc<EventRecord>, Pending),
}

fn json_line(v: &serde_json::Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.extend_from_slice(b"\r\n");
    line
}

/// Runs a QMP conversation until EOF: greeting, then one reply per input message, and events
/// once negotiated. `output` is written by a separate thread; `closer`, when given, must make
/// `input` return EOF (e.g. shut the socket down) — it is called when the client is stuck or
/// its output failed.
pub fn run_qmp_stream(
    monitor: Arc<Monitor>,
    input: &mut dyn Read,
    mut output: Box<dyn Write + Send>,
    closer: Option<Arc<dyn Fn() + Send + Sync>>,
    opts: ServeOptions,
) -> io::Result<()> {
    let mut session = QmpSession::new(monitor.clone());
    let (tx, rx) = mpsc::sync_channel::<Outgoing>(opts.queue.max(1));
    let writer_closer = closer.clone();
    let writer = std::thread::Builder::new()
        .name("qmp-writer".into())
        .spawn(move || {
            for msg in rx {
                // The pending mark goes once the bytes are written (end of this iteration).
                let (bytes, _sent) = match msg {
                    Outgoing::Line(b) => (b, None),
                    Outgoing::Reply(b, p) => (b, Some(p)),
                    Outgoing::Event(rec, p) => (json_line(&rec.to_json()), Some(p)),
                };
                if output
                    .write_all(&bytes)
                    .and_then(|()| output.flush())
                    .is_err()
                {
                    if let Some(c) = &writer_closer {
                        c();
                    }
                    return;
                }
            }
        })?;
    let mut subscription = None;
    let result = (|| -> io::Result<()> {
        if tx
            .send(Outgoing::Line(json_line(&session.greeting())))
            .is_err()
        {
            return Ok(());
        }
        let mut streamer = JsonStreamer::new(opts.max_line);
        let mut buf = vec![0u8; 8192];
        let mut items = Vec::new();
        loop {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                streamer.finish(&mut items);
            } else {
                streamer.feed(&buf[..n], &mut items);
            }
            for item in items.drain(..) {
                // Counted from before the command runs (`quit` ends the process once it is sent).
                let pending = Pending::new();
                let reply = Outgoing::Reply(json_line(&session.handle(item)), pending);
                let reply = if session.is_negotiated() && subscription.is_none() {
                    // Subscribe and queue the reply atomically: the reply comes first, and no
                    // event emitted after it is missed.
                    let etx = tx.clone();
                    let ecloser = closer.clone();
                    let (id, queued) = monitor.events().subscribe_fn_then(
                        move |rec| match etx.try_send(Outgoing::Event(rec.clone(), Pending::new())) {
                            Ok(()) => Delivery::Keep,
                            Err(TrySendError::Full(_)) => {
                                tracing::warn!(
                                    "QMP client does not read its events; disconnecting it"
                                );
                                if let Some(c) = &ecloser {
                                    c();
                                }
                                Delivery::Drop
                            }
                            Err(TrySendError::Disconnected(_)) => Delivery::Drop,
                        },
                        || tx.try_send(reply),
                    );
                    subscription = Some(id);
                    match queued {
                        Ok(()) => None,
                        Err(TrySendError::Full(r)) => Some(r), // queue full: send it blocking below
                        Err(TrySendError::Disconnected(_)) => return Ok(()),
                    }
                } else {
                    Some(reply)
                };
                if let Some(reply) = reply {
                    if tx.send(reply).is_err() {
                        return Ok(()); // writer gone: the client cannot hear us any more
                    }
                }
            }
            if n == 0 {
                return Ok(());
            }
        }
    })();
    if let Some(id) = subscription {
        monitor.events().unsubscribe(id);
    }
    drop(tx);
    let _ = writer.join();
    result
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// A connected client socket.
trait Conn: Read + Write + Send + 'static {
    fn clone_conn(&self) -> io::Result<Box<dyn Conn>>;
    fn shutdown_conn(&self);
}

impl Conn for TcpStream {
    fn clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Conn for UnixStream {
    fn clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown_conn(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
}

impl Conn for crate::hostinfo::FdConn {
    fn clone_conn(&self) -> io::Result<Box<dyn Conn>> {
        Ok(Box::new(self.0.try_clone()?))
    }
    fn shutdown_conn(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener, bool),
}

impl Listener {
    fn accept(&self) -> io::Result<Box<dyn Conn>> {
        match self {
            Listener::Unix(l) => Ok(Box::new(crate::hostinfo::FdConn(l.accept()?.0))),
            Listener::Tcp(l, nodelay) => {
                let (s, _) = l.accept()?;
                if *nodelay {
                    let _ = s.set_nodelay(true);
                }
                Ok(Box::new(s))
            }
        }
    }
}

type Clients = Arc<Mutex<HashMap<u64, Box<dyn Conn>>>>;

/// A listening monitor socket. Dropping it (or [`shutdown`](Self::shutdown)) stops accepting,
/// disconnects its clients and removes the unix socket file; keep it alive as long as the VM.
pub struct MonitorServer {
    addr: ListenAddr,
    stop: Arc<AtomicBool>,
    clients: Clients,
    accept_thread: Option<JoinHandle<()>>,
    /// The listening socket (owned by the accept thread until it returns): `shutdown(2)` on
    /// it wakes the blocked `accept()` even when the socket's path is gone.
    listen_fd: std::os::fd::RawFd,
    /// Remove the unix socket file at shutdown (not for an inherited descriptor).
    unlink: bool,
}

impl MonitorServer {
    /// Listens on `spec` (a `unix:` or `tcp:` spec in server mode) and serves `protocol`.
    /// With `wait` in the spec (QEMU's default for `server`), returns only once the first
    /// client has connected.
    pub fn start(
        monitor: Arc<Monitor>,
        spec: &ChardevSpec,
        protocol: Protocol,
        opts: ServeOptions,
    ) -> Result<MonitorServer, MonitorError> {
        let listen_err = |source| MonitorError::Listen {
            what: spec.to_string(),
            source,
        };
        let (listener, addr, wait) = match spec {
            ChardevSpec::Unix {
                path,
                server: true,
                wait,
            } => {
                remove_stale_socket(path).map_err(listen_err)?;
                let l = UnixListener::bind(path).map_err(listen_err)?;
                (Listener::Unix(l), ListenAddr::Unix(path.clone()), *wait)
            }
            ChardevSpec::Tcp {
                host,
                port,
                server: true,
                wait,
                nodelay,
            } => {
                let host = if host.is_empty() {
                    "0.0.0.0"
                } else {
                    host.as_str()
                };
                let addrs: Vec<SocketAddr> = (host, *port)
                    .to_socket_addrs()
                    .map_err(listen_err)?
                    .collect();
                let l = TcpListener::bind(&addrs[..]).map_err(listen_err)?;
                let local = l.local_addr().map_err(listen_err)?;
                (Listener::Tcp(l, *nodelay), ListenAddr::Tcp(local), *wait)
            }
            other => {
                return Err(MonitorError::BadChardev {
                    spec: other.to_string(),
                    reason: "a monitor socket needs a unix: or tcp: spec with ',server'".into(),
                })
            }
        };
        Self::serve(monitor, listener, addr, wait, protocol, opts, spec, true)
    }

    /// Serves `protocol` on a unix socket that is already listening: a descriptor inherited
    /// from the parent process, as libvirt passes `-chardev socket,id=..,fd=N,server=on`. The
    /// socket file belongs to whoever bound it and is left in place at shutdown.
    pub fn from_unix_listener(
        monitor: Arc<Monitor>,
        listener: UnixListener,
        protocol: Protocol,
        opts: ServeOptions,
    ) -> Result<MonitorServer, MonitorError> {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(PathBuf::from))
            .ok_or_else(|| MonitorError::BadChardev {
                spec: "fd".into(),
                reason: "the inherited socket is not bound to a path".into(),
            })?;
        let spec = ChardevSpec::Unix { path: path.clone(), server: true, wait: false };
        Self::serve(monitor, Listener::Unix(listener), ListenAddr::Unix(path), false, protocol, opts, &spec, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn serve(
        monitor: Arc<Monitor>,
        listener: Listener,
        addr: ListenAddr,
        wait: bool,
        protocol: Protocol,
        opts: ServeOptions,
        spec: &ChardevSpec,
        unlink: bool,
    ) -> Result<MonitorServer, MonitorError> {
        let listen_err = |source| MonitorError::Listen {
            what: spec.to_string(),
            source,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Clients = Arc::new(Mutex::new(HashMap::new()));
        let next_id = Arc::new(AtomicU64::new(0));
        let ctx = ClientCtx {
            monitor,
            protocol,
            opts,
            clients: clients.clone(),
            next_id,
        };
        let first = if wait {
            eprintln!("godwit: waiting for connection on: disconnected:{spec}");
            Some(listener.accept().map_err(listen_err)?)
        } else {
            None
        };
        if let Some(conn) = first {
            ctx.spawn_client(conn);
        }
        let stop2 = stop.clone();
        let listen_fd = match &listener {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l, _) => l.as_raw_fd(),
        };
        let accept_thread = std::thread::Builder::new()
            .name("monitor-accept".into())
            .spawn(move || accept_loop(listener, ctx, stop2))
            .map_err(|source| MonitorError::Io {
                what: "spawning the accept thread".into(),
                source,
            })?;
        Ok(MonitorServer {
            addr,
            stop,
            clients,
            accept_thread: Some(accept_thread),
            listen_fd,
            unlink,
        })
    }

    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Clients connected right now.
    pub fn client_count(&self) -> usize {
        self.clients.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Stops accepting, disconnects every client, removes the socket file.
    pub fn shutdown(&mut self) {
        if self.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the blocking accept(): on Linux, shutting a listening socket down makes
        // accept() fail (EINVAL), whether or not its path still exists (a socket file removed
        // by someone else must not make `quit` hang; the former wake-up by connecting to the
        // path did). The socket is still open: the accept thread holds it until it returns,
        // and it returns only after this.
        // SAFETY: shutdown(2) on a descriptor this server owns; it changes no memory.
        unsafe { libc::shutdown(self.listen_fd, libc::SHUT_RDWR) };
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        if let Ok(clients) = self.clients.lock() {
            for c in clients.values() {
                c.shutdown_conn();
            }
        }
        if let (ListenAddr::Unix(p), true) = (&self.addr, self.unlink) {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for MonitorServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes a socket file left by an earlier run (as QEMU does); refuses to touch anything that
/// is not a socket.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

struct ClientCtx {
    monitor: Arc<Monitor>,
    protocol: Protocol,
    opts: ServeOptions,
    clients: Clients,
    next_id: Arc<AtomicU64>,
}

fn accept_loop(listener: Listener, ctx: ClientCtx, stop: Arc<AtomicBool>) {
    loop {
        let conn = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match conn {
            Ok(conn) => ctx.spawn_client(conn),
            Err(e) => {
                tracing::warn!("monitor accept failed: {e}");
                // Back off a little on persistent errors (e.g. out of file descriptors).
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

impl ClientCtx {
    fn spawn_client(&self, mut conn: Box<dyn Conn>) {
        let count = self.clients.lock().map(|c| c.len()).unwrap_or(usize::MAX);
        if count >= self.opts.max_clients {
            let _ = conn.write_all(b"too many monitor clients connected\r\n");
            conn.shutdown_conn();
            return;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Ok(handle) = conn.clone_conn() else {
            return;
        };
        if let Ok(mut c) = self.clients.lock() {
            c.insert(id, handle);
        }
        let (monitor, protocol, opts, clients) = (
            self.monitor.clone(),
            self.protocol,
            self.opts,
            self.clients.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("monitor-client-{id}"))
            .spawn(move || {
                let r = serve_client(monitor, conn, protocol, opts);
                if let Err(e) = r {
                    tracing::debug!("monitor client {id} ended: {e}");
                }
                if let Ok(mut c) = clients.lock() {
                    if let Some(h) = c.remove(&id) {
                        h.shutdown_conn();
                    }
                }
            });
        if spawned.is_err() {
            if let Ok(mut c) = self.clients.lock() {
                if let Some(h) = c.remove(&id) {
                    h.shutdown_conn();
                }
            }
        }
    }
}

fn serve_client(
    monitor: Arc<Monitor>,
    mut conn: Box<dyn Conn>,
    protocol: Protocol,
    opts: ServeOptions,
) -> io::Result<()> {
    match protocol {
        Protocol::Hmp => {
            let mut out = conn.clone_conn()?;
            run_hmp_stream(monitor, &mut conn, &mut out, false, opts.max_line)
        }
        Protocol::Qmp => {
            let out = conn.clone_conn()?;
            let shut = Mutex::new(conn.clone_conn()?);
            let closer: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
                if let Ok(c) = shut.lock() {
                    c.shutdown_conn();
                }
            });
            run_qmp_stream(monitor, &mut conn, Box::new(out), Some(closer), opts)
        }
    }
}
