//! The parts of the suite, run in order on one VMM: boot, ledgers, TCP, three live migrations
//! (pre-copy, post-copy, auto-converge) that move the guest between two taps of one bridge
//! with a TCP connection open throughout, savevm/loadvm, a cold migration (savevm, quit, copy
//! the images, -loadvm) and power-off. After every move: the agent's three ledgers verified, the
//! heartbeat sequence continuous, the ext4 image `fsck`-clean (frozen with FIFREEZE while the
//! host copies it). A part that cannot start because an earlier one left no VM is NOT RUN.

use crate::image;
use crate::moves::{self, expect_ok};
use crate::net::{count_while, Client, Lan, TAPS};
use crate::vm::{field, info_ms, Machine, Spec, Vmm, R};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const PARTS: &[(&str, &str)] = &[
    ("boot-smp2", "Linux reaches the agent on -smp 2 (AGENT READY cpus=2)"),
    ("ledgers", "memory, disk (O_DIRECT, /dev/vda) and ext4 (/dev/vdb) ledgers OK; their self-test BAD where damaged"),
    ("tcp", "a TCP connection from the host to the agent over virtio-net on a tap"),
    ("precopy", "live pre-copy migration to the other tap: same TCP connection, ledgers, heartbeats, fsck"),
    ("postcopy", "live post-copy migration back: the same checks"),
    ("auto-converge", "live migration with auto-converge: the same checks"),
    ("savevm-loadvm", "savevm, run on, loadvm: ledgers, heartbeats back to the snapshot, fsck"),
    ("cold-migration", "savevm, quit, copy the qcow2 images, -loadvm elsewhere: ledgers, TCP, fsck"),
    ("poweroff", "the agent's poweroff ends the VMM with status 0; fsck clean"),
];

pub enum Outcome {
    Pass(String),
    Fail(String),
    NotRun(String),
}

pub struct Row {
    pub vmm: &'static str,
    pub part: &'static str,
    pub outcome: Outcome,
}

/// Inputs of one VMM's run.
pub struct Setup {
    pub vmm: Vmm,
    pub bin: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub work: PathBuf,
}

const BOOT: Duration = Duration::from_secs(180);
const T: Duration = Duration::from_secs(60);
const PORT: u16 = 7777;
const MAC: &str = "52:54:00:00:e2:01";

struct Run {
    s: Setup,
    lan: Lan,
    ledger: PathBuf,
    data: PathBuf,
    cur: Option<Machine>,
    /// Which tap the running VM uses.
    tap: usize,
    client: Option<Client>,
    serial: u32,
}

pub fn run(s: Setup) -> Vec<Row> {
    let name = s.vmm.name();
    let mut rows = Vec::new();
    let mut push = |part: &'static str, outcome| rows.push(Row { vmm: name, part, outcome });
    let mut r = match prepare(s) {
        Ok(r) => r,
        Err(e) => {
            for (i, (p, _)) in PARTS.iter().enumerate() {
                push(p, if i == 0 { Outcome::Fail(format!("setup: {e}")) } else { Outcome::NotRun("setup failed".into()) });
            }
            return rows;
        }
    };
    let mut blocked: Option<String> = None;
    for (part, _) in PARTS {
        if let Some(why) = &blocked {
            push(part, Outcome::NotRun(why.clone()));
            continue;
        }
        let res = match *part {
            "boot-smp2" => r.boot(),
            "ledgers" => r.ledgers(),
            "tcp" => r.tcp(),
            "precopy" => r.migrate("precopy"),
            "postcopy" => r.migrate("postcopy"),
            "auto-converge" => r.migrate("auto-converge"),
            "savevm-loadvm" => r.savevm_loadvm(),
            "cold-migration" => r.cold(),
            "poweroff" => r.poweroff(),
            _ => Err("unknown part".into()),
        };
        match res {
            Ok(n) => push(part, Outcome::Pass(n)),
            Err(e) => {
                push(part, Outcome::Fail(e));
                if r.cur.is_none() {
                    blocked = Some(format!("no VM left after {part} failed"));
                }
            }
        }
    }
    if let Some(mut m) = r.cur.take() {
        m.quit();
    }
    rows
}

fn prepare(s: Setup) -> R<Run> {
    let dir = s.work.join(s.vmm.name());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (ledger, data) = (dir.join("ledger.qcow2"), dir.join("data.qcow2"));
    image::create_qcow2(&ledger, "64M")?;
    image::create_ext4_qcow2(&data, "256M")?;
    let lan = Lan::new(&s.vmm.name()[..1])?;
    Ok(Run { s, lan, ledger, data, cur: None, tap: 0, client: None, serial: 0 })
}

impl Run {
    fn spec(&mut self, tap: usize, incoming: bool, loadvm: Option<&str>, ledger: PathBuf, data: PathBuf) -> Spec {
        self.serial += 1;
        let dir = self.ledger.parent().map(|p| p.to_path_buf()).unwrap_or_default();
        Spec {
            vmm: self.s.vmm,
            bin: self.s.bin.clone(),
            netns: self.lan.ns.clone(),
            kernel: self.s.kernel.clone(),
            initrd: self.s.initrd.clone(),
            append: format!("{} quiet godwit.ip=10.0.2.15/24 godwit.agent_port={PORT} godwit.agent_hb_ms=250", self.s.append),
            ledger,
            data,
            tap: TAPS[tap].to_string(),
            mac: MAC.into(),
            monitor: dir.join(format!("mon{}.sock", self.serial)),
            incoming: incoming.then(|| format!("unix:{}", dir.join(format!("mig{}.sock", self.serial)).display())),
            loadvm: loadvm.map(String::from),
        }
    }

    fn vm(&mut self) -> R<&mut Machine> {
        self.cur.as_mut().ok_or_else(|| "no VM".to_string())
    }

    fn boot(&mut self) -> R<String> {
        let spec = self.spec(0, false, None, self.ledger.clone(), self.data.clone());
        let mut m = Machine::start(&spec)?;
        let (t, ready) = m.wait_for("AGENT READY", BOOT)?;
        let boot_ms = (t - m.started).as_millis();
        let warns: Vec<String> = m.seen.iter().filter(|(_, l)| l.starts_with("AGENT WARN")).map(|(_, l)| l.clone()).collect();
        self.cur = Some(m);
        if field(&ready, "cpus") != Some(2) {
            return Err(format!("not 2 CPUs: {ready}"));
        }
        if !warns.is_empty() {
            return Err(warns.join("; "));
        }
        if !ready.contains("mounted=1") || !ready.contains("disk=/dev/vda") {
            return Err(format!("agent without its devices: {ready}"));
        }
        self.vm()?.wait_for("HEARTBEAT", T)?;
        Ok(format!("boot_ms={boot_ms} guest_uptime_ms={}", field(&ready, "uptime_ms").unwrap_or(0)))
    }

    fn ledgers(&mut self) -> R<String> {
        let m = self.vm()?;
        let ok = m.verify()?;
        m.send("c")?;
        let (_, l) = m.wait_for("LEDGER ", T)?;
        let (_, d) = m.wait_for("DISK ", T)?;
        let (_, f) = m.wait_for("FS ", T)?;
        if !l.starts_with("LEDGER BAD page=") || !d.starts_with("DISK BAD block=") || !(f.starts_with("FS BAD file=") || f.starts_with("FS SKIP")) {
            return Err(format!("self-test did not find the damage: {l}; {d}; {f}"));
        }
        m.verify()?;
        Ok(ok)
    }

    fn tcp(&mut self) -> R<String> {
        let mut c = self.lan.connect(PORT, T)?;
        for _ in 0..10 {
            c.count()?;
        }
        let e = c.ask1("echo godwit-e2e")?;
        if e != "ECHO godwit-e2e" {
            return Err(format!("echo: {e}"));
        }
        let conn = c.conn;
        self.client = Some(c);
        Ok(format!("conn={conn} count=10"))
    }

    /// Freezes the guest's ext4, checks a copy of its image, thaws.
    fn fsck(&mut self, data: &std::path::Path) -> R<()> {
        let m = self.vm()?;
        m.send("fsfreeze")?;
        let (_, l) = m.wait_for("FS ", T)?;
        if !l.starts_with("FS FROZEN") {
            return Err(l);
        }
        let r = image::fsck(data);
        let m = self.vm()?;
        m.send("fsthaw")?;
        m.wait_for("FS THAWED", T)?;
        r
    }

    fn migrate(&mut self, kind: &str) -> R<String> {
        let other = 1 - self.tap;
        let spec = self.spec(other, true, None, self.ledger.clone(), self.data.clone());
        let uri = spec.incoming.clone().unwrap_or_default();
        let mut dst = Machine::start(&spec)?;
        dst.hmp()?;
        let mut client = self.client.take().ok_or("no TCP connection (the tcp part failed)")?;
        // Pre-copy moves a guest dirtying 16 MiB/s; the others one dirtying more than the link.
        client.ask1(if kind == "precopy" { "rate 16" } else { "rate 256" })?;
        let stop = Arc::new(AtomicBool::new(false));
        let counter = count_while(client, stop.clone());
        let src = self.cur.as_mut().ok_or("no VM")?;
        let moved = moves::live_migrate(src, &mut dst, &uri, kind).and_then(|(info, total)| Ok((info, total, moves::handover(src, &mut dst)?)));
        let (info, total, (last_src, first)) = match moved {
            Ok(x) => x,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                let _ = counter.join();
                return Err(e);
            }
        };
        // The moved guest runs on: the old VM goes, the destination is the VM now.
        let mut old = self.cur.replace(dst).ok_or("no VM")?;
        old.quit();
        self.tap = other;
        stop.store(true, Ordering::Relaxed);
        let (mut client, gap) = counter.join().map_err(|_| "TCP thread panicked".to_string())?.map_err(|e| format!("TCP connection: {e}"))?;
        client.count()?;
        client.ask1("rate 16")?;
        self.client = Some(client);
        let v = self.vm()?.verify()?;
        let data = self.data.clone();
        self.fsck(&data)?;
        Ok(format!(
            "downtime_ms={} total_ms={total} vmm_total_ms={} tcp_gap_ms={gap} hb={}->{} ({v})",
            info_ms(&info, "downtime:").map(|d| d.to_string()).unwrap_or("?".into()),
            info_ms(&info, "total time:").map(|d| d.to_string()).unwrap_or("?".into()),
            last_src.unwrap_or(0),
            field(&first, "seq").unwrap_or(0)
        ))
    }

    fn savevm_loadvm(&mut self) -> R<String> {
        let m = self.vm()?;
        // Lines still queued are older than the snapshot: drop them first.
        m.collect(Duration::from_millis(50));
        let t0 = Instant::now();
        expect_ok(m.hmp()?.cmd("savevm e2e-live")?)?;
        let save_ms = t0.elapsed().as_millis();
        // The first heartbeat read now is the snapshot's last one (S) or the next (S+1).
        let (_, hb) = m.wait_for("HEARTBEAT", T)?;
        let at_save = field(&hb, "seq").unwrap_or(0);
        m.collect(Duration::from_secs(2));
        let t1 = Instant::now();
        expect_ok(m.hmp()?.cmd("loadvm e2e-live")?)?;
        let load_ms = t1.elapsed().as_millis();
        // Back to the snapshot: among the heartbeats after loadvm (behind a few printed just
        // before it, about 8 later than the snapshot's) comes S+1 again.
        let after: Vec<u64> = m.collect(Duration::from_millis(1500)).iter().filter(|(_, l)| l.starts_with("HEARTBEAT")).filter_map(|(_, l)| field(l, "seq")).collect();
        let back = after.iter().copied().min().ok_or("no heartbeat after loadvm")?;
        if back > at_save + 1 {
            return Err(format!("heartbeats {after:?} after loadvm, {at_save} at savevm: not back to the snapshot"));
        }
        let v = m.verify()?;
        // The guest's TCP state went back too: the old connection is dropped, a new one works.
        self.client = None;
        let mut c = self.lan.connect(PORT, T)?;
        c.count()?;
        self.client = Some(c);
        let data = self.data.clone();
        self.fsck(&data)?;
        Ok(format!("savevm_ms={save_ms} loadvm_ms={load_ms} hb_at_save={at_save} hb_after_load={back} ({v})"))
    }

    fn cold(&mut self) -> R<String> {
        let mut m = self.cur.take().ok_or("no VM")?;
        m.collect(Duration::from_millis(50));
        let t0 = Instant::now();
        let r = m.hmp().and_then(|h| h.cmd("savevm e2e-cold")).and_then(expect_ok);
        let save_ms = t0.elapsed().as_millis();
        if let Err(e) = r {
            self.cur = Some(m);
            return Err(e);
        }
        let (_, hb) = m.wait_for("HEARTBEAT", T)?;
        let at_save = field(&hb, "seq").unwrap_or(0);
        m.quit();
        drop(m);
        self.client = None;
        let dir = self.ledger.parent().map(|p| p.join("cold")).ok_or("no work dir")?;
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (ledger, data) = (dir.join("ledger.qcow2"), dir.join("data.qcow2"));
        image::copy(&self.ledger, &ledger)?;
        image::copy(&self.data, &data)?;
        let other = 1 - self.tap;
        let spec = self.spec(other, false, Some("e2e-cold"), ledger.clone(), data.clone());
        let t1 = Instant::now();
        self.cur = Some(Machine::start(&spec)?);
        self.tap = other;
        self.ledger = ledger;
        self.data = data.clone();
        let m = self.vm()?;
        let (t, hb) = m.wait_for("HEARTBEAT", T)?;
        let restore_ms = (t - t1).as_millis();
        let back = field(&hb, "seq").unwrap_or(0);
        if back > at_save + 2 || back + 2 < at_save {
            return Err(format!("heartbeat seq {back} after -loadvm, about {at_save} at savevm"));
        }
        let v = m.verify()?;
        let mut c = self.lan.connect(PORT, T)?;
        c.count()?;
        self.client = Some(c);
        self.fsck(&data)?;
        Ok(format!("savevm_ms={save_ms} start_to_heartbeat_ms={restore_ms} ({v})"))
    }

    fn poweroff(&mut self) -> R<String> {
        let m = self.vm()?;
        let t0 = Instant::now();
        m.send("poweroff")?;
        m.wait_for("AGENT POWEROFF", T)?;
        let code = m.wait_exit(T)?;
        let ms = t0.elapsed().as_millis();
        self.cur = None;
        if code != 0 {
            return Err(format!("the VMM exited with status {code}"));
        }
        image::fsck(&self.data)?;
        Ok(format!("exit=0 poweroff_ms={ms}"))
    }
}
