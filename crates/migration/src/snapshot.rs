//! `savevm` / `loadvm` streams: the whole VM — a config section first, then every state
//! section, then guest RAM (zero pages recorded, not stored), then END — written to any sink
//! (the qcow2 VM-state area) and read back. Loading checks every section before touching RAM
//! or vCPUs, so a bad or mismatched snapshot leaves the VM as it was.

use crate::ram::{populated_pages, send_marked};
use crate::{MigratableVm, MigrationError, Result};
use std::io::{Read, Write};
use vmstate::ram::RamStats;
use vmstate::stream::{Item, StreamReader, StreamWriter, PAGE_SIZE};
use vmstate::Section;

/// Writes the paused VM into `out`. Returns the bytes written and the page counts.
pub fn save<W: Write>(vm: &dyn MigratableVm, out: W) -> Result<(u64, RamStats)> {
    let mut w = StreamWriter::new(out)?;
    for s in vm.save_state().map_err(MigrationError::Vm)? {
        w.section(&s)?;
    }
    let mut st = RamStats::default();
    for r in vm.ram_regions() {
        let bits = populated_pages(&r);
        st.add(send_marked(&mut w, &r, &bits, true, &|| false)?.0);
    }
    w.end()?;
    Ok((w.bytes_written(), st))
}

/// Reads the sections at the head of a snapshot stream (everything before the RAM).
pub fn read_sections<R: Read>(r: &mut StreamReader<R>) -> Result<(Vec<Section>, Option<Item>)> {
    let mut sections = Vec::new();
    loop {
        match r.next_item()? {
            Item::Section(s) => {
                if sections.len() >= 4096 {
                    return Err(MigrationError::Protocol("too many state sections".into()));
                }
                sections.push(s)
            }
            other => return Ok((sections, Some(other))),
        }
    }
}

/// Loads a snapshot into the paused VM. Sections are checked first; RAM is then replaced.
/// `check_only` stops after the checks (used to validate before destroying anything).
pub fn load<R: Read>(vm: &dyn MigratableVm, input: R) -> Result<RamStats> {
    let mut r = StreamReader::new(input)?;
    let (sections, mut next) = read_sections(&mut r)?;
    vm.check_state(&sections).map_err(MigrationError::Vm)?;
    let regions = vm.ram_regions();
    vm.discard_ram().map_err(MigrationError::Vm)?;
    let mut st = RamStats::default();
    loop {
        let item = match next.take() {
            Some(i) => i,
            None => r.next_item()?,
        };
        match item {
            Item::RamData { gpa, npages } => {
                let len = npages as u64 * PAGE_SIZE as u64;
                let reg = regions
                    .iter()
                    .find(|x| gpa >= x.gpa && gpa.saturating_add(len) <= x.gpa + x.size)
                    .ok_or_else(|| MigrationError::Protocol(format!("RAM record {gpa:#x} outside guest RAM")))?;
                // SAFETY: bounds checked; the VM is paused.
                let dst = unsafe { std::slice::from_raw_parts_mut((reg.host + gpa - reg.gpa) as *mut u8, len as usize) };
                r.read_pages_into(dst)?;
                st.data_pages += npages as u64;
            }
            Item::RamZero { npages, .. } => st.zero_pages += npages as u64,
            Item::End => break,
            other => return Err(MigrationError::Protocol(format!("unexpected record in snapshot: {other:?}"))),
        }
    }
    vm.restore_state(&sections).map_err(MigrationError::Vm)?;
    Ok(st)
}
