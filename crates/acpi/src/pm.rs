//! The hardware-reduced ACPI power-management registers the FADT points at, and the event
//! register of the Generic Event Device (GED) the DSDT describes, as four I/O ports:
//!
//! | port  | register       | guest access                     | effect                 |
//! |-------|----------------|----------------------------------|------------------------|
//! | 0x600 | sleep control  | SLP_EN (bit 5) with SLP_TYP 5    | [`VmRequest::PowerOff`] |
//! | 0x601 | sleep status   | WAK_STS (bit 7) write-one-clear  | none                   |
//! | 0x602 | reset          | [`RESET_VALUE`]                  | [`VmRequest::Reset`]   |
//! | 0x603 | GED events     | read: pending events, cleared    | none                   |
//!
//! Linux's `poweroff` ends in `acpi_power_off`, which clears WAK_STS and writes
//! `SLP_TYP << 2 | SLP_EN` (0x34 for the `\_S5` value 5) to the sleep control register; its
//! ACPI reboot writes the FADT reset value to the reset register. Reads return 0 (never awake
//! from a sleep state). Other sleep types are ignored: the DSDT declares only S5.
//!
//! The power button (QMP `system_powerdown`): [`PowerButton::press`] latches
//! [`EVENT_POWER_BUTTON`] in the GED event register and pulses GSI [`GED_GSI`]. Linux's GED
//! driver then runs the DSDT's `_EVT`, which reads the register (clearing it) and notifies the
//! `PNP0C0C` power-button device: the guest sees a power-button press (systemd-logind or acpid
//! turn it into `poweroff`). A guest without ACPI may poll the register instead (the test guest
//! does, in its timer tick). The latch is not part of the saved or migrated state: a press the
//! guest has not read yet when the VM is snapshotted or moved is lost (press again), and a
//! reset clears it (`Vm::reset`).

use devices::bus::BusDevice;
use devices::{VmEvents, VmRequest};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// First port of the block.
pub const PM_PORT_BASE: u16 = 0x600;
/// Number of ports.
pub const PM_PORT_LEN: u16 = 4;
pub const SLEEP_CONTROL_PORT: u16 = PM_PORT_BASE;
pub const SLEEP_STATUS_PORT: u16 = PM_PORT_BASE + 1;
pub const RESET_PORT: u16 = PM_PORT_BASE + 2;
/// The GED event register: a read returns the pending events and clears them.
pub const GED_EVENT_PORT: u16 = PM_PORT_BASE + 3;
/// The GED's interrupt (an ISA-range IOAPIC pin nothing else uses; edge, active high).
pub const GED_GSI: u32 = 9;
/// The power-button bit in the GED event register.
pub const EVENT_POWER_BUTTON: u8 = 1;
/// The value the guest writes to [`RESET_PORT`] to reset (the FADT says so).
pub const RESET_VALUE: u8 = 0x42;

/// SLP_EN in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// SLP_TYP field position in the sleep control register (bits 2..=4).
pub const SLP_TYP_SHIFT: u8 = 2;

/// The GED's power button: a handle the monitor presses, shared with [`AcpiPm`].
#[derive(Clone)]
pub struct PowerButton {
    pending: Arc<AtomicU8>,
    irq: Arc<EventFd>,
}

impl PowerButton {
    /// A button raising `irq` (an eventfd the VMM registers as an irqfd on [`GED_GSI`]).
    pub fn new(irq: EventFd) -> Self {
        PowerButton {
            pending: Arc::new(AtomicU8::new(0)),
            irq: Arc::new(irq),
        }
    }
    pub fn irq(&self) -> &EventFd {
        &self.irq
    }
    /// Presses the button: latches the event and pulses the interrupt.
    pub fn press(&self) {
        self.pending.fetch_or(EVENT_POWER_BUTTON, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("GED interrupt: {e}");
        }
    }
    /// Takes the pending events (what a read of the event register returns).
    pub fn take(&self) -> u8 {
        self.pending.swap(0, Ordering::SeqCst)
    }
}

/// The register block. Insert it on the port bus at [`PM_PORT_BASE`], [`PM_PORT_LEN`] ports.
pub struct AcpiPm {
    events: VmEvents,
    button: PowerButton,
}

impl AcpiPm {
    pub fn new(events: VmEvents, button: PowerButton) -> Self {
        AcpiPm { events, button }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 3 {
            if let Some(b) = data.first_mut() {
                *b = self.button.take();
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => {
                let typ = (v >> SLP_TYP_SHIFT) & 7;
                if v & SLP_EN == 0 {
                    return;
                }
                if typ == crate::dsdt::S5_SLP_TYP {
                    tracing::info!("guest entered ACPI S5 (soft off)");
                    self.events.send(VmRequest::PowerOff);
                } else {
                    tracing::warn!(
                        "guest asked for ACPI sleep type {typ}, which is not offered; ignored"
                    );
                }
            }
            2 if v == RESET_VALUE => {
                tracing::info!("guest reset through the ACPI reset register");
                self.events.send(VmRequest::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn poweroff_reset_and_ignored_writes() {
        let (tx, rx) = channel();
        let button = PowerButton::new(EventFd::new(0).unwrap());
        let mut pm = AcpiPm::new(VmEvents::new(tx), button);
        // What Linux writes: SLP_TYP=5, SLP_EN.
        pm.write(0, &[(5 << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(rx.try_recv().unwrap(), VmRequest::PowerOff);
        // SLP_TYP without SLP_EN, another sleep type, the status register, a wrong reset value.
        pm.write(0, &[5 << SLP_TYP_SHIFT]);
        pm.write(0, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        pm.write(1, &[0x80]);
        pm.write(2, &[0x41]);
        pm.write(2, &[]);
        assert!(rx.try_recv().is_err());
        pm.write(2, &[RESET_VALUE]);
        assert_eq!(rx.try_recv().unwrap(), VmRequest::Reset);
        let mut b = [0xffu8; 1];
        pm.read(1, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn power_button_latches_until_read_and_pulses_its_interrupt() {
        let (tx, rx) = channel();
        let button = PowerButton::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut pm = AcpiPm::new(VmEvents::new(tx), button.clone());
        let mut b = [0xffu8; 1];
        pm.read(3, &mut b);
        assert_eq!(b, [0], "nothing pending");
        assert!(button.irq().read().is_err(), "no interrupt yet");
        button.press();
        button.press();
        assert_eq!(button.irq().read().unwrap(), 2, "one pulse per press");
        pm.read(3, &mut b);
        assert_eq!(b, [EVENT_POWER_BUTTON]);
        pm.read(3, &mut b);
        assert_eq!(b, [0], "a read clears it");
        // Writes to the register change nothing; no VM request comes from the button.
        button.press();
        pm.write(3, &[0]);
        pm.read(3, &mut b);
        assert_eq!(b, [EVENT_POWER_BUTTON]);
        assert!(rx.try_recv().is_err());
    }
}
