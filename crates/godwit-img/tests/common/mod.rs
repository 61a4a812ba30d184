//! What the godwit-img test binaries share: the binary under test, scratch directories that
//! remove themselves, and running a tool with a clear failure when it is missing.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const G: &str = env!("CARGO_BIN_EXE_godwit-img");

/// A temporary directory named after the test binary's `kind` and `tag`, removed on drop.
pub struct Scratch(pub PathBuf);
impl Scratch {
    pub fn named(kind: &str, tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("godwit-img-{kind}-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `tool` in `dir` (or the current directory).
pub fn run_in(dir: Option<&Path>, tool: &str, args: &[&str]) -> Output {
    let mut c = Command::new(tool);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    c.args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {tool}: {e} (qemu-img and qemu-io come from Debian's qemu-utils; these tests never skip)")
    })
}

pub fn run(tool: &str, args: &[&str]) -> Output {
    run_in(None, tool, args)
}
