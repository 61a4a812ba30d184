//! The live-migration wire protocol, version 1.
//!
//! One connection (TCP or a unix socket) carries two directions.
//!
//! **Source → destination**: a VM-state stream exactly as `vmstate::stream` defines it (header
//! `"GODWITVM"` + u32 format version, then tagged records, little-endian), using these
//! control records (tag, u32 length, postcard body) between its RAM and section records:
//!
//! | tag  | record      | body                                   | when |
//! |------|-------------|----------------------------------------|------|
//! | 0x40 | HELLO       | [`Hello`]: protocol version, config summary, RAM layout | first |
//! | 0x41 | ROUND_END   | [`RoundEnd`]: round number, pages sent; then u32 CRC-32 of the stream before this record | after each pre-copy round |
//! | 0x42 | SWITCHOVER  | empty                                  | the source has paused the guest |
//!
//! Order: `HELLO` → (wait for `READY`) → round 0 RAM records (all non-zero pages; zero pages
//! are never sent in round 0, the destination's RAM starts zeroed) → `ROUND_END` → dirty rounds
//! (`RAM_DATA` for dirtied pages, `RAM_ZERO` for dirtied pages that became zero) each closed by
//! `ROUND_END` → `SWITCHOVER` → the final dirty pages → every state `SECTION` → `END`.
//!
//! The CRC-32 in `ROUND_END` and `POSTCOPY_RUN` covers every byte of the stream before the
//! record (as `END`'s does): the destination checks it before it acknowledges the round or runs
//! the guest, so corruption is caught at the round it happens in, and post-copy never runs a
//! guest on pages the checksum has not vouched for. A body without it (an older source) is
//! accepted and checked at `END` only.
//!
//! **Destination → source**: small frames `u8 kind | u32 len | body`:
//! `1 READY` (HELLO accepted), `2 ERROR` (UTF-8 reason; the destination then exits without
//! having run the guest), `3 RUNNING` (postcard [`Running`]: the guest runs on the destination;
//! only now is the migration complete and may the source stop caring about its copy),
//! `7 ROUND_ACK` (postcard `u32`: the round number of a `ROUND_END` the destination has taken
//! in), `8 MULTIFD_READY` (see below). The source waits for each `ROUND_ACK` before its next decision, so a round (and the
//! bandwidth measured over it) ends when its data has arrived, not when it left the source's
//! buffers, and the pause never starts with data still queued on the way.
//!
//! **Post-copy extension** (same protocol version; a source only sends these records after the
//! operator asked for post-copy, and a destination without post-copy refuses them as unknown
//! control records before the guest runs anywhere but on the source):
//!
//! | tag  | record            | body                                             |
//! |------|-------------------|--------------------------------------------------|
//! | 0x43 | POSTCOPY_DISCARD  | [`Runs`]: pages the destination must drop and fetch (dirtied since sent) |
//! | 0x44 | POSTCOPY_RUN      | u32 CRC-32 of the stream before this record: the machine state is complete, run the guest now |
//! | 0x45 | POSTCOPY_RESUME   | empty: first record of a recovery stream          |
//!
//! Switching to post-copy: after any pre-copy round the source pauses the guest, sends one or
//! more `POSTCOPY_DISCARD` (instead of `SWITCHOVER`), every state `SECTION`, `POSTCOPY_RUN`, and
//! then streams every discarded page (`RAM_DATA`, in address order, requested pages first)
//! and `END`. The destination drops the discarded pages, registers guest RAM with
//! userfaultfd, restores the state, resumes the guest and replies `RUNNING`; a guest access to
//! a page still missing makes it reply `4 REQUEST` (postcard [`Request`]) and the source sends
//! that page next. Pages neither discarded nor received read as zero. When the destination has
//! every page it replies `5 COMPLETE`; only then may the source drop its copy.
//!
//! Recovery: if the link fails after `RUNNING`, both sides wait in `postcopy-paused` (the
//! guest keeps running on the destination; accesses to missing pages wait). The destination
//! listens again (`migrate_recover URI`), the source connects (`migrate -r URI`) and opens a
//! new stream with `POSTCOPY_RESUME`; the destination answers with `6 MISSING` frames
//! (postcard [`Missing`]: runs of pages it still lacks, the last frame flagged) and repeats
//! its outstanding requests, and the source streams exactly those pages, then `END`.
//!
//! **multifd extension** (capability `multifd`; a destination that does not know these
//! records refuses them as unknown before the guest runs anywhere but on the source):
//!
//! | tag  | record        | body |
//! |------|---------------|------|
//! | 0x46 | MULTIFD_SETUP | [`crate::multifd::Setup`]: channel count N, compression (0 none, 1 zlib, 2 zstd), random session id |
//! | 0x47 | MULTIFD_SYNC  | postcard `u32`: the switchover's round; every channel's share of it was sent |
//!
//! After `READY` the source sends `MULTIFD_SETUP` and opens N more connections to the same
//! address (each secured with TLS when `tls-creds` is set); each starts with
//! `"GODWITMF" | u32 version 1 | u64 session | u8 channel index`. The destination accepts
//! exactly N such connections (others are dropped), answers `8 MULTIFD_READY`, and from then
//! on every guest page travels on the channels, never on the main connection. A channel is a
//! sequence of packets:
//! `1 PAGES: u32 header length | header (postcard [`crate::multifd::Packet`]: round, the
//! data pages' addresses, the addresses of pages now zero, payload length) | payload (the data
//! pages, compressed as a whole when compression is on) | u32 CRC-32 of header and payload`,
//! `2 SYNC: u32 round` (this channel sent all its pages of that round), `3 FIN` (clean end).
//! A packet holds at most 128 pages; the destination checks the checksum, the decompressed
//! size and every address before it writes a page. Each pre-copy round ends with `SYNC(round)`
//! on every channel and then `ROUND_END` on the main connection; the destination answers
//! `ROUND_ACK` only when every channel has synced the round, so a round is complete only when
//! every channel's share of it arrived, and the next round (which may send the same page
//! again) cannot overtake it. At the switchover the last dirty pages go on the channels as
//! one more round, the main connection sends `MULTIFD_SYNC(round)` after `SWITCHOVER`, and the
//! destination restores the state only once every channel synced that round. Post-copy is
//! refused with multifd (as QEMU 7.2 does). A failed channel fails the whole migration on both
//! sides (the source resumes).
//!
//! **TLS** (`tls-creds`): every connection — the main one, each multifd channel, a post-copy
//! recovery — is a TLS session (see [`crate::tls`]); the records above travel inside it
//! unchanged.
//!
//! **What each side checks.** The destination refuses a HELLO with another protocol version,
//! config summary (RAM size, vCPU count, device set) or RAM layout; it bounds-checks every RAM
//! record against its RAM, bounds every length before allocating (see `vmstate::stream`),
//! decodes and checks every section before applying any, and verifies the END record's byte
//! count. The source treats anything but `RUNNING` after `SWITCHOVER` — an `ERROR`, EOF, a
//! timeout — as failure: it takes its disks back and resumes the guest.

use crate::{MigrationError, Result};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};

pub const PROTOCOL_VERSION: u32 = 1;

pub const TAG_HELLO: u8 = 0x40;
pub const TAG_ROUND_END: u8 = 0x41;
pub const TAG_SWITCHOVER: u8 = 0x42;
pub const TAG_POSTCOPY_DISCARD: u8 = 0x43;
pub const TAG_POSTCOPY_RUN: u8 = 0x44;
pub const TAG_POSTCOPY_RESUME: u8 = 0x45;
pub const TAG_MULTIFD_SETUP: u8 = 0x46;
pub const TAG_MULTIFD_SYNC: u8 = 0x47;
/// Largest multifd packet header accepted.
pub const MAX_PACKET_HDR: usize = 16 * 1024;

/// Runs of guest pages: (guest-physical address, page count).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Runs {
    pub runs: Vec<(u64, u32)>,
}

/// Destination → source: send these pages next (a guest access waits for them).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub gpa: u64,
    pub npages: u32,
}

/// Destination → source after `POSTCOPY_RESUME`: pages still missing.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub runs: Vec<(u64, u32)>,
    /// The last `MISSING` frame of this answer.
    pub last: bool,
}

/// Most runs one `MISSING` frame or `POSTCOPY_DISCARD` record carries.
pub const MAX_RUNS_PER_FRAME: usize = 4096;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    pub config: String,
    /// (guest-physical base, size) of each RAM region.
    pub ram: Vec<(u64, u64)>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    pub round: u32,
    pub pages: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// Destination time from SWITCHOVER received to the guest resumed, microseconds.
    pub switchover_us: u64,
    /// Of which: decoding and applying the machine state.
    pub restore_us: u64,
}

/// A frame on the destination → source channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ready,
    Error(String),
    Running(Running),
    /// Post-copy: a page the guest waits for.
    Request(Request),
    /// Post-copy: the destination has every page.
    Complete,
    /// Post-copy recovery: pages the destination still lacks.
    Missing(Missing),
    /// The destination has taken in the round with this number (its `ROUND_END`).
    RoundAck(u32),
    /// multifd: every channel is connected and checked.
    MultifdReady,
}

const MAX_REPLY: u32 = 64 * 1024;

pub fn write_reply<W: Write + ?Sized>(w: &mut W, r: &Reply) -> Result<()> {
    let (kind, body): (u8, Vec<u8>) = match r {
        Reply::Ready => (1, Vec::new()),
        Reply::Error(s) => (2, s.as_bytes().iter().take(MAX_REPLY as usize).copied().collect()),
        Reply::Running(x) => (3, encode(x)?),
        Reply::Request(x) => (4, encode(x)?),
        Reply::Complete => (5, Vec::new()),
        Reply::Missing(x) => (6, encode(x)?),
        Reply::RoundAck(n) => (7, encode(n)?),
        Reply::MultifdReady => (8, Vec::new()),
    };
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(kind);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

pub fn read_reply<R: Read + ?Sized>(r: &mut R) -> Result<Reply> {
    let mut hdr = [0u8; 5];
    r.read_exact(&mut hdr).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => MigrationError::Protocol("the destination closed the connection".into()),
        _ => MigrationError::Io(e),
    })?;
    let len = u32::from_le_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
    if len > MAX_REPLY {
        return Err(MigrationError::Protocol(format!("reply of {len} bytes is too long")));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    match hdr[0] {
        1 if len == 0 => Ok(Reply::Ready),
        2 => Ok(Reply::Error(String::from_utf8_lossy(&body).into_owned())),
        3 => Ok(Reply::Running(decode(&body)?)),
        4 => Ok(Reply::Request(decode(&body)?)),
        5 if len == 0 => Ok(Reply::Complete),
        6 => Ok(Reply::Missing(decode(&body)?)),
        7 => Ok(Reply::RoundAck(decode(&body)?)),
        8 if len == 0 => Ok(Reply::MultifdReady),
        k => Err(MigrationError::Protocol(format!("unknown reply kind {k}"))),
    }
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| MigrationError::Protocol(e.to_string()))
}

/// A control record's body followed by the stream's CRC-32 so far (`ROUND_END`,
/// `POSTCOPY_RUN`): the destination checks the stream before it acknowledges a round or runs
/// the guest, instead of only at `END`.
pub fn with_crc(mut body: Vec<u8>, crc: u32) -> Vec<u8> {
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

/// Checks the CRC-32 that follows a control record's postcard body (`rest`, what postcard did
/// not consume) against the reader's; a body without one (an older source) is accepted.
pub fn check_crc(rest: &[u8], reader_crc: u32, what: &str) -> Result<()> {
    match rest {
        [] => Ok(()),
        [a, b, c, d] => {
            let crc = u32::from_le_bytes([*a, *b, *c, *d]);
            if crc == reader_crc {
                Ok(())
            } else {
                Err(MigrationError::Protocol(format!(
                    "stream checksum mismatch at {what} (CRC-32 {reader_crc:#010x}, source says {crc:#010x}): corrupted in transit"
                )))
            }
        }
        _ => Err(MigrationError::Protocol(format!("malformed checksum after {what}"))),
    }
}

/// Decodes a postcard body and returns the bytes it did not use.
pub fn decode_prefix<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<(T, &'a [u8])> {
    postcard::take_from_bytes(b).map_err(|e| MigrationError::Protocol(format!("malformed control record: {e}")))
}

pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| MigrationError::Protocol(format!("malformed control record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_roundtrip_and_reject_garbage() {
        for r in [
            Reply::Ready,
            Reply::Error("no".into()),
            Reply::Running(Running { switchover_us: 5, restore_us: 3 }),
            Reply::Request(Request { gpa: 0x1000, npages: 1 }),
            Reply::Complete,
            Reply::Missing(Missing { runs: vec![(0, 3), (0x10000, 1)], last: true }),
        ] {
            let mut buf = Vec::new();
            write_reply(&mut buf, &r).unwrap();
            assert_eq!(read_reply(&mut &buf[..]).unwrap(), r);
        }
        assert!(read_reply(&mut &[9u8, 0, 0, 0, 0][..]).is_err());
        assert!(read_reply(&mut &[1u8, 0xff, 0xff, 0xff, 0xff][..]).is_err());
        assert!(read_reply(&mut &[1u8, 0][..]).is_err());
    }
}
