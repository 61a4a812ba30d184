//! The VM: creates the KVM VM with its RAM, in-kernel irqchip and PIT, the legacy devices and
//! the vCPUs, boots the kernel, and offers what everything above needs — pause/resume, reset,
//! the requests devices and vCPUs raise, dirty tracking, and save/restore of the whole machine
//! state as [`Section`]s (guest RAM travels separately, see `vmstate::ram`).

use crate::boot::BootEntry;
use crate::error::{kvm, Error, Result};
use crate::memory::GuestRam;
use crate::runner::{Vcpu, VcpuContext, VcpuSet};
use crate::vcpu::{self, VcpuState};
use crate::vmstate_kvm::{self, KvmVmState};
use crate::MAX_VCPUS;
use devices::bus::{lock, Bus};
use devices::legacy::{DebugExit, I8042};
use devices::serial::{Serial, SerialOut};
use devices::{VmEvents, VmRequest};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use virtio::{Block, BlockBackend, BlockConfig, MmioTransport};
use vmstate::{Section, StateError, Stateful};

/// A virtio-blk disk to attach: its backend and device configuration.
pub struct DiskSpec {
    pub backend: Box<dyn BlockBackend>,
    pub config: BlockConfig,
}

pub type BlockDevice = Arc<Mutex<MmioTransport<Block>>>;

const TSS_ADDRESS: usize = 0xfffb_d000;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// What the VM is made of.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub mem_size: u64,
    pub vcpus: usize,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
}

/// The part of the configuration a saved state must match (section `vm.config`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConfigState {
    pub mem_size: u64,
    pub vcpus: u32,
    pub devices: Vec<String>,
}
const CONFIG_ID: &str = "vm.config";
const CONFIG_VERSION: u32 = 1;

pub struct Vm {
    config: VmConfig,
    fd: VmFd,
    ram: Arc<GuestRam>,
    vcpus: Arc<VcpuSet>,
    serial: Arc<Mutex<Serial>>,
    disks: Vec<BlockDevice>,
    nets: Vec<crate::netdev::NetDevice>,
    events: VmEvents,
    power_button: acpi::pm::PowerButton,
    requests: Mutex<Receiver<VmRequest>>,
    msr_list: Vec<u32>,
    boot: BootEntry,
    boot_state: Vec<Section>,
    /// Set by the first resume: until then the machine is in its boot state, which is what a
    /// failed restore puts back (no need to save it again on the switchover's critical path).
    ran: std::sync::atomic::AtomicBool,
    _kvm: Kvm,
}

impl Vm {
    /// Builds the VM and loads the kernel; the vCPUs start paused (see [`Vm::resume`]).
    pub fn new(config: VmConfig, serial_out: SerialOut, disk_specs: Vec<DiskSpec>) -> Result<Self> {
        Self::with_nics(config, serial_out, disk_specs, Vec::new())
    }

    /// Like [`Vm::new`], with network cards (in the virtio-mmio slots after the disks).
    pub fn with_nics(
        config: VmConfig,
        serial_out: SerialOut,
        disk_specs: Vec<DiskSpec>,
        net_specs: Vec<crate::netdev::NetSpec>,
    ) -> Result<Self> {
        let kvm_sys = Kvm::new().map_err(Error::KvmOpen)?;
        let max = (kvm_sys.get_max_vcpus()).min(MAX_VCPUS);
        if config.vcpus == 0 || config.vcpus > max {
            return Err(Error::VcpuCount(config.vcpus));
        }
        let ram = Arc::new(GuestRam::new(config.mem_size)?);
        let fd = kvm_sys.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        fd.set_tss_address(TSS_ADDRESS).map_err(kvm("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(kvm("KVM_CREATE_PIT2"))?;
        let manual = ram.use_manual_protect(&fd);
        tracing::debug!("KVM manual dirty-log protection: {manual}");
        ram.register(&fd, false)?;

        let (tx, rx) = channel();
        let events = VmEvents::new(tx);
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
        fd.register_irqfd(&irq, Serial::IRQ).map_err(kvm("KVM_IRQFD"))?;
        let serial = Arc::new(Mutex::new(Serial::new(irq, serial_out)));
        let mut pio = Bus::new();
        let dev_err = |e: devices::bus::Overlap| Error::Device(e.to_string());
        pio.insert(Serial::PORT as u64, Serial::LEN as u64, serial.clone()).map_err(dev_err)?;
        pio.insert(DebugExit::PORT as u64, 1, Arc::new(Mutex::new(DebugExit::new(events.clone()))))
            .map_err(dev_err)?;
        pio.insert(I8042::BASE as u64, I8042::LEN as u64, Arc::new(Mutex::new(I8042::new(events.clone()))))
            .map_err(dev_err)?;
        let button = acpi::pm::PowerButton::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?);
        fd.register_irqfd(button.irq(), acpi::pm::GED_GSI).map_err(kvm("KVM_IRQFD"))?;
        let pm = Arc::new(Mutex::new(acpi::pm::AcpiPm::new(events.clone(), button.clone())));
        pio.insert(acpi::pm::PM_PORT_BASE as u64, acpi::pm::PM_PORT_LEN as u64, pm).map_err(dev_err)?;
        let mut mmio = Bus::new();
        let mut disks = Vec::new();
        for (i, d) in disk_specs.into_iter().enumerate() {
            let blk = Block::new(d.backend, d.config).map_err(|e| Error::Device(format!("disk {i}: {e}")))?;
            let dev = MmioTransport::new(i, blk, ram.memory().clone()).map_err(|e| Error::Device(format!("disk {i}: {e}")))?;
            fd.register_irqfd(dev.irq_evt(), dev.gsi()).map_err(kvm("KVM_IRQFD"))?;
            for e in dev.ioevents() {
                fd.register_ioevent(e.fd, &kvm_ioctls::IoEventAddress::Mmio(e.addr), e.datamatch)
                    .map_err(kvm("KVM_IOEVENTFD"))?;
            }
            let (base, len) = (dev.mmio_base(), dev.mmio_len());
            let dev = Arc::new(Mutex::new(dev));
            mmio.insert(base, len, dev.clone()).map_err(dev_err)?;
            disks.push(dev);
        }

        let nets = crate::netdev::attach(&fd, ram.memory(), &mut mmio, disks.len(), net_specs)?;
        let mut slots = crate::linux::virtio_slots(&disks);
        slots.extend(crate::netdev::slots(&nets));
        let boot = crate::linux::load_kernel(&ram, &config, &slots)?;

        let supported = kvm_sys
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut msr_list = kvm_sys.get_msr_index_list().map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec();
        vcpu::order_msrs(&mut msr_list);

        let mut vcpus = Vec::with_capacity(config.vcpus);
        for id in 0..config.vcpus {
            let vfd = fd.create_vcpu(id as u64).map_err(kvm("KVM_CREATE_VCPU"))?;
            vfd.set_cpuid2(&crate::cpuid::for_vcpu(&supported, id as u8, config.vcpus as u8))
                .map_err(kvm("KVM_SET_CPUID2"))?;
            let mut lapic = vfd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
            set_lvt_mode(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
            set_lvt_mode(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
            vfd.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
            vcpu::write_msrs(&vfd, &[(MSR_IA32_MISC_ENABLE, 1), (MSR_MTRR_DEF_TYPE, 0x806)])?;
            if id == 0 {
                crate::linux::setup_boot_vcpu(&vfd, boot)?;
            }
            vcpus.push(Arc::new(Vcpu::new(id, vfd)));
        }
        let ctx = VcpuContext { pio: Arc::new(pio), mmio: Arc::new(mmio), events: events.clone(), ram: ram.clone() };
        let vcpus = Arc::new(VcpuSet::start(vcpus, ctx).map_err(|e| Error::VcpuThread(0, e.to_string()))?);

        let mut vm = Vm {
            config,
            fd,
            ram,
            vcpus,
            serial,
            disks,
            nets,
            events,
            power_button: button,
            requests: Mutex::new(rx),
            msr_list,
            boot,
            boot_state: Vec::new(),
            ran: std::sync::atomic::AtomicBool::new(false),
            _kvm: kvm_sys,
        };
        vm.boot_state = vm.save_state()?;
        Ok(vm)
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
    pub fn kvm_vm(&self) -> &VmFd {
        &self.fd
    }
    pub fn serial(&self) -> &Arc<Mutex<Serial>> {
        &self.serial
    }
    /// A handle to raise requests as devices do (the monitor's `quit`).
    pub fn events(&self) -> VmEvents {
        self.events.clone()
    }
    /// Presses the ACPI power button (QMP `system_powerdown`): the GED latches the event and
    /// raises its interrupt; what happens next is the guest's choice.
    pub fn press_power_button(&self) {
        self.power_button.press();
    }
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.vcpus.len()
    }

    pub fn disks(&self) -> &[BlockDevice] {
        &self.disks
    }

    pub fn pause(&self) {
        self.vcpus.pause();
    }

    /// The network cards.
    pub fn nics(&self) -> &[crate::netdev::NetDevice] {
        &self.nets
    }

    /// Announces every NIC's MAC on its tap (after a migration or a restore; see
    /// `net::announce`). Returns at once; the frames go out on the devices' threads.
    pub fn announce(&self, params: net::AnnounceParams) {
        for n in &self.nets {
            lock(n).device().announce(params);
        }
    }

    /// `info network` data.
    pub fn nic_info(&self) -> Vec<crate::netdev::NicInfo> {
        crate::netdev::info(&self.nets)
    }

    /// Pauses the vCPUs, then drains and flushes every disk: guest RAM and disks are quiet,
    /// ready for a snapshot or a migration switchover.
    pub fn quiesce(&self) -> Result<()> {
        self.vcpus.pause();
        for (i, d) in self.disks.iter().enumerate() {
            lock(d).pause().map_err(|e| Error::Device(format!("disk {i}: {e}")))?;
        }
        for (i, n) in self.nets.iter().enumerate() {
            lock(n).pause().map_err(|e| Error::Device(format!("NIC {i}: {e}")))?;
        }
        Ok(())
    }

    /// Resumes the disks (if quiesced) and the vCPUs.
    pub fn resume(&self) {
        self.ran.store(true, std::sync::atomic::Ordering::SeqCst);
        for d in &self.disks {
            lock(d).resume();
        }
        for n in &self.nets {
            lock(n).resume();
        }
        self.vcpus.resume();
    }
    pub fn is_paused(&self) -> bool {
        self.vcpus.is_paused()
    }

    /// The next resume is imminent: parked vCPUs busy-wait for it instead of sleeping.
    pub fn prepare_resume(&self) {
        self.vcpus.prepare_resume();
    }

    /// Throttles the vCPUs to `100 - pct` percent of the time (auto-converge); 0 releases.
    pub fn set_throttle(&self, pct: u8) {
        self.vcpus.set_throttle(pct);
    }

    pub fn throttle(&self) -> u8 {
        self.vcpus.throttle()
    }

    /// Waits for the next request from a device, a vCPU or the monitor.
    pub fn next_request(&self) -> VmRequest {
        let rx = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        rx.recv().unwrap_or(VmRequest::Quit)
    }

    /// Like [`Vm::next_request`] with a timeout.
    pub fn next_request_timeout(&self, t: std::time::Duration) -> Option<VmRequest> {
        let rx = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        rx.recv_timeout(t).ok()
    }

    /// Resets the machine: every vCPU, the interrupt controllers and devices go back to their
    /// boot state and the kernel is loaded again (RAM is otherwise kept, as on real hardware).
    pub fn reset(&self) -> Result<()> {
        let was_running = !self.is_paused();
        self.pause();
        let mut slots = crate::linux::virtio_slots(&self.disks);
        slots.extend(crate::netdev::slots(&self.nets));
        let boot = crate::linux::load_kernel(&self.ram, &self.config, &slots)?;
        if boot.entry != self.boot.entry {
            return Err(Error::Kernel { path: self.config.kernel.clone(), reason: "kernel changed on disk".into() });
        }
        self.restore_state(&self.boot_state)?;
        // A power-button press the old boot never read must not power off the new one.
        self.power_button.take();
        if was_running {
            self.resume();
        }
        Ok(())
    }

    /// The device list a saved state must match.
    pub fn config_state(&self) -> ConfigState {
        ConfigState {
            mem_size: self.config.mem_size,
            vcpus: self.config.vcpus as u32,
            devices: std::iter::once(lock(&self.serial).state_id())
                .chain(self.disks.iter().map(|d| lock(d).state_id()))
                .chain(self.nets.iter().map(|n| lock(n).state_id()))
                .collect(),
        }
    }

    /// Saves configuration, VM, vCPU and device state. The VM must be paused.
    pub fn save_state(&self) -> Result<Vec<Section>> {
        let mut out = vec![Section::encode(CONFIG_ID, CONFIG_VERSION, &self.config_state())?];
        out.push(vmstate_kvm::save(&self.fd)?.to_section()?);
        for v in &self.vcpus.vcpus {
            let fd = v.lock();
            out.push(vcpu::save(&fd, v.id as u32, &self.msr_list)?.to_section()?);
        }
        out.push(lock(&self.serial).save_state()?);
        for d in &self.disks {
            out.push(lock(d).save_state()?);
        }
        for n in &self.nets {
            out.push(lock(n).save_state()?);
        }
        Ok(out)
    }

    /// Checks that `sections` describe a machine like this one and decode cleanly, without
    /// changing anything.
    pub fn check_state(&self, sections: &[Section]) -> Result<()> {
        self.decode_state(sections).map(|_| ())
    }

    fn decode_state(&self, sections: &[Section]) -> Result<(KvmVmState, Vec<VcpuState>)> {
        let cfg: ConfigState = vmstate::find(sections, CONFIG_ID)?.decode(CONFIG_ID, CONFIG_VERSION)?;
        let mine = self.config_state();
        if cfg.mem_size != mine.mem_size {
            return Err(StateError::Mismatch(format!(
                "saved VM has {} MiB of RAM, this one {} MiB (-m)",
                cfg.mem_size >> 20,
                mine.mem_size >> 20
            ))
            .into());
        }
        if cfg.vcpus != mine.vcpus {
            return Err(StateError::Mismatch(format!(
                "saved VM has {} vCPUs, this one {} (-smp)",
                cfg.vcpus, mine.vcpus
            ))
            .into());
        }
        if cfg.devices != mine.devices {
            return Err(StateError::Mismatch(format!(
                "saved VM has devices [{}], this one [{}]",
                cfg.devices.join(", "),
                mine.devices.join(", ")
            ))
            .into());
        }
        let kvm_state = KvmVmState::from_section(vmstate::find(sections, vmstate_kvm::SECTION_ID)?)?;
        let mut vcpu_states = Vec::new();
        for v in &self.vcpus.vcpus {
            let id = v.id as u32;
            vcpu_states.push(VcpuState::from_section(vmstate::find(sections, &vcpu::section_id(id))?, id)?);
        }
        let serial_id = lock(&self.serial).state_id();
        vmstate::find(sections, &serial_id)?;
        for d in &self.disks {
            let id = lock(d).state_id();
            vmstate::find(sections, &id)?;
        }
        for n in &self.nets {
            let id = lock(n).state_id();
            vmstate::find(sections, &id)?;
        }
        Ok((kvm_state, vcpu_states))
    }

    /// Restores a saved machine state. The VM must be paused. Everything is decoded and checked
    /// first; if applying then fails, the state from before the call is put back.
    pub fn restore_state(&self, sections: &[Section]) -> Result<()> {
        let (kvm_state, vcpu_states) = self.decode_state(sections)?;
        let before = if self.ran.load(std::sync::atomic::Ordering::SeqCst) {
            self.save_state()?
        } else {
            self.boot_state.clone()
        };
        let apply = |kvm_state: &KvmVmState, vcpu_states: &[VcpuState], sections: &[Section]| -> Result<()> {
            vmstate_kvm::restore(&self.fd, kvm_state)?;
            for (v, st) in self.vcpus.vcpus.iter().zip(vcpu_states) {
                vcpu::restore(&v.lock(), st)?;
            }
            let mut serial = lock(&self.serial);
            let id = serial.state_id();
            serial.restore_state(vmstate::find(sections, &id)?)?;
            for d in &self.disks {
                let mut d = lock(d);
                let id = d.state_id();
                d.restore_state(vmstate::find(sections, &id)?)?;
            }
            for n in &self.nets {
                let mut n = lock(n);
                let id = n.state_id();
                n.restore_state(vmstate::find(sections, &id)?)?;
            }
            Ok(())
        };
        if let Err(e) = apply(&kvm_state, &vcpu_states, sections) {
            tracing::error!("state restore failed ({e}); putting the previous state back");
            if let Ok((k, v)) = self.decode_state(&before) {
                let _ = apply(&k, &v, &before);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Turns KVM dirty logging on or off for every memslot (and clears device-write bits).
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        self.ram.reset_device_dirty();
        self.ram.register(&self.fd, on)
    }

    /// Harvests dirty pages since the last call (per slot bitmaps, 1 bit per 4 KiB page).
    pub fn take_dirty(&self) -> Result<Vec<Vec<u64>>> {
        self.ram.take_dirty(&self.fd)
    }

    /// Translates a guest-virtual address with vCPU `cpu`'s page tables (for the monitor's `x`).
    pub fn translate(&self, cpu: usize, gva: u64) -> Option<u64> {
        let v = self.vcpus.vcpus.get(cpu)?;
        let t = v.lock().translate_gva(gva).ok()?;
        (t.valid != 0).then_some(t.physical_address)
    }

    /// Register summary of each vCPU for `info cpus`: (id, rip, halted).
    pub fn cpu_summary(&self) -> Vec<(usize, u64, bool)> {
        self.vcpus
            .vcpus
            .iter()
            .map(|v| {
                let fd = v.lock();
                let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
                let halted = fd.get_mp_state().map(|m| m.mp_state == kvm_bindings::KVM_MP_STATE_HALTED).unwrap_or(false);
                (v.id, rip, halted)
            })
            .collect()
    }

    /// The guest's clock (kvmclock) in nanoseconds, for the snapshot's "VM CLOCK".
    pub fn guest_clock_ns(&self) -> u64 {
        self.fd.get_clock().map(|c| c.clock).unwrap_or(0)
    }

    /// Stops the vCPU threads for good.
    pub fn shutdown(&self) {
        self.vcpus.shutdown();
    }
}

fn set_lvt_mode(lapic: &mut kvm_bindings::kvm_lapic_state, reg: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = lapic.regs[reg + i] as u8;
    }
    let v = u32::from_le_bytes(b);
    let v = (v & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = *x as _;
    }
}
