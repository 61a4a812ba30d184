//! The disk ledger: the first `disk_mib` MiB of a block device (or file) rewritten in 4 KiB
//! blocks, 16 at a time (64 KiB), with O_DIRECT when the device allows it, each batch followed
//! by an fdatasync before the ledger records its generation. Block b at generation g carries
//! `pattern::Stamp(b, g, nonce)`. `verify` lets the batch in flight finish, reads the region
//! back and compares every block the ledger says was written.

use crate::pattern::{word_at, Stamp};
use crate::sys::{size_of, AlignedBuf, Pacer};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const BLOCK: usize = 4096;
const BATCH: usize = 16;

struct State {
    file: File,
    buf: AlignedBuf,
    ledger: Vec<u64>,
    next: usize,
    gen: u64,
    /// The last I/O error (errno), kept for STATUS and the verify line.
    error: Option<i32>,
}

pub struct Disk {
    st: Mutex<State>,
    blocks: usize,
    nonce: u64,
    pub direct: bool,
    pub rate: u64,
    pub written: AtomicU64,
    pub max_gen: AtomicU64,
    paused: AtomicBool,
}

impl Disk {
    /// Opens `path` (O_DIRECT if it can) and sizes the region; the warning says what was reduced.
    pub fn open(path: &Path, mib: u64, rate: u64, nonce: u64) -> Result<(Arc<Disk>, Option<String>), String> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (open(false).map_err(|e| format!("{}: {e}", path.display()))?, false),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let size = size_of(&file).map_err(|e| format!("{}: size: {e}", path.display()))?;
        let want = mib * 1024 * 1024;
        let bytes = want.min(size);
        let warn = (bytes < want).then(|| format!("disk region reduced to {} KiB (the device has {size} bytes)", bytes / 1024));
        let blocks = (bytes / BLOCK as u64) as usize;
        let buf = AlignedBuf::new(BATCH * BLOCK).ok_or("cannot allocate the I/O buffer")?;
        let st = State { file, buf, ledger: vec![0; blocks], next: 0, gen: 1, error: None };
        let d = Disk { st: Mutex::new(st), blocks, nonce, direct, rate, written: AtomicU64::new(0), max_gen: AtomicU64::new(0), paused: AtomicBool::new(false) };
        Ok((Arc::new(d), warn))
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub fn error(&self) -> i32 {
        self.st.lock().map(|s| s.error.unwrap_or(0)).unwrap_or(-1)
    }

    pub fn start(self: &Arc<Self>) {
        if self.blocks == 0 {
            return;
        }
        let me = self.clone();
        let _ = std::thread::Builder::new().name("disk".into()).spawn(move || me.run());
    }

    fn run(&self) {
        let mut pace = Pacer::new();
        loop {
            if !self.write_batch() {
                // Paused, or an I/O error (STATUS shows it): try again a little later.
                std::thread::sleep(Duration::from_millis(if self.paused.load(Ordering::Relaxed) { 20 } else { 1000 }));
                pace.restart();
                continue;
            }
            pace.wrote((BATCH * BLOCK) as u64, self.rate);
        }
    }

    /// Writes and syncs the next batch; false when paused or on an I/O error.
    fn write_batch(&self) -> bool {
        let Ok(mut g) = self.st.lock() else { return false };
        if self.paused.load(Ordering::Relaxed) {
            return false;
        }
        let st = &mut *g;
        let first = st.next;
        let n = BATCH.min(self.blocks - first);
        let gen = st.gen;
        {
            let buf = &mut st.buf.bytes()[..n * BLOCK];
            for (k, blk) in buf.chunks_exact_mut(BLOCK).enumerate() {
                Stamp::new((first + k) as u64, gen, self.nonce).fill_bytes(blk);
            }
        }
        let off = (first * BLOCK) as u64;
        let r = st.file.write_all_at(&st.buf.bytes()[..n * BLOCK], off).and_then(|_| st.file.sync_data());
        if let Err(e) = r {
            st.error = Some(e.raw_os_error().unwrap_or(-1));
            return false;
        }
        for b in first..first + n {
            st.ledger[b] = gen;
        }
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        self.max_gen.store(gen, Ordering::Relaxed);
        st.next += n;
        if st.next == self.blocks {
            st.next = 0;
            st.gen += 1;
        }
        true
    }

    /// `DISK OK blocks=N gen=G unwritten=U` or `DISK BAD block=X expected=E found=F word=W`.
    pub fn verify(&self) -> String {
        match self.st.lock() {
            Ok(mut st) => self.check(&mut st),
            Err(_) => "DISK BAD block=0 expected=0 found=0 word=0 reason=lock".into(),
        }
    }

    fn check(&self, st: &mut State) -> String {
        let (mut gmax, mut unwritten) = (0, 0);
        let mut b = 0;
        while b < self.blocks {
            let n = BATCH.min(self.blocks - b);
            let State { file, buf, ledger, .. } = st;
            let bytes = &mut buf.bytes()[..n * BLOCK];
            if let Err(e) = file.read_exact_at(bytes, (b * BLOCK) as u64) {
                return format!("DISK BAD block={b} expected={} found=0 word=0 reason=ioerror errno={}", ledger[b], e.raw_os_error().unwrap_or(-1));
            }
            for k in 0..n {
                let g = ledger[b + k];
                if g == 0 {
                    unwritten += 1;
                    continue;
                }
                let blk = &bytes[k * BLOCK..(k + 1) * BLOCK];
                if let Some((w, _)) = Stamp::new((b + k) as u64, g, self.nonce).check_bytes(blk) {
                    return format!("DISK BAD block={} expected={g} found={} word={w}", b + k, word_at(blk, 1));
                }
                gmax = gmax.max(g);
            }
            b += n;
        }
        format!("DISK OK blocks={} gen={gmax} unwritten={unwritten}", self.blocks)
    }

    /// The verifier's self-test: the ledger of the middle block expects one generation more (a
    /// lost write); verify (must be BAD there); undo.
    pub fn self_test(&self) -> String {
        let Ok(mut st) = self.st.lock() else { return "DISK BAD reason=lock".into() };
        if self.blocks == 0 {
            return "DISK OK blocks=0 gen=0 unwritten=0".into();
        }
        let mid = self.blocks / 2;
        st.ledger[mid] += 1;
        let line = self.check(&mut st);
        st.ledger[mid] -= 1;
        line
    }

    /// Pauses (true) or resumes the writer; returns once no batch is in flight.
    pub fn pause(&self, on: bool) {
        self.paused.store(on, Ordering::Relaxed);
        drop(self.st.lock());
    }

    /// Stops writing for good (power-off): waits for the batch in flight, keeps the lock.
    pub fn stop(&self) {
        if let Ok(g) = self.st.lock() {
            std::mem::forget(g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_ledger_sees_a_lost_write() {
        let p = std::env::temp_dir().join(format!("agent-disk-unit-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 256 * 1024]).unwrap();
        let (d, warn) = Disk::open(&p, 1, 0, 9).unwrap();
        assert!(warn.unwrap().contains("256 KiB"));
        assert_eq!(d.blocks(), 64);
        assert_eq!(d.verify(), "DISK OK blocks=64 gen=0 unwritten=64");
        for _ in 0..5 {
            assert!(d.write_batch());
        }
        assert_eq!(d.verify(), "DISK OK blocks=64 gen=2 unwritten=0");
        assert_eq!(d.self_test(), "DISK BAD block=32 expected=2 found=1 word=1");
        // Behind its back: block 3 (generation 2) gets generation 1's bytes of block 3.
        let mut old = vec![0u8; BLOCK];
        Stamp::new(3, 1, 9).fill_bytes(&mut old);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&old, 3 * BLOCK as u64).unwrap();
        assert_eq!(d.verify(), "DISK BAD block=3 expected=2 found=1 word=1");
        std::fs::remove_file(&p).unwrap();
    }
}
