//! Small legacy devices: the debug-exit port (like QEMU's isa-debug-exit at 0xf4, but the
//! VMM exits with the byte written) and the i8042 controller's reset line (port 0x64, 0xFE).

use crate::bus::BusDevice;
use crate::{VmEvents, VmRequest};

/// Port 0xf4: the guest writes a status, the VMM exits with it.
pub struct DebugExit {
    events: VmEvents,
}

impl DebugExit {
    pub const PORT: u16 = 0xf4;
    pub fn new(events: VmEvents) -> Self {
        DebugExit { events }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(&status) = data.first() {
                self.events.send(VmRequest::DebugExit(status));
            }
        }
    }
}

/// Ports 0x60..=0x64: enough of an i8042 for a guest to reset the machine with 0xFE and to
/// find no keyboard (status reads 0: output buffer empty, input buffer empty).
pub struct I8042 {
    events: VmEvents,
}

impl I8042 {
    pub const BASE: u16 = 0x60;
    pub const LEN: u16 = 5;
    pub fn new(events: VmEvents) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            self.events.send(VmRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    #[test]
    fn exit_and_reset_requests() {
        let (tx, rx) = channel();
        let mut d = DebugExit::new(VmEvents::new(tx.clone()));
        d.write(0, &[3]);
        assert_eq!(rx.try_recv().unwrap(), VmRequest::DebugExit(3));
        let mut k = I8042::new(VmEvents::new(tx));
        k.write(4, &[0x01]);
        assert!(rx.try_recv().is_err());
        k.write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), VmRequest::Reset);
    }
}
