//! Lets the migration engine drive a `vmm::Vm` (the `MigratableVm` trait lives in the
//! migration crate so that crate does not depend on the VM core). Pausing and resuming through
//! this handle also moves the monitor's run state (`finish-migrate`, `running`).

use crate::drives::SharedDisk;
use migration::{MigratableVm, RamRegion};
use monitor::runstate::{RunState, RunStateMachine};
use std::sync::Arc;
use vmm::Vm;
use vmstate::Section;

pub struct VmHandle {
    pub vm: Arc<Vm>,
    pub state: Arc<RunStateMachine>,
    pub disks: Vec<SharedDisk>,
    /// Announcement parameters (destination: the guest's MACs are announced before it runs).
    pub announce: Arc<std::sync::Mutex<net::AnnounceParams>>,
    /// Destination: run the guest once the incoming migration is done (false with `-S`).
    pub autostart: bool,
}

impl MigratableVm for VmHandle {
    fn ram_regions(&self) -> Vec<RamRegion> {
        self.vm.ram().slots().iter().map(|s| RamRegion { gpa: s.gpa, size: s.size, host: s.host }).collect()
    }
    fn discard_ram(&self) -> Result<(), String> {
        // Only what holds anything: dropping a whole 64 GiB slot makes KVM walk every page
        // of it, while a fresh destination has a few MiB (firmware, kernel) populated.
        for r in self.ram_regions() {
            let bits = migration::ram::populated_pages(&r);
            let npages = (r.size / vmm::memory::PAGE_SIZE) as usize;
            for (first, n) in migration::ram::runs(&bits, npages, usize::MAX) {
                let (gpa, len) = (r.gpa + first as u64 * vmm::memory::PAGE_SIZE, n as u64 * vmm::memory::PAGE_SIZE);
                self.vm.ram().discard(gpa, len).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
    fn migration_completed(&self) {
        self.state.force(RunState::Postmigrate);
    }
    fn before_receiving_pages(&self) {
        if vmm::pagesize::small_pages_while_receiving() {
            self.vm.ram().advise_huge_pages(false);
        }
    }
    fn set_dirty_logging(&self, on: bool) -> Result<(), String> {
        self.vm.set_dirty_logging(on).map_err(|e| e.to_string())
    }
    fn take_dirty(&self) -> Result<Vec<Vec<u64>>, String> {
        self.vm.take_dirty().map_err(|e| e.to_string())
    }
    fn pause(&self) {
        self.vm.pause();
        self.state.force(RunState::FinishMigrate);
    }
    fn resume(&self) {
        self.vm.resume();
        self.state.force(RunState::Running);
    }
    fn resume_incoming(&self) {
        if self.autostart {
            self.resume();
        } else {
            // QEMU with -S: `paused` (no STOP event, the guest never ran here) until `cont`.
            self.state.force(RunState::Paused);
        }
    }
    fn save_state(&self) -> Result<Vec<Section>, String> {
        self.vm.save_state().map_err(|e| e.to_string())
    }
    fn check_state(&self, sections: &[Section]) -> Result<(), String> {
        self.vm.check_state(sections).map_err(|e| e.to_string())
    }
    fn restore_state(&self, sections: &[Section]) -> Result<(), String> {
        self.vm.restore_state(sections).map_err(|e| e.to_string())
    }
    fn prepare_resume(&self) {
        self.vm.prepare_resume();
    }
    fn set_throttle(&self, pct: u8) {
        self.vm.set_throttle(pct);
    }
    fn before_switchover(&self) -> Result<(), String> {
        self.vm.quiesce().map_err(|e| e.to_string())?;
        // Storage migration: the destination's disks must be complete copies.
        for d in &self.disks {
            d.check_switchover()?;
        }
        for d in &self.disks {
            d.release()?;
        }
        Ok(())
    }
    fn after_failed_switchover(&self) -> Result<(), String> {
        for d in &self.disks {
            d.reacquire()?;
        }
        Ok(())
    }
    fn before_resume_incoming(&self) -> Result<(), String> {
        for d in &self.disks {
            d.reacquire()?;
        }
        // Switches and bridges learn the guest's new port now, not when their entries age out.
        self.vm.announce(*self.announce.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(())
    }
    fn config_summary(&self) -> String {
        let c = self.vm.config_state();
        format!("mem={}MiB vcpus={} devices={}", c.mem_size >> 20, c.vcpus, c.devices.join(","))
    }
}
