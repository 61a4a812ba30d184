//! The hardware-reduced ACPI power-management registers the FADT points at, as three I/O ports:
//!
//! | port  | register       | guest write                      | effect                 |
//! |-------|----------------|----------------------------------|------------------------|
//! | 0x600 | sleep control  | SLP_EN (bit 5) with SLP_TYP 5    | [`VmRequest::PowerOff`] |
//! | 0x601 | sleep status   | WAK_STS (bit 7) write-one-clear  | none                   |
//! | 0x602 | reset          | [`RESET_VALUE`]                  | [`VmRequest::Reset`]   |
//!
//! Linux's `poweroff` ends in `acpi_power_off`, which clears WAK_STS and writes
//! `SLP_TYP << 2 | SLP_EN` (0x34 for the `\_S5` value 5) to the sleep control register; its
//! ACPI reboot writes the FADT reset value to the reset register. Reads return 0 (never awake
//! from a sleep state). Other sleep types are ignored: the DSDT declares only S5.

use devices::bus::BusDevice;
use devices::{VmEvents, VmRequest};

/// First port of the block.
pub const PM_PORT_BASE: u16 = 0x600;
/// Number of ports.
pub const PM_PORT_LEN: u16 = 3;
pub const SLEEP_CONTROL_PORT: u16 = PM_PORT_BASE;
pub const SLEEP_STATUS_PORT: u16 = PM_PORT_BASE + 1;
pub const RESET_PORT: u16 = PM_PORT_BASE + 2;
/// The value the guest writes to [`RESET_PORT`] to reset (the FADT says so).
pub const RESET_VALUE: u8 = 0x42;

/// SLP_EN in the sleep control register.
pub const SLP_EN: u8 = 1 << 5;
/// SLP_TYP field position in the sleep control register (bits 2..=4).
pub const SLP_TYP_SHIFT: u8 = 2;

/// The register block. Insert it on the port bus at [`PM_PORT_BASE`], [`PM_PORT_LEN`] ports.
pub struct AcpiPm {
    events: VmEvents,
}

impl AcpiPm {
    pub fn new(events: VmEvents) -> Self {
        AcpiPm { events }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
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
        let mut pm = AcpiPm::new(VmEvents::new(tx));
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
}
