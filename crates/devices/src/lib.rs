//! Godwit's emulated devices and the buses that route guest port and MMIO accesses to them.
//!
//! Devices report VM-level happenings (the guest asked to exit, reset or power off) through
//! a [`VmEvents`] sink rather than by touching the VM, so they stay independent of it.

pub mod bus;
pub mod legacy;
pub mod serial;

use std::sync::mpsc::Sender;

/// Something a device asks the VM to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmRequest {
    /// A vCPU stopped with an error the VM cannot continue from (emulation failure...).
    Fatal { vcpu: usize, message: String },
    /// The monitor asked the VMM to quit.
    Quit,
    /// The guest wrote a status to the debug-exit port: end the VMM with it.
    DebugExit(u8),
    /// The guest asked for a reset (i8042 pulse, triple fault).
    Reset,
    /// The guest powered off.
    PowerOff,
}

/// Where devices send their [`VmRequest`]s.
#[derive(Clone)]
pub struct VmEvents(Sender<VmRequest>);

impl VmEvents {
    pub fn new(tx: Sender<VmRequest>) -> Self {
        VmEvents(tx)
    }
    pub fn send(&self, r: VmRequest) {
        // The receiver lives as long as the VM; if it is gone the VMM is exiting anyway.
        let _ = self.0.send(r);
    }
}
