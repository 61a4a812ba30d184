//! `savevm` in the lazily loadable layout (`vmstate::snapfile`, format version 2) and the
//! parts of `loadvm` that do not depend on how RAM comes back: reading and checking the
//! header and meta block, and an eager load (used where the image cannot serve RAM lazily).
//! The lazy load itself is in [`crate::lazy_ram`].
//!
//! Saving writes guest RAM straight from guest memory (the VM is paused), in large sequential
//! pieces, with one CRC-32 per chunk; the meta block and then the header follow, so a state
//! cut short is never mistaken for a complete one.

use crate::ram::{next_set, populated_pages};
use crate::{MigratableVm, MigrationError, RamRegion, Result};
use vmstate::ram::{is_zero_page, RamStats};
use vmstate::snapfile::{self, Chunk, Header, CHUNK_PAGES, HEADER_SIZE};
use vmstate::stream::PAGE_SIZE;
use vmstate::Section;

/// Largest single write handed to the sink.
const WRITE_PIECE: usize = 8 << 20;

/// Where `save` puts the state (the qcow2 VM-state area).
pub trait StateSink {
    /// Writes `data` at byte `pos` of the state.
    fn write_at(&mut self, pos: u64, data: &[u8]) -> std::io::Result<()>;
    /// Writes `len` bytes of guest memory at host address `host` to byte `pos`. The memory
    /// stays as it is until [`StateSink::finish_ram`] (the VM is paused), so an implementation
    /// may return before the write is done.
    fn write_ram(&mut self, pos: u64, host: u64, len: usize) -> std::io::Result<()> {
        // SAFETY: `save` passes ranges inside guest RAM, which outlives the call.
        let mem = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        self.write_at(pos, mem)
    }
    /// Waits until every `write_ram` is done.
    fn finish_ram(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<F: FnMut(u64, &[u8]) -> std::io::Result<()>> StateSink for F {
    fn write_at(&mut self, pos: u64, data: &[u8]) -> std::io::Result<()> {
        self(pos, data)
    }
}
/// Reads `buf.len()` bytes at byte `pos` of a saved VM state.
pub type Source<'a> = dyn FnMut(u64, &mut [u8]) -> std::io::Result<()> + 'a;

/// Guest memory of `len` bytes at `gpa`, if it lies inside one region.
pub(crate) fn host_of(regions: &[RamRegion], gpa: u64, len: u64) -> Option<u64> {
    let end = gpa.checked_add(len)?;
    regions.iter().find(|r| gpa >= r.gpa && end <= r.gpa + r.size).map(|r| r.host + (gpa - r.gpa))
}

/// Saves the paused VM into `sink`; returns the state's size and the page counts.
pub fn save(vm: &dyn MigratableVm, sink: &mut dyn StateSink) -> Result<(u64, RamStats)> {
    let sections = vm.save_state().map_err(MigrationError::Vm)?;
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut st = RamStats::default();
    let mut pos = HEADER_SIZE;
    // Pending write: (host address, length) contiguous in guest memory and in the state.
    let mut pend: Option<(u64, usize)> = None;
    let flush = |sink: &mut dyn StateSink, pend: &mut Option<(u64, usize)>, pos: &mut u64| -> Result<()> {
        if let Some((host, len)) = pend.take() {
            // Inside a guest RAM region (pages of it, queued below); the VM is paused.
            sink.write_ram(*pos, host, len)?;
            *pos += len as u64;
        }
        Ok(())
    };
    for r in vm.ram_regions() {
        let bits = populated_pages(&r);
        let npages = (r.size / PAGE_SIZE as u64) as usize;
        let mut p = 0usize;
        while let Some(i) = next_set(&bits, p, npages) {
            p = i + 1;
            let host = r.host + (i * PAGE_SIZE) as u64;
            // SAFETY: page i of the region; the VM is paused.
            let page = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE_SIZE) };
            if is_zero_page(page) {
                st.zero_pages += 1;
                continue;
            }
            st.data_pages += 1;
            let gpa = r.gpa + (i * PAGE_SIZE) as u64;
            match chunks.last_mut() {
                Some(c) if c.end() == gpa && c.npages < CHUNK_PAGES => {
                    let mut h = crc32fast::Hasher::new_with_initial_len(c.crc, c.len());
                    h.update(page);
                    c.crc = h.finalize();
                    c.npages += 1;
                }
                _ => chunks.push(Chunk { gpa, npages: 1, crc: crc32fast::hash(page) }),
            }
            match &mut pend {
                Some((h, l)) if *h + *l as u64 == host && *l < WRITE_PIECE => *l += PAGE_SIZE,
                _ => {
                    flush(sink, &mut pend, &mut pos)?;
                    pend = Some((host, PAGE_SIZE));
                }
            }
        }
    }
    flush(sink, &mut pend, &mut pos)?;
    sink.finish_ram()?;
    let data_len = pos - HEADER_SIZE;
    let meta = snapfile::encode_meta(&sections, &chunks)?;
    let h = Header {
        max_chunk_pages: CHUNK_PAGES,
        data_off: HEADER_SIZE,
        data_len,
        meta_off: pos,
        meta_len: meta.len() as u64,
        meta_crc: crc32fast::hash(&meta),
    };
    sink.write_at(pos, &meta)?;
    sink.write_at(0, &h.encode())?;
    Ok((pos + meta.len() as u64, st))
}

/// What `loadvm` knows before touching the VM: the machine state and where RAM lies.
#[derive(Debug, Clone)]
pub struct Plan {
    pub header: Header,
    pub sections: Vec<Section>,
    pub chunks: Vec<Chunk>,
    /// Byte offset of each chunk in the state.
    pub offsets: Vec<u64>,
}

/// Reads the header and meta of a version-2 state of `total` bytes and checks them, the
/// sections (against `vm`) and that every chunk lies inside guest RAM. Changes nothing.
pub fn read_plan(vm: &dyn MigratableVm, total: u64, src: &mut Source) -> Result<Plan> {
    let mut hb = vec![0u8; HEADER_SIZE as usize];
    src(0, &mut hb)?;
    let header = Header::parse(&hb, total)?;
    let mut meta = vec![0u8; header.meta_len as usize];
    src(header.meta_off, &mut meta)?;
    let (sections, chunks) = snapfile::parse_meta(&header, &meta)?;
    vm.check_state(&sections).map_err(MigrationError::Vm)?;
    let regions = vm.ram_regions();
    for c in &chunks {
        if host_of(&regions, c.gpa, c.len()).is_none() {
            return Err(MigrationError::Protocol(format!(
                "saved RAM at {:#x} ({} pages) lies outside this VM's RAM",
                c.gpa, c.npages
            )));
        }
    }
    let offsets = snapfile::chunk_offsets(&header, &chunks);
    Ok(Plan { header, sections, chunks, offsets })
}

/// What to say about a chunk whose bytes do not match their checksum.
pub fn corrupt_text(c: &Chunk, found: u32) -> String {
    format!(
        "saved RAM at {:#x}..{:#x} is corrupted (CRC-32 {found:#010x}, saved {:#010x})",
        c.gpa,
        c.end(),
        c.crc
    )
}

/// Loads every chunk now (RAM is discarded first), checking each, then the machine state.
/// On a checksum failure the VM's RAM is partly replaced: the caller must keep it stopped.
pub fn load_eager(vm: &dyn MigratableVm, plan: &Plan, src: &mut Source) -> Result<RamStats> {
    let regions = vm.ram_regions();
    vm.discard_ram().map_err(MigrationError::Vm)?;
    let mut st = RamStats::default();
    let mut i = 0;
    while i < plan.chunks.len() {
        // Read chunks that are contiguous in the state and in guest memory together.
        let first = &plan.chunks[i];
        let Some(host) = host_of(&regions, first.gpa, first.len()) else {
            return Err(MigrationError::Protocol(format!("saved RAM at {:#x} outside guest RAM", first.gpa)));
        };
        let mut j = i + 1;
        let mut len = first.len();
        while j < plan.chunks.len()
            && plan.chunks[j].gpa == first.gpa + len
            && len < WRITE_PIECE as u64
            && host_of(&regions, first.gpa, len + plan.chunks[j].len()).is_some()
        {
            len += plan.chunks[j].len();
            j += 1;
        }
        // SAFETY: checked to lie inside one guest RAM region; the VM is paused.
        let mem = unsafe { std::slice::from_raw_parts_mut(host as *mut u8, len as usize) };
        src(plan.offsets[i], mem)?;
        let mut at = 0usize;
        for c in &plan.chunks[i..j] {
            let got = crc32fast::hash(&mem[at..at + c.len() as usize]);
            if got != c.crc {
                return Err(MigrationError::State(vmstate::StateError::Stream(corrupt_text(c, got))));
            }
            at += c.len() as usize;
            st.data_pages += c.npages as u64;
        }
        i = j;
    }
    vm.restore_state(&plan.sections).map_err(MigrationError::Vm)?;
    Ok(st)
}
