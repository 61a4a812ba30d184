//! `libvirt` (only when asked for by name: it needs root and Debian's libvirt 9.0): migration
//! as libvirt drives it, with Godwit and with QEMU 7.2 as the domain's `<emulator>`, in the
//! harness of `crates/godwit/tests/libvirt_virsh.rs`: two libvirt session daemons on this host,
//! each run as `nobody` (group kvm) with its own `HOME`/`XDG_*` directories.
//!
//! Both daemons probe both emulator binaries first (`virsh domcapabilities`), as a daemon that
//! ran them before has their capabilities cached: otherwise the first migration to a daemon
//! includes that probe (1–4 s here). Each run defines and starts the domain on daemon A (the test guest with a qcow2 disk,
//! writing RAM and disk, heartbeats every 2 ms on the serial pty), sets
//! `virsh migrate-setmaxdowntime gw 30` (the other rows' downtime limit), then:
//! 1. `virsh migrate --live --unsafe gw B --migrateuri tcp://127.0.0.1` (shared image);
//! 2. back from B with `--copy-storage-all` into a separate image (libvirt's NBD +
//!    `blockdev-mirror`), after the same `migrate-setmaxdowntime` on B.
//!
//! Measured for each: the `virsh migrate` command from start to exit (what a libvirt user
//! waits; it includes libvirt starting the destination process), libvirt's own numbers from
//! `virsh domjobinfo --completed` on the destination (`Total downtime`, `Time elapsed`), and
//! the heartbeat gap seen from the guest: the source pty's last heartbeat to the destination
//! pty's first. The destination's pty is opened while the migration runs (as soon as
//! `virsh ttyconsole` names it). The gap is taken when the destination's first heartbeat is
//! the next one or the one after (the line the switchover cut in two is lost), so it includes
//! up to two heartbeat periods (4 ms); a run where more are missing (the destination's pty
//! was opened too late) gets no gap sample, and says so.
//! The destination must then answer `v` with `LEDGER OK` and `DISK OK`.

use crate::vm::{hb_seq, BenchError, Bins, Res, Vmm};
use crate::{order, Collect};
use bench::results::Metric;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(120);
const MEM_MIB: u64 = 512;
const DISK_MIB: u64 = 256;
const DOWNTIME_MS: u64 = 30;
const CMDLINE: &str = "mode=dirty mib=64 rate=16 disk=on disk_mib=16 hb=compact hb_ms=2 cpus=1";

fn fail(what: impl Into<String>) -> BenchError {
    BenchError::Failed(what.into())
}

/// One libvirt session daemon.
struct Session {
    dir: PathBuf,
    daemon: Option<Child>,
    as_root: bool,
}

impl Session {
    fn cmd(&self, prog: &str) -> Command {
        let mut c = if self.as_root {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=nobody", "--regid=nogroup", "--groups=kvm", prog]);
            c
        } else {
            Command::new(prog)
        };
        let d = &self.dir;
        c.env("HOME", d.join("home"))
            .env("XDG_CONFIG_HOME", d.join("cfg"))
            .env("XDG_RUNTIME_DIR", d.join("run"))
            .env("XDG_CACHE_HOME", d.join("cache"));
        c
    }

    fn start(dir: &Path) -> Res<Session> {
        // SAFETY: getuid has no preconditions.
        let as_root = unsafe { libc::getuid() } == 0;
        for sub in ["home", "cfg", "run", "cache"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| BenchError::Io(dir.display().to_string(), e))?;
        }
        if as_root {
            give_to_nobody(dir)?;
        }
        let mut s = Session { dir: dir.to_path_buf(), daemon: None, as_root };
        let log = std::fs::File::create(dir.join("libvirtd.log")).map_err(|e| BenchError::Io("libvirtd.log".into(), e))?;
        let log2 = log.try_clone().map_err(|e| BenchError::Io("libvirtd.log".into(), e))?;
        let child = s
            .cmd("libvirtd")
            .args(["--timeout", "0"])
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| BenchError::Spawn("libvirtd (apt-get install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)".into(), e))?;
        s.daemon = Some(child);
        let sock = dir.join("run/libvirt/libvirt-sock");
        let t0 = Instant::now();
        while !sock.exists() {
            if t0.elapsed() > T {
                return Err(fail(format!("libvirtd did not start: {}", s.log())));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(s)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default()
    }

    fn uri(&self) -> String {
        format!("qemu+unix:///session?socket={}", self.dir.join("run/libvirt/libvirt-sock").display())
    }

    fn try_virsh(&self, args: &[&str]) -> Res<String> {
        let out = self
            .cmd("virsh")
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .output()
            .map_err(|e| BenchError::Spawn("virsh".into(), e))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let dom_log = std::fs::read_to_string(self.dir.join("cache/libvirt/qemu/log/gw.log")).unwrap_or_default();
            let tail: String = dom_log.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
            return Err(fail(format!("virsh {args:?}: {} (domain log, last lines: {tail})", text.trim())));
        }
        Ok(text)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.cmd("virsh").arg("-c").arg(self.uri()).args(["destroy", "gw"]).output();
        let _ = self.cmd("virsh").arg("-c").arg(self.uri()).args(["undefine", "gw"]).output();
        if let Some(mut d) = self.daemon.take() {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn give_to_nobody(p: &Path) -> Res<()> {
    let ok = Command::new("chown").args(["-R", "nobody:nogroup"]).arg(p).status().is_ok_and(|s| s.success());
    let _ = Command::new("chmod").args(["-R", "a+rX"]).arg(p).status();
    if ok {
        Ok(())
    } else {
        Err(fail(format!("chown nobody {}", p.display())))
    }
}

/// The guest's serial pty: timestamped lines.
struct Console {
    file: std::fs::File,
    rx: Receiver<(Instant, String)>,
    lines: Vec<(Instant, String)>,
}

impl Console {
    fn open(path: &str) -> Res<Console> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| BenchError::Io(path.into(), e))?;
        let reader = file.try_clone().map_err(|e| BenchError::Io(path.into(), e))?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(reader).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), l)).is_err() {
                    return;
                }
            }
        });
        Ok(Console { file, rx, lines: Vec::new() })
    }

    fn of(s: &Session) -> Res<Console> {
        Console::open(s.try_virsh(&["ttyconsole", "gw"])?.trim())
    }

    fn pump(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.lines.push(l);
        }
    }

    fn wait(&mut self, pred: impl Fn(&str) -> bool, what: &str) -> Res<(Instant, String)> {
        let t0 = Instant::now();
        loop {
            let left = T.checked_sub(t0.elapsed()).unwrap_or_default();
            match self.rx.recv_timeout(left) {
                Ok(l) => {
                    self.lines.push(l.clone());
                    if pred(&l.1) {
                        return Ok(l);
                    }
                }
                Err(_) => {
                    let tail = self.lines.last().map(|l| l.1.clone()).unwrap_or_default();
                    return Err(BenchError::Timeout { what: what.into(), secs: T.as_secs_f64(), tail });
                }
            }
        }
    }

    fn last_heartbeat(&mut self) -> Option<(Instant, u64)> {
        self.pump();
        self.lines.iter().rev().find_map(|(t, l)| hb_seq(l).map(|s| (*t, s)))
    }

    /// `v`: the memory ledger and the disk ledger.
    fn check(&mut self) -> Res<bool> {
        self.file.write_all(b"v").map_err(|e| BenchError::Io("pty".into(), e))?;
        let (_, l) = self.wait(|l| l.starts_with("LEDGER "), "LEDGER line")?;
        let (_, d) = self.wait(|l| l.starts_with("DISK "), "DISK line")?;
        Ok(l.starts_with("LEDGER OK") && d.starts_with("DISK OK"))
    }
}

fn domain_xml(kernel: &Path, emu: &Path, disk: &Path, qemu: bool) -> String {
    let (ns, extra) = if qemu {
        (
            " xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'",
            "<qemu:commandline><qemu:arg value='-global'/><qemu:arg value='virtio-mmio.force-legacy=false'/></qemu:commandline>",
        )
    } else {
        ("", "")
    };
    format!(
        "<domain type='kvm'{ns}><name>gw</name><memory unit='MiB'>{MEM_MIB}</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='microvm'>hvm</type><kernel>{}</kernel>\
         <cmdline>{CMDLINE}</cmdline></os>\
         <cpu mode='host-passthrough'/><devices><emulator>{}</emulator>\
         <disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none'/><source file='{}'/>\
         <target dev='vda' bus='virtio'/><address type='virtio-mmio'/></disk>\
         <controller type='usb' model='none'/><serial type='pty'/><memballoon model='none'/></devices>{extra}</domain>",
        kernel.display(),
        emu.display(),
        disk.display()
    )
}

/// One migration's numbers.
struct Sample {
    virsh_ms: f64,
    downtime_ms: Option<f64>,
    elapsed_ms: Option<f64>,
    gap_ms: Option<f64>,
    ok: bool,
}

/// `Total downtime:   12 ms` → 12.
fn jobinfo_ms(text: &str, key: &str) -> Option<f64> {
    let l = text.lines().find(|l| l.trim_start().starts_with(key))?;
    l.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// Runs `virsh migrate ARGS` from `src` to `dst`, the source's console already open.
fn migrate(src: &Session, dst: &Session, args: &[&str], on_src: &mut Console) -> Res<(Sample, Console)> {
    src.try_virsh(&["migrate-setmaxdowntime", "gw", &DOWNTIME_MS.to_string()])?;
    // Open the destination's pty as soon as its domain exists.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = channel();
    let watcher = {
        let stop = stop.clone();
        let dst_cmd = |a: &[&str]| {
            let mut c = dst.cmd("virsh");
            c.arg("-c").arg(dst.uri()).args(a);
            c
        };
        let mut probe = dst_cmd(&["ttyconsole", "gw"]);
        probe.stderr(Stdio::null());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(out) = probe.output() {
                    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
                    if out.status.success() && p.starts_with("/dev/pts/") {
                        if let Ok(c) = Console::open(&p) {
                            let _ = tx.send(c);
                            return;
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let mut full = vec!["migrate"];
    full.extend_from_slice(args);
    let t0 = Instant::now();
    let res = src.try_virsh(&full);
    let virsh_ms = t0.elapsed().as_secs_f64() * 1e3;
    stop.store(true, Ordering::SeqCst);
    let _ = watcher.join();
    res?;
    let mut on_dst = match rx.try_recv() {
        Ok(c) => c,
        Err(_) => Console::of(dst)?,
    };
    let info = dst
        .try_virsh(&["domjobinfo", "--completed", "gw"])
        .or_else(|_| src.try_virsh(&["domjobinfo", "--completed", "gw"]))
        .unwrap_or_default();
    let (src_t, src_seq) = on_src.last_heartbeat().ok_or_else(|| fail("no heartbeat from the source"))?;
    let (dst_t, l) = on_dst.wait(|l| hb_seq(l).is_some(), "a heartbeat on the destination")?;
    let dst_seq = hb_seq(&l).unwrap_or(0);
    if dst_seq <= src_seq {
        return Err(fail(format!("heartbeats went back: source {src_seq}, destination {dst_seq}")));
    }
    // The next heartbeat, or the one after when the switchover cut a line in two (its start
    // on the source's pty, its end on the destination's); more missing means the
    // destination's pty was opened too late.
    let gap_ms = (dst_seq <= src_seq + 2).then(|| dst_t.saturating_duration_since(src_t).as_secs_f64() * 1e3);
    if gap_ms.is_none() {
        eprint!("(heartbeats {src_seq} on the source, {dst_seq} first on the destination) ");
    }
    let ok = on_dst.check()?;
    Ok((
        Sample {
            virsh_ms,
            downtime_ms: jobinfo_ms(&info, "Total downtime"),
            elapsed_ms: jobinfo_ms(&info, "Time elapsed"),
            gap_ms,
            ok,
        },
        on_dst,
    ))
}

fn create_qcow2(bins: &Bins, p: &Path) -> Res<()> {
    let img = bins.qemu_img.clone().unwrap_or_else(|| bins.godwit_img.clone());
    let ok = Command::new(&img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(p)
        .arg(format!("{DISK_MIB}M"))
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(fail(format!("{} create {}", img.display(), p.display())))
    }
}

/// One run: A → B live (shared image), B → A live with --copy-storage-all.
fn run(bins: &Bins, vmm: Vmm, a: &Session, b: &Session, img: &Path) -> Res<[Sample; 2]> {
    let (kernel, disk, disk2) = (img.join("guest"), img.join("disk.qcow2"), img.join("disk2.qcow2"));
    let emu = match vmm {
        Vmm::Godwit => img.join("godwit"),
        Vmm::Qemu => bins.qemu.clone(),
    };
    for d in [&disk, &disk2] {
        let _ = std::fs::remove_file(d);
        create_qcow2(bins, d)?;
    }
    let xml = img.join("gw.xml");
    std::fs::write(&xml, domain_xml(&kernel, &emu, &disk, vmm == Vmm::Qemu)).map_err(|e| BenchError::Io("gw.xml".into(), e))?;
    // The new files only: changing the emulator binary's ctime (chown) would make libvirt
    // probe it again, inside the next migration's time.
    if a.as_root {
        for f in [&disk, &disk2, &xml] {
            give_to_nobody(f)?;
        }
    }
    let xml_s = xml.display().to_string();
    a.try_virsh(&["define", &xml_s])?;
    a.try_virsh(&["start", "gw"])?;
    let mut on_a = Console::of(a)?;
    // A second of the workload first: RAM and disk written.
    on_a.wait(|l| hb_seq(l).is_some_and(|s| s >= 500), "500 heartbeats")?;
    let (live, mut on_b) = migrate(a, b, &["--live", "--unsafe", "gw", &b.uri(), "--migrateuri", "tcp://127.0.0.1"], &mut on_a)?;
    on_b.wait(|l| hb_seq(l).is_some(), "a heartbeat")?;
    let back = b
        .try_virsh(&["dumpxml", "--migratable", "gw"])?
        .replace(&disk.display().to_string(), &disk2.display().to_string());
    let back_xml = img.join("back.xml");
    std::fs::write(&back_xml, back).map_err(|e| BenchError::Io("back.xml".into(), e))?;
    if a.as_root {
        give_to_nobody(&back_xml)?;
    }
    let back_s = back_xml.display().to_string();
    let args = ["--live", "--copy-storage-all", "--xml", &back_s, "gw", &a.uri(), "--migrateuri", "tcp://127.0.0.1"];
    let (copy, _on_a) = migrate(b, a, &args, &mut on_b)?;
    a.try_virsh(&["destroy", "gw"])?;
    a.try_virsh(&["undefine", "gw"])?;
    Ok([live, copy])
}

const CASES: [(&str, &str); 2] = [
    ("libvirt-live", "virsh migrate --live, shared qcow2 image"),
    ("libvirt-copy", "virsh migrate --live --copy-storage-all (NBD + blockdev-mirror)"),
];

pub fn run_all(runs: usize, bins: &Bins, sides: &[Vmm], dir: &Path, c: &mut Collect, metrics: &mut Vec<Metric>) {
    let top = dir.join("libvirt");
    let img = top.join("img");
    let set_up = std::fs::create_dir_all(&img)
        .map_err(|e| BenchError::Io(img.display().to_string(), e))
        .and_then(|_| std::fs::copy(&bins.godwit, img.join("godwit")).map_err(|e| BenchError::Io("godwit".into(), e)))
        .and_then(|_| std::fs::copy(&bins.guest, img.join("guest")).map_err(|e| BenchError::Io("guest".into(), e)))
        .and_then(|_| Ok((Session::start(&top.join("a"))?, Session::start(&top.join("b"))?)))
        .and_then(|s| if s.0.as_root { give_to_nobody(&img).map(|_| s) } else { Ok(s) });
    let (a, b) = match set_up {
        Ok(s) => s,
        Err(e) => {
            c.notes.push(format!("libvirt: cannot set up the daemons: {e}"));
            return;
        }
    };
    // Each daemon probes an emulator binary the first time it needs it (and again when the
    // binary changes): done here, so no migration pays for it.
    for vmm in sides {
        let emu = match vmm {
            Vmm::Godwit => img.join("godwit"),
            Vmm::Qemu => bins.qemu.clone(),
        };
        let emu = emu.display().to_string();
        for s in [&a, &b] {
            if let Err(e) = s.try_virsh(&["domcapabilities", "--emulatorbin", &emu, "--machine", "microvm", "--virttype", "kvm"]) {
                c.notes.push(format!("libvirt: probing {emu}: {e}"));
                return;
            }
        }
    }
    let mut gaps_missed = 0;
    for i in 0..runs {
        for vmm in order(i, sides) {
            eprint!("[libvirt migration {}/{runs}] {:<6} ", i + 1, vmm.name());
            match run(bins, vmm, &a, &b, &img) {
                Ok(samples) => {
                    for ((k, _), s) in CASES.iter().zip(&samples) {
                        let opt = |v: Option<f64>| v.map_or("?".to_string(), |v| format!("{v:.0}"));
                        eprint!(
                            "{k}: virsh {:.0} ms, downtime {} ms (elapsed {} ms), gap {} ms, {}; ",
                            s.virsh_ms,
                            opt(s.downtime_ms),
                            opt(s.elapsed_ms),
                            s.gap_ms.map_or("n/a".into(), |g| format!("{g:.1}")),
                            if s.ok { "LEDGER OK + DISK OK" } else { "CHECK FAILED" }
                        );
                        c.add(&format!("{k}/virsh"), vmm, s.virsh_ms);
                        for (m, v) in [("downtime", s.downtime_ms), ("elapsed", s.elapsed_ms), ("gap", s.gap_ms)] {
                            if let Some(v) = v {
                                c.add(&format!("{k}/{m}"), vmm, v);
                            }
                        }
                        gaps_missed += s.gap_ms.is_none() as usize;
                        c.flag(&format!("{k}/ok"), vmm, s.ok);
                    }
                    eprintln!();
                }
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    c.failed("libvirt", vmm, &e);
                    let _ = a.try_virsh(&["destroy", "gw"]);
                    let _ = a.try_virsh(&["undefine", "gw"]);
                    let _ = b.try_virsh(&["destroy", "gw"]);
                }
            }
        }
    }
    if gaps_missed > 0 {
        c.notes.push(format!(
            "libvirt: {gaps_missed} migration(s) have no heartbeat-gap sample: heartbeats were missing between the source's last and the destination's first (its pty opened too late)"
        ));
    }
    for (k, what) in CASES {
        let scen = format!("libvirt 9.0, two session daemons: {what}; {MEM_MIB} MiB, 1 vCPU, guest writing RAM and disk, downtime limit {DOWNTIME_MS} ms");
        for (m, label, unit) in [
            ("virsh", "virsh migrate command, start → exit", "ms"),
            ("elapsed", "migration time (domjobinfo --completed: Time elapsed)", "ms"),
            ("downtime", "downtime (domjobinfo --completed: Total downtime)", "ms"),
            ("gap", "heartbeat gap seen from the guest (serial ptys)", "ms"),
        ] {
            let mut r = c.metric(k, m, label, unit);
            r.scenario = scen.clone();
            metrics.push(r);
        }
        let mut r = c.metric(k, "ok", "LEDGER OK + DISK OK on the destination, heartbeats continue", "runs").fraction();
        r.scenario = scen;
        metrics.push(r);
    }
    drop((a, b));
    let _ = std::fs::remove_dir_all(&top);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domjobinfo_fields() {
        let text = "Job type:         Completed\nOperation:        Outgoing migration\nTime elapsed:     1503         ms\nTotal downtime:   42           ms\nDowntime w/o network: 41 ms\n";
        assert_eq!(jobinfo_ms(text, "Time elapsed"), Some(1503.0));
        assert_eq!(jobinfo_ms(text, "Total downtime"), Some(42.0));
        assert_eq!(jobinfo_ms(text, "Memory processed"), None);
    }
}
