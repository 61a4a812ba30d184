//! The NBD wire format: magic numbers, option/command/reply codes, and the fixed-size headers
//! of both phases, encoded and decoded as plain byte arrays. Everything here is pure (no I/O),
//! so the parsers can be property-tested and fuzzed; every length a peer sends is checked
//! against the bounds below before anything is allocated for it.

use crate::error::{Error, Result};

/// `NBDMAGIC`: first eight bytes from the server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic (server greeting and every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Request magic (transmission phase).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (per export).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// `NBD_REP_INFO` item types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Error values on the wire (errno numbers fixed by the protocol).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Largest option payload accepted from a client (names and queries are ≤ 4 KiB each).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest string (export name, context name) inside an option.
pub const MAX_STRING: usize = 4096;
/// Largest READ/WRITE payload (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Largest option reply payload the client accepts.
pub const MAX_REPLY_LEN: u32 = 64 * 1024;

/// A client option header (after `IHAVEOPT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Decodes the 16-byte option header. A bad magic is a protocol error.
pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader> {
    let magic = be64(&b[0..8]);
    if magic != IHAVEOPT {
        return Err(Error::Protocol(format!("bad option magic {magic:#x}")));
    }
    Ok(OptionHeader { option: be32(&b[8..12]), len: be32(&b[12..16]) })
}

/// Encodes an option header.
pub fn option_header(option: u32, len: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encodes an option reply header.
pub fn option_reply_header(option: u32, reply: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A decoded option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

pub fn parse_option_reply_header(b: &[u8; 20]) -> Result<OptionReplyHeader> {
    let magic = be64(&b[0..8]);
    if magic != REPLY_MAGIC {
        return Err(Error::Protocol(format!("bad option reply magic {magic:#x}")));
    }
    Ok(OptionReplyHeader { option: be32(&b[8..12]), reply: be32(&b[12..16]), len: be32(&b[16..20]) })
}

/// A transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

pub const REQUEST_LEN: usize = 28;

pub fn parse_request(b: &[u8; REQUEST_LEN]) -> Result<Request> {
    let magic = be32(&b[0..4]);
    if magic != REQUEST_MAGIC {
        return Err(Error::Protocol(format!("bad request magic {magic:#x}")));
    }
    Ok(Request {
        flags: be16(&b[4..6]),
        cmd: be16(&b[6..8]),
        handle: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        len: be32(&b[24..28]),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn structured_header(flags: u16, ty: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&ty.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// `NBD_OPT_INFO`/`NBD_OPT_GO` payload: export name and requested info items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub items: Vec<u16>,
}

/// Decodes an `NBD_OPT_INFO`/`NBD_OPT_GO` payload.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest> {
    let mut c = Cursor(data);
    let n = c.u32()? as usize;
    let name = c.string(n)?;
    let count = c.u16()? as usize;
    if c.0.len() != count * 2 {
        return Err(Error::Protocol(format!(
            "info request lists {count} items in {} bytes",
            c.0.len()
        )));
    }
    let items = (0..count).map(|_| c.u16()).collect::<Result<Vec<_>>>()?;
    Ok(InfoRequest { name, items })
}

/// `NBD_OPT_LIST_META_CONTEXT`/`NBD_OPT_SET_META_CONTEXT` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest> {
    let mut c = Cursor(data);
    let n = c.u32()? as usize;
    let export = c.string(n)?;
    let count = c.u32()? as usize;
    // Each query takes at least 4 bytes: the count cannot exceed what is there.
    if count > c.0.len() / 4 {
        return Err(Error::Protocol(format!("{count} meta context queries in {} bytes", c.0.len())));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let n = c.u32()? as usize;
        queries.push(c.string(n)?);
    }
    if !c.0.is_empty() {
        return Err(Error::Protocol("trailing bytes after the meta context queries".into()));
    }
    Ok(MetaRequest { export, queries })
}

/// Reads big-endian fields from a byte slice, failing (never panicking) when it runs out.
pub struct Cursor<'a>(pub &'a [u8]);

impl<'a> Cursor<'a> {
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(Error::Protocol(format!("truncated payload: need {n} bytes, have {}", self.0.len())));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(be16(self.take(2)?))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(be32(self.take(4)?))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(be64(self.take(8)?))
    }
    pub fn string(&mut self, n: usize) -> Result<String> {
        if n > MAX_STRING {
            return Err(Error::Protocol(format!("string of {n} bytes (at most {MAX_STRING})")));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| Error::Protocol("string is not UTF-8".into()))
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Appends a `u32` length and the bytes of `s`.
pub fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let r = Request { flags: CMD_FLAG_FUA, cmd: CMD_WRITE, handle: 7, offset: 4096, len: 512 };
        assert_eq!(parse_request(&encode_request(&r)).unwrap(), r);
        let mut b = encode_request(&r);
        b[0] ^= 1;
        assert!(parse_request(&b).is_err());
    }

    #[test]
    fn info_request_counts_are_checked() {
        let mut d = Vec::new();
        put_string(&mut d, "disk0");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d).unwrap(),
            InfoRequest { name: "disk0".into(), items: vec![INFO_BLOCK_SIZE, INFO_NAME] }
        );
        d.pop();
        assert!(parse_info_request(&d).is_err());
        // A name length past the payload.
        assert!(parse_info_request(&[0, 0, 0, 200, b'a']).is_err());
    }

    #[test]
    fn meta_request_parses_and_bounds_counts() {
        let mut d = Vec::new();
        put_string(&mut d, "e");
        d.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut d, BASE_ALLOCATION);
        let m = parse_meta_request(&d).unwrap();
        assert_eq!(m.queries, vec![BASE_ALLOCATION.to_string()]);
        let mut huge = Vec::new();
        put_string(&mut huge, "e");
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge).is_err());
    }

    proptest! {
        /// Arbitrary bytes never panic any parser, and whatever parses re-encodes to itself.
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_request(&data);
            if data.len() >= REQUEST_LEN {
                let mut b = [0u8; REQUEST_LEN];
                b.copy_from_slice(&data[..REQUEST_LEN]);
                if let Ok(r) = parse_request(&b) {
                    prop_assert_eq!(encode_request(&r), b);
                }
            }
            if data.len() >= 16 {
                let mut b = [0u8; 16];
                b.copy_from_slice(&data[..16]);
                if let Ok(h) = parse_option_header(&b) {
                    prop_assert_eq!(option_header(h.option, h.len), b);
                }
            }
        }

        #[test]
        fn info_request_roundtrip(name in "[a-z0-9:/._-]{0,64}", items in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut d = Vec::new();
            put_string(&mut d, &name);
            d.extend_from_slice(&(items.len() as u16).to_be_bytes());
            for i in &items { d.extend_from_slice(&i.to_be_bytes()); }
            prop_assert_eq!(parse_info_request(&d).unwrap(), InfoRequest { name, items });
        }
    }
}
