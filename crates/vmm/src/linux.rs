//! Direct Linux boot, as QEMU's `-kernel/-initrd/-append` does it.
//!
//! [`load_kernel`] looks at the kernel file and picks the protocol:
//! - a **bzImage** (setup header magic `HdrS`) goes through `linux-loader`'s bzImage loader and
//!   the 64-bit boot protocol: the protected-mode code at 1 MiB, a zero page (`boot_params`)
//!   with the e820 map from [`crate::boot::memory_map`], the command line, the initrd and
//!   `acpi_rsdp_addr`, and the boot vCPU in long mode at `load address + 0x200` with RSI
//!   pointing at the zero page, identity-mapped low 4 GiB (2 MiB pages) and the `__BOOT_CS`/
//!   `__BOOT_DS` GDT the protocol asks for ([`setup_boot_vcpu`]);
//! - anything else goes to the PVH path ([`crate::boot::load_pvh`]; an ELF `vmlinux` with a
//!   PVH note, or Godwit's test guest), whose `hvm_start_info` then gets `rsdp_paddr` and the
//!   initrd as module 0.
//!
//! Both paths get the ACPI tables from the `acpi` crate in the reserved BIOS area (see
//! `docs/linux-boot.md`). Kernel and initrd files are checked before anything is loaded:
//! a truncated or non-64-bit bzImage, or one whose decompression needs more RAM than the guest
//! has, is refused with one line naming the file and the reason.

use crate::boot::{self, BootEntry, CMDLINE_ADDR, CMDLINE_MAX};
use crate::error::{kvm, Error, Result};
use crate::memory::{GuestMemoryMmap, GuestRam, MMIO_HOLE_START};
use crate::vm::BlockDevice;
use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use linux_loader::loader::elf::start_info::{hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

pub use ::acpi;

/// Where the protected-mode kernel is loaded (the classic `code32_start`).
pub const KERNEL_LOAD_ADDR: u64 = 0x10_0000;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Boot page tables: PML4, PDPT, then four page directories (identity map of 0–4 GiB).
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Initial stack pointer (the protocol needs none, but a sane one costs nothing).
const BOOT_STACK: u64 = 0x8ff0;
/// GDT of the 64-bit entry: null, null, __BOOT_CS (0x10), __BOOT_DS (0x18), TSS (0x20).
const GDT_ADDR: u64 = 0x500;
const GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;
/// PVH module list (one entry: the initrd), between the start info (0x6000) and the memmap.
const PVH_MODLIST_ADDR: u64 = 0x6800;

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
const LOADED_HIGH: u8 = 1;
const XLF_KERNEL_64: u16 = 1;
/// Boot protocol 2.12 brought `xloadflags` (and with them the 64-bit entry's advertisement).
const MIN_PROTOCOL: u16 = 0x020c;
const TYPE_OF_LOADER_UNDEFINED: u8 = 0xff;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The facts of a bzImage's setup header that loading depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BzImageInfo {
    pub protocol: u16,
    pub setup_bytes: u64,
    /// Length of setup + protected-mode code the header promises.
    pub expected_len: u64,
    pub file_len: u64,
    pub relocatable: bool,
    pub kernel_alignment: u64,
    pub pref_address: u64,
    pub init_size: u64,
    pub cmdline_size: u32,
    pub initrd_addr_max: u64,
}

impl BzImageInfo {
    /// Lowest address the decompressed kernel runs at (what the decompressor picks without
    /// KASLR: the load address rounded up to the alignment, at least `pref_address`).
    pub fn run_start(&self) -> u64 {
        if self.relocatable {
            let a = self.kernel_alignment.max(1);
            KERNEL_LOAD_ADDR
                .div_ceil(a)
                .saturating_mul(a)
                .max(self.pref_address)
        } else {
            self.pref_address
        }
    }
    /// End of the memory the kernel needs to decompress and start (`run_start + init_size`).
    pub fn needed_end(&self) -> u64 {
        self.run_start()
            .saturating_add(self.init_size)
            .max(KERNEL_LOAD_ADDR + (self.expected_len - self.setup_bytes))
    }
}

fn kernel_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Kernel {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    (le32(b, o) as u64) | ((le32(b, o + 4) as u64) << 32)
}

/// Reads the setup header region (0x1f1..0x270) if the file is long enough; `None` if not.
fn read_setup(file: &mut File) -> std::io::Result<Option<[u8; 0x270]>> {
    let mut b = [0u8; 0x270];
    file.seek(SeekFrom::Start(0))?;
    let mut got = 0;
    while got < b.len() {
        match file.read(&mut b[got..])? {
            0 => return Ok(None),
            n => got += n,
        }
    }
    Ok(Some(b))
}

/// Whether `b` (the start of a file) carries a bzImage setup header.
fn has_setup_magic(b: &[u8; 0x270]) -> bool {
    le32(b, 0x202) == HDRS_MAGIC
}

/// Parses and checks a bzImage's setup header: a 64-bit, complete, bzImage-style kernel.
pub fn inspect_bzimage(path: &Path) -> Result<BzImageInfo> {
    let mut f = File::open(path).map_err(|e| kernel_err(path, format!("cannot open: {e}")))?;
    let file_len = f
        .metadata()
        .map_err(|e| kernel_err(path, e.to_string()))?
        .len();
    let b = read_setup(&mut f)
        .map_err(|e| kernel_err(path, format!("cannot read: {e}")))?
        .filter(has_setup_magic)
        .ok_or_else(|| kernel_err(path, "not a bzImage (no 'HdrS' setup header)"))?;
    parse_setup(path, &b, file_len)
}

fn parse_setup(path: &Path, b: &[u8; 0x270], file_len: u64) -> Result<BzImageInfo> {
    let protocol = le16(b, 0x206);
    if le16(b, 0x1fe) != BOOT_FLAG {
        return Err(kernel_err(
            path,
            "bzImage setup header lacks the 0xAA55 boot flag",
        ));
    }
    if protocol < MIN_PROTOCOL {
        return Err(kernel_err(
            path,
            format!(
                "bzImage boot protocol {}.{:02} is too old (the 64-bit entry needs 2.12 or later)",
                protocol >> 8,
                protocol & 0xff
            ),
        ));
    }
    if b[0x211] & LOADED_HIGH == 0 {
        return Err(kernel_err(
            path,
            "zImage (loaded low) kernels are not supported, only bzImage",
        ));
    }
    if le16(b, 0x236) & XLF_KERNEL_64 == 0 {
        return Err(kernel_err(
            path,
            "bzImage has no 64-bit entry point (XLF_KERNEL_64): not an x86-64 kernel?",
        ));
    }
    let sects = match b[0x1f1] {
        0 => 4,
        n => n as u64,
    };
    let setup_bytes = (sects + 1) * 512;
    let expected_len = setup_bytes + le32(b, 0x1f4) as u64 * 16;
    if file_len < expected_len {
        return Err(kernel_err(
            path,
            format!(
                "truncated bzImage: the file has {file_len} bytes, its header says {expected_len}"
            ),
        ));
    }
    let info = BzImageInfo {
        protocol,
        setup_bytes,
        expected_len,
        file_len,
        relocatable: b[0x234] != 0,
        kernel_alignment: le32(b, 0x230) as u64,
        pref_address: le64(b, 0x258),
        init_size: le32(b, 0x260) as u64,
        cmdline_size: le32(b, 0x238),
        initrd_addr_max: le32(b, 0x22c) as u64,
    };
    if info.init_size == 0 || info.pref_address < KERNEL_LOAD_ADDR {
        return Err(kernel_err(
            path,
            "bzImage header has no usable init_size/pref_address",
        ));
    }
    Ok(info)
}

/// Top of the RAM below the 32-bit MMIO hole.
fn low_ram_end(ram: &GuestRam) -> u64 {
    ram.size().min(MMIO_HOLE_START)
}

fn mib(x: u64) -> u64 {
    x.div_ceil(1 << 20)
}

/// Loads the initrd at the top of low RAM (page aligned, below `addr_max`), above `floor`.
/// Returns (address, size).
fn load_initrd(ram: &GuestRam, path: &Path, floor: u64, addr_max: u64) -> Result<(u64, u64)> {
    let err = |reason: String| Error::Initrd {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let size = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if size == 0 {
        return Err(err("file is empty".into()));
    }
    let top = low_ram_end(ram).min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= floor => a,
        _ => return Err(err(format!(
            "{} MiB do not fit in guest RAM above the kernel (it needs {} MiB below it; raise -m)",
            mib(size),
            mib(floor)
        ))),
    };
    let mem: &GuestMemoryMmap = ram.memory();
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| err(format!("cannot read into guest memory: {e}")))?;
    Ok((addr, size))
}

fn write_cmdline(ram: &GuestRam, kernel: &Path, cmdline: &str, max: usize) -> Result<()> {
    let mut c = cmdline.as_bytes().to_vec();
    if c.contains(&0) {
        return Err(kernel_err(kernel, "command line contains a NUL byte"));
    }
    if c.len() + 1 > max {
        return Err(kernel_err(
            kernel,
            format!(
                "command line is {} bytes, this kernel takes at most {}",
                c.len(),
                max - 1
            ),
        ));
    }
    c.push(0);
    ram.memory()
        .write_slice(&c, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| Error::GuestMemory {
            addr: CMDLINE_ADDR,
            reason: e.to_string(),
        })
}

fn write_u64s(ram: &GuestRam, addr: u64, vals: &[u64]) -> Result<()> {
    let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    ram.memory()
        .write_slice(&bytes, GuestAddress(addr))
        .map_err(|e| Error::GuestMemory {
            addr,
            reason: e.to_string(),
        })
}

/// Writes the identity map of 0–4 GiB (2 MiB pages: 1 GiB pages triple-fault on some nested
/// hosts) and the 64-bit GDT.
fn write_page_tables_and_gdt(ram: &GuestRam) -> Result<()> {
    write_u64s(ram, PML4_ADDR, &[PDPT_ADDR | 3])?;
    let pdpt: Vec<u64> = (0..4).map(|i| (PD_ADDR + i * 0x1000) | 3).collect();
    write_u64s(ram, PDPT_ADDR, &pdpt)?;
    let pds: Vec<u64> = (0..4 * 512u64).map(|i| (i << 21) | 0x83).collect();
    write_u64s(ram, PD_ADDR, &pds)?;
    write_u64s(ram, GDT_ADDR, &GDT)
}

/// The e820 map for the zero page, from [`boot::memory_map`].
pub fn e820(ram: &GuestRam) -> Vec<boot_e820_entry> {
    boot::memory_map(ram)
        .into_iter()
        .map(|(addr, size, r#type)| boot_e820_entry { addr, size, r#type })
        .collect()
}

/// Loads a bzImage with the 64-bit boot protocol. `rsdp` goes to `acpi_rsdp_addr`.
pub fn load_bzimage(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: u64,
) -> Result<BootEntry> {
    let info = inspect_bzimage(kernel)?;
    let low_end = low_ram_end(ram);
    if info.needed_end() > low_end {
        return Err(kernel_err(
            kernel,
            format!(
                "this kernel needs {} MiB of RAM to decompress and start, the guest has {} MiB (raise -m)",
                mib(info.needed_end()),
                mib(low_end)
            ),
        ));
    }
    let cmdline_max = (info.cmdline_size as usize)
        .saturating_add(1)
        .min(CMDLINE_MAX);
    write_cmdline(ram, kernel, cmdline, cmdline_max)?;

    let mut f = File::open(kernel).map_err(|e| kernel_err(kernel, format!("cannot open: {e}")))?;
    let mem: &GuestMemoryMmap = ram.memory();
    let res = BzImage::load(
        mem,
        Some(GuestAddress(KERNEL_LOAD_ADDR)),
        &mut f,
        Some(GuestAddress(KERNEL_LOAD_ADDR)),
    )
    .map_err(|e| kernel_err(kernel, format!("cannot load bzImage: {e}")))?;
    let hdr: setup_header = res
        .setup_header
        .ok_or_else(|| kernel_err(kernel, "bzImage loader returned no setup header"))?;

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.acpi_rsdp_addr = rsdp;
    if let Some(p) = initrd {
        let (addr, size) = load_initrd(ram, p, info.needed_end(), info.initrd_addr_max)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820(ram);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(kernel_err(
            kernel,
            format!("{} e820 entries do not fit the zero page", map.len()),
        ));
    }
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        mem,
    )
    .map_err(|e| Error::GuestMemory {
        addr: ZERO_PAGE_ADDR,
        reason: e.to_string(),
    })?;
    write_page_tables_and_gdt(ram)?;
    Ok(BootEntry {
        entry: res.kernel_load.0 + 0x200,
        start_info: ZERO_PAGE_ADDR,
        long_mode: true,
    })
}

/// End of the physical range an ELF kernel's PT_LOAD segments occupy.
fn elf_phys_end(path: &Path) -> Result<u64> {
    let bad = |r: &str| kernel_err(path, format!("ELF program headers: {r}"));
    let mut f = File::open(path).map_err(|e| kernel_err(path, format!("cannot open: {e}")))?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).map_err(|_| bad("short ELF header"))?;
    let (phoff, phentsize, phnum) = (
        le64(&eh, 0x20),
        le16(&eh, 0x36) as usize,
        le16(&eh, 0x38) as usize,
    );
    if phentsize < 56 || phnum > 256 {
        return Err(bad("implausible size or count"));
    }
    let mut ph = vec![0u8; phentsize * phnum];
    f.seek(SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut ph))
        .map_err(|_| bad("cannot read"))?;
    Ok(ph
        .chunks(phentsize)
        .filter(|p| le32(p, 0) == 1)
        .map(|p| le64(p, 0x18).saturating_add(le64(p, 0x28)))
        .max()
        .unwrap_or(0))
}

/// Adds the ACPI RSDP and the initrd (module 0) to the PVH start info `load_pvh` wrote.
fn complete_pvh(
    ram: &GuestRam,
    b: &BootEntry,
    kernel: &Path,
    initrd: Option<&Path>,
    rsdp: u64,
) -> Result<()> {
    let mem: &GuestMemoryMmap = ram.memory();
    let gm = |e: vm_memory::GuestMemoryError| Error::GuestMemory {
        addr: b.start_info,
        reason: e.to_string(),
    };
    let mut si: hvm_start_info = mem.read_obj(GuestAddress(b.start_info)).map_err(gm)?;
    si.rsdp_paddr = rsdp;
    if let Some(p) = initrd {
        let floor = elf_phys_end(kernel)?.max(crate::memory::PAGE_SIZE * 256);
        let (addr, size) = load_initrd(ram, p, floor, u64::MAX)?;
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_ADDR))
            .map_err(gm)?;
        si.nr_modules = 1;
        si.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_obj(si, GuestAddress(b.start_info)).map_err(gm)
}

/// Whether `path` is a bzImage (as opposed to an ELF or anything else).
pub fn is_bzimage(path: &Path) -> Result<bool> {
    let mut f = File::open(path).map_err(|e| kernel_err(path, format!("cannot open: {e}")))?;
    Ok(read_setup(&mut f)
        .map_err(|e| kernel_err(path, format!("cannot read: {e}")))?
        .is_some_and(|b| has_setup_magic(&b)))
}

/// The ACPI tables for this machine.
pub fn acpi_tables(vcpus: usize, virtio: &[(u64, u32)]) -> Result<acpi::Tables> {
    let platform = acpi::Platform {
        vcpus,
        virtio: virtio
            .iter()
            .map(|&(base, gsi)| acpi::VirtioMmio { base, gsi })
            .collect(),
    };
    acpi::build(&platform, acpi::DEFAULT_BASE).map_err(|e| Error::Device(e.to_string()))
}

/// Window address and GSI of each virtio-mmio device, for the DSDT.
pub fn virtio_slots(disks: &[BlockDevice]) -> Vec<(u64, u32)> {
    disks
        .iter()
        .map(|d| {
            let t = devices::bus::lock(d);
            (t.mmio_base(), t.gsi())
        })
        .collect()
}

/// Writes the ACPI tables and loads the kernel (bzImage or PVH ELF), the initrd and the
/// command line. `virtio` lists the (window, GSI) of each virtio-mmio device.
pub fn load_kernel(
    ram: &GuestRam,
    config: &crate::VmConfig,
    virtio: &[(u64, u32)],
) -> Result<BootEntry> {
    let tables = acpi_tables(config.vcpus, virtio)?;
    ram.memory()
        .write_slice(&tables.bytes, GuestAddress(tables.base))
        .map_err(|e| Error::GuestMemory {
            addr: tables.base,
            reason: e.to_string(),
        })?;
    let initrd = config.initrd.as_deref();
    if is_bzimage(&config.kernel)? {
        load_bzimage(
            ram,
            &config.kernel,
            initrd,
            &config.cmdline,
            tables.rsdp_addr(),
        )
    } else {
        let b = boot::load_pvh(ram, &config.kernel, &config.cmdline)?;
        complete_pvh(ram, &b, &config.kernel, initrd, tables.rsdp_addr())?;
        Ok(b)
    }
}

fn seg64(selector: u16, type_: u8, s: u8, l: u8, db: u8, g: u8, limit: u32) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s,
        l,
        g,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts the boot vCPU at the kernel's entry: long mode for a bzImage (64-bit boot protocol),
/// the PVH 32-bit entry otherwise.
pub fn setup_boot_vcpu(fd: &VcpuFd, b: BootEntry) -> Result<()> {
    if !b.long_mode {
        return boot::setup_boot_vcpu(fd, b);
    }
    let mut sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let data = seg64(BOOT_DS, 0x3, 1, 0, 1, 1, 0xffff_ffff);
    sregs.cs = seg64(BOOT_CS, 0xb, 1, 1, 0, 1, 0xffff_ffff);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = seg64(BOOT_TSS, 0xb, 0, 0, 0, 0, 0x67);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: b.entry,
        rsi: b.start_info,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}
