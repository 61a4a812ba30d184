//! Helpers shared by the integration tests: scratch directories, running qemu-img/qemu-io
//! (failing loudly when they are missing), deterministic data patterns.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "qcow2-test-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: the differential tests need QEMU's tools \
         (Debian package qemu-utils); install it, these tests never skip"
    );
    Command::new(name)
}

/// Run a QEMU tool, returning its output (status not checked).
pub fn run(name: &str, args: &[&str]) -> Output {
    tool(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// Run a QEMU tool and insist on success; returns stdout.
pub fn ok(name: &str, args: &[&str]) -> String {
    let o = run(name, args);
    assert!(
        o.status.success(),
        "{name} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `qemu-img check` must report a clean image (exit 0).
pub fn assert_qemu_clean(img: &Path) {
    let o = run("qemu-img", &["check", p(img)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img check not clean:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img check` exit code (0 clean, 2 corrupt, 3 leaks).
pub fn qemu_check_code(img: &Path) -> (i32, String) {
    let o = run("qemu-img", &["check", p(img)]);
    (
        o.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Guest contents as qemu-img sees them (optionally of a snapshot).
pub fn qemu_raw(img: &Path, snapshot: Option<&str>, dir: &Scratch) -> Vec<u8> {
    let out = dir.path("qemu-convert.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.push("-l");
        args.push(&l);
    }
    args.push(p(img));
    args.push(p(&out));
    ok("qemu-img", &args);
    std::fs::read(&out).expect("read converted raw")
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Read the whole guest disk through our library.
pub fn our_raw(img: &mut qcow2::Qcow2) -> Vec<u8> {
    use qcow2::BlockBackend;
    let mut v = vec![0u8; img.size() as usize];
    img.read_at(0, &mut v).expect("read whole disk");
    v
}

/// First differing offset, for readable assertion messages.
pub fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}
