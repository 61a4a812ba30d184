//! Allocation map of the active layer (what `qemu-img map` shows) and resizing.

use crate::error::{Error, IoCtx, Result};
use crate::header::OFF_SIZE;
use crate::image::{Kind, Qcow2, OFFSET_MASK};

/// How a guest range is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// Not allocated (reads as zeros).
    Unallocated,
    /// Zero cluster, optionally with preallocated host space.
    Zero(Option<u64>),
    /// Data at this host offset.
    Data(u64),
    /// Allocated data cluster whose host range is a hole in the file (reads as zeros).
    DataHole(u64),
    /// Compressed data.
    Compressed,
    /// Not allocated, inside an allocated host cluster at this offset (an unallocated
    /// subcluster with extended L2 entries; qemu-img prints the offset). Only
    /// [`Qcow2::chain_map`] reports it; [`Qcow2::map`] says [`MapKind::Unallocated`].
    UnallocatedAt(u64),
}

/// One run of the allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// Storage kind (host offsets are those of `start`).
    pub kind: MapKind,
}

impl Qcow2 {
    /// The allocation map of the guest-visible disk, merged into runs.
    pub fn map(&mut self) -> Result<Vec<MapEntry>> {
        let mut out: Vec<MapEntry> = Vec::new();
        for mut e in self.map_detailed()? {
            if let MapKind::UnallocatedAt(_) = e.kind {
                e.kind = MapKind::Unallocated;
            }
            match out.last_mut() {
                Some(l) if l.kind == MapKind::Unallocated
                    && e.kind == MapKind::Unallocated
                    && l.start + l.length == e.start =>
                {
                    l.length += e.length
                }
                _ => out.push(e),
            }
        }
        Ok(out)
    }

    /// [`Qcow2::map`] with the host offsets of unallocated subclusters.
    pub(crate) fn map_detailed(&mut self) -> Result<Vec<MapEntry>> {
        let cs = self.cs;
        let size = self.h.size;
        let mut out: Vec<MapEntry> = Vec::new();
        let mut g = 0u64;
        while g < size {
            let span = self.span();
            let l1i = g / span;
            let n = (span - g % span).min(size - g);
            let e = self.l1.get(l1i as usize).copied().unwrap_or(0) & OFFSET_MASK;
            if e == 0 {
                match out.last_mut() {
                    Some(last) if last.kind == MapKind::Unallocated => last.length += n,
                    _ => out.push(MapEntry {
                        start: g,
                        length: n,
                        kind: MapKind::Unallocated,
                    }),
                }
                g += n;
                continue;
            }
            // (guest length, kind) per cluster, or per subcluster with extended L2.
            let units: Vec<(u64, MapKind)> = if self.ext {
                self.map_ext(e, (g / cs) % self.l2e, n.div_ceil(cs))?
            } else {
                let ents = self.l2_entries(e, (g / cs) % self.l2e, n.div_ceil(cs))?;
                ents.iter()
                    .map(|&x| {
                        let k = match self.classify(x) {
                            Kind::Unalloc => MapKind::Unallocated,
                            Kind::ZeroPlain => MapKind::Zero(None),
                            Kind::ZeroAlloc(o) => MapKind::Zero(Some(o)),
                            Kind::Normal(o) => MapKind::Data(o),
                            Kind::Compressed(..) => MapKind::Compressed,
                        };
                        (cs, k)
                    })
                    .collect()
            };
            let mut start = g;
            for (ulen, kind) in units {
                let ustart = start;
                start += ulen;
                if ustart >= size {
                    break;
                }
                let start = ustart;
                let length = ulen.min(size - start);
                if let Some(last) = out.last_mut() {
                    let cont = match (last.kind, kind) {
                        (MapKind::Data(a), MapKind::Data(b)) => a + last.length == b,
                        (MapKind::DataHole(a), MapKind::DataHole(b)) => a + last.length == b,
                        (MapKind::Zero(Some(a)), MapKind::Zero(Some(b))) => a + last.length == b,
                        (MapKind::UnallocatedAt(a), MapKind::UnallocatedAt(b)) => {
                            a + last.length == b
                        }
                        (a, b) => {
                            a == b
                                && !matches!(
                                    a,
                                    MapKind::Data(_)
                                        | MapKind::DataHole(_)
                                        | MapKind::Zero(Some(_))
                                        | MapKind::UnallocatedAt(_)
                                )
                        }
                    };
                    if cont {
                        last.length += length;
                        continue;
                    }
                }
                out.push(MapEntry {
                    start,
                    length,
                    kind,
                });
            }
            g += n;
        }
        // Like qemu-img, report data clusters whose host bytes are file holes as zero.
        let mut split: Vec<MapEntry> = Vec::with_capacity(out.len());
        for e in out {
            let MapKind::Data(o) = e.kind else {
                split.push(e);
                continue;
            };
            let regions = self
                .file
                .data_regions(o, e.length)
                .ctx("mapping the file")?;
            for (ho, hl, data) in regions {
                let start = e.start + (ho - o);
                let kind = if data {
                    MapKind::Data(ho)
                } else {
                    MapKind::DataHole(ho)
                };
                let merge = match (
                    split.last().map(|l| (l.kind, l.start + l.length, l.length)),
                    kind,
                ) {
                    (Some((MapKind::Data(a), end, len)), MapKind::Data(b))
                    | (Some((MapKind::DataHole(a), end, len)), MapKind::DataHole(b)) => {
                        end == start && a + len == b
                    }
                    _ => false,
                };
                match split.last_mut() {
                    Some(l) if merge => l.length += hl,
                    _ => split.push(MapEntry {
                        start,
                        length: hl,
                        kind,
                    }),
                }
            }
        }
        Ok(split)
    }

    /// Grow the virtual disk to `new_size` bytes (shrinking is refused). Any VM state left in
    /// the active layer is dropped first, since the area moves.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check_writable()?;
        if new_size < self.h.size {
            return Err(Error::Unsupported("shrinking a qcow2 image".into()));
        }
        if new_size == self.h.size {
            return Ok(());
        }
        let need = new_size.div_ceil(self.span());
        if need * 8 > crate::header::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!("size {new_size} too large")));
        }
        self.discard_vmstate()?;
        self.grow_l1(need, true)?;
        self.file
            .write_at(&new_size.to_be_bytes(), OFF_SIZE)
            .ctx("updating the header")?;
        self.sync()?;
        self.h.size = new_size;
        Ok(())
    }
}
