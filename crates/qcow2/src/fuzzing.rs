//! Shared body of the fuzz target and the hostile-input property test: open arbitrary bytes as
//! an image (read-only and read-write, on memory) and drive every read path and a few writes,
//! with bounded work. Any panic or abort is a bug; errors are expected.

use crate::backend::BlockBackend;
use crate::image::{OpenOptions, Qcow2};
use crate::snapshot::NewSnapshot;
use crate::storage::MemStorage;

/// Exercise the image in `data`. Never panics on any input (that is what is being tested).
pub fn exercise_image(data: &[u8]) {
    for rw in [false, true] {
        let mem = MemStorage::from_vec(data.to_vec());
        mem.set_space_limit(data.len() as u64 + (64 << 20));
        let opts = OpenOptions {
            read_only: !rw,
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
