//! QEMU's migration capabilities (`migrate-set-capabilities`, `migrate_set_capability`) as
//! Godwit answers them. Every capability QEMU 7.2 lists is listed (libvirt sends each advertised
//! one back, true or false, in one call, and aborts when one it needs is missing), and each is
//! one of three kinds:
//! - implemented: it changes what Godwit does (`events`, `auto-converge`, `postcopy-ram`,
//!   `pause-before-switchover`, `multifd`);
//! - inherent: what the capability asks for is what Godwit always does, so turning it on
//!   changes nothing and is accepted (`return-path`, `late-block-activate`, `zero-blocks`,
//!   `dirty-bitmaps`);
//! - refused: turning it on is an error with QEMU's error class (GenericError) and the reason;
//!   turning it off is always accepted.
//!
//! Nothing is changed unless every entry of a call is accepted.

use monitor::error::CommandError;
use monitor::migration::{CapabilityStatus, MigrationCapability};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What turning a capability on means here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Godwit implements it; the state is kept by whoever acts on it.
    Implemented,
    /// Godwit always behaves this way; the state is only remembered.
    Inherent(&'static str),
    /// Cannot be turned on: the reason.
    Refused(&'static str),
}

/// How Godwit treats `c`.
pub fn support(c: MigrationCapability) -> Support {
    use MigrationCapability as C;
    match c {
        C::Events | C::AutoConverge | C::PostcopyRam | C::PauseBeforeSwitchover | C::Multifd => Support::Implemented,
        C::ReturnPath => Support::Inherent("the stream always has a reply channel from the destination"),
        C::LateBlockActivate => {
            Support::Inherent("the destination opens and locks its disks only at switchover, right before the guest runs")
        }
        C::ZeroBlocks => Support::Inherent("disk blocks never travel in the migration stream (shared storage or NBD mirror)"),
        C::DirtyBitmaps => Support::Inherent("drives carry no persistent dirty bitmaps to migrate"),
        C::Xbzrle => Support::Refused("xbzrle is not supported by Godwit"),
        C::RdmaPinAll => Support::Refused("RDMA migration is not supported by Godwit"),
        C::Compress => {
            Support::Refused("the 'compress' capability (QEMU's deprecated compression threads) is not supported by Godwit")
        }
        C::XColo => Support::Refused("COLO is not supported by Godwit"),
        C::ReleaseRam => Support::Refused("release-ram is not supported by Godwit"),
        C::Block => Support::Refused(
            "block migration in the migration stream is not supported; use shared storage or an NBD mirror (drive-mirror)",
        ),
        C::PostcopyBlocktime => Support::Refused("postcopy-blocktime is not supported by Godwit"),
        C::XIgnoreShared => Support::Refused("x-ignore-shared is not supported by Godwit"),
        C::ValidateUuid => Support::Refused("validate-uuid is not supported: Godwit has no -uuid"),
        C::BackgroundSnapshot => Support::Refused("background-snapshot is not supported by Godwit"),
        C::ZeroCopySend => Support::Refused("zero-copy-send is not supported by Godwit"),
        C::PostcopyPreempt => Support::Refused("postcopy-preempt is not supported by Godwit"),
    }
}

/// The capabilities' states that are not kept by the migration engine's parameters.
#[derive(Default)]
pub struct Caps {
    /// `events`: MIGRATION and MIGRATION_PASS events are emitted (QEMU's default: off).
    events: AtomicBool,
    /// States of the inherent ones, as last set.
    remembered: Mutex<Vec<(MigrationCapability, bool)>>,
}

impl Caps {
    pub fn events(&self) -> bool {
        self.events.load(Ordering::SeqCst)
    }

    /// Checks a whole `migrate-set-capabilities` call; `Ok` only if every entry is accepted.
    pub fn check(caps: &[CapabilityStatus]) -> Result<(), CommandError> {
        for c in caps {
            if let (true, Support::Refused(why)) = (c.state, support(c.capability)) {
                return Err(CommandError::generic(format!(
                    "Migration capability '{}' cannot be enabled: {why}",
                    c.capability.as_str()
                )));
            }
        }
        Ok(())
    }

    /// Records the states this struct keeps (call after [`Caps::check`]).
    pub fn apply(&self, caps: &[CapabilityStatus]) {
        let mut rem = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        for c in caps {
            if c.capability == MigrationCapability::Events {
                self.events.store(c.state, Ordering::SeqCst);
            } else if matches!(support(c.capability), Support::Inherent(_)) {
                rem.retain(|(k, _)| *k != c.capability);
                rem.push((c.capability, c.state));
            }
        }
    }

    /// The state of a capability this struct keeps (false for the others).
    pub fn state(&self, c: MigrationCapability) -> bool {
        if c == MigrationCapability::Events {
            return self.events();
        }
        let rem = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        rem.iter().find(|(k, _)| *k == c).is_some_and(|(_, s)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(capability: MigrationCapability, state: bool) -> CapabilityStatus {
        CapabilityStatus { capability, state }
    }

    #[test]
    fn every_capability_has_an_answer_and_off_is_always_accepted() {
        let all: Vec<_> = MigrationCapability::ALL.iter().map(|&c| cs(c, false)).collect();
        assert!(Caps::check(&all).is_ok());
        let refused = MigrationCapability::ALL.iter().filter(|&&c| matches!(support(c), Support::Refused(_))).count();
        assert!(refused > 0 && refused < MigrationCapability::ALL.len());
    }

    #[test]
    fn one_refused_entry_changes_nothing() {
        let caps = Caps::default();
        let call = [cs(MigrationCapability::Events, true), cs(MigrationCapability::Xbzrle, true)];
        let e = Caps::check(&call).unwrap_err();
        assert!(e.to_string().contains("xbzrle"), "{e}");
        assert!(!caps.events());
    }

    #[test]
    fn events_and_inherent_states_are_kept() {
        let caps = Caps::default();
        let call = [cs(MigrationCapability::Events, true), cs(MigrationCapability::ReturnPath, true)];
        Caps::check(&call).unwrap();
        caps.apply(&call);
        assert!(caps.events());
        assert!(caps.state(MigrationCapability::ReturnPath));
        assert!(!caps.state(MigrationCapability::LateBlockActivate));
        caps.apply(&[cs(MigrationCapability::Events, false)]);
        assert!(!caps.events());
    }
}
