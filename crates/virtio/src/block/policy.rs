//! The drive's storage error policy, as QEMU's `-drive werror=`/`rerror=`: what happens to a
//! guest request whose backend I/O failed.
//!
//! | action | the request | the VM |
//! |---|---|---|
//! | `report` | completes with `VIRTIO_BLK_S_IOERR` | runs on |
//! | `ignore` | completes with `VIRTIO_BLK_S_OK` (the error is only logged) | runs on |
//! | `stop` | is not completed: it goes back to the available ring, as if never popped | paused (`io-error`) until `cont`, which executes it again |
//! | `enospc` | `stop` when the error is "no space left", `report` otherwise | |
//!
//! QEMU's defaults: `werror=enospc`, `rerror=report`. Every failure is handed to the
//! [`ErrorHook`] the VMM installed (QMP `BLOCK_IO_ERROR`, the VM stop, `query-block`'s
//! `io-status`); the device itself never pauses vCPUs.

use std::fmt;
use std::sync::Arc;

/// One `werror`/`rerror` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorAction {
    /// Complete the request with an I/O error status.
    #[default]
    Report,
    /// Complete the request as if it had succeeded.
    Ignore,
    /// Keep the request and stop the VM.
    Stop,
    /// `Stop` on ENOSPC, `Report` on anything else.
    Enospc,
}

impl ErrorAction {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
            ErrorAction::Enospc => "enospc",
        }
    }

    /// What to do with a failure (`nospace`: the backend ran out of space): `Report`,
    /// `Ignore` or `Stop`.
    pub fn resolve(self, nospace: bool) -> ErrorAction {
        match self {
            ErrorAction::Enospc if nospace => ErrorAction::Stop,
            ErrorAction::Enospc => ErrorAction::Report,
            a => a,
        }
    }

    /// Whether the drive keeps an I/O status (QEMU: only when the VM may stop on errors).
    pub fn may_stop(self) -> bool {
        matches!(self, ErrorAction::Stop | ErrorAction::Enospc)
    }
}

impl fmt::Display for ErrorAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ErrorAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "report" => ErrorAction::Report,
            "ignore" => ErrorAction::Ignore,
            "stop" => ErrorAction::Stop,
            "enospc" => ErrorAction::Enospc,
            _ => return Err(format!("'{s}' invalid error action (report, ignore, stop or enospc)")),
        })
    }
}

/// A failed guest request, as the VMM hears of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoErrorReport {
    /// A write (OUT, FLUSH, DISCARD, WRITE_ZEROES) rather than a read.
    pub write: bool,
    /// What was done: `Report`, `Ignore` or `Stop`.
    pub action: ErrorAction,
    /// The backend ran out of space.
    pub nospace: bool,
    /// The backend's error.
    pub reason: String,
}

/// Called by the device's worker thread for every failed guest request, after the device
/// acted on it (with `Stop`: after it stopped taking requests). It must not block on the
/// device (pausing the VM from it would wait for this very thread): hand the work to another
/// thread.
#[derive(Clone)]
pub struct ErrorHook(pub Arc<dyn Fn(&IoErrorReport) + Send + Sync>);

impl fmt::Debug for ErrorHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ErrorHook")
    }
}

/// The policy of one drive.
#[derive(Debug, Clone)]
pub struct ErrorPolicy {
    /// Failed writes (QEMU's default: `enospc`).
    pub werror: ErrorAction,
    /// Failed reads (QEMU's default: `report`).
    pub rerror: ErrorAction,
    /// Where failures are reported.
    pub hook: Option<ErrorHook>,
}

impl Default for ErrorPolicy {
    fn default() -> Self {
        ErrorPolicy { werror: ErrorAction::Enospc, rerror: ErrorAction::Report, hook: None }
    }
}

impl ErrorPolicy {
    /// The action for a failed request.
    pub fn action(&self, write: bool, nospace: bool) -> ErrorAction {
        if write { self.werror } else { self.rerror }.resolve(nospace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_as_qemu() {
        for a in ["report", "ignore", "stop", "enospc"] {
            assert_eq!(a.parse::<ErrorAction>().unwrap().name(), a);
        }
        assert!("halt".parse::<ErrorAction>().is_err());
        let p = ErrorPolicy::default();
        assert_eq!(p.action(true, true), ErrorAction::Stop);
        assert_eq!(p.action(true, false), ErrorAction::Report);
        assert_eq!(p.action(false, true), ErrorAction::Report);
        let p = ErrorPolicy { werror: ErrorAction::Ignore, rerror: ErrorAction::Stop, hook: None };
        assert_eq!(p.action(true, false), ErrorAction::Ignore);
        assert_eq!(p.action(false, false), ErrorAction::Stop);
    }
}
