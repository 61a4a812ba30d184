//! The Linux kit's host profile for `kvm_pvm` hosts (`scripts/linux-kit.sh`,
//! `scripts/linux-kit/pvm-profile.py`): the two instruction patches change exactly the bytes
//! they name, and a kernel whose bytes at a patch site differ from what the profile expects is
//! refused (exit 3, a message saying what was expected and found, no output file).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

/// The kit with the pvm profile forced (it needs /dev/kvm for the TSC frequency), once. The
/// same folder as `linux_moves.rs`'s kit: on a kvm_pvm host that is the same build, reused (the
/// kit keeps each file's inputs and rebuilds only what changed).
fn kit_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-kit");
        let out = Command::new("bash")
            .arg(scripts().join("linux-kit.sh"))
            .arg(&dir)
            .env("GODWIT_HOST_PROFILE", "pvm")
            .output()
            .expect("run bash");
        assert!(
            out.status.success(),
            "scripts/linux-kit.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.lines().any(|l| l == "profile=pvm"), "{stdout}");
        assert!(stdout.lines().any(|l| l.starts_with("append=") && l.contains("noxsave") && l.contains("tsc_early_khz=")), "{stdout}");
        dir
    })
}

fn patch(vmlinux: &Path, out: &Path) -> (i32, String) {
    let o = Command::new("python3")
        .arg(scripts().join("linux-kit/pvm-profile.py"))
        .arg("patch")
        .arg(vmlinux)
        .arg(kit_dir().join("vmlinux.syms"))
        .arg(out)
        .output()
        .expect("run python3");
    (
        o.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
    )
}

/// Byte offsets where two equally long files differ.
fn diff(a: &[u8], b: &[u8]) -> Vec<usize> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect()
}

#[test]
fn the_profile_patches_exactly_two_instructions() {
    let d = kit_dir();
    let orig = std::fs::read(d.join("vmlinux")).unwrap();
    let patched = std::fs::read(d.join("vmlinux-pvm")).unwrap();
    let at = diff(&orig, &patched);
    // int3; nop x4 -> call rel32 (up to 5 bytes differ; the first is always cc -> e8), fwait -> nop.
    assert!((2..=6).contains(&at.len()), "{} bytes differ: {at:?}", at.len());
    let first = at[0].min(*at.last().unwrap());
    let calls: Vec<usize> = at.iter().copied().filter(|&i| orig[i] == 0xcc).collect();
    assert_eq!(calls.len(), 1, "one int3 replaced, at {calls:?}");
    assert_eq!(patched[calls[0]], 0xe8, "the int3 became a call");
    assert_eq!(&orig[calls[0]..calls[0] + 5], &[0xcc, 0x90, 0x90, 0x90, 0x90]);
    let waits: Vec<usize> = at.iter().copied().filter(|&i| orig[i] == 0x9b).collect();
    assert_eq!(waits.len(), 1, "one fwait replaced, at {waits:?}");
    assert_eq!(patched[waits[0]], 0x90, "the fwait became a nop");
    for &i in &at {
        assert!(i == waits[0] || (calls[0]..calls[0] + 5).contains(&i), "byte {i:#x} changed outside the two sites (first {first:#x})");
    }
    // Patching again from the original gives the same file.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vmlinux-pvm-again");
    let (rc, text) = patch(&d.join("vmlinux"), &out);
    assert_eq!(rc, 0, "{text}");
    assert!(text.contains("patched int3_selftest_ip") && text.contains("patched fpu__drop"), "{text}");
    assert!(std::fs::read(&out).unwrap() == patched, "a second patch run differs from the kit's");
    let _ = std::fs::remove_file(&out);
}

#[test]
fn a_kernel_with_other_bytes_at_a_patch_site_is_refused() {
    let d = kit_dir();
    let orig = std::fs::read(d.join("vmlinux")).unwrap();
    let patched = std::fs::read(d.join("vmlinux-pvm")).unwrap();
    let at = diff(&orig, &patched);
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    // Each site in turn: one byte of the original changed there.
    for (name, site) in [
        ("int3", at.iter().copied().find(|&i| orig[i] == 0xcc).unwrap()),
        ("fwait", at.iter().copied().find(|&i| orig[i] == 0x9b).unwrap()),
    ] {
        let mut other = orig.clone();
        other[site] = 0x90;
        let k = tmp.join(format!("vmlinux-other-{name}"));
        let out = tmp.join(format!("vmlinux-other-{name}-patched"));
        let _ = std::fs::remove_file(&out);
        std::fs::write(&k, &other).unwrap();
        let (rc, text) = patch(&k, &out);
        assert_eq!(rc, 3, "{name}: expected a refusal (exit 3): {text}");
        assert!(text.contains("refusing to patch") && text.contains("expected bytes") || text.contains("fwait instructions, expected 1"), "{name}: {text}");
        assert!(!out.exists(), "{name}: a refused patch wrote {}", out.display());
        let _ = std::fs::remove_file(&k);
    }
    // Not a kernel at all.
    let junk = tmp.join("not-a-kernel");
    std::fs::write(&junk, b"hello").unwrap();
    let (rc, text) = patch(&junk, &tmp.join("not-a-kernel-out"));
    assert_eq!(rc, 3, "{text}");
    assert!(text.contains("not a 64-bit little-endian ELF"), "{text}");
}
