//! Booting a PVH ELF kernel (our test guest, or a Linux `vmlinux` with a PVH note): load the
//! ELF with `linux-loader`, write the `hvm_start_info` block, the memory map and the command
//! line, and put the boot vCPU in 32-bit protected mode at the PVH entry with EBX pointing at
//! the start-info block, as the Xen PVH boot ABI (and QEMU's `-kernel`) does.

use crate::error::{kvm, Error, Result};
use crate::memory::{GuestMemoryMmap, GuestRam, MMIO_HOLE_START};
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

const GDT_ADDR: u64 = 0x500;
const START_INFO_ADDR: u64 = 0x6000;
const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x8000;
const HIMEM_START: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9_fc00;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: u64,
    pub start_info: u64,
    /// Linux 64-bit boot protocol (RSI = zero page, see `linux.rs`) instead of PVH's 32-bit entry.
    pub long_mode: bool,
}

/// The e820-style memory map Godwit gives its guests (PVH memmap and, later, Linux's e820).
pub fn memory_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED)];
    for s in ram.slots() {
        let start = s.gpa.max(HIMEM_START);
        let end = s.gpa + s.size;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Loads a PVH ELF and writes the boot information.
pub fn load_pvh(ram: &GuestRam, kernel: &Path, cmdline: &str) -> Result<BootEntry> {
    let kerr = |reason: String| Error::Kernel { path: kernel.to_path_buf(), reason };
    let mut file = std::fs::File::open(kernel).map_err(|e| kerr(format!("cannot open: {e}")))?;
    let len = file.metadata().map_err(|e| kerr(e.to_string()))?.len();
    if len < 64 {
        return Err(kerr(format!("file is too small ({len} bytes) to be a kernel")));
    }
    let mem: &GuestMemoryMmap = ram.memory();
    let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| kerr(format!("not a loadable PVH ELF kernel: {e}")))?;
    let entry = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => a.0,
        _ => return Err(kerr("ELF has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)".into())),
    };
    if res.kernel_end > ram.size().min(MMIO_HOLE_START) {
        return Err(kerr("kernel does not fit in guest RAM (raise -m)".into()));
    }

    let bytes = cmdline.as_bytes();
    if bytes.len() + 1 > CMDLINE_MAX {
        return Err(kerr(format!("command line is {} bytes, at most {} fit", bytes.len(), CMDLINE_MAX - 1)));
    }
    let mut c = bytes.to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::GuestMemory { addr: CMDLINE_ADDR, reason: e.to_string() })?;

    let map: Vec<hvm_memmap_table_entry> = memory_map(ram)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry { addr, size, type_, reserved: 0 })
        .collect();
    let start = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start, GuestAddress(START_INFO_ADDR));
    params.set_sections(&map, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| Error::GuestMemory { addr: START_INFO_ADDR, reason: e.to_string() })?;

    // A flat GDT: null, 32-bit code (0x08), 32-bit data (0x10), TSS (0x18).
    let gdt: [u64; 4] = [0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| Error::GuestMemory { addr: GDT_ADDR, reason: e.to_string() })?;
    }
    Ok(BootEntry { entry, start_info: START_INFO_ADDR, long_mode: false })
}

fn seg(selector: u16, type_: u8, limit: u32, g: u8, db: u8, s: u8) -> kvm_segment {
    kvm_segment { base: 0, limit, selector, type_, present: 1, dpl: 0, db, s, l: 0, g, avl: 0, unusable: 0, padding: 0 }
}

/// Puts the boot vCPU at the PVH entry: 32-bit protected mode, paging off, flat segments.
pub fn setup_boot_vcpu(fd: &VcpuFd, b: BootEntry) -> Result<()> {
    let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = seg(0x08, 0xb, 0xffff_ffff, 1, 1, 1);
    let data = seg(0x10, 0x3, 0xffff_ffff, 1, 1, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg(0x18, 0xb, 0x67, 0, 0, 0);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs { rip: b.entry, rbx: b.start_info, rflags: 0x2, ..Default::default() };
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}
