//! A bus maps address ranges (I/O ports or guest-physical MMIO addresses) to devices.
//! vCPU threads dispatch every port/MMIO exit through it; unclaimed reads return all ones.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. Offsets are relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// An address space of devices.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, dev: SharedDevice) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        if len == 0 || self.devices.range(..end).next_back().is_some_and(|(b, (l, _))| b + l > base) {
            return Err(Overlap { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, dev))
    }

    /// Dispatches a read; returns false (and fills ones) when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                lock(dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((off, dev)) => {
                lock(dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock (a panicking device thread must not take
/// the vCPUs down with it).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, off: u64, d: &mut [u8]) {
            d[0] = self.0 + off as u8;
        }
        fn write(&mut self, _: u64, d: &[u8]) {
            self.0 = d[0];
        }
    }

    #[test]
    fn routes_and_rejects_overlaps() {
        let mut bus = Bus::new();
        bus.insert(0x10, 8, Arc::new(Mutex::new(Reg(1)))).unwrap();
        assert!(bus.insert(0x14, 8, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(0x8, 9, Arc::new(Mutex::new(Reg(0)))).is_err());
        bus.insert(0x18, 1, Arc::new(Mutex::new(Reg(0)))).unwrap();
        let mut b = [0u8];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x10, &[9]));
        bus.read(0x10, &mut b);
        assert_eq!(b[0], 9);
        assert!(!bus.read(0x20, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.write(0x0, &[1]));
    }
}
