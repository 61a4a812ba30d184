//! What the QMP clients have not been sent yet, process-wide: each command being handled (from
//! before its handler runs until its reply is written) and each event queued for a client holds
//! a [`Pending`]. At exit, [`wait_sent`] lets the VMM answer first, as QEMU does: `quit`'s
//! `{"return": {}}` reaches the client before the connection closes, and the `SHUTDOWN` event
//! emitted after it too.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

static UNSENT: Mutex<usize> = Mutex::new(0);
static SENT: Condvar = Condvar::new();

/// One reply or event not yet written to its client (dropped once written, or once the
/// client is gone).
#[derive(Debug)]
pub(crate) struct Pending(());

impl Pending {
    pub(crate) fn new() -> Pending {
        *UNSENT.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Pending(())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut n = UNSENT.lock().unwrap_or_else(|e| e.into_inner());
        *n = n.saturating_sub(1);
        if *n == 0 {
            SENT.notify_all();
        }
    }
}

/// Waits until every command being handled has had its reply written and every queued event
/// was written (or its client went away), at most `timeout` (a client that does not read
/// does not hold the exit back longer). True when everything was sent.
pub fn wait_sent(timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    let mut n = UNSENT.lock().unwrap_or_else(|e| e.into_inner());
    while *n > 0 {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        n = SENT.wait_timeout(n, left).unwrap_or_else(|e| e.into_inner()).0;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_what_is_pending() {
        let p = Pending::new();
        assert!(!wait_sent(Duration::from_millis(1)), "one reply still pending");
        let t = std::thread::spawn(move || drop(p));
        assert!(wait_sent(Duration::from_secs(60)));
        t.join().unwrap();
    }
}
