//! VM-wide KVM state: the PIT, the kvmclock and the in-kernel interrupt controllers (PIC
//! master, PIC slave, IOAPIC), saved after a clean pause and restored before any vCPU state.

use crate::error::{kvm, Result};
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vmstate::Section;

pub const SECTION_ID: &str = "vm.kvm";
pub const STATE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, Clone)]
pub struct KvmVmState {
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// PIC master (0), PIC slave (1), IOAPIC (2).
    pub irqchips: Vec<kvm_irqchip>,
}

pub fn save(vm: &VmFd) -> Result<KvmVmState> {
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in 0..3 {
        let mut c = kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
        irqchips.push(c);
    }
    Ok(KvmVmState { pit, clock, irqchips })
}

pub fn restore(vm: &VmFd, st: &KvmVmState) -> Result<()> {
    vm.set_pit2(&st.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = st.clock;
    clock.flags &= KVM_CLOCK_REALTIME;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    for c in &st.irqchips {
        vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

impl KvmVmState {
    pub fn to_section(&self) -> Result<Section> {
        Ok(Section::encode(SECTION_ID, STATE_VERSION, self)?)
    }
    pub fn from_section(s: &Section) -> Result<Self> {
        let st: KvmVmState = s.decode(SECTION_ID, STATE_VERSION)?;
        if st.irqchips.len() != 3 || st.irqchips.iter().enumerate().any(|(i, c)| c.chip_id != i as u32) {
            return Err(vmstate::StateError::Malformed { id: SECTION_ID.into(), reason: "irqchip list".into() }.into());
        }
        Ok(st)
    }
}
