//! Shared helpers for the end-to-end tests: find the binaries, insist on KVM, spawn `godwit`
//! with the test guest and follow its serial output line by line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub fn godwit_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_godwit"))
}

/// The test guest, built next to `godwit` by `cargo build` (same profile).
pub fn guest_bin() -> PathBuf {
    let p = godwit_bin().parent().expect("target dir").join("godwit-guest");
    assert!(
        p.exists(),
        "test guest {} is missing: build the workspace first (cargo build --release --workspace)",
        p.display()
    );
    p
}

/// Fails the test with a clear message when KVM is not usable here.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("this test needs /dev/kvm (read/write): {e}");
    }
}

/// A test's scratch directory (images, sockets, logs). Removed when the test passes; kept, with
/// its path printed, when the test panics, so a failure can be inspected. Derefs to its path.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for TestDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TestDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: its files are kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn tmpdir(name: &str) -> TestDir {
    let d = std::env::temp_dir().join(format!("godwit-test-{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmpdir");
    TestDir(d)
}

/// A running godwit process with its serial output split into lines.
pub struct Vm {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<(Instant, String)>,
    pub seen: Vec<String>,
    /// When each line of `seen` arrived from the VM (read off its stdout), same order.
    pub seen_at: Vec<Instant>,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Vm {
    pub fn spawn(args: &[&str]) -> Vm {
        let g = godwit_bin();
        Vm::spawn_cmd(g.to_str().unwrap(), args)
    }

    /// Spawns any command whose stdio is godwit's (e.g. `ip netns exec NS godwit ...`).
    pub fn spawn_cmd(cmd: &str, args: &[&str]) -> Vm {
        require_kvm();
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn godwit");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (tx, rx) = channel();
        // GODWIT_TEST_SERIAL_DIR=DIR: every VM's whole serial output also goes to
        // DIR/serial-PID.log (a failure message shows only the last lines).
        let mut log = std::env::var_os("GODWIT_TEST_SERIAL_DIR").and_then(|d| {
            std::fs::File::create(std::path::Path::new(&d).join(format!("serial-{}.log", child.id()))).ok()
        });
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                match l {
                    Ok(l) => {
                        if let Some(f) = log.as_mut() {
                            let _ = writeln!(f, "{l}");
                        }
                        if tx.send((Instant::now(), l)).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let se = stderr.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[godwit stderr] {l}");
                let mut s = se.lock().unwrap();
                s.push_str(&l);
                s.push('\n');
            }
        });
        let stdin = child.stdin.take();
        Vm { child, stdin, lines: rx, seen: Vec::new(), seen_at: Vec::new(), stderr }
    }

    /// Boots the test guest with extra godwit args and guest command line.
    pub fn guest(extra: &[&str], append: &str) -> Vm {
        let g = guest_bin();
        let mut args = vec!["-kernel", g.to_str().unwrap(), "-append", append];
        args.extend_from_slice(extra);
        Vm::spawn(&args)
    }

    /// Waits for a line containing `pat`.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> String {
        match self.try_wait_for(pat, timeout) {
            Some(l) => l,
            None => panic!(
                "no line containing {pat:?} within {timeout:?}; last lines:\n{}\nstderr:\n{}",
                self.seen.iter().rev().take(15).rev().cloned().collect::<Vec<_>>().join("\n"),
                self.stderr.lock().unwrap()
            ),
        }
    }

    pub fn try_wait_for(&mut self, pat: &str, timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, l)) => {
                    self.seen.push(l.clone());
                    self.seen_at.push(at);
                    if l.contains(pat) {
                        return Some(l);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Collects every line for `d`.
    pub fn collect_for(&mut self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        while let Ok((at, l)) = self.lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
            self.seen.push(l.clone());
            self.seen_at.push(at);
            out.push(l);
        }
        out
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let s = self.stdin.as_mut().expect("stdin");
        s.write_all(bytes).expect("write to guest");
        s.flush().expect("flush");
    }

    /// Waits for the process to exit; returns its code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `key=value` from a guest line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}

/// Runs godwit to completion with `args`, returning (exit code, stderr).
pub fn run_to_end(args: &[&str]) -> (i32, String) {
    let out = Command::new(godwit_bin()).args(args).stdin(Stdio::null()).output().expect("run godwit");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

impl Vm {
    /// Waits until godwit's stderr contains `pat`.
    pub fn wait_stderr(&self, pat: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.stderr.lock().unwrap().contains(pat) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("stderr never showed {pat:?}: {}", self.stderr.lock().unwrap());
    }
}

/// A human-monitor client over a unix socket.
pub struct Hmp {
    s: std::os::unix::net::UnixStream,
}

impl Hmp {
    pub fn connect(path: &std::path::Path) -> Hmp {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                    let mut h = Hmp { s };
                    match h.try_read_to_prompt() {
                        Some(_) => return h,
                        None if Instant::now() > end => panic!("monitor {} closes connections", path.display()),
                        None => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
                Err(e) if Instant::now() > end => panic!("monitor {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn try_read_to_prompt(&mut self) -> Option<String> {
        use std::io::Read;
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        while !out.ends_with(b"(qemu) ") {
            let n = self.s.read(&mut b).ok()?;
            if n == 0 {
                return None;
            }
            out.extend_from_slice(&b[..n]);
        }
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    fn read_to_prompt(&mut self) -> String {
        use std::io::Read;
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        while !out.ends_with(b"(qemu) ") {
            let n = match self.s.read(&mut b) {
                Ok(n) => n,
                // A signal to the test process (e.g. while it runs a child) is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("monitor read: {e}"),
            };
            assert!(n > 0, "monitor closed; got {:?}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&b[..n]);
        }
        let s = String::from_utf8_lossy(&out).into_owned();
        s.trim_end_matches("(qemu) ").replace('\r', "").to_string()
    }

    /// Runs one command and returns its output (without the prompt).
    pub fn cmd(&mut self, line: &str) -> String {
        self.s.write_all(format!("{line}\n").as_bytes()).expect("monitor write");
        self.read_to_prompt()
    }

    /// Sends `quit`; the VMM may close the connection before answering.
    pub fn quit(&mut self) {
        let _ = self.s.write_all(b"quit\n");
    }

    /// Polls `info migrate` until the status is settled; returns the last output.
    pub fn wait_migration(&mut self, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let out = self.cmd("info migrate");
            if ["completed", "failed", "cancelled"].iter().any(|s| out.contains(&format!("Migration status: {s}"))) {
                return out;
            }
            assert!(Instant::now() < end, "migration did not settle: {out}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Heartbeat sequence numbers in `lines`.
pub fn seqs(lines: &[String]) -> Vec<u64> {
    lines.iter().filter(|l| l.starts_with("HEARTBEAT")).filter_map(|l| field(l, "seq")).collect()
}

/// Runs a command, panicking with its output if it fails; returns stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is needed for this test (Debian qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` exit code and output.
pub fn qemu_img_check(path: &std::path::Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", path.to_str().unwrap()])
        .output()
        .expect("qemu-img is needed for this test (Debian qemu-utils)");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

pub fn create_image(path: &std::path::Path, fmt: &str, size: &str) {
    let _ = std::fs::remove_file(path);
    sh("qemu-img", &["create", "-q", "-f", fmt, path.to_str().unwrap(), size]);
}

/// The guest's disk-ledger sector contents (docs/guest.md, `disk=on`).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checks every written sector of the guest's disk region in a raw dump: each one must be a
/// whole, valid sector for its own number (no torn, misplaced or garbage sectors). Returns
/// (written sectors, highest generation).
pub fn check_dump(raw: &[u8], sectors: usize) -> (usize, u64) {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut written = 0;
    let mut gmax = 0;
    for s in 0..sectors {
        let w: Vec<u64> = raw[s * 512..(s + 1) * 512].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        if w.iter().all(|&x| x == 0) {
            continue;
        }
        let (g, nonce) = (w[1], w[3]);
        let seed = mix((s as u64) ^ g.rotate_left(32) ^ nonce ^ 0x3c6e_f372_fe94_f82b);
        assert_eq!(w[0], s as u64, "sector {s} holds sector {}", w[0]);
        assert_eq!(w[2], mix(seed ^ s as u64 ^ g ^ 0xa54f_f53a_5f1d_36f1), "sector {s}: bad checksum");
        for (j, &x) in w.iter().enumerate().skip(4) {
            assert_eq!(x, seed.wrapping_add((j as u64).wrapping_mul(K1)), "sector {s} word {j} torn");
        }
        written += 1;
        gmax = gmax.max(g);
    }
    (written, gmax)
}

/// The destination's first heartbeat (`first`, the last line in `dst_seen`) continues the
/// source's sequence: no gap, no repeat. The switchover can cut a heartbeat line in two (its
/// start printed by the source, its end by the destination); that heartbeat counts as the
/// source's last, and the destination then shows the rest of it before its first full line.
#[allow(dead_code)]
pub fn assert_seq_continues(src_seen: &[String], dst_seen: &[String], first: &str) {
    let last_src = seqs(src_seen).into_iter().max().expect("no heartbeat from the source");
    let before_first = dst_seen.iter().take_while(|l| !l.starts_with("HEARTBEAT")).count();
    let cut = before_first > 0;
    let expected = last_src + if cut { 2 } else { 1 };
    assert_eq!(
        field(first, "seq"),
        Some(expected),
        "gap or repeat: source's last full heartbeat {last_src}, destination's first {first:?} (after {:?})",
        &dst_seen[..before_first]
    );
}

/// The usual loopback set-up: a destination waiting with `-incoming tcp:127.0.0.1:PORT` and a
/// source with a unix HMP monitor, both `-m 256` running the test guest with `append`, the
/// source's guest ready. Returns (destination, source, the source's monitor, PORT).
#[allow(dead_code)]
pub fn loopback_pair(name: &str, append: &str) -> (Vm, Vm, Hmp, u16) {
    let dir = tmpdir(name);
    let sock = dir.join("src.sock");
    let port = free_port();
    let dst = Vm::guest(&["-m", "256", "-incoming", &format!("tcp:127.0.0.1:{port}")], append);
    dst.wait_stderr("waiting for an incoming migration", T_PAIR);
    let mon = format!("unix:{},server,nowait", sock.display());
    let mut src = Vm::guest(&["-m", "256", "-monitor", &mon], append);
    src.wait_for("GUEST READY", T_PAIR);
    let hmp = Hmp::connect(&sock);
    (dst, src, hmp, port)
}

const T_PAIR: Duration = Duration::from_secs(60);

