//! The NBD server: a listener thread, one thread per client connection, fixed newstyle
//! negotiation and the transmission phase over named exports of block backends.
//!
//! Requests of one connection are served in order; several connections (`CAN_MULTI_CONN`)
//! share the export's backend through its mutex, so a flush on one covers the writes of all.
//! [`NbdServer::stop`] (or dropping the server) closes the listener and every connection.

use crate::error::{Error, IoCtx, Result};
use crate::proto::*;
use qcow2::BlockBackend;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A block backend shared between the VMM and the server's connections.
pub type SharedBackend = Arc<Mutex<Box<dyn BlockBackend>>>;

/// One named export.
#[derive(Clone)]
pub struct Export {
    /// The name clients ask for (`nbd://host:port/NAME`).
    pub name: String,
    /// Free text shown by `nbdinfo` (`NBD_INFO_DESCRIPTION`); may be empty.
    pub description: String,
    /// The disk.
    pub backend: SharedBackend,
    /// Whether clients may write (otherwise the export is read-only).
    pub writable: bool,
}

/// Most negotiation options one client may send before it must pick an export.
const MAX_OPTIONS: usize = 256;
/// Most concurrent client connections.
pub const MAX_CONNECTIONS: usize = 64;
/// Most extents in one `BLOCK_STATUS` reply.
const MAX_EXTENTS: usize = 64 * 1024;
/// Meta context id of `base:allocation`.
const CTX_BASE_ALLOCATION: u32 = 1;

struct Inner {
    exports: Mutex<BTreeMap<String, Export>>,
    conns: Mutex<BTreeMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running NBD server.
pub struct NbdServer {
    inner: Arc<Inner>,
    listener: TcpListener,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Listens on `addr` (e.g. `"0.0.0.0:10809"`, `"[::]:0"`) and serves in the background.
    pub fn bind(addr: impl ToSocketAddrs) -> Result<NbdServer> {
        let listener = TcpListener::bind(addr).ctx("binding the NBD server socket")?;
        let addr = listener.local_addr().ctx("querying the NBD server address")?;
        let inner = Arc::new(Inner {
            exports: Mutex::new(BTreeMap::new()),
            conns: Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        });
        let l = listener.try_clone().ctx("cloning the NBD server socket")?;
        let i = inner.clone();
        let accept = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(l, i))
            .ctx("starting the NBD accept thread")?;
        Ok(NbdServer { inner, listener, addr, accept: Some(accept) })
    }

    /// The address actually bound (port 0 → the chosen port).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds an export; names are unique.
    pub fn add_export(&self, export: Export) -> Result<()> {
        if export.name.len() > MAX_STRING {
            return Err(Error::InvalidArgument(format!("export name longer than {MAX_STRING} bytes")));
        }
        let mut ex = lock(&self.inner.exports);
        if ex.contains_key(&export.name) {
            return Err(Error::InvalidArgument(format!("NBD server already has an export named '{}'", export.name)));
        }
        ex.insert(export.name.clone(), export);
        Ok(())
    }

    /// Removes an export (connections already using it keep it until they disconnect).
    pub fn remove_export(&self, name: &str) -> Result<()> {
        match lock(&self.inner.exports).remove(name) {
            Some(_) => Ok(()),
            None => Err(Error::InvalidArgument(format!("Export '{name}' is not found"))),
        }
    }

    /// Names of the exports.
    pub fn export_names(&self) -> Vec<String> {
        lock(&self.inner.exports).keys().cloned().collect()
    }

    /// Number of client connections open now.
    pub fn connections(&self) -> usize {
        lock(&self.inner.conns).len()
    }

    /// Stops listening and closes every client connection.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a listening socket we own wakes the blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, c) in std::mem::take(&mut *lock(&self.inner.conns)) {
            let _ = c.shutdown(Shutdown::Both);
        }
        lock(&self.inner.exports).clear();
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let (stream, _) = match listener.accept() {
            Ok(s) => s,
            Err(_) if inner.stopping.load(Ordering::SeqCst) => return,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let id = inner.next_conn.fetch_add(1, Ordering::SeqCst);
        {
            let mut conns = lock(&inner.conns);
            if conns.len() >= MAX_CONNECTIONS {
                continue; // dropped: closed
            }
            match stream.try_clone() {
                Ok(c) => conns.insert(id, c),
                Err(_) => continue,
            };
        }
        let _ = stream.set_nodelay(true);
        let i = inner.clone();
        let spawned = std::thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || {
            let _ = serve(stream, &i);
            lock(&i.conns).remove(&id);
        });
        if spawned.is_err() {
            lock(&inner.conns).remove(&id);
        }
    }
}

/// What negotiation settled.
struct Session {
    export: Export,
    structured: bool,
    base_allocation: bool,
}

fn serve(mut s: TcpStream, inner: &Inner) -> Result<()> {
    match negotiate(&mut s, inner)? {
        Some(sess) => transmission(&mut s, sess),
        None => Ok(()),
    }
}

fn read_exact(s: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    s.read_exact(buf).ctx("reading from the NBD client")
}

fn write_all(s: &mut TcpStream, buf: &[u8]) -> Result<()> {
    s.write_all(buf).ctx("writing to the NBD client")
}

fn reply(s: &mut TcpStream, option: u32, ty: u32, data: &[u8]) -> Result<()> {
    let mut b = option_reply_header(option, ty, data.len() as u32).to_vec();
    b.extend_from_slice(data);
    write_all(s, &b)
}

fn export_flags(e: &Export, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN;
    if structured {
        f |= TF_SEND_DF;
    }
    if e.writable {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    } else {
        f |= TF_READ_ONLY;
    }
    f
}

fn find_export(inner: &Inner, name: &str) -> Option<Export> {
    let ex = lock(&inner.exports);
    match ex.get(name) {
        Some(e) => Some(e.clone()),
        // The empty name is the default export when there is exactly one.
        None if name.is_empty() && ex.len() == 1 => ex.values().next().cloned(),
        None => None,
    }
}

fn export_size(e: &Export) -> u64 {
    lock(&e.backend).size()
}

/// Fixed newstyle negotiation. `None`: the client left (`NBD_OPT_ABORT`).
fn negotiate(s: &mut TcpStream, inner: &Inner) -> Result<Option<Session>> {
    let mut greet = Vec::with_capacity(18);
    greet.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greet.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greet.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    write_all(s, &greet)?;
    let mut cf = [0u8; 4];
    read_exact(s, &mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(Error::Protocol(format!("unknown client flags {cflags:#x}")));
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = false;
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; 16];
        read_exact(s, &mut h)?;
        let h = parse_option_header(&h)?;
        if h.len > MAX_OPTION_LEN {
            // The payload cannot be skipped cheaply and honestly: refuse and hang up.
            let _ = reply(s, h.option, REP_ERR_TOO_BIG, b"option payload too large");
            return Err(Error::Protocol(format!("option {} with {} bytes of payload", h.option, h.len)));
        }
        let mut data = vec![0u8; h.len as usize];
        read_exact(s, &mut data)?;
        match h.option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = find_export(inner, &name) else {
                    return Err(Error::Protocol(format!("client asked for unknown export '{name}'")));
                };
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export_size(&export).to_be_bytes());
                b.extend_from_slice(&export_flags(&export, structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                write_all(s, &b)?;
                return Ok(Some(Session { export, structured, base_allocation }));
            }
            OPT_ABORT => {
                let _ = reply(s, h.option, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(s, h.option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                    continue;
                }
                let names: Vec<String> = lock(&inner.exports).keys().cloned().collect();
                for n in names {
                    let mut d = Vec::new();
                    put_string(&mut d, &n);
                    reply(s, h.option, REP_SERVER, &d)?;
                }
                reply(s, h.option, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(s, h.option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else {
                    structured = true;
                    reply(s, h.option, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                let req = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(s, h.option, REP_ERR_INVALID, e.to_string().as_bytes())?;
                        continue;
                    }
                };
                let Some(export) = find_export(inner, &req.name) else {
                    reply(s, h.option, REP_ERR_UNKNOWN, format!("export '{}' not present", req.name).as_bytes())?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export_size(&export).to_be_bytes());
                info.extend_from_slice(&export_flags(&export, structured).to_be_bytes());
                reply(s, h.option, REP_INFO, &info)?;
                if req.items.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(export.name.as_bytes());
                    reply(s, h.option, REP_INFO, &d)?;
                }
                if req.items.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(export.description.as_bytes());
                    reply(s, h.option, REP_INFO, &d)?;
                }
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                reply(s, h.option, REP_INFO, &bs)?;
                reply(s, h.option, REP_ACK, &[])?;
                if h.option == OPT_GO {
                    return Ok(Some(Session { export, structured, base_allocation }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                if !structured {
                    reply(s, h.option, REP_ERR_INVALID, b"structured replies were not negotiated")?;
                    continue;
                }
                let req = match parse_meta_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(s, h.option, REP_ERR_INVALID, e.to_string().as_bytes())?;
                        continue;
                    }
                };
                if find_export(inner, &req.export).is_none() {
                    reply(s, h.option, REP_ERR_UNKNOWN, format!("export '{}' not present", req.export).as_bytes())?;
                    continue;
                }
                let set = h.option == OPT_SET_META_CONTEXT;
                let wanted = if set {
                    req.queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    req.queries.is_empty() || req.queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
                };
                if set {
                    base_allocation = wanted;
                }
                if wanted {
                    let mut d = CTX_BASE_ALLOCATION.to_be_bytes().to_vec();
                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    reply(s, h.option, REP_META_CONTEXT, &d)?;
                }
                reply(s, h.option, REP_ACK, &[])?;
            }
            OPT_STARTTLS => reply(s, h.option, REP_ERR_POLICY, b"TLS is not supported by this server")?,
            other => reply(s, other, REP_ERR_UNSUP, &[])?,
        }
    }
    Err(Error::Protocol(format!("more than {MAX_OPTIONS} options without choosing an export")))
}

/// The NBD error number for a backend failure.
fn errno_of(e: &qcow2::Error) -> u32 {
    match e {
        qcow2::Error::ReadOnly => EPERM,
        qcow2::Error::InvalidArgument(_) => EINVAL,
        e if e.is_no_space() => ENOSPC,
        _ => EIO,
    }
}

fn send_done(s: &mut TcpStream, sess: &Session, handle: u64, error: u32) -> Result<()> {
    if !sess.structured {
        return write_all(s, &simple_reply(error, handle));
    }
    if error == 0 {
        return write_all(s, &structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0));
    }
    let mut b = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6).to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    write_all(s, &b)
}

fn transmission(s: &mut TcpStream, sess: Session) -> Result<()> {
    let size = export_size(&sess.export);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut hb = [0u8; REQUEST_LEN];
        match s.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(Error::Io { context: "reading an NBD request", source: e }),
        }
        let r = parse_request(&hb)?;
        let in_range = r.offset.checked_add(r.len as u64).is_some_and(|e| e <= size);
        if r.cmd == CMD_WRITE {
            if r.len > MAX_PAYLOAD {
                send_done(s, &sess, r.handle, EOVERFLOW)?;
                return Err(Error::Protocol(format!("write of {} bytes (at most {MAX_PAYLOAD})", r.len)));
            }
            buf.resize(r.len as usize, 0);
            read_exact(s, &mut buf)?;
        }
        let result: std::result::Result<(), u32> = match r.cmd {
            CMD_DISC => return Ok(()),
            CMD_READ => {
                if r.len > MAX_PAYLOAD {
                    Err(EOVERFLOW)
                } else if !in_range {
                    Err(EINVAL)
                } else {
                    buf.resize(r.len as usize, 0);
                    match lock(&sess.export.backend).read_at(r.offset, &mut buf) {
                        Ok(()) => {
                            let mut out;
                            if sess.structured {
                                let plen = 8 + r.len;
                                out = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.handle, plen).to_vec();
                                out.extend_from_slice(&r.offset.to_be_bytes());
                            } else {
                                out = simple_reply(0, r.handle).to_vec();
                            }
                            out.extend_from_slice(&buf);
                            write_all(s, &out)?;
                            continue;
                        }
                        Err(e) => Err(errno_of(&e)),
                    }
                }
            }
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if !sess.export.writable => Err(EPERM),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if !in_range => Err(if r.offset > size { EINVAL } else { ENOSPC }),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
                let mut b = lock(&sess.export.backend);
                let res = match r.cmd {
                    CMD_WRITE => b.write_at(r.offset, &buf),
                    CMD_TRIM => b.discard(r.offset, r.len as u64),
                    _ if r.flags & CMD_FLAG_NO_HOLE != 0 => write_zero_data(&mut **b, r.offset, r.len as u64),
                    _ => b.write_zeroes(r.offset, r.len as u64),
                };
                let res = res.and_then(|()| if r.flags & CMD_FLAG_FUA != 0 { b.flush() } else { Ok(()) });
                res.map_err(|e| errno_of(&e))
            }
            CMD_FLUSH => lock(&sess.export.backend).flush().map_err(|e| errno_of(&e)),
            CMD_CACHE => if in_range { Ok(()) } else { Err(EINVAL) },
            CMD_BLOCK_STATUS => {
                if !sess.base_allocation || !sess.structured || r.len == 0 || r.offset >= size {
                    Err(EINVAL)
                } else {
                    let end = r.offset.saturating_add(r.len as u64).min(size);
                    match block_status(&sess.export, r.offset, end, r.flags & CMD_FLAG_REQ_ONE != 0) {
                        Ok(ext) => {
                            let plen = 4 + 8 * ext.len() as u32;
                            let mut out = structured_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, r.handle, plen).to_vec();
                            out.extend_from_slice(&CTX_BASE_ALLOCATION.to_be_bytes());
                            for (len, flags) in ext {
                                out.extend_from_slice(&len.to_be_bytes());
                                out.extend_from_slice(&flags.to_be_bytes());
                            }
                            write_all(s, &out)?;
                            continue;
                        }
                        Err(e) => Err(errno_of(&e)),
                    }
                }
            }
            _ => Err(EINVAL),
        };
        send_done(s, &sess, r.handle, result.err().unwrap_or(0))?;
        if buf.capacity() > 4 * 1024 * 1024 {
            buf = Vec::new(); // do not keep a large buffer around between big requests
        }
    }
}

/// Zeroes written as data (`NBD_CMD_FLAG_NO_HOLE`).
fn write_zero_data(b: &mut dyn BlockBackend, off: u64, len: u64) -> qcow2::Result<()> {
    let z = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = off;
    while pos < off + len {
        let n = (off + len - pos).min(z.len() as u64);
        b.write_at(pos, &z[..n as usize])?;
        pos += n;
    }
    Ok(())
}

/// `base:allocation` extents covering `[off, end)`: a qcow2 image's allocation map, anything
/// else one allocated extent.
fn block_status(e: &Export, off: u64, end: u64, one: bool) -> qcow2::Result<Vec<(u32, u32)>> {
    let mut b = lock(&e.backend);
    let map = match b.as_qcow2() {
        Some(q) => q.map()?,
        None => return Ok(vec![((end - off).min(u32::MAX as u64) as u32, 0)]),
    };
    drop(b);
    let mut out: Vec<(u32, u32)> = Vec::new();
    for m in map {
        let (s, t) = (m.start.max(off), (m.start + m.length).min(end));
        if s >= t {
            continue;
        }
        let flags = match m.kind {
            qcow2::MapKind::Unallocated => STATE_HOLE | STATE_ZERO,
            qcow2::MapKind::Zero(_) | qcow2::MapKind::DataHole(_) => STATE_ZERO,
            _ => 0,
        };
        let mut len = t - s;
        while len > 0 {
            let n = len.min(u32::MAX as u64 & !0xfff);
            match out.last_mut() {
                Some(last) if last.1 == flags && last.0 as u64 + n <= u32::MAX as u64 => last.0 += n as u32,
                _ => out.push((n as u32, flags)),
            }
            len -= n;
        }
        if out.len() >= MAX_EXTENTS || (one && !out.is_empty()) {
            break;
        }
    }
    if one {
        out.truncate(1);
    }
    Ok(out)
}
