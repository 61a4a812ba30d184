//! The VM's network cards: virtio-net devices on taps, placed in the virtio-mmio slots after
//! the disks (so a VM without NICs keeps its layout), with their irqfds and ioeventfds
//! registered like the disks', and the announcement entry point used after a move.
//!
//! Kept apart from `vm.rs` so the VM core only holds a list of them and loops over it for
//! pause/resume and save/restore (section `dev.virtio-net<slot>`, see `virtio::net`).

use crate::error::{kvm, Error, Result};
use devices::bus::{lock, Bus};
use kvm_ioctls::VmFd;
use std::sync::{Arc, Mutex};
use virtio::{GuestMemoryMmap, MmioTransport, Net, NetConfig};

/// A NIC to attach: its open tap and the device configuration (MAC).
pub struct NetSpec {
    pub tap: net::Tap,
    pub config: NetConfig,
}

pub type NetDevice = Arc<Mutex<MmioTransport<Net>>>;

/// Builds the NICs in slots `first_slot..`, registers their interrupts and notifications
/// with KVM and their windows on the MMIO bus.
pub(crate) fn attach(
    fd: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    first_slot: usize,
    specs: Vec<NetSpec>,
) -> Result<Vec<NetDevice>> {
    let mut out = Vec::new();
    for (i, s) in specs.into_iter().enumerate() {
        let ifname = s.tap.ifname().to_string();
        let err = |e: virtio::Error| Error::Device(format!("NIC {i} (tap {ifname}): {e}"));
        let dev = Net::new(s.tap, s.config).map_err(err)?;
        let dev = MmioTransport::new(first_slot + i, dev, mem.clone()).map_err(err)?;
        fd.register_irqfd(dev.irq_evt(), dev.gsi()).map_err(kvm("KVM_IRQFD"))?;
        for e in dev.ioevents() {
            fd.register_ioevent(e.fd, &kvm_ioctls::IoEventAddress::Mmio(e.addr), e.datamatch)
                .map_err(kvm("KVM_IOEVENTFD"))?;
        }
        let (base, len) = (dev.mmio_base(), dev.mmio_len());
        let dev = Arc::new(Mutex::new(dev));
        mmio.insert(base, len, dev.clone()).map_err(|e| Error::Device(e.to_string()))?;
        out.push(dev);
    }
    Ok(out)
}

/// (window, GSI) of every NIC, for the ACPI DSDT.
pub(crate) fn slots(nets: &[NetDevice]) -> Vec<(u64, u32)> {
    nets.iter()
        .map(|n| {
            let t = lock(n);
            (t.mmio_base(), t.gsi())
        })
        .collect()
}

/// What `info network` shows about one NIC.
#[derive(Debug, Clone)]
pub struct NicInfo {
    pub ifname: String,
    pub mac: net::MacAddr,
    pub slot_base: u64,
    pub activated: bool,
    pub counters: virtio::NetCounters,
}

pub(crate) fn info(nets: &[NetDevice]) -> Vec<NicInfo> {
    nets.iter()
        .map(|n| {
            let t = lock(n);
            NicInfo {
                ifname: t.device().ifname().to_string(),
                mac: t.device().mac(),
                slot_base: t.mmio_base(),
                activated: t.is_activated(),
                counters: t.device().counters(),
            }
        })
        .collect()
}
