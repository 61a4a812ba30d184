//! One VMM process (Godwit or QEMU) running the Linux kit inside the test's network namespace:
//! its serial console as timestamped lines, its stdin for agent commands, and an HMP monitor on
//! a unix socket. Every wait has a timeout and returns an error that says what was missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub type R<T> = Result<T, String>;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Vmm {
    Godwit,
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Godwit => "godwit",
            Vmm::Qemu => "qemu",
        }
    }
}

/// Everything needed to start one VM of the suite.
#[derive(Clone, Debug)]
pub struct Spec {
    pub vmm: Vmm,
    pub bin: PathBuf,
    pub netns: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    /// The disk ledger's image (vda) and the ext4 image (vdb).
    pub ledger: PathBuf,
    pub data: PathBuf,
    pub tap: String,
    pub mac: String,
    pub monitor: PathBuf,
    pub incoming: Option<String>,
    pub loadvm: Option<String>,
}

impl Spec {
    /// The command line: QEMU's syntax, which Godwit speaks too (plus what QEMU alone needs).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-M", "microvm,acpi=on", "-enable-kvm", "-cpu", "host", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-m", "1024", "-smp", "2", "-no-reboot",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        let s = |p: &Path| p.display().to_string();
        a.extend(["-kernel".into(), s(&self.kernel), "-initrd".into(), s(&self.initrd), "-append".into(), self.append.clone()]);
        for (id, img) in [("d0", &self.ledger), ("d1", &self.data)] {
            a.extend(["-drive".into(), format!("file={},format=qcow2,if=none,id={id}", img.display())]);
            a.extend(["-device".into(), format!("virtio-blk-device,drive={id}")]);
        }
        a.extend(["-netdev".into(), format!("tap,id=n0,ifname={},script=no,downscript=no", self.tap)]);
        a.extend(["-device".into(), format!("virtio-net-device,netdev=n0,mac={}", self.mac)]);
        a.extend(["-monitor".into(), format!("unix:{},server,nowait", self.monitor.display())]);
        if self.vmm == Vmm::Qemu {
            a.extend(["-global".into(), "virtio-mmio.force-legacy=false".into()]);
        }
        if let Some(i) = &self.incoming {
            a.extend(["-incoming".into(), i.clone()]);
        }
        if let Some(l) = &self.loadvm {
            a.extend(["-loadvm".into(), l.clone()]);
        }
        a
    }
}

/// A running VM.
pub struct Machine {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<(Instant, String)>,
    pub seen: Vec<(Instant, String)>,
    pub stderr: Arc<Mutex<String>>,
    pub started: Instant,
    pub monitor: PathBuf,
    hmp: Option<Hmp>,
}

impl Machine {
    pub fn start(spec: &Spec) -> R<Machine> {
        let _ = std::fs::remove_file(&spec.monitor);
        let mut child = Command::new("ip")
            .args(["netns", "exec", &spec.netns])
            .arg(&spec.bin)
            .args(spec.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ip netns exec {} {}: {e}", spec.netns, spec.bin.display()))?;
        let started = Instant::now();
        let out = child.stdout.take().ok_or("no stdout")?;
        let err = child.stderr.take().ok_or("no stderr")?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            // Bytes, not UTF-8 lines: a console may carry anything.
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let l = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
                buf.clear();
                if tx.send((Instant::now(), l)).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let se = stderr.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut s) = se.lock() {
                    s.push_str(&l);
                    s.push('\n');
                }
            }
        });
        Ok(Machine { child, stdin, lines: rx, seen: Vec::new(), stderr, started, monitor: spec.monitor.clone(), hmp: None })
    }

    fn tail(&self) -> String {
        let last: Vec<&str> = self.seen.iter().rev().take(8).map(|(_, l)| l.as_str()).collect();
        let err = self.stderr.lock().map(|s| s.lines().last().unwrap_or("").to_string()).unwrap_or_default();
        format!("last console lines: [{}]; stderr: {err}", last.into_iter().rev().collect::<Vec<_>>().join(" | "))
    }

    /// The next console line that starts with `prefix`.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> R<(Instant, String)> {
        let end = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
                Ok((t, l)) => {
                    self.seen.push((t, l.clone()));
                    // The kernel may print on the same console; the agent's lines start a line.
                    if l.starts_with(prefix) {
                        return Ok((t, l));
                    }
                }
                Err(RecvTimeoutError::Timeout) => return Err(format!("no '{prefix}' line within {timeout:?}; {}", self.tail())),
                Err(RecvTimeoutError::Disconnected) => return Err(format!("console closed before a '{prefix}' line; {}", self.tail())),
            }
        }
    }

    /// Every console line for `d`.
    pub fn collect(&mut self, d: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + d;
        let mut v = Vec::new();
        while let Ok(x) = self.lines.recv_timeout(end.saturating_duration_since(Instant::now())) {
            self.seen.push(x.clone());
            v.push(x);
        }
        v
    }

    /// Sends a command line to the agent on the console.
    pub fn send(&mut self, line: &str) -> R<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).and_then(|_| self.stdin.flush()).map_err(|e| format!("console write: {e}"))
    }

    /// `v` on the console: the LEDGER, DISK and FS lines, each of which must be OK.
    pub fn verify(&mut self) -> R<String> {
        self.send("v")?;
        let mut out = Vec::new();
        for p in ["LEDGER ", "DISK ", "FS "] {
            let (_, l) = self.wait_for(p, Duration::from_secs(60))?;
            if !l.starts_with(&format!("{p}OK")) {
                return Err(l);
            }
            out.push(l);
        }
        Ok(out.join("; "))
    }

    pub fn hmp(&mut self) -> R<&mut Hmp> {
        if self.hmp.is_none() {
            self.hmp = Some(Hmp::connect(&self.monitor)?);
        }
        self.hmp.as_mut().ok_or_else(|| "no monitor".into())
    }

    /// Waits for the process to end; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> R<i32> {
        let end = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Ok(st.code().unwrap_or(-1)),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => return Err(format!("still running after {timeout:?}; {}", self.tail())),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// `quit` on the monitor, then waits for the exit.
    pub fn quit(&mut self) {
        if let Ok(h) = self.hmp() {
            h.send_only("quit");
        }
        if self.wait_exit(Duration::from_secs(20)).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A human-monitor client.
pub struct Hmp {
    s: UnixStream,
}

impl Hmp {
    pub fn connect(path: &Path) -> R<Hmp> {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = UnixStream::connect(path) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(300)));
                let mut h = Hmp { s };
                if h.read_to_prompt().is_ok() {
                    return Ok(h);
                }
            }
            if Instant::now() > end {
                return Err(format!("monitor {} does not answer", path.display()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read_to_prompt(&mut self) -> R<String> {
        let mut out = Vec::new();
        let mut b = [0u8; 4096];
        while !out.ends_with(b"(qemu) ") {
            match self.s.read(&mut b) {
                Ok(0) => return Err(format!("monitor closed: {}", String::from_utf8_lossy(&out))),
                Ok(n) => out.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("monitor: {e}")),
            }
        }
        let s = String::from_utf8_lossy(&out).replace('\r', "");
        Ok(s.trim_end_matches("(qemu) ").to_string())
    }

    /// One command; its output without the echo and prompt. (QEMU echoes what it reads on a
    /// socket, redrawing the line with terminal escapes; Godwit does not.)
    pub fn cmd(&mut self, line: &str) -> R<String> {
        self.s.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("monitor: {e}"))?;
        let out = without_escapes(&self.read_to_prompt()?);
        let mut lines: Vec<&str> = out.lines().collect();
        if lines.first().is_some_and(|l| l.trim_end().ends_with(line.trim())) {
            lines.remove(0);
        }
        Ok(lines.join("\n"))
    }

    pub fn send_only(&mut self, line: &str) {
        let _ = self.s.write_all(format!("{line}\n").as_bytes());
    }

    /// Polls `info migrate` until completed (Ok with the output) or failed/cancelled.
    pub fn wait_migration(&mut self, timeout: Duration) -> R<String> {
        let end = Instant::now() + timeout;
        loop {
            let out = self.cmd("info migrate")?;
            if out.contains("Migration status: completed") {
                return Ok(out);
            }
            if out.contains("Migration status: failed") || out.contains("Migration status: cancelled") {
                return Err(format!("migration: {}", out.replace('\n', "; ")));
            }
            if Instant::now() > end {
                let _ = self.cmd("migrate_cancel");
                return Err(format!("migration not done after {timeout:?}: {}", out.replace('\n', "; ")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Text without ANSI escape sequences (`ESC [ params final-byte`).
pub fn without_escapes(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if it.next() == Some('[') {
            for d in it.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
        }
    }
    out
}

/// `key: N ...` from `info migrate` (e.g. `downtime:`, `total time:`).
pub fn info_ms(info: &str, key: &str) -> Option<u64> {
    info.lines().find_map(|l| l.trim().strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `key=N` from an agent line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_and_parsers() {
        let spec = Spec {
            vmm: Vmm::Qemu,
            bin: "qemu-system-x86_64".into(),
            netns: "ns".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0".into(),
            ledger: "/a.qcow2".into(),
            data: "/b.qcow2".into(),
            tap: "e2ea".into(),
            mac: "52:54:00:00:e2:01".into(),
            monitor: "/m".into(),
            incoming: Some("unix:/s".into()),
            loadvm: None,
        };
        let a = spec.args().join(" ");
        assert!(a.contains("-smp 2") && a.contains("-append console=ttyS0") && a.contains("-incoming unix:/s"), "{a}");
        assert!(a.contains("-drive file=/a.qcow2,format=qcow2,if=none,id=d0 -device virtio-blk-device,drive=d0 -drive file=/b.qcow2"), "{a}");
        assert!(a.contains("-global virtio-mmio.force-legacy=false"));
        let g = Spec { vmm: Vmm::Godwit, incoming: None, loadvm: Some("s1".into()), ..spec };
        let a = g.args().join(" ");
        assert!(!a.contains("-global") && a.contains("-loadvm s1") && !a.contains("-incoming"), "{a}");
        let info = "Migration status: completed\ntotal time: 812 ms\ndowntime: 3 ms\n";
        assert_eq!((info_ms(info, "downtime:"), info_ms(info, "total time:")), (Some(3), Some(812)));
        assert_eq!(field("COUNT conn=1 n=17", "n"), Some(17));
        assert_eq!(without_escapes("info st\x1b[K\x1b[D\x1b[Datus\nVM status: running"), "info status\nVM status: running");
    }
}
