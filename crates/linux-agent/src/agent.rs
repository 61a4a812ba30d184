//! The agent's state and its command language, the same on the console and on TCP (see
//! docs/linux-agent.md): every command is one line, every answer one or more lines.

use crate::disk::Disk;
use crate::files::Files;
use crate::memory::Memory;
use crate::sys;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub struct Agent {
    pub mem: Option<Arc<Memory>>,
    pub disk: Option<Arc<Disk>>,
    /// Why the disk ledger is not running (the device was asked for but could not be used).
    pub disk_missing: Option<String>,
    pub files: Option<Arc<Files>>,
    pub files_missing: Option<String>,
    pub hb_seq: AtomicU64,
    pub conns_open: AtomicU64,
    pub conns_total: AtomicU64,
    pub commands: AtomicU64,
    pub port: u16,
    console: Mutex<()>,
}

/// What the caller does after a command.
#[derive(Debug, PartialEq)]
pub enum Next {
    Continue,
    /// Close this TCP connection.
    Close,
}

/// Per-connection state: the id and the `count` counter (console: id 0).
pub struct Conn {
    pub id: u64,
    pub count: u64,
}

impl Agent {
    pub fn new(mem: Option<Arc<Memory>>, disk: Result<Option<Arc<Disk>>, String>, files: Result<Option<Arc<Files>>, String>, port: u16) -> Agent {
        let (disk, disk_missing) = match disk {
            Ok(d) => (d, None),
            Err(e) => (None, Some(e)),
        };
        let (files, files_missing) = match files {
            Ok(f) => (f, None),
            Err(e) => (None, Some(e)),
        };
        Agent {
            mem,
            disk,
            disk_missing,
            files,
            files_missing,
            hb_seq: AtomicU64::new(0),
            conns_open: AtomicU64::new(0),
            conns_total: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            port,
            console: Mutex::new(()),
        }
    }

    /// Writes one line to the console (stdout), whole.
    pub fn say(&self, line: &str) {
        let _g = self.console.lock();
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(format!("{line}\n").as_bytes());
        let _ = o.flush();
    }

    fn gen(&self) -> (u64, u64) {
        self.mem.as_ref().map(|m| (m.max_gen.load(Ordering::Relaxed), m.dirtied.load(Ordering::Relaxed))).unwrap_or((0, 0))
    }

    /// `HEARTBEAT seq=N mono_ms=M real_ms=R gen=G dirtied=D disk=W files=F`.
    pub fn heartbeat(&self) -> String {
        let seq = self.hb_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let (gen, dirtied) = self.gen();
        let disk = self.disk.as_ref().map(|d| d.written.load(Ordering::Relaxed)).unwrap_or(0);
        let files = self.files.as_ref().map(|f| f.written.load(Ordering::Relaxed)).unwrap_or(0);
        format!("HEARTBEAT seq={seq} mono_ms={} real_ms={} gen={gen} dirtied={dirtied} disk={disk} files={files}", sys::mono_ms(), sys::real_ms())
    }

    pub fn status(&self) -> String {
        let (gen, dirtied) = self.gen();
        let mut s = format!(
            "STATUS seq={} mono_ms={} real_ms={} uptime_ms={} gen={gen} dirtied={dirtied} pages={} rate={}",
            self.hb_seq.load(Ordering::Relaxed),
            sys::mono_ms(),
            sys::real_ms(),
            sys::clock_ms(libc::CLOCK_BOOTTIME),
            self.mem.as_ref().map(|m| m.pages()).unwrap_or(0),
            self.mem.as_ref().map(|m| m.rate.load(Ordering::Relaxed)).unwrap_or(0),
        );
        match &self.disk {
            Some(d) => s += &format!(
                " disk_blocks={} disk_gen={} disk_written={} disk_direct={} disk_error={}",
                d.blocks(),
                d.max_gen.load(Ordering::Relaxed),
                d.written.load(Ordering::Relaxed),
                d.direct as u8,
                d.error()
            ),
            None => s += " disk_blocks=0",
        }
        match &self.files {
            Some(f) => {
                let (frozen, err) = f.state();
                s += &format!(
                    " fs_files={} fs_gen={} fs_written={} fs_frozen={} fs_error={}",
                    f.count(),
                    f.max_gen.load(Ordering::Relaxed),
                    f.written.load(Ordering::Relaxed),
                    frozen as u8,
                    err.map(|e| e.replace(' ', "_")).unwrap_or_else(|| "0".into())
                )
            }
            None => s += " fs_files=0",
        }
        s + &format!(
            " port={} conns={} conns_total={} commands={}",
            self.port,
            self.conns_open.load(Ordering::Relaxed),
            self.conns_total.load(Ordering::Relaxed),
            self.commands.load(Ordering::Relaxed)
        )
    }

    /// The verify lines: LEDGER, then DISK (when a disk was asked for), then FS (same).
    pub fn verify(&self, self_test: bool) -> Vec<String> {
        let mut out = Vec::new();
        match &self.mem {
            Some(m) => out.push(if self_test { m.self_test() } else { m.verify() }),
            None => out.push("LEDGER OK pages=0 gen=0".into()),
        }
        match (&self.disk, &self.disk_missing) {
            (Some(d), _) => out.push(if self_test { d.self_test() } else { d.verify() }),
            (None, Some(why)) => out.push(format!("DISK BAD block=0 expected=0 found=0 reason=nodevice ({why})")),
            _ => {}
        }
        match (&self.files, &self.files_missing) {
            (Some(f), _) => out.push(if self_test { f.self_test() } else { f.verify() }),
            (None, Some(why)) => out.push(format!("FS BAD file=none expected=0 found=0 reason=nofs ({why})")),
            _ => {}
        }
        out
    }

    /// Runs one command line; answers through `out`. `poweroff` does not return as PID 1.
    pub fn command(&self, line: &str, conn: &mut Conn, out: &mut dyn FnMut(&str)) -> Next {
        let line = line.trim();
        let (cmd, arg) = line.split_once(char::is_whitespace).map(|(c, a)| (c, a.trim())).unwrap_or((line, ""));
        if cmd.is_empty() {
            return Next::Continue;
        }
        self.commands.fetch_add(1, Ordering::Relaxed);
        match cmd {
            "v" | "verify" => self.verify(false).iter().for_each(|l| out(l)),
            "c" | "selftest" => self.verify(true).iter().for_each(|l| out(l)),
            "s" | "status" => out(&self.status()),
            "ping" => out("PONG"),
            "echo" => out(&format!("ECHO {arg}")),
            "count" => {
                conn.count += 1;
                out(&format!("COUNT conn={} n={}", conn.id, conn.count));
            }
            "rate" => match (arg.parse::<u64>(), &self.mem) {
                (Ok(r), Some(m)) => {
                    m.rate.store(r, Ordering::Relaxed);
                    out(&format!("RATE mib_s={r}"));
                }
                (Ok(_), None) => out("ERROR rate: no memory region"),
                (Err(_), _) => out(&format!("ERROR rate: '{arg}' is not a number")),
            },
            "fsfreeze" | "fsthaw" => match &self.files {
                Some(f) => out(&f.freeze(cmd == "fsfreeze")),
                None => out("FS ERROR no file workload"),
            },
            "pause" | "resume" => {
                let on = cmd == "pause";
                self.mem.iter().for_each(|m| m.pause(on));
                self.disk.iter().for_each(|d| d.pause(on));
                self.files.iter().for_each(|f| f.pause(on));
                out(if on { "PAUSED" } else { "RESUMED" });
            }
            "sync" => {
                sys::sync_all();
                out("SYNC OK");
            }
            "bye" => {
                out("BYE");
                return Next::Close;
            }
            "q" | "poweroff" => self.power_off(conn.id != 0, out),
            _ => out(&format!("ERROR unknown command '{cmd}' (v verify c selftest s status ping echo count rate pause resume fsfreeze fsthaw sync bye poweroff)")),
        }
        Next::Continue
    }

    /// Stops every writer at a clean point, syncs, unmounts, then powers off (PID 1) or exits 0.
    fn power_off(&self, from_tcp: bool, out: &mut dyn FnMut(&str)) {
        if let Some(d) = &self.disk {
            d.stop();
        }
        let mut err = None;
        if let Some(f) = &self.files {
            err = f.stop();
        }
        sys::sync_all();
        let line = match &err {
            Some(e) => format!("AGENT POWEROFF warn={}", e.replace(' ', "_")),
            None => "AGENT POWEROFF".to_string(),
        };
        out(&line);
        if from_tcp {
            self.say(&line);
        }
        if sys::is_pid1() {
            let e = sys::power_off();
            self.say(&format!("AGENT ERROR poweroff: {e}"));
            loop {
                std::thread::park();
            }
        }
        std::process::exit(0);
    }
}
