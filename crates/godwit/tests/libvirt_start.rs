//! A domain started the way libvirt 9.0 starts a microvm domain: the command line of
//! `../shared/libvirt-argv-example.txt` (paths adapted, the test guest as the kernel, no
//! `-netdev user`, which Godwit does not have), the monitor as an inherited listening socket
//! (`-chardev socket,fd=17`), the serial port on a pty. Then libvirt's start-up QMP:
//! capabilities, `query-chardev` (the pty), `query-cpus-fast` (real vCPU thread ids),
//! `qom-list /machine/peripheral`, `query-named-block-nodes`/`query-block` (libvirt's node
//! names), `cont` — and the guest boots and runs its disk workload on the qcow2 image.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &std::path::Path) -> Qmp {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut q = Qmp { w: s.try_clone().unwrap(), r: BufReader::new(s), events: Vec::new() };
        q.read();
        q
    }
    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON '{line}': {e}"))
    }
    fn ok(&mut self, execute: &str, arguments: Value) -> Value {
        writeln!(self.w, "{}", json!({ "execute": execute, "arguments": arguments })).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.events.push(v);
                continue;
            }
            return v.get("return").cloned().unwrap_or_else(|| panic!("{execute}: {v}"));
        }
    }
}

/// Lines read from a pty slave.
fn pty_lines(path: &str) -> (std::fs::File, Receiver<String>) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let r = f.try_clone().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            match l {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    (f, rx)
}

fn wait_line(rx: &Receiver<String>, pat: &str) -> String {
    let t0 = Instant::now();
    loop {
        let left = T.checked_sub(t0.elapsed()).unwrap_or_else(|| panic!("no {pat:?} on the serial pty"));
        let l = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no {pat:?} on the serial pty"));
        if l.contains(pat) {
            return l;
        }
    }
}

#[test]
fn libvirt_command_line_boots_and_answers_start_up_qmp() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    require_kvm();
    let dir = tmpdir("libvirt-start");
    let img = dir.join("disk.qcow2");
    create_image(&img, "qcow2", "16M");
    let key = dir.join("master-key.aes");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let sock = dir.join("monitor.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let lfd = listener.as_raw_fd();
    let guest = guest_bin();
    let secret = json!({"qom-type":"secret","id":"masterKey0","format":"raw","file": key}).to_string();
    let file_node = json!({"driver":"file","filename": img,"node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}).to_string();
    let args: Vec<String> = [
        "-name", "guest=mvm,debug-threads=on", "-S", "-object", &secret,
        "-machine", "microvm,usb=off,dump-guest-core=off,memory-backend=microvm.ram", "-accel", "kvm",
        "-cpu", "host,migratable=on", "-m", "256",
        "-object", r#"{"qom-type":"memory-backend-ram","id":"microvm.ram","size":268435456}"#,
        "-overcommit", "mem-lock=off", "-smp", "1,sockets=1,cores=1,threads=1",
        "-uuid", "9ccfd1c8-7455-4ccb-b910-d96707fca7fb", "-display", "none", "-no-user-config", "-nodefaults",
        "-chardev", "socket,id=charmonitor,fd=17,server=on,wait=off", "-mon", "chardev=charmonitor,id=monitor,mode=control",
        "-rtc", "base=utc", "-no-shutdown", "-no-acpi", "-boot", "strict=on",
        "-kernel", guest.to_str().unwrap(), "-append", "mode=dirty mib=8 rate=5 disk=on disk_mib=2 hb_ms=100 cpus=1",
        "-blockdev", &file_node,
        "-blockdev", r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":null}"#,
        "-device", r#"{"driver":"virtio-blk-device","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}"#,
        "-chardev", "pty,id=charserial0",
        "-device", r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
        "-audiodev", r#"{"id":"audio1","driver":"none"}"#, "-msg", "timestamp=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut cmd = Command::new(godwit_bin());
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: dup2 between fork and exec: the listening monitor socket becomes fd 17.
    unsafe {
        cmd.pre_exec(move || if libc::dup2(lfd, 17) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let (etx, erx) = channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = etx.send(l);
        }
    });
    let line = wait_line(&erx, "char device redirected to");
    let pts = line.split_whitespace().nth(4).expect("the pty path").to_string();
    assert!(line.ends_with("(label charserial0)"), "{line}");
    let (mut serial, lines) = pty_lines(&pts);

    let mut q = Qmp::connect(&sock);
    q.ok("qmp_capabilities", json!({}));
    let caps = q.ok("query-migrate-capabilities", json!({}));
    assert!(caps.as_array().unwrap().iter().any(|c| c["capability"] == "events"));
    q.ok("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}));
    let chardevs = q.ok("query-chardev", json!({}));
    let serial_dev = chardevs.as_array().unwrap().iter().find(|c| c["label"] == "charserial0").expect("charserial0");
    assert_eq!(serial_dev["filename"], format!("pty:{pts}"));
    assert!(chardevs.as_array().unwrap().iter().any(|c| c["label"] == "charmonitor"));
    let cpus = q.ok("query-cpus-fast", json!({}));
    let cpus = cpus.as_array().unwrap();
    assert_eq!(cpus.len(), 1);
    let tid = cpus[0]["thread-id"].as_i64().unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{}/task/{tid}/comm", child.id()))
        .unwrap_or_else(|e| panic!("thread-id {tid} is no thread of godwit: {e}"));
    assert_eq!(comm.trim(), "vcpu0");
    assert!(cpus[0]["qom-path"].as_str().unwrap().starts_with("/machine/"));
    let periph = q.ok("qom-list", json!({"path": "/machine/peripheral"}));
    for id in ["virtio-disk0", "serial0"] {
        assert!(periph.as_array().unwrap().iter().any(|p| p["name"] == id), "{id} in {periph}");
    }
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert!(nodes.as_array().unwrap().iter().any(|n| n["node-name"] == "libvirt-1-format" && n["drv"] == "qcow2"), "{nodes}");
    let block = q.ok("query-block", json!({}));
    let disk = &block.as_array().unwrap()[0];
    assert_eq!(disk["inserted"]["node-name"], "libvirt-1-format", "{block}");
    assert_eq!(q.ok("query-status", json!({}))["status"], "prelaunch");
    q.ok("cont", json!({}));
    wait_line(&lines, "GUEST READY");
    wait_line(&lines, "HEARTBEAT");
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    assert!(q.events.iter().any(|e| e["event"] == "RESUME"), "{:?}", q.events);
    serial.write_all(b"v").unwrap();
    wait_line(&lines, "LEDGER OK");
    wait_line(&lines, "DISK OK");
    q.ok("quit", json!({}));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < T, "godwit did not exit after quit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    let (code, out) = qemu_img_check(&img);
    assert_eq!(code, 0, "{out}");
}
