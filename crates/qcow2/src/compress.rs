//! Compressed clusters: reading zlib (raw deflate, 4 KiB window) and zstd (one zstd frame)
//! clusters, and writing zstd-compressed clusters into unallocated guest clusters (what
//! `convert -c -o compression_type=zstd` does). Several compressed clusters share host
//! clusters, packed byte after byte; every L2 entry holds one reference on each host cluster
//! its byte range touches, as QEMU counts them.

use crate::error::{corrupt, Error, IoCtx, Result};
use crate::header::COMPRESSION_ZSTD;
use crate::image::{Kind, Qcow2, COMPRESSED};
use std::collections::BTreeMap;
use std::io::Read;

impl Qcow2 {
    /// Decompress one cluster (cached: the last one).
    pub(crate) fn decompress(&mut self, e: u64, h: u64, l: u64) -> Result<Vec<u8>> {
        if let Some((k, d)) = &self.comp_cache {
            if *k == e {
                return Ok(d.clone());
            }
        }
        let mut src = vec![0u8; l as usize];
        self.file
            .read_at(&mut src, h)
            .ctx("reading a compressed cluster")?;
        let mut out = vec![0u8; self.cs as usize];
        if self.h.compression_type == COMPRESSION_ZSTD {
            // One frame; the sector-rounded stream may carry bytes of the next cluster after it.
            let dec = zstd::stream::read::Decoder::with_buffer(&src[..])
                .map_err(|err| Error::Corrupt(format!("compressed cluster at {h:#x}: {err}")))?;
            let mut dec = dec.single_frame();
            if let Err(err) = dec.read_exact(&mut out) {
                return corrupt(format!("zstd cluster at {h:#x}: {err}"));
            }
        } else {
            let mut d = flate2::Decompress::new(false);
            let r = d.decompress(&src, &mut out, flate2::FlushDecompress::Finish);
            match r {
                Ok(_) if d.total_out() == self.cs => {}
                Ok(_) => return corrupt(format!("compressed cluster at {h:#x} is short")),
                Err(err) => return corrupt(format!("compressed cluster at {h:#x}: {err}")),
            }
        }
        self.comp_cache = Some((e, out.clone()));
        Ok(out)
    }

    /// Write one guest cluster (at cluster-aligned `off`; `data` is the cluster, the last one
    /// of the disk may be shorter and is zero-padded) zstd-compressed, as `qemu-img convert -c`
    /// does. Data that does not compress is written as a normal cluster. The cluster must be
    /// unallocated (compressed writes go to fresh images).
    pub fn write_compressed(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let cs = self.cs;
        if off % cs != 0 || data.len() as u64 > cs || off >= self.h.size {
            return Err(Error::InvalidArgument(format!(
                "compressed write of {} bytes at {off} is not one cluster",
                data.len()
            )));
        }
        if self.ext {
            return Err(Error::Unsupported(
                "writing compressed clusters into an image with extended L2 entries".into(),
            ));
        }
        if self.h.compression_type != COMPRESSION_ZSTD {
            return Err(Error::Unsupported(
                "writing compressed clusters needs compression_type=zstd".into(),
            ));
        }
        let mut cluster = data.to_vec();
        cluster.resize(cs as usize, 0);
        let z = zstd::bulk::compress(&cluster, 0)
            .map_err(|e| Error::Io { context: "compressing a cluster", source: e })?;
        if z.len() as u64 >= cs - 512 {
            return self.write_active(off, &cluster[..data.len()]);
        }
        let l1_idx = off / self.span();
        let l2 = self.writable_l2(l1_idx)?;
        let idx = (off / cs) % self.l2e;
        let old = self.l2_entries(l2, idx, 1)?[0];
        if self.classify(old) != Kind::Unalloc {
            return Err(Error::InvalidArgument(format!(
                "compressed write into an allocated cluster at {off}"
            )));
        }
        let host = self.alloc_compressed_bytes(z.len() as u64)?;
        self.file
            .write_at(&z, host)
            .ctx("writing a compressed cluster")?;
        self.barrier()?;
        let x = 62 - (self.cbits - 8);
        let nsec = ((host + z.len() as u64 - 1) >> 9) - (host >> 9);
        let entry = COMPRESSED | (nsec << x) | host;
        self.set_l2_entries(l2, idx, &[entry])
    }

    /// Host bytes for a compressed stream: packed after the previous one when it fits in the
    /// clusters already taken for packing, else a fresh run. Refcounts: +1 on every host cluster
    /// the range touches (fresh clusters start at 1).
    fn alloc_compressed_bytes(&mut self, len: u64) -> Result<u64> {
        let cs = self.cs;
        if let Some((next, end)) = self.comp_pack {
            // Reuse only while the refcounts say these clusters are still the packing run.
            if next + len <= end && self.refcount(next / cs)? > 0 {
                let mut d = BTreeMap::new();
                for c in next / cs..=(next + len - 1) / cs {
                    *d.entry(c).or_insert(0i64) += 1;
                }
                // A cluster touched for the first time (after the previous stream's end) was
                // allocated with refcount 1 already: count it once only.
                let prev_last = (next - 1) / cs;
                for c in next / cs..=(next + len - 1) / cs {
                    if c > prev_last {
                        d.insert(c, 0);
                    }
                }
                self.apply_deltas(&d)?;
                self.comp_pack = Some((next + len, end));
                return Ok(next);
            }
        }
        let n = len.div_ceil(cs).max(1) + 1;
        let start = self.alloc_clusters(n)?;
        self.comp_pack = Some((start + len, start + n * cs));
        // Clusters of the run past the stream's end are held for the next streams (refcount 1);
        // if none lands there they are released when packing stops (see `finish_compressed`).
        Ok(start)
    }

    /// Release host clusters reserved for packing compressed clusters that no stream uses.
    pub fn finish_compressed(&mut self) -> Result<()> {
        if let Some((next, end)) = self.comp_pack.take() {
            let cs = self.cs;
            let first_unused = next.div_ceil(cs);
            let mut d = BTreeMap::new();
            for c in first_unused..end / cs {
                d.insert(c, -1i64);
            }
            if !d.is_empty() {
                self.apply_deltas(&d)?;
            }
        }
        Ok(())
    }
}
