//! Shared body of the fuzz targets and the hostile-input property tests: open arbitrary bytes as
//! an image (read-only and read-write, on memory) and drive every read path and a few writes,
//! with bounded work; and open arbitrary bytes as the top of a backing chain whose backing files
//! are in-memory images (never host files): loops, missing files, absurd depths and hostile
//! backing headers must give errors. Any panic or abort is a bug; errors are expected.

use crate::backend::BlockBackend;
use crate::backing::{OpenedBacking, Opener};
use crate::error::{Error, Result};
use crate::image::{OpenOptions, Qcow2};
use std::path::Path;
use std::sync::Arc;
use crate::snapshot::NewSnapshot;
use crate::storage::MemStorage;

/// Exercise the image in `data`. Never panics on any input (that is what is being tested).
pub fn exercise_image(data: &[u8]) {
    for rw in [false, true] {
        let mem = MemStorage::from_vec(data.to_vec());
        mem.set_space_limit(data.len() as u64 + (64 << 20));
        let opts = OpenOptions {
            read_only: !rw,
            backing_opener: Some(Arc::new(FuzzOpener::one(data))),
            ..Default::default()
        };
        let Ok(mut q) = Qcow2::open_storage(Box::new(mem), &opts) else {
            continue;
        };
        let size = q.size();
        let mut buf = vec![0u8; 256 << 10];
        let n = (size.min(buf.len() as u64)) as usize;
        let _ = q.read_at(0, &mut buf[..n]);
        if size > 70_000 {
            let _ = q.read_at(size - 70_000, &mut buf[..70_000]);
            let _ = q.read_at(size / 2, &mut buf[..4096.min(n)]);
        }
        for s in q.snapshots().into_iter().take(4) {
            let k = (s.disk_size.min(65536)) as usize;
            let _ = q.read_snapshot(&s.id, 0, &mut buf[..k]);
            let _ = q.load_vmstate(&s.id, 0, &mut buf[..65536]);
            if let Ok(mut r) = q.vmstate_reader(&s.name) {
                let _ = r.read_bytes(&mut buf[..65536]);
            }
        }
        let _ = q.check();
        let _ = q.map();
        if rw {
            let _ = q.write_at(0, &buf[..4096.min(n)]);
            if size > 8192 {
                let _ = q.write_at(size / 2 - 1000, &buf[..2000]);
            }
            let mut ns = NewSnapshot::new("fuzz");
            ns.vm_state_size = 0;
            if q.save_vmstate(0, &buf[..10_000]).is_ok() {
                ns.vm_state_size = 10_000;
            }
            let _ = q.create_snapshot(&ns);
            if let Some(s) = q.snapshots().first() {
                let id = s.id.clone();
                let _ = q.goto_snapshot(&id);
            }
            let _ = q.delete_snapshot("fuzz");
            let _ = q.discard(0, size.min(1 << 20));
            let _ = q.resize(size.saturating_add(1 << 20));
            let _ = q.check();
            let _ = q.repair(crate::check::RepairMode::All);
        }
    }
}

/// Backing files for fuzzing: every name opens one of a few in-memory images (chosen by the
/// name's length), never a host file. The same name is the same image (loops), and names that
/// grow with each level give arbitrarily deep chains.
#[derive(Debug)]
pub struct FuzzOpener {
    images: Vec<Vec<u8>>,
}

impl FuzzOpener {
    /// Every backing name opens `data` itself.
    pub fn one(data: &[u8]) -> FuzzOpener {
        FuzzOpener {
            images: vec![data.to_vec()],
        }
    }
}

impl Opener for FuzzOpener {
    fn open(&self, path: &Path, _opts: &OpenOptions) -> Result<OpenedBacking> {
        let name = path.as_os_str().len();
        let Some(img) = self.images.get(name % self.images.len().max(1)) else {
            return Err(Error::InvalidArgument("no such backing image".into()));
        };
        if path.as_os_str().is_empty() || name % 7 == 6 {
            // Some names are missing files.
            return Err(Error::Io {
                context: "opening the backing file",
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        Ok(OpenedBacking {
            storage: Box::new(MemStorage::from_vec(img.clone())),
            identity: path.to_path_buf(),
            guard: None,
        })
    }
}

/// Open `top` as the top of a chain whose backing files are `top` itself and `others`
/// (in-memory), read everything, write through copy-on-write, commit and rebase, with bounded
/// work. Never panics.
pub fn exercise_chain(top: &[u8], others: &[&[u8]]) {
    let mut images = vec![top.to_vec()];
    images.extend(others.iter().map(|o| o.to_vec()));
    let opener = Arc::new(FuzzOpener { images });
    for rw in [false, true] {
        let mem = MemStorage::from_vec(top.to_vec());
        mem.set_space_limit(top.len() as u64 + (64 << 20));
        let opts = OpenOptions {
            read_only: !rw,
            backing_opener: Some(opener.clone()),
            ..Default::default()
        };
        let Ok(mut q) = Qcow2::open_storage(Box::new(mem), &opts) else {
            continue;
        };
        let size = q.size();
        let mut buf = vec![0u8; 256 << 10];
        let n = (size.min(buf.len() as u64)) as usize;
        let _ = q.read_at(0, &mut buf[..n]);
        if size > 70_000 {
            let _ = q.read_at(size - 70_000, &mut buf[..70_000]);
        }
        let _ = q.chain_map();
        let _ = q.top_allocation(0, size.min(1 << 30));
        if rw {
            let _ = q.write_at(0, &buf[..1000.min(n)]);
            if size > 8192 {
                let _ = q.write_at(size / 2 - 1000, &buf[..2000]);
            }
            let _ = q.write_zeroes(0, size.min(1 << 20));
            if size <= 4 << 20 {
                let _ = q.rebase(None, None, false);
            }
            let _ = q.set_backing(Some("fuzz-base"), Some(crate::ImageFormat::Qcow2));
            let _ = q.check();
        }
    }
}
