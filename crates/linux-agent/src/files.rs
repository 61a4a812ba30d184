//! The file workload: `fs_files` files of 64 KiB in DIR/godwit-agent, one rewritten every
//! `fs_ms` (written to a temporary name, fsync'd, renamed over the old one, the directory
//! fsync'd), each stamped like a disk block (`pattern::Stamp(file, gen, nonce)` over the whole
//! file). `verify` reads every file written so far back. With a device, the agent mounts it
//! (ext4) itself, and can freeze the filesystem (FIFREEZE) so an image of it checks clean.

use crate::pattern::{word_at, Stamp};
use crate::sys;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const FILE_BYTES: usize = 64 * 1024;

struct State {
    ledger: Vec<u64>,
    next: usize,
    gen: u64,
    frozen: bool,
    paused: bool,
    error: Option<String>,
}

pub struct Files {
    st: Mutex<State>,
    /// The mount point (or given directory) and the workload's folder inside it.
    pub root: PathBuf,
    dir: PathBuf,
    /// True when the agent mounted `root` itself (then freeze and unmount are allowed).
    pub mounted: bool,
    nonce: u64,
    period_ms: u64,
    pub written: AtomicU64,
    pub max_gen: AtomicU64,
}

impl Files {
    /// Mounts `dev` at `root` when given, then prepares the folder.
    pub fn open(dev: Option<&Path>, root: &Path, files: u64, period_ms: u64, nonce: u64) -> Result<Arc<Files>, String> {
        if let Some(dev) = dev {
            std::fs::create_dir_all(root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
            sys::mount(dev, root, "ext4").map_err(|e| format!("mount {} on {} (ext4): {e}", dev.display(), root.display()))?;
        }
        let dir = root.join("godwit-agent");
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let st = State { ledger: vec![0; files as usize], next: 0, gen: 1, frozen: false, paused: false, error: None };
        Ok(Arc::new(Files {
            st: Mutex::new(st),
            root: root.to_path_buf(),
            dir,
            mounted: dev.is_some(),
            nonce,
            period_ms,
            written: AtomicU64::new(0),
            max_gen: AtomicU64::new(0),
        }))
    }

    pub fn count(&self) -> usize {
        self.st.lock().map(|s| s.ledger.len()).unwrap_or(0)
    }

    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        let _ = std::thread::Builder::new().name("files".into()).spawn(move || loop {
            me.step();
            std::thread::sleep(Duration::from_millis(me.period_ms));
        });
    }

    fn name(&self, i: usize) -> PathBuf {
        self.dir.join(format!("f{i:04}"))
    }

    /// Writes the next file unless frozen.
    fn step(&self) {
        let Ok(mut st) = self.st.lock() else { return };
        if st.frozen || st.paused {
            return;
        }
        let (i, gen) = (st.next, st.gen);
        match self.write(i, gen) {
            Ok(()) => {
                st.ledger[i] = gen;
                st.error = None;
                self.written.fetch_add(1, Ordering::Relaxed);
                self.max_gen.store(gen, Ordering::Relaxed);
                st.next += 1;
                if st.next == st.ledger.len() {
                    st.next = 0;
                    st.gen += 1;
                }
            }
            Err(e) => st.error = Some(e),
        }
    }

    fn write(&self, i: usize, gen: u64) -> Result<(), String> {
        let mut data = vec![0u8; FILE_BYTES];
        Stamp::new(i as u64, gen, self.nonce).fill_bytes(&mut data);
        let tmp = self.dir.join(format!(".f{i:04}.tmp"));
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(&data).and_then(|_| f.sync_all()).map_err(|e| format!("write {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, self.name(i)).map_err(|e| format!("rename {}: {e}", tmp.display()))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| format!("fsync {}: {e}", self.dir.display()))
    }

    /// `FS OK files=N gen=G unwritten=U` or `FS BAD file=NAME expected=E found=F reason=...`.
    pub fn verify(&self) -> String {
        match self.st.lock() {
            Ok(st) => self.check(&st.ledger),
            Err(_) => "FS BAD file=none expected=0 found=0 reason=lock".into(),
        }
    }

    fn check(&self, ledger: &[u64]) -> String {
        let (mut gmax, mut unwritten) = (0, 0);
        for (i, &g) in ledger.iter().enumerate() {
            if g == 0 {
                unwritten += 1;
                continue;
            }
            let name = format!("f{i:04}");
            let data = match std::fs::read(self.name(i)) {
                Ok(d) => d,
                Err(e) => return format!("FS BAD file={name} expected={g} found=0 reason=missing errno={}", e.raw_os_error().unwrap_or(-1)),
            };
            if data.len() != FILE_BYTES {
                return format!("FS BAD file={name} expected={g} found={} reason=size bytes={}", word_at(&data, 1), data.len());
            }
            if let Some((w, _)) = Stamp::new(i as u64, g, self.nonce).check_bytes(&data) {
                return format!("FS BAD file={name} expected={g} found={} reason=content word={w}", word_at(&data, 1));
            }
            gmax = gmax.max(g);
        }
        format!("FS OK files={} gen={gmax} unwritten={unwritten}", ledger.len())
    }

    /// The verifier's self-test: the middle file is expected one generation later; verify; undo.
    pub fn self_test(&self) -> String {
        let Ok(mut st) = self.st.lock() else { return "FS BAD reason=lock".into() };
        let mid = st.ledger.len() / 2;
        if st.ledger[mid] == 0 {
            return format!("FS SKIP file=f{mid:04} reason=unwritten");
        }
        st.ledger[mid] += 1;
        let line = self.check(&st.ledger);
        st.ledger[mid] -= 1;
        line
    }

    /// Pauses (true) or resumes the writer; returns once no file is being written.
    pub fn pause(&self, on: bool) {
        if let Ok(mut st) = self.st.lock() {
            st.paused = on;
        }
    }

    /// FIFREEZE / FITHAW, only on a filesystem the agent mounted itself.
    pub fn freeze(&self, on: bool) -> String {
        if !self.mounted {
            return format!("FS ERROR {}: {} was not mounted by the agent", if on { "freeze" } else { "thaw" }, self.root.display());
        }
        let Ok(mut st) = self.st.lock() else { return "FS ERROR lock".into() };
        if st.frozen == on {
            return if on { "FS FROZEN already=1".into() } else { "FS THAWED already=1".into() };
        }
        match sys::freeze(&self.root, on) {
            Ok(()) => {
                st.frozen = on;
                if on { "FS FROZEN".into() } else { "FS THAWED".into() }
            }
            Err(e) => format!("FS ERROR {}: {e}", if on { "freeze" } else { "thaw" }),
        }
    }

    /// (frozen, last error) for STATUS.
    pub fn state(&self) -> (bool, Option<String>) {
        self.st.lock().map(|s| (s.frozen, s.error.clone())).unwrap_or((false, None))
    }

    /// Power-off: waits for the file in flight, thaws, unmounts what it mounted; keeps the lock.
    pub fn stop(&self) -> Option<String> {
        let g = self.st.lock().ok()?;
        if g.frozen {
            let _ = sys::freeze(&self.root, false);
        }
        std::mem::forget(g);
        sys::sync_all();
        if self.mounted {
            if let Err(e) = sys::umount(&self.root) {
                return Some(format!("umount {}: {e}", self.root.display()));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_and_checked() {
        let root = std::env::temp_dir().join(format!("agent-files-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let f = Files::open(None, &root, 4, 1, 5).unwrap();
        assert_eq!(f.verify(), "FS OK files=4 gen=0 unwritten=4");
        for _ in 0..6 {
            f.step();
        }
        assert_eq!(f.verify(), "FS OK files=4 gen=2 unwritten=0");
        assert_eq!(f.self_test(), "FS BAD file=f0002 expected=2 found=1 reason=content word=1");
        assert!(f.freeze(true).starts_with("FS ERROR freeze"), "never freezes a filesystem it did not mount");
        std::fs::write(root.join("godwit-agent/f0001"), b"short").unwrap();
        assert!(f.verify().starts_with("FS BAD file=f0001 expected=2 found=0 reason=size bytes=5"), "{}", f.verify());
        std::fs::remove_file(root.join("godwit-agent/f0001")).unwrap();
        assert!(f.verify().starts_with("FS BAD file=f0001 expected=2 found=0 reason=missing"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
