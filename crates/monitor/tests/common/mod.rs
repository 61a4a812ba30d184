//! Test helpers: start the monitor against the mock VM on real sockets, and minimal raw HMP and
//! QMP clients. Every read has a generous timeout so a broken server fails a test instead of
//! hanging it; no test asserts on timing.
#![allow(dead_code)]

use monitor::mock::MockVm;
use monitor::{
    ChardevSpec, EventBus, ListenAddr, Monitor, MonitorServer, Protocol, RunState, ServeOptions,
};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh socket path under the temp dir.
pub fn sock_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("godwit-mon-{}-{tag}-{n}.sock", std::process::id()))
}

pub struct Vm {
    pub vm: Arc<MockVm>,
    pub monitor: Arc<Monitor>,
    pub events: EventBus,
}

pub fn mock_vm(state: RunState) -> Vm {
    let events = EventBus::new();
    let vm = MockVm::new(events.clone(), state, 2);
    let monitor = Monitor::new(vm.clone(), events.clone());
    Vm {
        vm,
        monitor,
        events,
    }
}

pub fn serve(vm: &Vm, spec: &str, proto: Protocol) -> MonitorServer {
    serve_with(vm, spec, proto, ServeOptions::default())
}

pub fn serve_with(vm: &Vm, spec: &str, proto: Protocol, opts: ServeOptions) -> MonitorServer {
    let spec = ChardevSpec::parse(spec).expect("spec");
    MonitorServer::start(vm.monitor.clone(), &spec, proto, opts).expect("server starts")
}

pub fn unix_spec(tag: &str) -> String {
    format!("unix:{},server,nowait", sock_path(tag).display())
}

/// A connected stream of either kind.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    pub fn connect(addr: &ListenAddr) -> Stream {
        let s = match addr {
            ListenAddr::Unix(p) => Stream::Unix(UnixStream::connect(p).expect("connect unix")),
            ListenAddr::Tcp(a) => Stream::Tcp(TcpStream::connect(a).expect("connect tcp")),
        };
        s.set_timeout(Some(IO_TIMEOUT));
        s
    }
    pub fn set_timeout(&self, t: Option<Duration>) {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t).unwrap(),
            Stream::Tcp(s) => s.set_read_timeout(t).unwrap(),
        }
    }
    pub fn try_clone(&self) -> Stream {
        match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone().unwrap()),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone().unwrap()),
        }
    }
    pub fn shutdown_write(&self) {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Write).unwrap(),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Write).unwrap(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A raw QMP client: sends JSON, reads `\r\n`-terminated replies, keeps events aside.
pub struct Qmp {
    pub w: Stream,
    pub r: BufReader<Stream>,
    pub events: VecDeque<Value>,
    pub greeting: Value,
}

impl Qmp {
    pub fn connect(addr: &ListenAddr) -> Qmp {
        let s = Stream::connect(addr);
        let mut q = Qmp {
            w: s.try_clone(),
            r: BufReader::new(s),
            events: VecDeque::new(),
            greeting: Value::Null,
        };
        q.greeting = q.read_msg().expect("greeting");
        q
    }

    /// Connects and negotiates.
    pub fn ready(addr: &ListenAddr) -> Qmp {
        let mut q = Qmp::connect(addr);
        assert_eq!(
            q.cmd(json!({"execute": "qmp_capabilities"})),
            json!({"return": {}})
        );
        q
    }

    /// Reads one message; `None` on EOF.
    pub fn read_msg(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("read from QMP server");
        if n == 0 {
            return None;
        }
        assert!(line.ends_with("\r\n"), "QMP lines end with CRLF: {line:?}");
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("server sent bad JSON {line:?}: {e}")),
        )
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).expect("send");
    }

    /// Reads until a non-event message arrives (events are queued).
    pub fn reply(&mut self) -> Value {
        loop {
            let m = self.read_msg().expect("reply before EOF");
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else {
                return m;
            }
        }
    }

    pub fn cmd(&mut self, v: Value) -> Value {
        self.send_raw(serde_json::to_string(&v).unwrap().as_bytes());
        self.reply()
    }

    /// `{"execute": name, "arguments": args}` → the `return` value (panics on error).
    pub fn ok(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(json!({"execute": name, "arguments": args}));
        r.get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{name} failed: {r}"))
    }

    /// → the `error` object (panics on success).
    pub fn err(&mut self, name: &str, args: Value) -> Value {
        let r = self.cmd(json!({"execute": name, "arguments": args}));
        r.get("error")
            .cloned()
            .unwrap_or_else(|| panic!("{name} unexpectedly succeeded: {r}"))
    }

    /// The next event (queued or read).
    pub fn event(&mut self) -> Value {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        let m = self.read_msg().expect("event before EOF");
        assert!(m.get("event").is_some(), "expected an event, got {m}");
        m
    }

    /// Waits for an event with this name, returning it (other events are skipped).
    pub fn wait_event(&mut self, name: &str) -> Value {
        loop {
            let e = self.event();
            if e["event"] == name {
                return e;
            }
        }
    }
}

/// A raw HMP client.
pub struct Hmp {
    pub w: Stream,
    pub r: Stream,
    pub banner: String,
}

pub const PROMPT: &str = "(qemu) ";

impl Hmp {
    pub fn connect(addr: &ListenAddr) -> Hmp {
        let s = Stream::connect(addr);
        let mut h = Hmp {
            w: s.try_clone(),
            r: s,
            banner: String::new(),
        };
        h.banner = h.until_prompt();
        h
    }

    /// Reads until the prompt; returns what came before it.
    pub fn until_prompt(&mut self) -> String {
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        while !got.ends_with(PROMPT.as_bytes()) {
            let n = self.r.read(&mut b).expect("read from HMP server");
            assert!(
                n > 0,
                "EOF before prompt; got {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&b[..n]);
        }
        got.truncate(got.len() - PROMPT.len());
        String::from_utf8(got).expect("utf8")
    }

    /// Runs one command; returns its output with `\r\n` turned into `\n`.
    pub fn cmd(&mut self, line: &str) -> String {
        self.w
            .write_all(format!("{line}\n").as_bytes())
            .expect("send");
        let out = self.until_prompt();
        assert!(
            !out.replace("\r\n", "").contains('\n'),
            "HMP output uses CRLF: {out:?}"
        );
        out.replace("\r\n", "\n")
    }
}
