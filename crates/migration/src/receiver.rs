//! The destination side: accept one source, check its HELLO against this VM, write RAM records
//! straight into guest memory, and after SWITCHOVER restore the machine state and resume the
//! guest. The guest never runs before the whole state arrived and was checked; any error is
//! reported back to the source and returned (the caller exits non-zero).

use crate::protocol::{self, Hello, Reply, RoundEnd, Running, PROTOCOL_VERSION, TAG_HELLO, TAG_MULTIFD_SETUP, TAG_MULTIFD_SYNC, TAG_ROUND_END, TAG_SWITCHOVER};
use crate::transport::{Channel, Listener, SpinReader};

/// How long the destination busy-waits for the next record after a round ended. The source
/// decides on the switchover within a few milliseconds of the round's ACK (harvest, pause,
/// last harvest), so the final pages come well inside this; a longer window only keeps a
/// core busy on a host the guest and the source share (250 ms made the destination spin for
/// half of every migration across a 1 Gbit/s link).
const SPIN_AFTER_ROUND: std::time::Duration = std::time::Duration::from_millis(50);
/// How long it busy-waits before sleeping at any other time: a sleeping thread can take
/// milliseconds to wake on a nested host, and a round end it sleeps through delays the
/// switchover by that much.
const SPIN_IDLE: std::time::Duration = std::time::Duration::from_millis(3);
/// While pages of a live round flow (more than `SPIN_AFTER_ROUND` after the last round end):
/// a short spin only. On a link slower than this thread, records arrive every fraction of a
/// millisecond, so a longer spin never ends and the destination burns a whole core for the
/// length of the migration (12–17 CPU s of an 18 s migration across a 1 Gbit/s link); the
/// kernel's socket buffer holds what arrives while it sleeps.
const SPIN_DATA: std::time::Duration = std::time::Duration::from_micros(100);
use crate::{MigratableVm, MigrationError, RamRegion, Result};
use std::io::BufReader;
use std::time::Instant;
use vmstate::stream::{Item, StreamReader, PAGE_SIZE};
use vmstate::Section;

/// What the destination saw.
#[derive(Debug, Clone, Default)]
pub struct IncomingStats {
    pub rounds: u32,
    pub bytes: u64,
    pub pages: u64,
    pub switchover_ms: f64,
    pub restore_ms: f64,
    pub total_ms: f64,
}

/// Waits for one source on `listener` and completes the migration into `vm` (plain).
pub fn incoming(vm: &dyn MigratableVm, listener: &Listener) -> Result<IncomingStats> {
    let chan = listener.accept()?;
    receive(vm, chan)
}

/// Waits for one source on `listener` and completes the migration into `vm`, with the TLS
/// and other parameters of `shared` as they are when the source connects. A peer refused by
/// TLS is reported (stderr, `info migrate`'s error) and the wait goes on.
pub fn incoming_with(vm: &dyn MigratableVm, listener: &Listener, shared: &crate::sender::Shared) -> Result<IncomingStats> {
    let tls = || crate::tls::destination_setup(&shared.params());
    let chan = listener.accept_until_secure(&tls, &|m| shared.update(|s| s.error = Some(format!("TLS: {m}"))))?;
    shared.update(|s| s.error = None);
    receive_with(vm, chan, Some((listener, &tls)))
}

/// Runs the destination protocol over an accepted channel (no multifd: there is no listener
/// to take its channels from).
pub fn receive(vm: &dyn MigratableVm, chan: Box<dyn Channel>) -> Result<IncomingStats> {
    receive_with(vm, chan, None)
}

/// Where multifd channels come from: the listener and how to secure each connection.
pub type AcceptCtx<'a> = (&'a Listener, &'a dyn Fn() -> Result<Option<crate::tls::TlsSetup>>);

/// How long the destination waits for all multifd channels to connect.
const CHANNELS_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Accepts the N channels announced by `MULTIFD_SETUP`, in index order.
fn accept_channels(ctx: Option<AcceptCtx<'_>>, setup: &crate::multifd::Setup) -> Result<Vec<Box<dyn Channel>>> {
    let Some((listener, tls)) = ctx else {
        return Err(MigrationError::Protocol("this destination cannot take multifd channels".into()));
    };
    let n = setup.channels;
    if n == 0 || n > 64 {
        return Err(MigrationError::Protocol(format!("{n} multifd channels requested (1 to 64)")));
    }
    let mut got: Vec<Option<Box<dyn Channel>>> = (0..n).map(|_| None).collect();
    let end = Instant::now() + CHANNELS_WITHIN;
    while got.iter().any(Option::is_none) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || !listener.wait_readable(left) {
            return Err(MigrationError::Protocol(format!("not all {n} multifd channels connected within {CHANNELS_WITHIN:?}")));
        }
        let mut c = match listener.accept_secure(tls) {
            Ok(c) => c,
            Err(MigrationError::Tls(m)) => {
                eprintln!("godwit: incoming migration: TLS: {m} (multifd channel)");
                continue;
            }
            Err(e) => return Err(e),
        };
        c.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        match crate::multifd::read_channel_header(&mut c, setup.session, n) {
            Ok(i) if got[i as usize].is_none() => {
                c.set_read_timeout(None)?;
                got[i as usize] = Some(c);
            }
            Ok(i) => tracing::warn!("multifd channel {i} connected twice; dropped"),
            Err(e) => tracing::warn!("dropped a connection that is not one of this migration's channels: {e}"),
        }
    }
    Ok(got.into_iter().flatten().collect())
}

/// Runs the destination protocol over an accepted channel; multifd channels are accepted
/// through `ctx`.
pub fn receive_with(vm: &dyn MigratableVm, chan: Box<dyn Channel>, ctx: Option<AcceptCtx<'_>>) -> Result<IncomingStats> {
    let mut back = chan.try_clone_box()?;
    let res = receive_inner(vm, chan, &mut *back, ctx);
    if let Err(e) = &res {
        let _ = protocol::write_reply(&mut back, &Reply::Error(e.to_string()));
    }
    res
}

fn region_slice(regions: &[RamRegion], gpa: u64, npages: u32) -> Result<*mut u8> {
    let len = npages as u64 * PAGE_SIZE as u64;
    let end = gpa.checked_add(len).ok_or_else(|| MigrationError::Protocol(format!("RAM record at {gpa:#x} overflows")))?;
    regions
        .iter()
        .find(|r| gpa >= r.gpa && end <= r.gpa + r.size)
        .map(|r| (r.host + (gpa - r.gpa)) as *mut u8)
        .ok_or_else(|| MigrationError::Protocol(format!("RAM record {gpa:#x}+{len:#x} is outside guest RAM")))
}

fn receive_inner(vm: &dyn MigratableVm, chan: Box<dyn Channel>, back: &mut dyn Channel, ctx: Option<AcceptCtx<'_>>) -> Result<IncomingStats> {
    let t0 = Instant::now();
    let mut spin = SpinReader::new(chan, None)?;
    spin.set_spin(SPIN_IDLE);
    let mut r = StreamReader::new(BufReader::with_capacity(crate::transport::RECV_BUF, spin))?;
    let hello: Hello = match r.next_item()? {
        Item::Control { tag: TAG_HELLO, body } => protocol::decode(&body)?,
        other => return Err(MigrationError::Protocol(format!("expected HELLO, got {other:?}"))),
    };
    if hello.protocol != PROTOCOL_VERSION {
        return Err(MigrationError::Incompatible(format!(
            "source speaks migration protocol {}, this destination {}",
            hello.protocol, PROTOCOL_VERSION
        )));
    }
    let mine = vm.config_summary();
    if hello.config != mine {
        return Err(MigrationError::Incompatible(format!("source VM is [{}], destination VM is [{}]", hello.config, mine)));
    }
    let regions = vm.ram_regions();
    let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.size)).collect();
    if hello.ram != layout {
        return Err(MigrationError::Incompatible("RAM layouts differ".into()));
    }
    vm.discard_ram().map_err(MigrationError::Vm)?;
    vm.before_receiving_pages();
    protocol::write_reply(back, &Reply::Ready)?;

    let mut st = IncomingStats::default();
    let mut switch_at: Option<Instant> = None;
    let mut last_round_end = Instant::now();
    let mut sections: Vec<Section> = Vec::new();
    let mut mf: Option<crate::multifd::Receivers> = None;
    loop {
        let item = match r.next_item() {
            Ok(i) => i,
            // A failed channel ends the main connection's reads: report the channel's reason.
            Err(e) => return Err(mf.as_ref().and_then(|m| m.error()).map(MigrationError::Protocol).unwrap_or(e.into())),
        };
        match item {
            Item::RamData { gpa, npages } => {
                // Data is flowing: right after a round end (the final pages of a switchover
                // come then) keep spinning; later in a live round, only briefly.
                if mf.is_none() {
                    let since = last_round_end.elapsed();
                    let spin = if since < SPIN_AFTER_ROUND { SPIN_AFTER_ROUND - since } else { SPIN_DATA };
                    r.get_mut().get_mut().set_spin(spin);
                }
                let p = region_slice(&regions, gpa, npages)?;
                // SAFETY: bounds checked against a RAM region; the guest is not running.
                let dst = unsafe { std::slice::from_raw_parts_mut(p, npages as usize * PAGE_SIZE) };
                r.read_pages_into(dst)?;
                st.pages += npages as u64;
            }
            Item::RamZero { gpa, npages } => {
                let p = region_slice(&regions, gpa, npages)?;
                // SAFETY: as above; dropping private anonymous pages makes them read as zero.
                let rc = unsafe { libc::madvise(p as *mut _, npages as usize * PAGE_SIZE, libc::MADV_DONTNEED) };
                if rc != 0 {
                    return Err(MigrationError::Io(std::io::Error::last_os_error()));
                }
                st.pages += npages as u64;
            }
            Item::Control { tag: TAG_ROUND_END, body } => {
                let (re, rest): (RoundEnd, _) = protocol::decode_prefix(&body)?;
                protocol::check_crc(rest, r.crc_before_last_item(), &format!("ROUND_END {}", re.round))?;
                st.rounds = re.round + 1;
                if let Some(m) = &mf {
                    m.wait_round(re.round)?;
                }
                last_round_end = Instant::now();
                protocol::write_reply(back, &Reply::RoundAck(re.round))?;
                // The switchover may come next: wait for it awake. Not with multifd: the main
                // connection is quiet while pages flow on the channels, and a spinning main
                // thread would take the CPU their threads need.
                if mf.is_none() {
                    r.get_mut().get_mut().set_spin(SPIN_AFTER_ROUND);
                }
            }
            Item::Control { tag: TAG_SWITCHOVER, .. } => {
                switch_at = Some(Instant::now());
                vm.prepare_resume();
                tracing::debug!("SWITCHOVER received {:.3} ms after the last round ended", last_round_end.elapsed().as_secs_f64() * 1e3);
            }
            Item::Control { tag: TAG_MULTIFD_SETUP, body } if mf.is_none() => {
                let setup: crate::multifd::Setup = protocol::decode(&body)?;
                let chans = accept_channels(ctx, &setup)?;
                mf = Some(crate::multifd::Receivers::start(chans, setup.compression, regions.clone(), back.try_clone_box()?)?);
                r.get_mut().get_mut().set_spin(std::time::Duration::ZERO);
                protocol::write_reply(back, &Reply::MultifdReady)?;
                tracing::info!("multifd: {} channels, compression {}", setup.channels, setup.compression);
            }
            Item::Control { tag: TAG_MULTIFD_SYNC, body } => {
                let round: u32 = protocol::decode(&body)?;
                match &mf {
                    Some(m) => m.wait_round(round)?,
                    None => return Err(MigrationError::Protocol("MULTIFD_SYNC without multifd".into())),
                }
            }
            Item::Control { tag: crate::protocol::TAG_POSTCOPY_DISCARD, .. } if mf.is_some() => {
                return Err(MigrationError::Protocol("post-copy is not compatible with multifd".into()));
            }
            Item::Control { tag: crate::protocol::TAG_POSTCOPY_DISCARD, body } => {
                return crate::postcopy_dest::destination(vm, r, back, body, st, t0);
            }
            Item::Control { tag, .. } => {
                return Err(MigrationError::Protocol(format!("unexpected control record {tag:#x}")))
            }
            Item::Section(s) => {
                if switch_at.is_none() {
                    return Err(MigrationError::Protocol("state section before SWITCHOVER".into()));
                }
                if sections.len() >= 4096 {
                    return Err(MigrationError::Protocol("too many state sections".into()));
                }
                sections.push(s);
            }
            Item::End => break,
        }
    }
    let switch_at = switch_at.ok_or_else(|| MigrationError::Protocol("stream ended without SWITCHOVER".into()))?;
    let t_restore = Instant::now();
    vm.check_state(&sections).map_err(MigrationError::Vm)?;
    vm.restore_state(&sections).map_err(MigrationError::Vm)?;
    st.restore_ms = t_restore.elapsed().as_secs_f64() * 1000.0;
    vm.before_resume_incoming().map_err(MigrationError::Vm)?;
    vm.resume_incoming();
    st.switchover_ms = switch_at.elapsed().as_secs_f64() * 1000.0;
    st.bytes = r.bytes_read();
    if let Some(m) = &mf {
        st.bytes += m.bytes.load(std::sync::atomic::Ordering::Relaxed);
        st.pages += m.pages.load(std::sync::atomic::Ordering::Relaxed);
    }
    st.total_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let running = Running {
        switchover_us: (st.switchover_ms * 1000.0) as u64,
        restore_us: (st.restore_ms * 1000.0) as u64,
    };
    // The guest runs now; if the source cannot hear it, its disk lock guard keeps it paused.
    if let Err(e) = protocol::write_reply(back, &Reply::Running(running)) {
        tracing::warn!("could not tell the source the guest runs here: {e}");
    }
    Ok(st)
}
