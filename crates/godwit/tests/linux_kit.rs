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

/// A kit built with the pvm profile forced (it needs /dev/kvm for the TSC frequency), once.
fn kit_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-kit-pvm");
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

/// The kit's kernel and initramfs with the agent, in real Linux user space: under QEMU's
/// software emulation (TCG, from PATH), which runs all of Linux on any host, this one included.
/// (Godwit needs a KVM that runs Linux user space for the same: `scripts/linux-e2e.sh`.) The
/// agent reports its three ledgers OK on a virtio-blk disk and an ext4 one made here, then
/// `poweroff` ends QEMU with status 0 and the filesystem checks clean.
#[test]
fn the_agent_runs_in_linux_user_space_under_qemu_tcg() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let d = kit_dir();
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("agent-tcg-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (vda, vdb) = (tmp.join("vda.raw"), tmp.join("vdb.raw"));
    std::fs::write(&vda, vec![0u8; 16 << 20]).unwrap();
    std::fs::write(&vdb, vec![0u8; 32 << 20]).unwrap();
    let mk = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&vdb).output().expect("mkfs.ext4 (Debian e2fsprogs)");
    assert!(mk.status.success(), "{}", String::from_utf8_lossy(&mk.stderr));
    let drive = |p: &Path, id: &str| format!("file={},if=none,id={id},format=raw", p.display());
    let mut q = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=on", "-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .arg("-kernel")
        .arg(d.join("vmlinux"))
        .arg("-initrd")
        .arg(d.join("initramfs.cpio"))
        .args(["-append", "console=ttyS0 rdinit=/init godwit.workload=agent"])
        .args(["-drive", &drive(&vda, "d0"), "-device", "virtio-blk-device,drive=d0"])
        .args(["-drive", &drive(&vdb, "d1"), "-device", "virtio-blk-device,drive=d1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 is needed for this test (Debian qemu-system-x86)");
    let mut stdin = q.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = q.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let wait = |pat: &str, seen: &mut Vec<String>| -> String {
        let end = Instant::now() + Duration::from_secs(300);
        loop {
            match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok(l) => {
                    seen.push(l.clone());
                    if l.contains(pat) {
                        return l;
                    }
                }
                Err(_) => panic!("no {pat:?} from the agent; saw:\n{}", seen.join("\n")),
            }
        }
    };
    let ready = wait("AGENT READY", &mut seen);
    assert!(ready.contains("pid=1") && ready.contains("disk=/dev/vda") && ready.contains("mounted=1"), "{ready}");
    // A few heartbeats of work (memory, disk, files), then verify everything.
    wait("HEARTBEAT seq=3 ", &mut seen);
    stdin.write_all(b"v\n").unwrap();
    for want in ["LEDGER OK", "DISK OK", "FS OK"] {
        let l = wait(want.split(' ').next().unwrap(), &mut seen);
        assert!(l.starts_with(want), "expected {want}: {l}\n{}", seen.join("\n"));
    }
    stdin.write_all(b"poweroff\n").unwrap();
    wait("AGENT POWEROFF", &mut seen);
    let end = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = q.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "QEMU still running after poweroff");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "QEMU ended with {status} after the agent's poweroff");
    let fsck = Command::new("fsck.ext4").arg("-fn").arg(&vdb).output().expect("fsck.ext4");
    assert!(fsck.status.success(), "fsck after poweroff: {}{}", String::from_utf8_lossy(&fsck.stdout), String::from_utf8_lossy(&fsck.stderr));
    let _ = std::fs::remove_dir_all(&tmp);
}
