//! The 16550 UART at 0x3f8 (IRQ 4), a thin wrapper over `vm-superio`'s emulation: interrupts go
//! to KVM through an irqfd, output to any writer (stdout, a file, the monitor mux), input is
//! queued by the VMM's console thread. Its registers and receive FIFO are saved and restored.

use crate::bus::BusDevice;
use serde::{Deserialize, Serialize};
use std::io::Write;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;
use vmstate::{Section, StateError, Stateful};

/// Raises the UART's interrupt by signalling an eventfd that KVM turns into an IRQ.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOut = Box<dyn Write + Send>;

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, SerialOut>,
    out_error_reported: bool,
}

/// Saved form of the UART (version 1).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct SerialStateV1 {
    dll: u8,
    dlh: u8,
    ier: u8,
    iir: u8,
    lcr: u8,
    lsr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    rx: Vec<u8>,
}

const STATE_VERSION: u32 = 1;

impl Serial {
    pub const PORT: u16 = 0x3f8;
    pub const LEN: u16 = 8;
    pub const IRQ: u32 = 4;

    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Serial { uart: Uart::new(IrqTrigger(irq), out), out_error_reported: false }
    }

    /// Room left in the receive FIFO.
    pub fn rx_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues input bytes for the guest; returns how many were taken.
    pub fn enqueue(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, b) {
                if !self.out_error_reported {
                    tracing::warn!("serial output failed: {e:?}");
                    self.out_error_reported = true;
                }
            }
        }
    }
}

impl Stateful for Serial {
    fn state_id(&self) -> String {
        "dev.serial0".into()
    }

    fn save_state(&self) -> vmstate::Result<Section> {
        let s = self.uart.state();
        Section::encode(
            self.state_id(),
            STATE_VERSION,
            &SerialStateV1 {
                dll: s.baud_divisor_low,
                dlh: s.baud_divisor_high,
                ier: s.interrupt_enable,
                iir: s.interrupt_identification,
                lcr: s.line_control,
                lsr: s.line_status,
                mcr: s.modem_control,
                msr: s.modem_status,
                scr: s.scratch,
                rx: s.in_buffer,
            },
        )
    }

    fn restore_state(&mut self, section: &Section) -> vmstate::Result<()> {
        let v: SerialStateV1 = section.decode(&self.state_id(), STATE_VERSION)?;
        let st = SerialState {
            baud_divisor_low: v.dll,
            baud_divisor_high: v.dlh,
            interrupt_enable: v.ier,
            interrupt_identification: v.iir,
            line_control: v.lcr,
            line_status: v.lsr,
            modem_control: v.mcr,
            modem_status: v.msr,
            scratch: v.scr,
            in_buffer: v.rx,
        };
        // Rebuild the UART around the same trigger and writer.
        let trigger = IrqTrigger(
            self.uart.interrupt_evt().0.try_clone().map_err(|e| apply_err(&self.state_id(), e))?,
        );
        let placeholder: SerialOut = Box::new(std::io::sink());
        let old = std::mem::replace(&mut self.uart, Uart::new(IrqTrigger(EventFd::new(0).map_err(|e| apply_err("dev.serial0", e))?), placeholder));
        let out = old.into_writer();
        match Uart::from_state(&st, trigger, NoEvents, out) {
            Ok(u) => {
                self.uart = u;
                Ok(())
            }
            Err(e) => Err(StateError::Apply { id: self.state_id(), reason: format!("{e:?}") }),
        }
    }
}

fn apply_err(id: &str, e: impl std::fmt::Display) -> StateError {
    StateError::Apply { id: id.into(), reason: e.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_state_roundtrip() {
        let out = Buf::default();
        let mut s = Serial::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        s.write(7, &[0x5a]); // scratch
        assert_eq!(s.enqueue(b"vq"), 2);
        let saved = s.save_state().unwrap();

        let mut t = Serial::new(EventFd::new(0).unwrap(), Box::new(out.clone()));
        t.restore_state(&saved).unwrap();
        let mut b = [0u8];
        t.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        t.read(0, &mut b);
        assert_eq!(b[0], b'v');
        t.write(0, b"!");
        assert_eq!(&*out.0.lock().unwrap(), b"hi!");
        let bad = Section { id: "dev.serial0".into(), version: 9, data: vec![] };
        assert!(t.restore_state(&bad).is_err());
    }
}
