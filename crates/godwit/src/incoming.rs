//! The destination side of `-incoming URI`: bind at once (so a bad address fails at start),
//! say on stderr that we listen, then receive on a thread. Success resumes the guest here
//! (with `-S`, as QEMU, it stays `paused` until `cont`); failure ends the process with a non-zero status, without the guest ever having run.

use crate::machine::Machine;
use devices::VmRequest;
use migration::receiver;
use migration::transport::{Listener, Uri};
use monitor::events::Event;
use monitor::types::MigrationStatus;
use std::sync::Arc;

/// The destination's MIGRATION events (with the `events` capability, as QEMU): `active` while
/// the stream is awaited and received, then `completed` or `failed`.
fn emit(m: &Machine, status: MigrationStatus) {
    if m.caps.events() {
        m.events.emit(Event::Migration { status });
    }
}

pub fn start(m: &Arc<Machine>, uri: &str) -> Result<(), String> {
    let parsed = Uri::parse(uri).map_err(|e| e.to_string())?;
    let listener = Listener::bind(&parsed).map_err(|e| format!("-incoming {uri}: {e}"))?;
    let shown = match (&parsed, listener.local_port()) {
        (Uri::Tcp { host, .. }, Some(p)) => format!("tcp:{host}:{p}"),
        _ => uri.to_string(),
    };
    eprintln!("godwit: waiting for an incoming migration on {shown}");
    // Post-copy reports its status and takes `migrate_recover` through the monitor's shared state.
    migration::postcopy_dest::attach_incoming(m.mig.clone());
    let m = m.clone();
    std::thread::Builder::new()
        .name("incoming".into())
        .spawn(move || {
            let h = m.handle();
            emit(&m, MigrationStatus::Active);
            let res = receiver::incoming_with(&h, &listener, &m.mig);
            emit(&m, if res.is_ok() { MigrationStatus::Completed } else { MigrationStatus::Failed });
            match res {
                Ok(st) => eprintln!(
                    "godwit: incoming migration completed: {} rounds, {} MiB received in {:.1} ms, \
                     switchover {:.2} ms (state restore {:.2} ms)",
                    st.rounds,
                    st.bytes >> 20,
                    st.total_ms,
                    st.switchover_ms,
                    st.restore_ms
                ),
                Err(e) => m.vm.events().send(VmRequest::Fatal {
                    vcpu: usize::MAX,
                    message: format!("incoming migration failed: {e}"),
                }),
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(())
}
