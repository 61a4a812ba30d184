//! The DSDT: static AML describing COM1, every virtio-mmio transport, the power button behind
//! a Generic Event Device, and the S5 sleep state.
//!
//! ```text
//! Scope (\_SB) {   // names at the root are written relative to it, as iasl does
//!     Device (COM1) { _HID PNP0501, _UID 1, _CRS { IO 0x3F8/8, IRQNoFlags {4} } }
//!     Device (VRnn) { _HID "LNRO0005", _UID nn,
//!                     _CRS { Memory32Fixed (RW, base, 0x200),
//!                            Interrupt (Consumer, Edge, ActiveHigh, Exclusive) {gsi} } }
//!     Device (GED0) { _HID "ACPI0013", _UID 0,
//!                     _CRS { Interrupt (Consumer, Edge, ActiveHigh, Exclusive) {9} },
//!                     OperationRegion (EREG, SystemIO, 0x603, 1), Field { ESEL, 8 },
//!                     Method (_EVT, 1, Serialized) {
//!                         Local0 = ESEL; If (Local0 & 1) { Notify (PWRB, 0x80) } } }
//!     Device (PWRB) { _HID PNP0C0C, _UID 0 }
//! }
//! Name (\_S5, Package (4) { 5, 0, 0, 0 })
//! ```
//! COM1 must be there: in hardware-reduced mode Linux routes no legacy IRQ 4 otherwise, and
//! everything written to `/dev/console` after boot is lost. `\_S5` must be there for
//! `poweroff` to reach the sleep register (without it the kernel only halts). Hardware-reduced
//! ACPI has no fixed power button, so the button is a `PNP0C0C` device that the GED's `_EVT`
//! notifies (0x80: pressed) when [`crate::pm::PowerButton`] latched its event.

use crate::{
    AcpiError, VirtioMmio, COM1_IRQ, COM1_PORT, OEM_ID, OEM_REVISION, OEM_TABLE_ID,
    VIRTIO_MMIO_SIZE,
};
use crate::pm::{EVENT_POWER_BUTTON, GED_EVENT_PORT, GED_GSI};
use acpi_tables::aml::{
    And, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If,
    Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion, OpRegionSpace, Package, Path,
    ResourceTemplate, Scope, Store, Zero, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};

/// `_HID` of a virtio-mmio transport (Linux's `virtio_mmio` driver matches it).
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";
/// The sleep type value `\_S5` gives (written as SLP_TYP into the sleep control register).
pub const S5_SLP_TYP: u8 = 5;
/// `_HID` of the Generic Event Device.
pub const GED_HID: &str = "ACPI0013";
/// Notify value for a power-button device: the button was pressed.
pub const NOTIFY_PRESSED: u8 = 0x80;

/// `Device (GED0)` and `Device (PWRB)`, appended to `out` (inside `\_SB`).
fn power_button(out: &mut Vec<u8>) {
    let hid: &'static str = GED_HID;
    let irq = Interrupt::new(true, true, false, false, GED_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);
    let (port, len) = (GED_EVENT_PORT as u64, 1u8);
    let region = OpRegion::new("EREG".into(), OpRegionSpace::SystemIO, &port, &len);
    let field = Field::new(
        "EREG".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::Preserve,
        vec![FieldEntry::Named(*b"ESEL", 8)],
    );
    let (esel, local0, button) = (Path::new("ESEL"), Local(0), Path::new("PWRB"));
    let read = Store::new(&local0, &esel);
    let bit = EVENT_POWER_BUTTON;
    let pressed = And::new(&Zero {}, &local0, &bit);
    let value = NOTIFY_PRESSED;
    let notify = Notify::new(&button, &value);
    let on_button = If::new(&pressed, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read, &on_button]);
    let (h, u, c) = (
        Name::new("_HID".into(), &hid),
        Name::new("_UID".into(), &0u8),
        Name::new("_CRS".into(), &crs),
    );
    let ged = Device::new("GED0".into(), vec![&h, &u, &c, &region, &field, &evt]);
    ged.to_aml_bytes(out);
    let (h, u) = (
        Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
        Name::new("_UID".into(), &0u8),
    );
    Device::new("PWRB".into(), vec![&h, &u]).to_aml_bytes(out);
}

/// ACPI small resource descriptor "IRQ without flags" (edge, active high, exclusive).
struct IrqNoFlags(u8);

impl Aml for IrqNoFlags {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(0x22); // small item: IRQ format, 2 bytes follow
        sink.word(1u16 << self.0);
    }
}

/// AML already encoded.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The name of virtio device `index` in the namespace (`VR00`..`VR99`).
pub fn virtio_device_name(index: usize) -> String {
    format!("VR{:02}", index % 100)
}

/// The AML body (everything after the table header).
pub fn body(virtio: &[VirtioMmio]) -> Result<Vec<u8>, AcpiError> {
    if virtio.len() > 100 {
        return Err(AcpiError::TooManyDevices(virtio.len()));
    }
    let (com1_io, com1_irq) = (IO::new(COM1_PORT, COM1_PORT, 0, 8), IrqNoFlags(COM1_IRQ));
    let com1_crs = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let com1_uid = Name::new("_UID".into(), &1u8);
    let com1_crs = Name::new("_CRS".into(), &com1_crs);
    let com1 = Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    struct Vr {
        name: String,
        uid: u32,
        mem: Memory32Fixed,
        irq: Interrupt,
    }
    let mut vrs = Vec::with_capacity(virtio.len());
    for (index, d) in virtio.iter().enumerate() {
        let base = u32::try_from(d.base).map_err(|_| AcpiError::VirtioAddress {
            index,
            base: d.base,
        })?;
        vrs.push(Vr {
            name: virtio_device_name(index),
            uid: index as u32,
            mem: Memory32Fixed::new(true, base, VIRTIO_MMIO_SIZE),
            // Consumer, edge-triggered, active high, exclusive: an irqfd injects a pulse.
            irq: Interrupt::new(true, true, false, false, d.gsi),
        });
    }
    let hid: &'static str = VIRTIO_MMIO_HID;
    let mut parts: Vec<(Name, Name, Name)> = Vec::with_capacity(vrs.len());
    for v in &vrs {
        let crs = ResourceTemplate::new(vec![&v.mem, &v.irq]);
        parts.push((
            Name::new("_HID".into(), &hid),
            Name::new("_UID".into(), &v.uid),
            Name::new("_CRS".into(), &crs),
        ));
    }
    let devices: Vec<Device> = vrs
        .iter()
        .zip(&parts)
        .map(|(v, (h, u, c))| Device::new(Path::new(&v.name), vec![h as &dyn Aml, u, c]))
        .collect();
    let mut buttons = Vec::new();
    power_button(&mut buttons);
    let buttons = RawAml(buttons);
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    children.push(&buttons);
    let sb = Scope::new("_SB_".into(), children);

    let zero = 0u8;
    let s5_typ = S5_SLP_TYP;
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&s5_typ, &zero, &zero, &zero]),
    );

    let mut out = Vec::new();
    sb.to_aml_bytes(&mut out);
    s5.to_aml_bytes(&mut out);
    Ok(out)
}

/// The whole DSDT (revision 2: 64-bit integers).
pub fn dsdt(virtio: &[VirtioMmio]) -> Result<Vec<u8>, AcpiError> {
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append_slice(&body(virtio)?);
    Ok(t.as_slice().to_vec())
}
