//! The suite's disk images (qcow2, made with qemu-img and mkfs.ext4) and the host-side
//! filesystem check of the ext4 image: `qemu-img convert -U -O raw` of the image, then
//! `fsck.ext4 -fn` of the copy (read-only; clean = exit status 0).

use crate::vm::R;
use std::path::Path;
use std::process::Command;

fn run(cmd: &str, args: &[&str]) -> R<String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e} (Debian: qemu-utils, e2fsprogs)"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd} {} exited {}: {}", args.join(" "), out.status.code().unwrap_or(-1), text.trim().replace('\n', "; ")))
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// An empty qcow2 image (the disk ledger's device).
pub fn create_qcow2(path: &Path, size: &str) -> R<()> {
    run("qemu-img", &["create", "-q", "-f", "qcow2", &s(path), size]).map(|_| ())
}

/// A qcow2 image holding a fresh ext4 filesystem.
pub fn create_ext4_qcow2(path: &Path, size: &str) -> R<()> {
    let raw = path.with_extension("mkfs.raw");
    run("qemu-img", &["create", "-q", "-f", "raw", &s(&raw), size])?;
    run("mkfs.ext4", &["-q", "-F", "-L", "godwit-e2e", &s(&raw)])?;
    let r = run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(path)]);
    let _ = std::fs::remove_file(&raw);
    r.map(|_| ())
}

/// `fsck.ext4 -fn` of a raw copy of `image` (which a VMM may hold open: -U).
pub fn fsck(image: &Path) -> R<()> {
    let raw = image.with_extension("fsck.raw");
    run("qemu-img", &["convert", "-U", "-f", "qcow2", "-O", "raw", &s(image), &s(&raw)])?;
    let r = run("fsck.ext4", &["-fn", &s(&raw)]);
    let _ = std::fs::remove_file(&raw);
    r.map(|_| ()).map_err(|e| format!("fsck not clean: {e}"))
}

/// `cp --sparse=always`.
pub fn copy(from: &Path, to: &Path) -> R<()> {
    run("cp", &["--sparse=always", &s(from), &s(to)]).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_fresh_ext4_image_checks_clean_and_a_damaged_one_does_not() {
        let d = std::env::temp_dir().join(format!("e2e-image-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let img = d.join("data.qcow2");
        create_ext4_qcow2(&img, "32M").unwrap();
        fsck(&img).unwrap();
        let copy_of = d.join("copy.qcow2");
        copy(&img, &copy_of).unwrap();
        fsck(&copy_of).unwrap();
        // Damage the filesystem: zero the first block group's descriptors and bitmaps inside a
        // raw image, then make it qcow2 again.
        let raw = d.join("bad.raw");
        run("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &s(&img), &s(&raw)]).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.write_all_at(&[0xffu8; 8192], 4096).unwrap();
        drop(f);
        let bad = d.join("bad.qcow2");
        run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&bad)]).unwrap();
        let e = fsck(&bad).unwrap_err();
        assert!(e.starts_with("fsck not clean"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
