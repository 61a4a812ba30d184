//! Guest RAM: the physical layout (RAM below the 32-bit MMIO hole, the rest above 4 GiB), its
//! allocation through `vm-memory` (lazily populated anonymous memory, with a dirty bitmap,
//! `virtio::dirty::DirtyBitmap`, so every write a device makes through `vm-memory` is
//! tracked), one KVM memslot per region, and dirty tracking that merges KVM's log (vCPU
//! writes) with that bitmap (device writes).

use crate::error::{kvm, Error, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestMemoryMmap as Mmap};

pub type GuestMemoryMmap = Mmap<virtio::dirty::DirtyBitmap>;

pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole (virtio-mmio, IOAPIC, LAPIC live at its top).
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
pub const FOUR_GIB: u64 = 1 << 32;
/// Largest RAM size accepted (the guest's page tables and our bitmaps stay reasonable).
pub const MAX_RAM: u64 = 1 << 40;

/// The guest-physical RAM ranges for `size` bytes of RAM.
pub fn layout(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE_START), (FOUR_GIB, size - MMIO_HOLE_START)]
    }
}

/// One RAM region registered as a KVM memslot.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub index: u32,
    pub gpa: u64,
    pub size: u64,
    pub host: u64,
}

/// Guest RAM and its memslots.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    slots: Vec<Slot>,
    size: u64,
    /// KVM's manual dirty-log protection with an initially-set log is on (see
    /// [`GuestRam::use_manual_protect`]).
    manual: std::sync::atomic::AtomicBool,
    /// With manual protection: per slot, the pages write-protected (cleared) at least once
    /// since logging started; KVM's bit for any other page is the initial "dirty".
    tracked: std::sync::Mutex<Vec<Vec<u64>>>,
}

// KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log); kvm-ioctls has no
// wrapper for it.
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_bindings::kvm_clear_dirty_log);

impl GuestRam {
    /// Reserves `size` bytes of guest RAM (pages are populated on first touch).
    pub fn new(size: u64) -> Result<Self> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(Error::MemorySize(format!("{size} bytes is not a positive multiple of 4 KiB")));
        }
        if size > MAX_RAM {
            return Err(Error::MemorySize(format!(
                "{} MiB is more than the {} MiB Godwit supports",
                size >> 20,
                MAX_RAM >> 20
            )));
        }
        let ranges: Vec<(GuestAddress, usize)> =
            layout(size).into_iter().map(|(a, s)| (GuestAddress(a), s as usize)).collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| Error::MemoryAlloc { size: size >> 20, reason: e.to_string() })?;
        let slots: Vec<Slot> = mem
            .iter()
            .enumerate()
            .map(|(i, r)| Slot {
                index: i as u32,
                gpa: r.start_addr().0,
                size: r.len(),
                host: r.as_ptr() as u64,
            })
            .collect();
        let ram = GuestRam { mem, slots, size, manual: Default::default(), tracked: Default::default() };
        // Transparent huge pages: one fault maps 2 MiB instead of 4 KiB, ~500x fewer faults
        // when fresh RAM is populated (boot, loadvm, an incoming migration; but see
        // `crate::pagesize` for hosts where fresh huge pages are cold). Advice only: where THP
        // is off this does nothing.
        ram.advise_huge_pages(true);
        Ok(ram)
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Turns on KVM's manual dirty-log protection with an initially-set log, where KVM offers
    /// it (call before any slot logs). Starting to log then costs nothing per guest page:
    /// instead of KVM write-protecting every page of every slot, Godwit protects only the
    /// pages that hold anything (the kernel's page map), and pages never touched stay
    /// unprotected until the guest first writes them — which makes them populated, so the
    /// next harvest finds them. Returns whether it is on.
    pub fn use_manual_protect(&self, vm: &VmFd) -> bool {
        const WANT: u64 = (kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET) as u64;
        let cap = kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2;
        let have = vm.check_extension_raw(cap as libc::c_ulong);
        if have < 0 || (have as u64) & WANT != WANT {
            return false;
        }
        let mut c = kvm_bindings::kvm_enable_cap { cap, ..Default::default() };
        c.args[0] = WANT;
        let on = vm.enable_cap(&c).is_ok();
        self.manual.store(on, std::sync::atomic::Ordering::Relaxed);
        on
    }

    /// Clears (and so write-protects) the pages of slot `s` marked in `bits`: one call per
    /// span of marked words (KVM reads and walks every word it is given, so a few pages of
    /// a 64 GiB slot are not handed over as a 2 MiB bitmap).
    fn clear_dirty(vm: &VmFd, s: &Slot, bits: &[u64]) -> Result<()> {
        /// Marked words closer than this share one call.
        const GAP: usize = 64;
        let npages = (s.size / PAGE_SIZE) as usize;
        let mut w = 0;
        while w < bits.len() {
            if bits[w] == 0 {
                w += 1;
                continue;
            }
            let start = w;
            let mut end = w + 1;
            while end < bits.len() && bits[end..(end + GAP).min(bits.len())].iter().any(|&x| x != 0) {
                end += 1;
            }
            // Pages start..end words; a span reaching the last word ends at the slot's end.
            let first = start * 64;
            let num = (end * 64).min(npages) - first;
            let mut arg = kvm_bindings::kvm_clear_dirty_log { slot: s.index, num_pages: num as u32, first_page: first as u64, ..Default::default() };
            arg.__bindgen_anon_1.dirty_bitmap = bits[start..end].as_ptr() as *mut libc::c_void;
            // SAFETY: KVM_CLEAR_DIRTY_LOG on our VM fd; the bitmap holds a bit for each of the
            // `num` pages from `first` and outlives the call.
            let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
            if r < 0 {
                return Err(kvm("KVM_CLEAR_DIRTY_LOG")(kvm_ioctls::Error::last()));
            }
            w = end;
        }
        Ok(())
    }

    /// Registers (or re-registers) every region with KVM, with or without dirty logging.
    pub fn register(&self, vm: &VmFd, dirty_log: bool) -> Result<()> {
        for s in &self.slots {
            let region = kvm_userspace_memory_region {
                slot: s.index,
                flags: if dirty_log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: s.gpa,
                memory_size: s.size,
                userspace_addr: s.host,
            };
            // SAFETY: the host range belongs to `self.mem`, which outlives the VM's use of it
            // (the VM owns this GuestRam and drops the VmFd first).
            unsafe { vm.set_user_memory_region(region) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        tracked.clear();
        if dirty_log && self.manual.load(std::sync::atomic::Ordering::Relaxed) {
            // Every page starts "dirty" and writable: protect the ones holding anything, so
            // their next write is logged. The others are all zero; while they stay
            // untouched there is nothing to send.
            for s in &self.slots {
                let pop = vmstate::pagemap::populated(s.host, s.size);
                Self::clear_dirty(vm, s, &pop)?;
                tracked.push(pop);
            }
        }
        Ok(())
    }

    fn slot_for(&self, gpa: u64, len: u64) -> Option<&Slot> {
        let end = gpa.checked_add(len)?;
        self.slots.iter().find(|s| gpa >= s.gpa && end <= s.gpa + s.size)
    }

    /// A host view of guest RAM at `gpa`, `len` bytes, within one slot.
    ///
    /// The vCPUs may be writing these bytes concurrently (live migration reads a running
    /// guest's memory); the data read may then be stale, which dirty tracking corrects.
    pub fn host_slice(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        let s = self.slot_for(gpa, len)?;
        // SAFETY: bounds checked against the slot; the mapping lives as long as `self`.
        Some(unsafe { std::slice::from_raw_parts((s.host + (gpa - s.gpa)) as *const u8, len as usize) })
    }

    /// Mutable host view of guest RAM (restore paths, with the vCPUs paused).
    #[allow(clippy::mut_from_ref)]
    pub fn host_slice_mut(&self, gpa: u64, len: u64) -> Option<&mut [u8]> {
        let s = self.slot_for(gpa, len)?;
        // SAFETY: as above; callers write guest RAM only while the vCPUs are paused, and the
        // mapping is shared memory the guest owns anyway.
        Some(unsafe { std::slice::from_raw_parts_mut((s.host + (gpa - s.gpa)) as *mut u8, len as usize) })
    }

    /// Advises huge pages (`true`, the default) or small pages for every slot; only the
    /// faults after this call follow it (see [`crate::pagesize`]).
    pub fn advise_huge_pages(&self, huge: bool) {
        let advice = if huge { libc::MADV_HUGEPAGE } else { libc::MADV_NOHUGEPAGE };
        for s in &self.slots {
            // SAFETY: the range is our own anonymous mapping; advice changes no contents.
            unsafe { libc::madvise(s.host as *mut libc::c_void, s.size as usize, advice) };
        }
    }

    /// Zeroes a page-aligned range by dropping its pages (they read back as zero and cost no RSS).
    pub fn discard(&self, gpa: u64, len: u64) -> Result<()> {
        let slice = self
            .host_slice(gpa, len)
            .ok_or(Error::GuestMemory { addr: gpa, reason: "range outside RAM".into() })?;
        // SAFETY: the range is inside our private anonymous mapping.
        let r = unsafe { libc::madvise(slice.as_ptr() as *mut _, len as usize, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Collects and clears the dirty pages of every slot: KVM's log OR-ed with the bitmap of
    /// writes made through `vm-memory`. One bit per 4 KiB page, per slot.
    pub fn take_dirty(&self, vm: &VmFd) -> Result<Vec<Vec<u64>>> {
        let mut out = Vec::with_capacity(self.slots.len());
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        for (i, (s, region)) in self.slots.iter().zip(self.mem.iter()).enumerate() {
            let mut bits = vm.get_dirty_log(s.index, s.size as usize).map_err(kvm("KVM_GET_DIRTY_LOG"))?;
            if let Some(t) = tracked.get_mut(i) {
                // Manual protection: KVM's log still holds the initial "dirty" of pages never
                // protected. Of those, only pages that now hold anything were written; the
                // rest are zero as they were. Clear (protect) what is reported, then the
                // caller reads those pages: a write after this is logged again.
                let pop = vmstate::pagemap::populated(s.host, s.size);
                for ((b, t), p) in bits.iter_mut().zip(t.iter()).zip(pop.iter()) {
                    *b &= *t | *p;
                }
                Self::clear_dirty(vm, s, &bits)?;
                for (t, b) in t.iter_mut().zip(bits.iter()) {
                    *t |= *b;
                }
            }
            let dev = std::ops::Deref::deref(region).bitmap().get_and_reset();
            for (w, d) in bits.iter_mut().zip(dev.iter()) {
                *w |= *d;
            }
            out.push(bits);
        }
        Ok(out)
    }

    /// Clears the device-write bitmaps (at the start of dirty tracking).
    pub fn reset_device_dirty(&self) {
        for region in self.mem.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_respects_the_hole() {
        assert_eq!(layout(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(layout(4 << 30), vec![(0, MMIO_HOLE_START), (FOUR_GIB, (4 << 30) - MMIO_HOLE_START)]);
    }

    /// Manual dirty-log protection (when this KVM offers it): pages holding anything are
    /// protected when logging starts, untouched pages are not reported until they hold
    /// something, a reported page is reported once, and device writes still count.
    #[test]
    fn manual_protection_reports_what_was_populated_and_device_writes() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm (KVM available and usable)");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let ram = GuestRam::new(64 << 20).unwrap();
        if !ram.use_manual_protect(&vm) {
            eprintln!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not offered here: the classic log is used");
            return;
        }
        ram.register(&vm, false).unwrap();
        let host = |gpa: u64| ram.host_slice_mut(gpa, 4096).unwrap();
        host(0x10_000)[0] = 1; // populated before logging starts
        ram.register(&vm, true).unwrap();
        ram.reset_device_dirty();
        let set = |b: &[Vec<u64>]| -> Vec<u64> {
            let mut v = Vec::new();
            for (w, x) in b[0].iter().enumerate() {
                for i in 0..64 {
                    if x >> i & 1 == 1 {
                        v.push((w * 64 + i) as u64 * PAGE_SIZE);
                    }
                }
            }
            v
        };
        // Nothing written since: nothing dirty, although KVM's log starts all set.
        assert_eq!(set(&ram.take_dirty(&vm).unwrap()), Vec::<u64>::new());
        // A page that now holds something (not through KVM: a write into the mapping, as a
        // vCPU's first write to a never-mapped page populates it) is reported, once.
        // (With transparent huge pages the whole 2 MiB around it is populated, and reported.)
        host(0x200_000)[0] = 2;
        let got = set(&ram.take_dirty(&vm).unwrap());
        assert!(got.contains(&0x200_000) && got.iter().all(|&g| (0x200_000..0x400_000).contains(&g)), "{got:x?}");
        assert_eq!(set(&ram.take_dirty(&vm).unwrap()), Vec::<u64>::new());
        // Device writes through vm-memory are tracked as before.
        ram.memory().write_obj(7u32, GuestAddress(0x300_000)).unwrap();
        assert_eq!(set(&ram.take_dirty(&vm).unwrap()), vec![0x300_000]);
        ram.register(&vm, false).unwrap();
    }

    #[test]
    fn sizes_validated_and_device_writes_tracked() {
        assert!(GuestRam::new(0).is_err());
        assert!(GuestRam::new(MAX_RAM * 2).is_err());
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.memory().write_obj(0xdeadu32, GuestAddress(0x5000)).unwrap();
        let bm = std::ops::Deref::deref(ram.memory().iter().next().unwrap()).bitmap().get_and_reset();
        assert_eq!(bm[0], 1 << 5);
        assert_eq!(ram.host_slice(0x5000, 4).unwrap(), &0xdeadu32.to_le_bytes());
        assert!(ram.host_slice((16 << 20) - 2, 4).is_none());
        ram.discard(0x5000, 4096).unwrap();
        assert_eq!(ram.host_slice(0x5000, 4).unwrap(), &[0, 0, 0, 0]);
    }
}
