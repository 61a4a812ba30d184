//! Bad input gets one clear line on stderr and a non-zero exit, never a panic or core dump.

mod common;
use common::*;

fn fails_clearly(args: &[&str], expect: &str) {
    let (code, err) = run_to_end(args);
    assert_eq!(code, 1, "args {args:?}: exit {code}, stderr: {err}");
    assert!(err.contains(expect), "args {args:?}: stderr {err:?} lacks {expect:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line expected: {err:?}");
}

#[test]
fn unknown_flag() {
    fails_clearly(&["-frobnicate"], "unknown option '-frobnicate'");
}

#[test]
fn bad_sizes_and_counts() {
    fails_clearly(&["-m", "0", "-kernel", "x"], "invalid value for -m");
    fails_clearly(&["-smp", "0", "-kernel", "x"], "invalid value for -smp");
    fails_clearly(&["-m", "banana"], "invalid value for -m");
}

#[test]
fn huge_memory() {
    require_kvm();
    let g = guest_bin();
    fails_clearly(&["-m", "999999G", "-kernel", g.to_str().unwrap()], "MiB");
}

#[test]
fn missing_and_garbage_kernels() {
    require_kvm();
    fails_clearly(&["-kernel", "/nonexistent/kernel"], "cannot open");
    let d = tmpdir("garbage");
    let p = d.join("garbage.bin");
    std::fs::write(&p, vec![0x5au8; 8192]).unwrap();
    fails_clearly(&["-kernel", p.to_str().unwrap()], "not a loadable PVH ELF kernel");
    let empty = d.join("empty");
    std::fs::write(&empty, b"").unwrap();
    fails_clearly(&["-kernel", empty.to_str().unwrap()], "too small");
    fails_clearly(&[], "no kernel");
}

#[test]
fn no_kvm_access() {
    // Run as an unprivileged user who cannot open /dev/kvm (crw------- root).
    let g = guest_bin();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(godwit_bin())
        .args(["-kernel", g.to_str().unwrap()])
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot open /dev/kvm"), "{err}");
}
