//! The agent as a normal host process: a file stands in for /dev/vda, a directory for the ext4
//! mount, a loopback port for the NIC. The files are damaged behind its back and the verify
//! lines must say where. One test runs it as PID 1 of a new PID namespace (root only) to check
//! the power-off path of PID 1.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("godwit-agent-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Agent {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    seen: Vec<String>,
    /// Removed once the agent is gone.
    dir: Option<PathBuf>,
}

impl Agent {
    fn spawn_cmd(mut cmd: Command) -> Agent {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn godwit-agent");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let stdin = child.stdin.take().unwrap();
        Agent { child, stdin, lines: rx, seen: Vec::new(), dir: None }
    }

    /// The agent on a 4 MiB disk file (1 MiB region), a file folder, any free port.
    fn spawn(dir: &Path, extra: &[&str]) -> Agent {
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_godwit-agent"));
        cmd.args(["--port", "0", "--listen", "127.0.0.1", "--hb-ms", "100", "--mib", "4", "--rate", "8", "--disk-mib", "1"])
            .args(["--disk-rate", "4", "--fs-ms", "20", "--fs-files", "8"])
            .arg("--disk")
            .arg(&disk)
            .arg("--fs-dir")
            .arg(dir.join("fs"))
            .args(extra);
        let mut a = Agent::spawn_cmd(cmd);
        a.dir = Some(dir.to_path_buf());
        a
    }

    fn wait_for(&mut self, pat: &str) -> String {
        loop {
            match self.lines.recv_timeout(T) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.contains(pat) {
                        return l;
                    }
                }
                Err(_) => panic!("no line with {pat:?}; seen:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// `v`: the LEDGER, DISK and FS lines.
    fn verify(&mut self) -> (String, String, String) {
        self.send("v");
        (self.wait_for("LEDGER "), self.wait_for("DISK "), self.wait_for("FS "))
    }

    fn send(&mut self, line: &str) {
        self.stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }

    /// Sends `v` until every ledger has written all its units at least once; returns the lines.
    fn verify_all_written(&mut self) -> (String, String, String) {
        loop {
            let (l, d, f) = self.verify();
            assert!(l.starts_with("LEDGER OK") && d.starts_with("DISK OK") && f.starts_with("FS OK"), "{l} / {d} / {f}");
            if field(&l, "gen") >= 1 && d.ends_with("unwritten=0") && f.ends_with("unwritten=0") {
                return (l, d, f);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

#[test]
fn ready_heartbeats_verify_and_self_test_on_the_console() {
    let dir = tmpdir("console");
    let mut a = Agent::spawn(&dir, &[]);
    let r = a.wait_for("AGENT READY");
    assert!(r.contains(&format!("pid={}", a.child.id())), "{r}");
    assert!(r.contains(" pages=1024 ") && r.contains(" blocks=256 ") && r.contains(" mounted=0 "), "{r}");
    assert!(field(&r, "port") > 0, "{r}");
    let hb: Vec<String> = (0..4).map(|_| a.wait_for("HEARTBEAT")).collect();
    let seqs: Vec<u64> = hb.iter().map(|l| field(l, "seq")).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4], "{hb:?}");
    let mono: Vec<u64> = hb.iter().map(|l| field(l, "mono_ms")).collect();
    assert!(mono.windows(2).all(|w| w[1] > w[0]), "{hb:?}");
    assert!(field(&hb[3], "real_ms") > 1_700_000_000_000, "{}", hb[3]);
    let (l, d, f) = a.verify_all_written();
    assert!(l.contains("pages=1024"), "{l}");
    assert!(d.starts_with("DISK OK blocks=256 gen="), "{d}");
    assert!(f.starts_with("FS OK files=8 gen="), "{f}");
    a.send("c");
    let (l, d, f) = (a.wait_for("LEDGER "), a.wait_for("DISK "), a.wait_for("FS "));
    assert!(l.starts_with("LEDGER BAD page=512 ") && l.contains(" word=100 "), "{l}");
    assert!(d.starts_with("DISK BAD block=128 "), "{d}");
    assert!(f.starts_with("FS BAD file=f0004 ") && f.contains("reason=content"), "{f}");
    // The self-test undid its damage.
    a.send("v");
    assert!(a.wait_for("LEDGER ").starts_with("LEDGER OK"));
    assert!(a.wait_for("DISK ").starts_with("DISK OK"));
    assert!(a.wait_for("FS ").starts_with("FS OK"));
    a.send("s");
    let s = a.wait_for("STATUS");
    assert!(field(&s, "dirtied") > 0 && field(&s, "disk_written") >= 256 && field(&s, "fs_written") >= 8, "{s}");
    assert_eq!(field(&s, "disk_error"), 0, "{s}");
    a.send("frobnicate");
    assert!(a.wait_for("ERROR").contains("unknown command 'frobnicate'"));
}

#[test]
fn disk_and_files_damaged_behind_its_back_are_found() {
    let dir = tmpdir("damage");
    let mut a = Agent::spawn(&dir, &[]);
    a.wait_for("AGENT READY");
    a.verify_all_written();
    a.send("pause");
    a.wait_for("PAUSED");
    let disk = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("disk.img")).unwrap();
    let (mut good, mut good101) = (vec![0u8; 4096], vec![0u8; 4096]);
    disk.read_exact_at(&mut good, 100 * 4096).unwrap();
    disk.read_exact_at(&mut good101, 101 * 4096).unwrap();
    // A block of zeros where block 100 was (a write the device lost).
    disk.write_all_at(&[0u8; 4096], 100 * 4096).unwrap();
    disk.sync_all().unwrap();
    let (_, d, _) = a.verify();
    assert!(d.starts_with("DISK BAD block=100 ") && d.ends_with("found=0 word=0"), "{d}");
    // One flipped bit deep inside the block.
    let mut bad = good.clone();
    bad[8 * 300 + 3] ^= 0x10;
    disk.write_all_at(&bad, 100 * 4096).unwrap();
    let (_, d, _) = a.verify();
    assert!(d.starts_with("DISK BAD block=100 ") && d.ends_with(" word=300"), "{d}");
    // Block 100's data at block 101 (a misdirected write).
    disk.write_all_at(&good, 100 * 4096).unwrap();
    disk.write_all_at(&good, 101 * 4096).unwrap();
    let (_, d, _) = a.verify();
    assert!(d.starts_with("DISK BAD block=101 ") && d.ends_with(" word=0"), "{d}");
    // Put back, the region checks out again.
    disk.write_all_at(&good101, 101 * 4096).unwrap();
    let (l, d, f) = a.verify();
    assert!(l.starts_with("LEDGER OK") && d.starts_with("DISK OK") && f.starts_with("FS OK"), "{l} / {d} / {f}");
    // A file replaced by another one of the same size.
    let f3 = dir.join("fs/godwit-agent/f0003");
    let f5 = std::fs::read(dir.join("fs/godwit-agent/f0005")).unwrap();
    std::fs::write(&f3, &f5).unwrap();
    let (_, _, f) = a.verify();
    assert!(f.starts_with("FS BAD file=f0003 ") && f.ends_with("reason=content word=0"), "{f}");
    a.send("resume");
    a.wait_for("RESUMED");
    // The writers carry on after resume.
    a.send("s");
    let w0 = field(&a.wait_for("STATUS"), "disk_written");
    loop {
        a.send("s");
        if field(&a.wait_for("STATUS"), "disk_written") > w0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tcp_service_counts_per_connection() {
    let dir = tmpdir("tcp");
    let mut a = Agent::spawn(&dir, &[]);
    let port = field(&a.wait_for("AGENT READY"), "port");
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let r = BufReader::new(s.try_clone().unwrap());
        (s, r)
    };
    let ask = |s: &mut TcpStream, r: &mut BufReader<TcpStream>, cmd: &str, n: usize| -> Vec<String> {
        s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        (0..n)
            .map(|_| {
                let mut l = String::new();
                r.read_line(&mut l).unwrap();
                l.trim_end().to_string()
            })
            .collect()
    };
    let (mut s1, mut r1) = connect();
    assert_eq!(ask(&mut s1, &mut r1, "", 1), vec!["AGENT HELLO conn=1"]);
    let (mut s2, mut r2) = connect();
    assert_eq!(ask(&mut s2, &mut r2, "", 1), vec!["AGENT HELLO conn=2"]);
    for n in 1..=5 {
        assert_eq!(ask(&mut s1, &mut r1, "count", 1), vec![format!("COUNT conn=1 n={n}")]);
    }
    assert_eq!(ask(&mut s2, &mut r2, "count", 1), vec!["COUNT conn=2 n=1"]);
    assert_eq!(ask(&mut s1, &mut r1, "echo hello there", 1), vec!["ECHO hello there"]);
    assert_eq!(ask(&mut s1, &mut r1, "ping", 1), vec!["PONG"]);
    let v = ask(&mut s1, &mut r1, "verify", 3);
    assert!(v[0].starts_with("LEDGER OK") && v[1].starts_with("DISK OK") && v[2].starts_with("FS OK"), "{v:?}");
    let st = ask(&mut s2, &mut r2, "status", 1);
    assert_eq!(field(&st[0], "conns"), 2, "{st:?}");
    assert_eq!(ask(&mut s2, &mut r2, "bye", 1), vec!["BYE"]);
    let mut rest = String::new();
    assert_eq!(r2.read_line(&mut rest).unwrap(), 0, "closed after BYE");
    assert_eq!(ask(&mut s1, &mut r1, "count", 1), vec!["COUNT conn=1 n=6"]);
    // The console is connection 0 and keeps its own count.
    a.send("count");
    assert_eq!(a.wait_for("COUNT"), "COUNT conn=0 n=1");
    // Heartbeats go to the console only.
    a.wait_for("HEARTBEAT");
    assert_eq!(ask(&mut s1, &mut r1, "rate 2", 1), vec!["RATE mib_s=2"]);
}

/// Every written block of a disk image left by the agent is a whole block stamped for its own
/// number: returns (written blocks, highest generation).
fn check_image(raw: &[u8]) -> (usize, u64) {
    const K1: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let (mut n, mut gmax) = (0, 0);
    for (b, blk) in raw.chunks(4096).enumerate() {
        let w: Vec<u64> = blk.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        if w.iter().all(|&x| x == 0) {
            continue;
        }
        let (gen, nonce) = (w[1], w[3]);
        assert_eq!(w[0], b as u64, "block {b} holds block {}'s data", w[0]);
        assert_eq!(w[2], mix(w[0] ^ gen.rotate_left(32) ^ mix(nonce ^ 0x5151_5151_5151_5151)), "block {b}: checksum");
        let seed = mix(mix((b as u64).wrapping_mul(K1) ^ gen) ^ nonce.rotate_left(17));
        for (j, &x) in w.iter().enumerate().skip(4) {
            assert_eq!(x, seed.wrapping_add((j as u64).wrapping_mul(K1)), "block {b} word {j}: torn");
        }
        n += 1;
        gmax = gmax.max(gen);
    }
    (n, gmax)
}

#[test]
fn poweroff_syncs_and_exits_zero_leaving_whole_blocks() {
    let dir = tmpdir("poweroff");
    let mut a = Agent::spawn(&dir, &[]);
    a.wait_for("AGENT READY");
    let (_, d, _) = a.verify_all_written();
    a.send("poweroff");
    a.wait_for("AGENT POWEROFF");
    let st = a.child.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    let raw = std::fs::read(dir.join("disk.img")).unwrap();
    let (n, gmax) = check_image(&raw[..1 << 20]);
    assert_eq!(n, 256, "every block of the region written");
    assert!(gmax >= field(&d, "gen"), "{gmax} vs {d}");
    assert!(raw[1 << 20..].iter().all(|&b| b == 0), "nothing written past the region");
}

#[test]
fn bad_arguments_and_a_missing_disk() {
    let out = Command::new(env!("CARGO_BIN_EXE_godwit-agent")).args(["--bogus", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown setting 'bogus'"));
    let out = Command::new(env!("CARGO_BIN_EXE_godwit-agent")).args(["--port"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let dir = tmpdir("missing");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_godwit-agent"));
    cmd.args(["--port", "0", "--listen", "127.0.0.1", "--mib", "1", "--disk"]).arg(dir.join("nope")).args(["--fs-dir", "none"]);
    let mut a = Agent::spawn_cmd(cmd);
    a.dir = Some(dir);
    assert!(a.wait_for("AGENT WARN").contains("disk ledger off"));
    let r = a.wait_for("AGENT READY");
    assert!(r.contains("disk=none") && r.contains("fs=none"), "{r}");
    a.send("v");
    assert!(a.wait_for("LEDGER").starts_with("LEDGER OK pages=256"));
    assert!(a.wait_for("DISK").starts_with("DISK BAD block=0 expected=0 found=0 reason=nodevice"));
}

#[test]
fn as_pid1_in_a_pid_namespace_poweroff_reaches_the_kernel() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test needs root (unshare --pid)");
    }
    let dir = tmpdir("pid1");
    let cmdline = dir.join("cmdline");
    std::fs::write(&cmdline, "console=ttyS0 godwit.agent_mib=2 godwit.agent_hb_ms=100 godwit.agent_port=0\n").unwrap();
    let mut cmd = Command::new("unshare");
    // Never the host's /dev/vda: every device is given (arguments win over the command line).
    cmd.args(["--pid", "--fork", "--kill-child", env!("CARGO_BIN_EXE_godwit-agent"), "--cmdline"])
        .arg(&cmdline)
        .args(["--listen", "127.0.0.1", "--disk", "none", "--fs-dev", "none", "--fs-dir", "none"]);
    let mut a = Agent::spawn_cmd(cmd);
    a.dir = Some(dir);
    let r = a.wait_for("AGENT READY");
    assert!(r.contains(" pid=1 ") && r.contains(" pages=512 ") && r.contains(" hb_ms=100 "), "{r}");
    a.send("poweroff");
    a.wait_for("AGENT POWEROFF");
    // reboot(RB_POWER_OFF) in a PID namespace ends its init with SIGINT.
    let st = a.child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(st.signal() == Some(2) || st.code() == Some(128 + 2), "unshare: {st:?}");
}

#[test]
fn a_terminal_console_does_not_echo_commands_into_the_output() {
    // A pseudo-terminal stands in for the serial console: stdin is its slave side.
    // SAFETY: plain libc calls; the fds are checked.
    let (master, slave) = unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(m)).to_owned();
        let s = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        assert!(s >= 0);
        (m, s)
    };
    use std::os::unix::io::FromRawFd;
    // SAFETY: both fds were just opened and are owned here.
    let (mut m, s) = unsafe { (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave)) };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_godwit-agent"));
    cmd.args(["--port", "0", "--listen", "127.0.0.1", "--mib", "1", "--hb-ms", "100"]);
    // Killed on drop, also when an assertion fails.
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Kill(cmd.stdin(Stdio::from(s)).stdout(Stdio::piped()).spawn().unwrap());
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let wait = |pat: &str| loop {
        let l = rx.recv_timeout(T).unwrap_or_else(|_| panic!("no {pat}"));
        if l.starts_with(pat) {
            return l;
        }
    };
    wait("AGENT READY");
    // A terminal sends CR for Enter.
    m.write_all(b"v\r").unwrap();
    assert!(wait("LEDGER ").starts_with("LEDGER OK"));
    // The line was read, so any echo of it is already waiting on the master side.
    // SAFETY: fcntl on an open fd.
    unsafe { libc::fcntl(master, libc::F_SETFL, libc::O_NONBLOCK) };
    let mut buf = [0u8; 64];
    match std::io::Read::read(&mut m, &mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the console echoed: {other:?} {:?}", String::from_utf8_lossy(&buf)),
    }
}
