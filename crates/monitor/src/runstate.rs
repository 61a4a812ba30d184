//! The VM run states, named as QEMU names them in `query-status` and `info status`, the
//! transitions QEMU allows between them, and [`RunStateMachine`]: a small tracker the VMM can use
//! so that STOP/RESUME events are emitted on exactly the edges where QEMU emits them.

use crate::events::{Event, EventBus};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

/// A VM run state. The serde and `Display` forms are QEMU's spelling (`finish-migrate`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Stopped by a debugger (gdbstub).
    Debug,
    /// Waiting for an incoming migration (`-incoming`).
    Inmigrate,
    /// The VMM hit an error it cannot continue from (e.g. an unhandled KVM exit).
    InternalError,
    /// Stopped on a disk I/O error.
    IoError,
    /// Stopped by `stop` (or `-S` after start).
    Paused,
    /// Paused after an outgoing migration completed.
    Postmigrate,
    /// Created but never started (`-S`).
    Prelaunch,
    /// Paused for the final phase of an outgoing migration.
    FinishMigrate,
    /// Paused while `loadvm` restores a snapshot.
    RestoreVm,
    /// Running guest code.
    Running,
    /// Paused while `savevm` writes a snapshot.
    SaveVm,
    /// The guest shut down (and the VMM was asked to stay alive).
    Shutdown,
    /// The guest is suspended (ACPI S3).
    Suspended,
    /// Stopped by a watchdog action.
    Watchdog,
    /// The guest reported a panic.
    GuestPanicked,
    /// COLO fault tolerance mode.
    Colo,
}

impl RunState {
    /// Every state, in QEMU's enum order.
    pub const ALL: [RunState; 16] = [
        RunState::Debug,
        RunState::Inmigrate,
        RunState::InternalError,
        RunState::IoError,
        RunState::Paused,
        RunState::Postmigrate,
        RunState::Prelaunch,
        RunState::FinishMigrate,
        RunState::RestoreVm,
        RunState::Running,
        RunState::SaveVm,
        RunState::Shutdown,
        RunState::Suspended,
        RunState::Watchdog,
        RunState::GuestPanicked,
        RunState::Colo,
    ];

    /// QEMU's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Debug => "debug",
            RunState::Inmigrate => "inmigrate",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Paused => "paused",
            RunState::Postmigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::FinishMigrate => "finish-migrate",
            RunState::RestoreVm => "restore-vm",
            RunState::Running => "running",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Colo => "colo",
        }
    }

    /// Only `running` counts as running (`"running": true` in `query-status`).
    pub fn is_running(self) -> bool {
        self == RunState::Running
    }

    /// States from which `cont` is refused until the VM is reset (QEMU's `runstate_needs_reset`).
    pub fn needs_reset(self) -> bool {
        matches!(
            self,
            RunState::InternalError | RunState::Shutdown | RunState::GuestPanicked
        )
    }

    /// Whether QEMU allows a transition from `self` to `to`. Staying in the same state is
    /// always allowed.
    pub fn can_transition_to(self, to: RunState) -> bool {
        use RunState::*;
        if self == to {
            return true;
        }
        let allowed: &[RunState] = match self {
            Debug => &[Running, FinishMigrate, Prelaunch, Suspended],
            Inmigrate => &[
                InternalError,
                IoError,
                Paused,
                Running,
                Shutdown,
                Suspended,
                Watchdog,
                GuestPanicked,
                FinishMigrate,
                Prelaunch,
                Postmigrate,
                Colo,
            ],
            InternalError => &[Paused, FinishMigrate, Prelaunch],
            IoError => &[Running, FinishMigrate, Prelaunch],
            Paused => &[Running, FinishMigrate, Postmigrate, Prelaunch, Colo],
            Postmigrate => &[Running, FinishMigrate, Prelaunch],
            Prelaunch => &[Running, FinishMigrate, Inmigrate],
            FinishMigrate => &[Running, Paused, Postmigrate, Prelaunch, Colo],
            RestoreVm => &[Running, Prelaunch],
            Colo => &[Running, Prelaunch, Shutdown],
            Running => &[
                Debug,
                InternalError,
                IoError,
                Paused,
                FinishMigrate,
                RestoreVm,
                SaveVm,
                Shutdown,
                Watchdog,
                GuestPanicked,
                Colo,
                Suspended,
            ],
            SaveVm => &[Running],
            Shutdown => &[Paused, FinishMigrate, Prelaunch, Colo],
            Suspended => &[Running, FinishMigrate, Prelaunch, Colo],
            Watchdog => &[Running, FinishMigrate, Prelaunch, Colo],
            GuestPanicked => &[Running, FinishMigrate, Prelaunch],
        };
        allowed.contains(&to)
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`RunState::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown run state '{0}'")]
pub struct UnknownRunState(pub String);

impl FromStr for RunState {
    type Err = UnknownRunState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunState::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRunState(s.to_string()))
    }
}

/// A transition QEMU would not make.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid run state transition: '{from}' -> '{to}'")]
pub struct InvalidTransition {
    pub from: RunState,
    pub to: RunState,
}

/// The current run state plus the rule QEMU follows for events: leaving `running` emits
/// `STOP`, entering `running` emits `RESUME`. The VMM keeps one and calls [`set`](Self::set)
/// whenever its vCPUs are paused or resumed; the monitor only reads it.
pub struct RunStateMachine {
    state: Mutex<RunState>,
    events: EventBus,
}

impl RunStateMachine {
    pub fn new(initial: RunState, events: EventBus) -> Self {
        RunStateMachine {
            state: Mutex::new(initial),
            events,
        }
    }

    /// The current state.
    pub fn get(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves to `to` if QEMU allows it, emitting STOP/RESUME on the running edges.
    /// Returns the previous state.
    pub fn set(&self, to: RunState) -> Result<RunState, InvalidTransition> {
        self.update(|from| {
            if from.can_transition_to(to) {
                Ok(to)
            } else {
                Err(InvalidTransition { from, to })
            }
        })
    }

    /// Moves to `to` without checking QEMU's table (for recovery paths), still emitting events.
    pub fn force(&self, to: RunState) -> RunState {
        match self.update(|_| Ok::<_, InvalidTransition>(to)) {
            Ok(prev) => prev,
            Err(e) => e.from,
        }
    }

    /// Atomically computes the next state from the current one. `f` returning an error leaves
    /// the state unchanged. Events are emitted while the state lock is held, so every observer
    /// sees STOP/RESUME in the order the transitions happened.
    pub fn update<E>(
        &self,
        f: impl FnOnce(RunState) -> Result<RunState, E>,
    ) -> Result<RunState, E> {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let from = *guard;
        let to = f(from)?;
        *guard = to;
        if from.is_running() && !to.is_running() {
            self.events.emit(Event::Stop);
        } else if !from.is_running() && to.is_running() {
            self.events.emit(Event::Resume);
        }
        Ok(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_str_and_serde() {
        for s in RunState::ALL {
            assert_eq!(s.as_str().parse::<RunState>(), Ok(s));
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert!("Running".parse::<RunState>().is_err());
    }

    #[test]
    fn transitions_follow_qemu() {
        assert!(RunState::Running.can_transition_to(RunState::Paused));
        assert!(RunState::Paused.can_transition_to(RunState::Running));
        assert!(RunState::Inmigrate.can_transition_to(RunState::Running));
        assert!(!RunState::Postmigrate.can_transition_to(RunState::Inmigrate));
        assert!(!RunState::SaveVm.can_transition_to(RunState::Paused));
        assert!(!RunState::Prelaunch.can_transition_to(RunState::Paused));
    }

    #[test]
    fn machine_emits_stop_and_resume_on_running_edges() {
        let bus = EventBus::new();
        let rx = bus.subscribe(16);
        let m = RunStateMachine::new(RunState::Prelaunch, bus);
        assert_eq!(m.set(RunState::Running), Ok(RunState::Prelaunch));
        assert_eq!(m.set(RunState::Paused), Ok(RunState::Running));
        assert_eq!(m.set(RunState::Paused), Ok(RunState::Paused));
        assert!(m.set(RunState::Inmigrate).is_err());
        assert_eq!(m.get(), RunState::Paused);
        let names: Vec<String> = rx.try_iter().map(|e| e.name().to_string()).collect();
        assert_eq!(names, ["RESUME", "STOP"]);
    }
}
