//! The NBD client: connect to an export with `NBD_OPT_GO`, then read, write, zero, trim and
//! flush it (simple replies). Writes can be pipelined ([`NbdClient::send_write`] /
//! [`NbdClient::recv_reply`]) so a copy is not bound by one round trip per request.
//! The client is a [`BlockBackend`], so a mirror job writes into it like into a local image.

use crate::error::{Error, IoCtx, Result};
use crate::proto::*;
use qcow2::{BlockBackend, ImageFormat};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where an NBD export lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Export name ("" = the server's default export).
    pub export: String,
}

impl NbdTarget {
    /// `host:port` for connecting (IPv6 in brackets).
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses QEMU's NBD URIs: `nbd://HOST[:PORT]/EXPORT` (IPv6 as `[::1]`) and the legacy
/// `nbd:HOST:PORT[:exportname=NAME]`. The default port is 10809.
pub fn parse_nbd_uri(uri: &str) -> Result<NbdTarget> {
    let bad = |why: &str| Error::InvalidArgument(format!("invalid NBD URI '{uri}': {why}"));
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("unterminated '['"))?;
            (h.to_string(), after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
            None => 10809,
        };
        return Ok(NbdTarget { host, port, export: export.to_string() });
    }
    if let Some(rest) = uri.strip_prefix("nbd:") {
        let (main, export) = match rest.split_once(":exportname=") {
            Some((m, e)) => (m, e.to_string()),
            None => (rest, String::new()),
        };
        let (host, port) = main.rsplit_once(':').ok_or_else(|| bad("expected nbd:HOST:PORT"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = port.parse().map_err(|_| bad("bad port"))?;
        return Ok(NbdTarget { host, port, export });
    }
    Err(bad("not an nbd: URI"))
}

/// A connection to one export.
pub struct NbdClient {
    s: TcpStream,
    size: u64,
    flags: u16,
    max_block: u32,
    next_handle: u64,
    /// Handles sent and not answered yet, in order, with what they were.
    in_flight: VecDeque<(u64, &'static str, u64, u64)>,
}

/// Default time to wait for the server before a request fails.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl NbdClient {
    /// Connects to `target` and negotiates its export.
    pub fn connect(target: &NbdTarget) -> Result<NbdClient> {
        let addrs: Vec<_> = target
            .addr()
            .to_socket_addrs()
            .map_err(|e| Error::Io { context: "resolving the NBD server address", source: e })?
            .collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, DEFAULT_TIMEOUT) {
                Ok(s) => return Self::handshake(s, &target.export),
                Err(e) => last = Some(e),
            }
        }
        Err(Error::Io {
            context: "connecting to the NBD server",
            source: last.unwrap_or_else(|| std::io::Error::other("no address")),
        })
    }

    /// Negotiates `export` over an open connection.
    pub fn handshake(mut s: TcpStream, export: &str) -> Result<NbdClient> {
        if export.len() > MAX_STRING {
            return Err(Error::InvalidArgument("export name too long".into()));
        }
        let _ = s.set_nodelay(true);
        s.set_read_timeout(Some(DEFAULT_TIMEOUT)).ctx("setting the NBD socket timeout")?;
        s.set_write_timeout(Some(DEFAULT_TIMEOUT)).ctx("setting the NBD socket timeout")?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g).ctx("reading the NBD server greeting")?;
        if be64(&g[0..8]) != NBDMAGIC {
            return Err(Error::Protocol("not an NBD server (no NBDMAGIC)".into()));
        }
        if be64(&g[8..16]) != IHAVEOPT {
            return Err(Error::Protocol("old-style NBD server (newstyle negotiation required)".into()));
        }
        let sflags = be16(&g[16..18]);
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(Error::Protocol("NBD server lacks fixed newstyle negotiation".into()));
        }
        let cflags = FLAG_C_FIXED_NEWSTYLE | if sflags & FLAG_NO_ZEROES != 0 { FLAG_C_NO_ZEROES } else { 0 };
        let mut d = Vec::new();
        put_string(&mut d, export);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let mut msg = cflags.to_be_bytes().to_vec();
        msg.extend_from_slice(&option_header(OPT_GO, d.len() as u32));
        msg.extend_from_slice(&d);
        s.write_all(&msg).ctx("sending NBD_OPT_GO")?;
        let (mut size, mut flags, mut max_block) = (None, 0u16, MAX_PAYLOAD);
        for n in 0.. {
            if n > 64 {
                return Err(Error::Protocol("more than 64 replies to NBD_OPT_GO".into()));
            }
            let mut h = [0u8; 20];
            s.read_exact(&mut h).ctx("reading an NBD option reply")?;
            let h = parse_option_reply_header(&h)?;
            if h.option != OPT_GO {
                return Err(Error::Protocol(format!("reply to option {} while negotiating NBD_OPT_GO", h.option)));
            }
            if h.len > MAX_REPLY_LEN {
                return Err(Error::Protocol(format!("option reply of {} bytes", h.len)));
            }
            let mut data = vec![0u8; h.len as usize];
            s.read_exact(&mut data).ctx("reading an NBD option reply")?;
            match h.reply {
                REP_ACK => break,
                REP_INFO => {
                    let mut c = Cursor(&data);
                    match c.u16()? {
                        INFO_EXPORT => {
                            size = Some(c.u64()?);
                            flags = c.u16()?;
                        }
                        INFO_BLOCK_SIZE => {
                            let _min = c.u32()?;
                            let _pref = c.u32()?;
                            max_block = c.u32()?.clamp(512, MAX_PAYLOAD);
                        }
                        _ => {}
                    }
                }
                r if r & REP_FLAG_ERROR != 0 => {
                    let message = String::from_utf8_lossy(&data).into_owned();
                    return Err(Error::Refused {
                        option: "NBD_OPT_GO",
                        message: if message.is_empty() { format!("error reply {:#x}", r) } else { message },
                    });
                }
                _ => {} // unknown reply types are ignored
            }
        }
        let size = size.ok_or_else(|| Error::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into()))?;
        Ok(NbdClient { s, size, flags, max_block, next_handle: 1, in_flight: VecDeque::new() })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Transmission flags the server announced.
    pub fn flags(&self) -> u16 {
        self.flags
    }
    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }
    /// Largest payload of one request.
    pub fn max_block(&self) -> u32 {
        self.max_block
    }
    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(Error::InvalidArgument(format!("access {off}+{len} beyond the export size {}", self.size))),
        }
    }

    fn send(&mut self, op: &'static str, cmd: u16, flags: u16, off: u64, len: u32, data: &[u8]) -> Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut b = encode_request(&Request { flags, cmd, handle, offset: off, len }).to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b).ctx("sending an NBD request")?;
        self.in_flight.push_back((handle, op, off, len as u64));
        Ok(handle)
    }

    /// Sends a WRITE of `data` (at most [`max_block`](Self::max_block) bytes) without waiting.
    pub fn send_write(&mut self, off: u64, data: &[u8], fua: bool) -> Result<u64> {
        self.check(off, data.len() as u64)?;
        if data.len() > self.max_block as usize {
            return Err(Error::InvalidArgument(format!("write of {} bytes exceeds the block limit", data.len())));
        }
        self.send("write", CMD_WRITE, if fua { CMD_FLAG_FUA } else { 0 }, off, data.len() as u32, data)
    }

    /// Sends a WRITE_ZEROES (or, if the server lacks it, a WRITE of zeros) without waiting.
    pub fn send_write_zeroes(&mut self, off: u64, len: u32) -> Result<u64> {
        self.check(off, len as u64)?;
        if self.flags & TF_SEND_WRITE_ZEROES != 0 {
            self.send("write-zeroes", CMD_WRITE_ZEROES, 0, off, len, &[])
        } else {
            let z = vec![0u8; len.min(self.max_block) as usize];
            self.send_write(off, &z, false)
        }
    }

    /// Waits for one outstanding request's reply (servers may answer out of order, so it is
    /// matched by handle); an error reply becomes an error.
    pub fn recv_reply(&mut self) -> Result<()> {
        if self.in_flight.is_empty() {
            return Err(Error::InvalidArgument("no NBD request in flight".into()));
        }
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).ctx("reading an NBD reply")?;
        let magic = be32(&h[0..4]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(Error::Protocol(format!("bad reply magic {magic:#x}")));
        }
        let got = be64(&h[8..16]);
        let Some(pos) = self.in_flight.iter().position(|r| r.0 == got) else {
            return Err(Error::Protocol(format!("reply for unknown handle {got}")));
        };
        let (_, op, off, len) = self.in_flight.remove(pos).unwrap_or((got, "request", 0, 0));
        match be32(&h[4..8]) {
            0 => Ok(()),
            errno => Err(Error::Request { op, offset: off, len, errno }),
        }
    }

    /// Waits for every outstanding reply.
    pub fn drain(&mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.recv_reply()?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.check(off, buf.len() as u64)?;
        self.drain()?;
        let max = self.max_block as usize;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            self.send("read", CMD_READ, 0, off + done as u64, n as u32, &[])?;
            self.recv_reply()?;
            self.s.read_exact(&mut buf[done..done + n]).ctx("reading NBD read data")?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `off` and waits for it.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.check(off, data.len() as u64)?;
        for (i, c) in data.chunks(self.max_block as usize).enumerate() {
            self.send_write(off + (i * self.max_block as usize) as u64, c, false)?;
        }
        self.drain()
    }

    /// Zeroes `len` bytes at `off` and waits.
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.check(off, len)?;
        let step = (self.max_block as u64) & !4095;
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(step);
            self.send_write_zeroes(pos, n as u32)?;
            pos += n;
        }
        self.drain()
    }

    /// Discards `len` bytes at `off` (no-op when the server cannot trim).
    pub fn trim(&mut self, off: u64, len: u64) -> Result<()> {
        self.check(off, len)?;
        if self.flags & TF_SEND_TRIM == 0 {
            return Ok(());
        }
        let step = (self.max_block as u64) & !4095;
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(step);
            self.send("trim", CMD_TRIM, 0, pos, n as u32, &[])?;
            pos += n;
        }
        self.drain()
    }

    /// Makes the server's writes durable.
    pub fn flush(&mut self) -> Result<()> {
        self.drain()?;
        if self.flags & TF_SEND_FLUSH != 0 {
            self.send("flush", CMD_FLUSH, 0, 0, 0, &[])?;
            self.recv_reply()?;
        }
        Ok(())
    }

    /// Says goodbye (`NBD_CMD_DISC`) after the outstanding replies.
    pub fn disconnect(mut self) -> Result<()> {
        self.drain()?;
        self.send("disconnect", CMD_DISC, 0, 0, 0, &[])?;
        let _ = self.s.shutdown(std::net::Shutdown::Write);
        Ok(())
    }
}

fn io_err(e: Error) -> qcow2::Error {
    match e {
        Error::InvalidArgument(m) => qcow2::Error::InvalidArgument(m),
        other => qcow2::Error::Io { context: "accessing the NBD export", source: std::io::Error::other(other.to_string()) },
    }
}

impl BlockBackend for NbdClient {
    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn is_read_only(&self) -> bool {
        self.read_only()
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> qcow2::Result<()> {
        self.read(off, buf).map_err(io_err)
    }
    fn write_at(&mut self, off: u64, buf: &[u8]) -> qcow2::Result<()> {
        self.write(off, buf).map_err(io_err)
    }
    fn flush(&mut self) -> qcow2::Result<()> {
        NbdClient::flush(self).map_err(io_err)
    }
    fn discard(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        self.trim(off, len).map_err(io_err)
    }
    fn write_zeroes(&mut self, off: u64, len: u64) -> qcow2::Result<()> {
        NbdClient::write_zeroes(self, off, len).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = parse_nbd_uri("nbd://127.0.0.1:10810/drive-virtio-disk0").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.export.as_str()), ("127.0.0.1", 10810, "drive-virtio-disk0"));
        assert_eq!(t.addr(), "127.0.0.1:10810");
        let t = parse_nbd_uri("nbd://[::1]:5000/e").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 5000));
        assert_eq!(t.addr(), "[::1]:5000");
        let t = parse_nbd_uri("nbd://host").unwrap();
        assert_eq!((t.port, t.export.as_str()), (10809, ""));
        let t = parse_nbd_uri("nbd:localhost:10809:exportname=d0").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.export.as_str()), ("localhost", 10809, "d0"));
        for bad in ["tcp:1:2", "nbd://", "nbd://h:port/x", "nbd://[::1/x", "nbd:host"] {
            assert!(parse_nbd_uri(bad).is_err(), "{bad}");
        }
    }
}
