//! Whole-chain operations: the allocation map across layers (`qemu-img map` with `depth`),
//! committing the top layer into its backing file, rebasing (safe and unsafe) and rewriting the
//! backing file name in the header.
//!
//! Depth follows qemu-img: the first layer (0 = this image) that holds data or zeros for a
//! range; a range no layer holds is reported unallocated at the depth of the layer where the
//! lookup ended (the bottom image, or a layer whose backing file is shorter).

use crate::backend::{BlockBackend, ImageFormat};
use crate::backing::{open_backing, ChainCtx};
use crate::error::{Error, IoCtx, Result};
use crate::header::{self, Extension, Header};
use crate::image::{OpenOptions, Qcow2};
use crate::map::{MapEntry, MapKind};

/// One run of the chain's allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainExtent {
    /// Guest offset.
    pub start: u64,
    /// Bytes.
    pub length: u64,
    /// Layer the run comes from (0 = the top image).
    pub depth: u32,
    /// How that layer stores it (`Unallocated`: no layer holds it; reads as zeros).
    pub kind: MapKind,
}

/// Host offset of a map kind (at the run's start).
fn host(k: MapKind) -> Option<u64> {
    match k {
        MapKind::Data(o)
        | MapKind::DataHole(o)
        | MapKind::Zero(Some(o))
        | MapKind::UnallocatedAt(o) => Some(o),
        _ => None,
    }
}

/// Same kind class (ignoring offsets).
fn same_class(a: MapKind, b: MapKind) -> bool {
    std::mem::discriminant(&a) == std::mem::discriminant(&b)
        && matches!(a, MapKind::Zero(Some(_))) == matches!(b, MapKind::Zero(Some(_)))
}

/// Shift a map kind's host offset by `d` bytes (a run's piece starting later).
fn shifted(k: MapKind, d: u64) -> MapKind {
    match k {
        MapKind::Data(o) => MapKind::Data(o + d),
        MapKind::DataHole(o) => MapKind::DataHole(o + d),
        MapKind::Zero(Some(o)) => MapKind::Zero(Some(o + d)),
        MapKind::UnallocatedAt(o) => MapKind::UnallocatedAt(o + d),
        k => k,
    }
}

fn layer_map(img: &mut dyn BlockBackend) -> Result<Vec<MapEntry>> {
    match img.as_qcow2() {
        Some(q) => q.map_detailed(),
        None => img.layer_map(),
    }
}

/// Map `ranges` (sorted, disjoint) of `img` at `depth`, descending into backing files.
fn map_layer(
    img: &mut dyn BlockBackend,
    ranges: &[(u64, u64)],
    depth: u32,
    out: &mut Vec<ChainExtent>,
) -> Result<()> {
    if ranges.is_empty() {
        return Ok(());
    }
    let map = layer_map(img)?;
    let bsize = img
        .as_qcow2()
        .and_then(|q| q.backing())
        .map(|b| b.size());
    let mut down: Vec<(u64, u64)> = Vec::new();
    let mut i = 0usize;
    for &(s, e) in ranges {
        while i < map.len() && map[i].start + map[i].length <= s {
            i += 1;
        }
        let mut j = i;
        while j < map.len() && map[j].start < e {
            let m = map[j];
            let a = m.start.max(s);
            let z = (m.start + m.length).min(e);
            if matches!(m.kind, MapKind::Unallocated | MapKind::UnallocatedAt(_)) {
                match bsize {
                    Some(bs) => {
                        if a < bs {
                            down.push((a, z.min(bs)));
                        }
                        if z > bs {
                            let s2 = a.max(bs);
                            let kind = shifted(m.kind, s2 - m.start);
                            out.push(ChainExtent { start: s2, length: z - s2, depth, kind });
                        }
                    }
                    None => out.push(ChainExtent { start: a, length: z - a, depth, kind: shifted(m.kind, a - m.start) }),
                }
            } else {
                out.push(ChainExtent { start: a, length: z - a, depth, kind: shifted(m.kind, a - m.start) });
            }
            j += 1;
        }
    }
    if down.is_empty() {
        return Ok(());
    }
    match img.as_qcow2().and_then(|q| q.backing()) {
        Some(b) => map_layer(b, &down, depth + 1, out),
        None => Ok(()),
    }
}

impl Qcow2 {
    /// The allocation map of the whole chain, as `qemu-img map --output=json` reports it.
    pub fn chain_map(&mut self) -> Result<Vec<ChainExtent>> {
        let size = self.h.size;
        let mut v = Vec::new();
        map_layer(self, &[(0, size)], 0, &mut v)?;
        v.sort_by_key(|e| e.start);
        let mut out: Vec<ChainExtent> = Vec::with_capacity(v.len());
        for e in v {
            if let Some(l) = out.last_mut() {
                let contiguous = match (host(l.kind), host(e.kind)) {
                    (Some(a), Some(b)) => a + l.length == b,
                    (None, None) => true,
                    _ => false,
                };
                if l.depth == e.depth
                    && l.start + l.length == e.start
                    && same_class(l.kind, e.kind)
                    && contiguous
                {
                    l.length += e.length;
                    continue;
                }
            }
            out.push(e);
        }
        Ok(out)
    }

    /// Rewrite the header's backing file name and format (`None`: no backing file) and reopen
    /// the chain accordingly (unless `no_backing`). Unknown header extensions are kept.
    pub fn set_backing(&mut self, name: Option<&str>, fmt: Option<ImageFormat>) -> Result<()> {
        self.check_writable()?;
        let mut h: Header = self.h.clone();
        h.extensions.retain(|e| e.kind != header::EXT_BACKING_FORMAT);
        if let (Some(_), Some(f)) = (name, fmt) {
            h.extensions.insert(
                0,
                Extension {
                    kind: header::EXT_BACKING_FORMAT,
                    data: f.to_string().into_bytes(),
                },
            );
        }
        if let Some(n) = name {
            if n.is_empty() || n.len() as u64 > header::MAX_BACKING_NAME || n.contains('\0') {
                return Err(Error::InvalidArgument(format!("backing file name '{n}'")));
            }
        }
        h.backing_file = name.map(str::to_string);
        let mut bytes = h.to_bytes();
        if bytes.len() as u64 > self.cs {
            return Err(Error::InvalidArgument(
                "backing file name and header extensions do not fit in the first cluster".into(),
            ));
        }
        if h.version >= 3 && h.header_length > 105 {
            // Keep header fields this implementation does not know (bytes 105..header_length).
            let mut keep = vec![0u8; h.header_length as usize - 105];
            self.file.read_at(&mut keep, 105).ctx("reading the header")?;
            bytes[105..h.header_length as usize].copy_from_slice(&keep);
        }
        // Clear the old tail (old name) within the rewritten area, then one header write.
        let old_end = self.h.to_bytes().len().max(bytes.len());
        bytes.resize(old_end, 0);
        self.file.write_at(&bytes, 0).ctx("updating the header")?;
        self.sync()?;
        self.h = h;
        self.open_backing_chain()
    }

    /// `qemu-img commit`: write every range allocated in this (top) layer into the backing
    /// image (opened read-write for the purpose), then, unless `keep`, empty this layer so it
    /// reads through to the backing file. The backing image grows if it is smaller.
    pub fn commit_to_backing(&mut self, keep: bool) -> Result<()> {
        self.commit_into(1, keep)
    }

    /// `qemu-img commit -b BASE`: write everything the layers above the backing image at
    /// `depth` (1 = the immediate backing file) hold into it. The top layer is emptied only
    /// when committing into the immediate backing file without `keep` (an explicit base implies
    /// `-d` in qemu-img); no header changes. A base another process reads as backing file is
    /// refused.
    pub fn commit_into(&mut self, depth: usize, keep: bool) -> Result<()> {
        self.check_writable()?;
        if self.h.backing_file.is_none() {
            return Err(Error::InvalidArgument("image does not have a backing file".into()));
        }
        if self.backing.is_none() {
            return Err(Error::InvalidArgument("commit needs the backing chain open".into()));
        }
        // The target layer: its resolved path and format, from the layer above it.
        let (path, fmt) = {
            let mut cur: &mut Qcow2 = self;
            for _ in 1..depth {
                cur = match cur.backing.as_mut().and_then(|b| b.img.as_qcow2()) {
                    Some(q) => q,
                    None => return Err(Error::InvalidArgument(format!("no backing image at depth {depth}"))),
                };
            }
            match (&cur.backing, cur.backing_format()) {
                (Some(b), f) => (b.path.clone(), Some(f.map_or(Ok(b.format), |f| f.parse::<ImageFormat>())?)),
                (None, _) => return Err(Error::InvalidArgument(format!("no backing image at depth {depth}"))),
            }
        };
        let ranges: Vec<(u64, u64)> = self
            .chain_map()?
            .into_iter()
            .filter(|e| (e.depth as usize) < depth && !matches!(e.kind, MapKind::Unallocated | MapKind::UnallocatedAt(_)))
            .map(|e| (e.start, e.length))
            .collect();
        // Our own read-only handles (and shared locks) go; reopen the chain without locks to
        // read through it while the target is open for writing.
        self.backing = None;
        let locked = crate::backing::in_use_as_backing(&path).unwrap_or(false);
        let saved = self.opts.clone();
        let r = if locked {
            Err(Error::Locked(
                path.display().to_string(),
                "Failed to get \"write\" lock: the image is in use as a backing file".into(),
            ))
        } else {
            self.opts.no_backing_locks = true;
            let r = self.open_backing_chain().and_then(|_| self.copy_into(&path, fmt, &ranges));
            self.opts = saved;
            self.backing = None;
            r
        };
        if r.is_ok() && depth == 1 && !keep {
            self.drop_active_from(0)?;
            self.sync()?;
        }
        if !self.opts.no_backing {
            self.open_backing_chain()?;
        }
        r
    }

    /// Copy guest `ranges` (read through this image) into the image at `path`.
    fn copy_into(&mut self, path: &std::path::Path, fmt: Option<ImageFormat>, ranges: &[(u64, u64)]) -> Result<()> {
        let mut base = crate::backend::open(path, fmt, &OpenOptions { cache: self.opts.cache, ..Default::default() })
            .map_err(|e| Error::BackingOpen { name: path.display().to_string(), path: path.display().to_string(), source: Box::new(e) })?;
        let size = self.h.size;
        if base.size() < size {
            match base.as_qcow2() {
                Some(q) => q.resize(size)?,
                None => {
                    return Err(Error::Unsupported(
                        "committing into a raw backing file smaller than the overlay".into(),
                    ))
                }
            }
        }
        let chunk = (self.cs.max(1 << 20)) as usize;
        let mut buf = vec![0u8; chunk];
        for &(s, l) in ranges {
            let mut g = s;
            while g < s + l {
                let n = ((s + l - g) as usize).min(chunk);
                self.read_active(g, &mut buf[..n])?;
                if buf[..n].iter().all(|&b| b == 0) {
                    base.write_zeroes(g, n as u64)?;
                } else {
                    base.write_at(g, &buf[..n])?;
                }
                g += n as u64;
            }
        }
        base.flush()?;
        if let Some(q) = base.as_qcow2() {
            q.close()?;
        }
        Ok(())
    }

    /// `qemu-img rebase`: make `name` (format `fmt`; `None` = no backing file) the backing
    /// file. Safe mode (`unsafe_` false) first copies into this layer every unallocated range
    /// whose contents differ between the old chain and the new backing file, so the guest-visible
    /// contents do not change; unsafe mode (`-u`) only rewrites the header.
    pub fn rebase(&mut self, name: Option<&str>, fmt: Option<ImageFormat>, unsafe_: bool) -> Result<()> {
        self.check_writable()?;
        if unsafe_ {
            return self.set_backing(name, fmt);
        }
        if self.backing.is_none() && self.h.backing_file.is_some() {
            return Err(Error::InvalidArgument(
                "safe rebase needs the old backing file open (use unsafe mode)".into(),
            ));
        }
        let mut new = match name {
            Some(n) => {
                let f = fmt.map(|f| f.to_string());
                let ctx = ChainCtx { path: self.chain.path.clone(), seen: self.chain.seen.clone() };
                Some(open_backing(n, f.as_deref(), &self.opts, &ctx)?)
            }
            None => None,
        };
        let size = self.h.size;
        let cs = self.cs;
        let runs = self.top_allocation(0, size)?;
        let mut old = vec![0u8; cs as usize];
        let mut nb = vec![0u8; cs as usize];
        for (s, l, allocated) in runs {
            if allocated {
                continue;
            }
            let mut g = s;
            while g < s + l {
                let n = ((s + l - g).min(cs - g % cs)) as usize;
                self.read_active(g, &mut old[..n])?;
                match new.as_mut() {
                    Some(b) => {
                        let bsize = b.img.size();
                        let m = if g >= bsize { 0 } else { ((bsize - g) as usize).min(n) };
                        b.img.read_at(g, &mut nb[..m])?;
                        nb[m..n].fill(0);
                    }
                    None => nb[..n].fill(0),
                }
                if old[..n] != nb[..n] {
                    self.write_active(g, &old[..n])?;
                }
                g += n as u64;
            }
        }
        drop(new);
        self.sync()?;
        self.set_backing(name, fmt)
    }
}
