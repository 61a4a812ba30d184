//! The agent on real block devices (root only): loop devices stand in for /dev/vda (the disk
//! ledger, O_DIRECT, BLKGETSIZE64) and /dev/vdb (ext4, mounted by the agent itself). Checks the
//! freeze that the full suite relies on: while frozen, a copy of the ext4 image is fsck-clean;
//! damage written to the device behind the agent's back is found; `poweroff` unmounts, and the
//! image checks clean afterwards.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd} (Debian util-linux / e2fsprogs): {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A loop device over a file; detached on drop.
struct Loop(String);

impl Loop {
    fn new(file: &Path) -> Loop {
        Loop(sh("losetup", &["-f", "--show", file.to_str().unwrap()]))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

/// Unmounts (lazily) on drop, so a failed test leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(Stdio::null()).output();
    }
}

struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Agent {
    fn wait_for(&mut self, pat: &str) -> String {
        loop {
            let l = self.lines.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no line with {pat:?}"));
            if l.starts_with(pat) {
                return l;
            }
        }
    }

    fn ask(&mut self, cmd: &str, pat: &str) -> String {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        self.wait_for(pat)
    }

    fn verify(&mut self) -> (String, String, String) {
        self.stdin.write_all(b"v\n").unwrap();
        (self.wait_for("LEDGER "), self.wait_for("DISK "), self.wait_for("FS "))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fsck_copy(img: &Path) -> (bool, String) {
    let copy = img.with_extension("copy");
    std::fs::copy(img, &copy).unwrap();
    let out = Command::new("fsck.ext4").arg("-fn").arg(&copy).output().expect("fsck.ext4 (Debian e2fsprogs)");
    std::fs::remove_file(&copy).unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{key} in {line}"))
}

#[test]
fn on_loop_devices_freeze_gives_a_clean_image_and_poweroff_unmounts() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root (loop devices, mount)");
    let dir: PathBuf = std::env::temp_dir().join(format!("godwit-agent-block-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (disk_img, fs_img, mnt) = (dir.join("disk.img"), dir.join("fs.img"), dir.join("mnt"));
    std::fs::write(&disk_img, vec![0u8; 8 << 20]).unwrap();
    std::fs::write(&fs_img, vec![0u8; 64 << 20]).unwrap();
    sh("mkfs.ext4", &["-q", "-F", fs_img.to_str().unwrap()]);
    let (vda, vdb) = (Loop::new(&disk_img), Loop::new(&fs_img));
    let _unmount = Unmount(mnt.clone());
    let mut child = Command::new(env!("CARGO_BIN_EXE_godwit-agent"))
        .args(["--port", "0", "--listen", "127.0.0.1", "--mib", "2", "--hb-ms", "100", "--disk", &vda.0, "--disk-mib", "4"])
        .args(["--disk-rate", "8", "--fs-dev", &vdb.0, "--fs-dir", mnt.to_str().unwrap(), "--fs-ms", "10", "--fs-files", "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let stdin = child.stdin.take().unwrap();
    let mut a = Agent { child, stdin, lines: rx };
    let r = a.wait_for("AGENT READY");
    assert!(r.contains(&format!("disk={} blocks=1024 direct=1", vda.0)) && r.contains(" mounted=1 "), "{r}");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(mounts.lines().any(|l| l.starts_with(&format!("{} {} ext4", vdb.0, mnt.display()))), "{mounts}");
    loop {
        let (l, d, f) = a.verify();
        assert!(l.starts_with("LEDGER OK") && d.starts_with("DISK OK") && f.starts_with("FS OK"), "{l} / {d} / {f}");
        if d.ends_with("unwritten=0") && f.ends_with("unwritten=0") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Frozen: the journal and metadata are on the device, so a copy of the image is clean.
    assert_eq!(a.ask("fsfreeze", "FS "), "FS FROZEN");
    let (clean, report) = fsck_copy(&fs_img);
    assert!(clean, "fsck of the frozen filesystem's image: {report}");
    assert_eq!(a.ask("fsthaw", "FS "), "FS THAWED");
    let w0 = field(&a.ask("s", "STATUS"), "fs_written");
    while field(&a.ask("s", "STATUS"), "fs_written") == w0 {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Behind its back, on the block device: block 10 zeroed.
    assert_eq!(a.ask("pause", "PAUSED"), "PAUSED");
    let dev = std::fs::OpenOptions::new().read(true).write(true).open(&vda.0).unwrap();
    let mut good = vec![0u8; 4096];
    dev.read_exact_at(&mut good, 10 * 4096).unwrap();
    dev.write_all_at(&[0u8; 4096], 10 * 4096).unwrap();
    dev.sync_all().unwrap();
    let (_, d, _) = a.verify();
    assert!(d.starts_with("DISK BAD block=10 ") && d.ends_with("found=0 word=0"), "{d}");
    dev.write_all_at(&good, 10 * 4096).unwrap();
    dev.sync_all().unwrap();
    let (_, d, _) = a.verify();
    assert!(d.starts_with("DISK OK"), "{d}");
    assert_eq!(a.ask("resume", "RESUMED"), "RESUMED");
    assert_eq!(a.ask("poweroff", "AGENT POWEROFF"), "AGENT POWEROFF");
    assert_eq!(a.child.wait().unwrap().code(), Some(0));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(&mnt.display().to_string()), "poweroff unmounted it: {mounts}");
    drop((vda, vdb));
    let (clean, report) = fsck_copy(&fs_img);
    assert!(clean, "fsck after poweroff: {report}");
    std::fs::remove_dir_all(&dir).unwrap();
}
