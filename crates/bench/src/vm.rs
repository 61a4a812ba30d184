//! Running one VMM process (Godwit or QEMU) on the test guest: the command line for each, the
//! guest's serial lines timestamped by the harness as they arrive on the process's stdout, its
//! stderr, its RSS; and a human-monitor client on a unix socket.

use bench::hmptext;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot start {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{what}: nothing within {secs:.0} s; last output:\n{tail}")]
    Timeout {
        what: String,
        secs: f64,
        tail: String,
    },
    #[error("monitor {0}: {1}")]
    Monitor(String, String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

pub type Res<T> = Result<T, BenchError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
    /// The HMP prompt (Godwit uses QEMU's).
    pub fn prompt(self) -> &'static str {
        "(qemu) "
    }
}

/// The programs the suite runs.
#[derive(Debug, Clone)]
pub struct Bins {
    pub godwit: PathBuf,
    pub guest: PathBuf,
    pub qemu: PathBuf,
    pub godwit_img: PathBuf,
    pub qemu_img: Option<PathBuf>,
}

/// What to run: the same for both VMMs.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    pub mem_mib: u64,
    pub smp: u32,
    pub append: String,
    pub monitor: Option<PathBuf>,
    /// `tcp:127.0.0.1:PORT`.
    pub incoming: Option<String>,
    /// An image attached as a virtio-blk device (qcow2 unless `disk_format` says otherwise).
    pub disk: Option<PathBuf>,
    /// `format=` of the disk (default qcow2).
    pub disk_format: Option<String>,
    /// `cache=` of the disk (default: the VMM's, writeback for both).
    pub disk_cache: Option<String>,
    pub loadvm: Option<String>,
    /// Run inside this network namespace (`ip netns exec NS ...`; see `links.rs`).
    pub netns: Option<String>,
    /// `-object` arguments (TLS credentials).
    pub objects: Vec<String>,
    /// Another kernel than the test guest (the Linux kit's), with its initrd.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// `-no-reboot`: a guest reset ends the VMM.
    pub no_reboot: bool,
}

/// The command line of `vmm` for `spec`. QEMU gets the microvm machine the guest's contract
/// names; Godwit gets the same flags minus the QEMU-only device plumbing (its debug-exit port
/// is built in).
pub fn command(bins: &Bins, vmm: Vmm, spec: &Spec) -> Command {
    let mut c;
    let program = |p: &Path| match &spec.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(p);
            c
        }
        None => Command::new(p),
    };
    match vmm {
        Vmm::Qemu => {
            c = program(&bins.qemu);
            c.args([
                "-enable-kvm",
                "-M",
                "microvm",
                "-nodefaults",
                "-no-user-config",
                "-nographic",
            ]);
            c.args([
                "-serial",
                "stdio",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
            ]);
        }
        Vmm::Godwit => {
            c = program(&bins.godwit);
            c.args(["-serial", "stdio"]);
        }
    }
    c.arg("-m")
        .arg(spec.mem_mib.to_string())
        .arg("-smp")
        .arg(spec.smp.to_string());
    c.arg("-kernel")
        .arg(spec.kernel.as_deref().unwrap_or(&bins.guest))
        .arg("-append")
        .arg(&spec.append);
    if let Some(rd) = &spec.initrd {
        c.arg("-initrd").arg(rd);
    }
    if spec.no_reboot {
        c.arg("-no-reboot");
    }
    if let Some(m) = &spec.monitor {
        c.arg("-monitor")
            .arg(format!("unix:{},server,nowait", m.display()));
    }
    if let Some(disk) = &spec.disk {
        if vmm == Vmm::Qemu {
            c.args(["-global", "virtio-mmio.force-legacy=false"]);
        }
        let mut drive = format!(
            "if=none,id=d0,format={},file={}",
            spec.disk_format.as_deref().unwrap_or("qcow2"),
            disk.display()
        );
        if let Some(cache) = &spec.disk_cache {
            drive += &format!(",cache={cache}");
        }
        c.arg("-drive").arg(drive);
        c.args(["-device", "virtio-blk-device,drive=d0"]);
    }
    for o in &spec.objects {
        c.arg("-object").arg(o);
    }
    if let Some(i) = &spec.incoming {
        c.arg("-incoming").arg(i);
    }
    if let Some(t) = &spec.loadvm {
        c.arg("-loadvm").arg(t);
    }
    c
}

/// A running VMM with its serial output as timestamped lines.
pub struct Proc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    rx: Receiver<(Instant, String, bool)>,
    /// Every complete line seen so far, with the time the harness read it.
    pub lines: Vec<(Instant, String)>,
    /// What followed the last newline when the output ended.
    pub partial: Option<String>,
    cursor: usize,
    stderr: Arc<Mutex<String>>,
    /// Just before the process was spawned.
    pub started: Instant,
}

/// `H N` (compact) or `HEARTBEAT seq=N ...` → N.
pub fn hb_seq(line: &str) -> Option<u64> {
    if let Some(r) = line.strip_prefix("H ") {
        return r.trim().parse().ok();
    }
    line.strip_prefix("HEARTBEAT ")?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("seq="))
        .and_then(|v| v.parse().ok())
}

/// `key=value` from a guest line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

impl Proc {
    pub fn spawn(bins: &Bins, vmm: Vmm, spec: &Spec, name: &str) -> Res<Proc> {
        let mut cmd = command(bins, vmm, spec);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| BenchError::Spawn(vmm.name().into(), e))?;
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let now = Instant::now();
                        // A line cut by the end of output (the guest was moved mid-line).
                        let complete = buf.ends_with(b"\n");
                        let l = String::from_utf8_lossy(&buf);
                        // Only a complete line loses its end: a cut one keeps its spaces.
                        let l = if complete {
                            l.trim_end().to_string()
                        } else {
                            l.into_owned()
                        };
                        if tx.send((now, l, complete)).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let se = stderr.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut l = String::new();
            while matches!(r.read_line(&mut l), Ok(n) if n > 0) {
                se.lock().unwrap_or_else(|p| p.into_inner()).push_str(&l);
                l.clear();
            }
        });
        let stdin = child.stdin.take();
        Ok(Proc {
            name: name.into(),
            child,
            stdin,
            rx,
            lines: Vec::new(),
            partial: None,
            cursor: 0,
            stderr,
            started,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn take(&mut self, (t, l, complete): (Instant, String, bool)) {
        if complete {
            self.lines.push((t, l));
        } else {
            self.partial = Some(l);
        }
    }

    /// Moves every line already read into `lines`.
    pub fn pump(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(m) => self.take(m),
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Waits (up to `timeout`) for the process to exit and its output to end.
    pub fn finish(&mut self, timeout: Duration) {
        let end = Instant::now() + timeout;
        while let Ok(m) = self
            .rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.take(m);
        }
    }

    fn tail(&self) -> String {
        let mut t: Vec<String> = self
            .lines
            .iter()
            .rev()
            .take(6)
            .map(|(_, l)| l.clone())
            .collect();
        t.reverse();
        let err = self.stderr();
        let err: Vec<&str> = err.lines().rev().take(6).collect();
        format!(
            "[{} stdout] {}\n[{} stderr] {}",
            self.name,
            t.join(" | "),
            self.name,
            err.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }

    /// Marks everything read so far as consumed: the next `wait_line` looks only at newer lines.
    pub fn skip_seen(&mut self) {
        self.pump();
        self.cursor = self.lines.len();
    }

    /// Waits for a new line (after the cursor) satisfying `pred`; returns its time and text.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Res<(Instant, String)> {
        let end = Instant::now() + timeout;
        loop {
            while self.cursor < self.lines.len() {
                let i = self.cursor;
                self.cursor += 1;
                if pred(&self.lines[i].1) {
                    return Ok(self.lines[i].clone());
                }
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) => self.take(m),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                    return Err(BenchError::Timeout {
                        what: format!("{}: {what}", self.name),
                        secs: timeout.as_secs_f64(),
                        tail: self.tail(),
                    })
                }
            }
        }
    }

    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> Res<(Instant, String)> {
        self.wait_line(pat, timeout, |l| l.contains(pat))
    }

    /// Waits until stderr contains `pat`.
    pub fn wait_stderr(&mut self, pat: &str, timeout: Duration) -> Res<()> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.stderr().contains(pat) {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(BenchError::Failed(format!(
                    "{} exited ({st}) before {pat:?}: {}",
                    self.name,
                    self.tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(BenchError::Timeout {
            what: format!("{}: stderr {pat:?}", self.name),
            secs: timeout.as_secs_f64(),
            tail: self.tail(),
        })
    }

    /// Heartbeats seen so far: (time read, seq).
    pub fn heartbeats(&mut self) -> Vec<(Instant, u64)> {
        self.pump();
        self.lines
            .iter()
            .filter_map(|(t, l)| hb_seq(l).map(|s| (*t, s)))
            .collect()
    }

    pub fn send(&mut self, bytes: &[u8]) -> Res<()> {
        let name = self.name.clone();
        let s = self
            .stdin
            .as_mut()
            .ok_or_else(|| BenchError::Failed(format!("{name}: stdin closed")))?;
        s.write_all(bytes)
            .and_then(|_| s.flush())
            .map_err(|e| BenchError::Io(format!("{name}: serial input"), e))
    }

    /// Asks the guest for `STATUS` until it has written `pages` pages (its region touched once).
    pub fn wait_dirtied(&mut self, pages: u64, timeout: Duration) -> Res<()> {
        let end = Instant::now() + timeout;
        loop {
            self.send(b"s")?;
            let (_, l) = self.wait_for("STATUS ", Duration::from_secs(10))?;
            if field(&l, "dirtied").unwrap_or(0) >= pages {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(BenchError::Failed(format!(
                    "{}: guest wrote fewer than {pages} pages in time: {l}",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `v` → the guest's `LEDGER` line; true when it says OK.
    pub fn ledger_ok(&mut self) -> Res<bool> {
        self.skip_seen();
        self.send(b"v")?;
        let (_, l) = self.wait_for("LEDGER ", Duration::from_secs(60))?;
        Ok(l.starts_with("LEDGER OK"))
    }

    /// Resident set size in MiB (VmRSS).
    pub fn rss_mib(&self) -> Res<f64> {
        let p = format!("/proc/{}/status", self.pid());
        let s = std::fs::read_to_string(&p).map_err(|e| BenchError::Io(p.clone(), e))?;
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .ok_or_else(|| BenchError::Failed(format!("no VmRSS in {p}")))
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Lets the guest exit (`q`), then makes sure the process is gone.
    pub fn quit(mut self) {
        let _ = self.send(b"q");
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A human-monitor client (QEMU's or Godwit's HMP) on a unix socket.
pub struct Hmp {
    s: UnixStream,
    prompt: &'static str,
    name: String,
}

impl Hmp {
    /// Connects (retrying while the VMM creates the socket) and reads the greeting.
    pub fn connect(path: &Path, vmm: Vmm, name: &str, timeout: Duration) -> Res<Hmp> {
        let end = Instant::now() + timeout;
        loop {
            match UnixStream::connect(path) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(300)))
                        .map_err(|e| BenchError::Io(name.into(), e))?;
                    let mut h = Hmp {
                        s,
                        prompt: vmm.prompt(),
                        name: name.into(),
                    };
                    h.read_to_prompt()?;
                    return Ok(h);
                }
                Err(e) if Instant::now() > end => {
                    return Err(BenchError::Monitor(
                        name.into(),
                        format!("connect {}: {e}", path.display()),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn read_to_prompt(&mut self) -> Res<String> {
        let mut out = Vec::new();
        let mut b = [0u8; 8192];
        while !out.ends_with(self.prompt.as_bytes()) {
            let n = self
                .s
                .read(&mut b)
                .map_err(|e| BenchError::Monitor(self.name.clone(), e.to_string()))?;
            if n == 0 {
                return Err(BenchError::Monitor(
                    self.name.clone(),
                    format!("closed; got {:?}", String::from_utf8_lossy(&out)),
                ));
            }
            out.extend_from_slice(&b[..n]);
        }
        out.truncate(out.len() - self.prompt.len());
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Runs one command; returns its answer (echo and escapes removed).
    pub fn cmd(&mut self, line: &str) -> Res<String> {
        self.s
            .write_all(format!("{line}\n").as_bytes())
            .map_err(|e| BenchError::Monitor(self.name.clone(), e.to_string()))?;
        let raw = self.read_to_prompt()?;
        Ok(hmptext::clean(&raw, line))
    }

    /// Sends `quit` without waiting for an answer (the VMM exits).
    pub fn quit(mut self) {
        let _ = self.s.write_all(b"quit\n");
    }
}

/// Answers that mean the VMM does not have the command (yet).
pub fn unsupported(answer: &str) -> bool {
    let a = answer.to_ascii_lowercase();
    a.contains("not supported") || a.contains("unknown command") || a.contains("not implemented")
}

/// A free TCP port on loopback.
pub fn free_port() -> Res<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| BenchError::Io("bind 127.0.0.1:0".into(), e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| BenchError::Io("local_addr".into(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_forms_and_a_line_cut_by_the_switchover() {
        assert_eq!(hb_seq("H 12"), Some(12));
        assert_eq!(hb_seq("HEARTBEAT seq=5 ticks=100 gen=0 dirtied=0"), Some(5));
        assert_eq!(hb_seq("GUEST READY cpus=2 mem=1024"), None);
        // "H " written on the source, "1923\n" on the destination.
        assert_eq!(hb_seq(&format!("{}{}", "H ", "1923")), Some(1923));
        assert_eq!(hb_seq("1923"), None);
    }

    #[test]
    fn status_fields() {
        assert_eq!(field("STATUS seq=3 dirtied=16384 cpus=2", "dirtied"), Some(16384));
        assert_eq!(field("STATUS seq=3 cpu_dirtied=1,2", "dirtied"), None);
    }
}
