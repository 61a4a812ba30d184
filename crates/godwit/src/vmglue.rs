//! Lets the migration engine drive a `vmm::Vm` (the `MigratableVm` trait lives in the
//! migration crate so that crate does not depend on the VM core).

use migration::{MigratableVm, RamRegion};
use std::sync::Arc;
use vmm::Vm;
use vmstate::Section;

pub struct VmHandle(pub Arc<Vm>);

impl MigratableVm for VmHandle {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.0.ram().slots().iter().map(|s| RamRegion { gpa: s.gpa, size: s.size, host: s.host }).collect()
    }
    fn discard_ram(&self) -> Result<(), String> {
        for s in self.0.ram().slots() {
            self.0.ram().discard(s.gpa, s.size).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    fn set_dirty_logging(&self, on: bool) -> Result<(), String> {
        self.0.set_dirty_logging(on).map_err(|e| e.to_string())
    }
    fn take_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        self.0.take_dirty().map_err(|e| e.to_string())
    }
    fn pause(&self) {
        self.0.pause()
    }
    fn resume(&self) {
        self.0.resume()
    }
    fn save_state(&self) -> Result<Vec<Section>, String> {
        self.0.save_state().map_err(|e| e.to_string())
    }
    fn check_state(&self, sections: &[Section]) -> Result<(), String> {
        self.0.check_state(sections).map_err(|e| e.to_string())
    }
    fn restore_state(&self, sections: &[Section]) -> Result<(), String> {
        self.0.restore_state(sections).map_err(|e| e.to_string())
    }
    fn config_summary(&self) -> String {
        let c = self.0.config_state();
        format!("mem={}MiB vcpus={} devices={}", c.mem_size >> 20, c.vcpus, c.devices.join(","))
    }
}
