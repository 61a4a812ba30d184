//! One vCPU's architectural state: what is saved after a clean pause and restored in the
//! order that works on KVM (see `../shared/HOST-KVM.md`): CPUID, TSC frequency (same value
//! only), MP state, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRs (TSC deadline after the
//! TSC), vCPU events last.

use crate::error::{kvm, Error, Result};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vmstate::{Section, StateError};

pub const STATE_VERSION: u32 = 1;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Saved state of one vCPU (version 1).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: Option<u32>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

pub fn section_id(id: u32) -> String {
    format!("vcpu.{id}")
}

/// Orders an MSR list so the TSC deadline comes after the TSC (and last).
pub fn order_msrs(list: &mut Vec<u32>) {
    list.retain(|&m| m != MSR_IA32_TSC_DEADLINE);
    if let Some(p) = list.iter().position(|&m| m == MSR_IA32_TSC) {
        let tsc = list.remove(p);
        list.push(tsc);
    }
    list.push(MSR_IA32_TSC_DEADLINE);
}

/// Reads the MSRs in `list`; those KVM refuses to read are dropped (and logged once).
pub fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>> {
    let entries: Vec<kvm_msr_entry> =
        list.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|e| Error::Device(format!("MSR list: {e:?}")))?;
    let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
    if n == list.len() {
        return Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect());
    }
    // Some MSR is not readable: read one by one, keep what works.
    let mut out = Vec::with_capacity(list.len());
    for &index in list {
        let mut one = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
            .map_err(|e| Error::Device(format!("MSR list: {e:?}")))?;
        if fd.get_msrs(&mut one).map_err(kvm("KVM_GET_MSRS"))? == 1 {
            out.push((index, one.as_slice()[0].data));
        } else {
            tracing::debug!("MSR {index:#x} not readable; not saved");
        }
    }
    Ok(out)
}

pub fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<()> {
    let entries: Vec<kvm_msr_entry> =
        msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    let m = Msrs::from_entries(&entries).map_err(|e| Error::Device(format!("MSR list: {e:?}")))?;
    let n = fd.set_msrs(&m).map_err(kvm("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(Error::State(StateError::Apply {
            id: "vcpu".into(),
            reason: format!("KVM accepted only {n} of {} MSRs (stopped at {:#x})", entries.len(), entries[n].index),
        }));
    }
    Ok(())
}

/// Saves a paused vCPU.
pub fn save(fd: &VcpuFd, id: u32, msr_list: &[u32]) -> Result<VcpuState> {
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().ok();
    let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = read_msrs(fd, msr_list)?;
    let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState { id, cpuid, tsc_khz, mp_state, regs, sregs, xsave, xcrs, debugregs, lapic, msrs, events })
}

/// Restores a paused vCPU in the order known to work.
pub fn restore(fd: &VcpuFd, st: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&st.cpuid).map_err(|e| Error::Device(format!("CPUID: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    if let Some(khz) = st.tsc_khz {
        // Only the same frequency can be set on this host; a different one is refused by KVM
        // and reported (the guest would see its TSC run at another rate).
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(kvm("KVM_SET_TSC_KHZ"))?;
        }
    }
    fd.set_mp_state(st.mp_state).map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&st.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&st.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: the buffer is a full kvm_xsave as KVM_GET_XSAVE returned it.
    unsafe { fd.set_xsave(&st.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    if let Some(x) = &st.xcrs {
        fd.set_xcrs(x).map_err(kvm("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&st.debugregs).map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&st.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    write_msrs(fd, &st.msrs)?;
    fd.set_vcpu_events(&st.events).map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

impl VcpuState {
    pub fn to_section(&self) -> Result<Section> {
        Ok(Section::encode(section_id(self.id), STATE_VERSION, self)?)
    }
    pub fn from_section(s: &Section, id: u32) -> Result<Self> {
        let st: VcpuState = s.decode(&section_id(id), STATE_VERSION)?;
        if st.id != id {
            return Err(StateError::Mismatch(format!("section for vCPU {} holds vCPU {}", id, st.id)).into());
        }
        Ok(st)
    }
}
