//! ACPI tables for Godwit's guests, built with the `acpi_tables` crate.
//!
//! A Linux guest learns its CPUs, interrupt controllers and virtio-mmio devices from ACPI
//! (Debian's kernels parse no MP table and take no `virtio_mmio.device=` argument), and powers
//! off through ACPI. Godwit gives it the smallest set that does all of that, as one blob placed
//! in the reserved BIOS area below 1 MiB (where Linux also scans for the RSDP):
//!
//! - RSDP (revision 2) pointing at the XSDT;
//! - XSDT listing the FADT and the MADT (the DSDT is reached through the FADT);
//! - FADT, hardware-reduced, with a sleep control/status register pair and a reset register,
//!   all in I/O port space and served by [`pm::AcpiPm`]; boot flags say "no 8042, no VGA,
//!   no CMOS RTC";
//! - MADT: one local APIC per vCPU, the in-kernel IOAPIC (24 pins, GSI 0), the ISA IRQ 0 →
//!   GSI 2 override KVM's routing implies, and the LINT1 NMI;
//! - DSDT: COM1 (`PNP0501`, 0x3f8, IRQ 4), one `LNRO0005` device per virtio-mmio transport
//!   (its window and its GSI, edge-triggered as an irqfd injects it), the power button (a
//!   `PNP0C0C` device notified by a Generic Event Device on GSI 9, see [`pm`]) and `\_S5`.
//!
//! [`parse`] reads such tables back (tests, and anyone checking a guest's memory).

pub mod dsdt;
pub mod parse;
pub mod pm;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

/// OEM ID written in every table header.
pub const OEM_ID: [u8; 6] = *b"GODWIT";
/// OEM table ID written in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"GODWITVM";
pub const OEM_REVISION: u32 = 1;

/// Where the tables go by default: the start of the BIOS area Linux scans for the RSDP
/// (0xE0000–0xFFFFF, 16-byte steps), inside the range Godwit's e820 map marks reserved.
pub const DEFAULT_BASE: u64 = 0xE_0000;
/// End (exclusive) of that area.
pub const AREA_END: u64 = 0x10_0000;

/// The local APIC's MMIO base.
pub const LAPIC_ADDR: u32 = 0xFEE0_0000;
/// The (in-kernel) IOAPIC's MMIO base and its number of pins.
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
pub const IOAPIC_PINS: u32 = 24;

/// COM1, as Godwit's 16550 serves it.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u8 = 4;

/// The size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u32 = 0x200;

/// Most vCPUs the MADT describes (xAPIC IDs are one byte; 0xFF is the broadcast ID).
pub const MAX_VCPUS: usize = 255;

/// Boot architecture flags (FADT IAPC_BOOT_ARCH): VGA not present (bit 2), CMOS RTC not present
/// (bit 5). Bit 1 (8042 present) is clear, so Linux skips the i8042 probe.
pub const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// A virtio-mmio transport as the guest must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Guest-physical base of its 0x200-byte register window.
    pub base: u64,
    /// The GSI (IOAPIC pin) it raises.
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub vcpus: usize,
    pub virtio: Vec<VirtioMmio>,
}

/// Why tables could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI: {0} vCPUs cannot be described (1 to {MAX_VCPUS})")]
    VcpuCount(usize),
    #[error("ACPI: virtio-mmio device {index} at {base:#x} is not a 32-bit address")]
    VirtioAddress { index: usize, base: u64 },
    #[error(
        "ACPI: virtio-mmio device {index} uses GSI {gsi}, past the IOAPIC's {IOAPIC_PINS} pins"
    )]
    VirtioGsi { index: usize, gsi: u32 },
    #[error("ACPI: virtio-mmio device {index} uses GSI {gsi}, already taken")]
    GsiTaken { index: usize, gsi: u32 },
    #[error("ACPI: too many virtio-mmio devices ({0}, at most 100)")]
    TooManyDevices(usize),
    #[error("ACPI: tables need {need} bytes at {base:#x}, only {room} fit below {AREA_END:#x}")]
    NoRoom { base: u64, need: usize, room: u64 },
}

/// Guest-physical addresses of each table in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub rsdp: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub dsdt: u64,
}

/// The finished tables: `bytes` go to guest-physical `base` as they are.
#[derive(Debug, Clone)]
pub struct Tables {
    pub base: u64,
    pub bytes: Vec<u8>,
    pub layout: Layout,
}

impl Tables {
    /// The address to give the guest (`acpi_rsdp_addr` in the zero page, PVH `rsdp_paddr`).
    pub fn rsdp_addr(&self) -> u64 {
        self.layout.rsdp
    }

    /// The bytes of the table at guest-physical `addr` (`len` from its header; RSDP: 36).
    pub fn table_at(&self, addr: u64) -> Option<&[u8]> {
        let off = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        let len = if addr == self.layout.rsdp {
            Rsdp::len()
        } else {
            let l = self.bytes.get(off + 4..off + 8)?;
            u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize
        };
        self.bytes.get(off..off.checked_add(len)?)
    }
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Builds the FADT: hardware-reduced ACPI with our sleep and reset registers, DSDT at `dsdt`.
pub fn fadt(dsdt: u64) -> Vec<u8> {
    let io8 = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port as u64,
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    // Both DSDT pointers: older parsers read the 32-bit one.
    if let Ok(d32) = u32::try_from(dsdt) {
        b.dsdt = d32.into();
    }
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.sleep_control_reg = io8(pm::SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io8(pm::SLEEP_STATUS_PORT);
    b.reset_reg = io8(pm::RESET_PORT);
    b.reset_value = pm::RESET_VALUE;
    to_bytes(&b.finalize())
}

/// MADT entry: Interrupt Source Override (type 2).
fn iso(bus_irq: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut v = vec![2, 10, 0, bus_irq];
    v.extend_from_slice(&gsi.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// MADT entry: Local APIC NMI (type 4) for every processor (UID 0xFF) on `lint`.
fn lapic_nmi(lint: u8) -> Vec<u8> {
    vec![4, 6, 0xff, 0, 0, lint]
}

/// Builds the MADT for `vcpus` processors (APIC ID = UID = index).
pub fn madt(vcpus: usize) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(AcpiError::VcpuCount(vcpus));
    }
    // The crate's MADT type has no way to set the flags, so the generic SDT carries it.
    let mut t = Sdt::new(*b"APIC", 44, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, 1); // PCAT_COMPAT: the 8259s exist (KVM's in-kernel PIC)
    for i in 0..vcpus {
        t.append_slice(&to_bytes(&ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        )));
    }
    t.append_slice(&to_bytes(&IoApic::new(0, IOAPIC_ADDR, 0)));
    // KVM's default routing wires the PIT (ISA IRQ 0) to IOAPIC pin 2.
    t.append_slice(&iso(0, 2, 0));
    t.append_slice(&lapic_nmi(1));
    Ok(t.as_slice().to_vec())
}

/// Builds the XSDT listing `entries`.
pub fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut x = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for e in entries {
        x.add_entry(*e);
    }
    to_bytes(&x)
}

fn check(platform: &Platform) -> Result<(), AcpiError> {
    if platform.vcpus == 0 || platform.vcpus > MAX_VCPUS {
        return Err(AcpiError::VcpuCount(platform.vcpus));
    }
    if platform.virtio.len() > 100 {
        return Err(AcpiError::TooManyDevices(platform.virtio.len()));
    }
    let mut used = vec![COM1_IRQ as u32, 2, pm::GED_GSI];
    for (index, d) in platform.virtio.iter().enumerate() {
        if u32::try_from(d.base)
            .ok()
            .and_then(|b| b.checked_add(VIRTIO_MMIO_SIZE))
            .is_none()
        {
            return Err(AcpiError::VirtioAddress {
                index,
                base: d.base,
            });
        }
        if d.gsi >= IOAPIC_PINS {
            return Err(AcpiError::VirtioGsi { index, gsi: d.gsi });
        }
        if used.contains(&d.gsi) {
            return Err(AcpiError::GsiTaken { index, gsi: d.gsi });
        }
        used.push(d.gsi);
    }
    Ok(())
}

fn align16(x: usize) -> usize {
    (x + 15) & !15
}

/// Builds every table for `platform` as one blob meant for guest-physical `base`.
pub fn build(platform: &Platform, base: u64) -> Result<Tables, AcpiError> {
    check(platform)?;
    let dsdt = dsdt::dsdt(&platform.virtio)?;
    let madt = madt(platform.vcpus)?;
    // Offsets: RSDP, XSDT (2 entries), FADT, MADT, DSDT, each 16-byte aligned.
    let o_xsdt = align16(Rsdp::len());
    let o_fadt = align16(o_xsdt + 36 + 2 * 8);
    let fadt_len = acpi_tables::fadt::FADT::len();
    let o_madt = align16(o_fadt + fadt_len);
    let o_dsdt = align16(o_madt + madt.len());
    let total = o_dsdt + dsdt.len();
    let room = AREA_END.saturating_sub(base);
    if base < 0x1000 || total as u64 > room {
        return Err(AcpiError::NoRoom {
            base,
            need: total,
            room,
        });
    }
    let at = |o: usize| base + o as u64;
    let layout = Layout {
        rsdp: base,
        xsdt: at(o_xsdt),
        fadt: at(o_fadt),
        madt: at(o_madt),
        dsdt: at(o_dsdt),
    };

    let mut bytes = vec![0u8; total];
    let mut put = |o: usize, b: &[u8]| bytes[o..o + b.len()].copy_from_slice(b);
    put(0, &to_bytes(&Rsdp::new(OEM_ID, layout.xsdt)));
    put(o_xsdt, &xsdt(&[layout.fadt, layout.madt]));
    put(o_fadt, &fadt(layout.dsdt));
    put(o_madt, &madt);
    put(o_dsdt, &dsdt);
    Ok(Tables {
        base,
        bytes,
        layout,
    })
}

#[cfg(test)]
mod tests;
