//! libvirt's probe of a binary, as libvirt 9.0 does it: `godwit -machine none -daemonize
//! -pidfile P -qmp unix:S,...` (the parent must exit only once the socket listens), then the
//! probe's QMP sequence, every answer's shape checked (errors only `CommandNotFound` /
//! `DeviceNotFound` where libvirt tolerates them), then `quit` and the daemon is gone. Also the
//! monitor libvirt passes to a guest: a listening socket inherited as `-chardev
//! socket,fd=N,server=on,wait=off` + `-mon chardev=..,mode=control`. No KVM needed: `-machine
//! none` runs no guest.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn godwit() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_godwit"))
}

/// These tests run one at a time: run concurrently in one process, a child spawned by one test
/// can inherit (between fork and exec) descriptors of another's sockets, and the monitor
/// connections then saw early EOFs about one run in five. Sequentially they are stable.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A scratch directory for one test, removed when the test ends.
fn tmpdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("godwit-test-{name}-")).tempdir().expect("scratch directory")
}

struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(T)).unwrap();
        let mut q = Qmp { w: s.try_clone().unwrap(), r: BufReader::new(s) };
        let g = q.read();
        assert!(g["QMP"]["version"]["qemu"]["major"].is_u64(), "greeting {g}");
        q
    }
    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON '{line}': {e}"))
    }
    /// Sends a command and returns its reply (events are skipped).
    fn cmd(&mut self, c: &Value) -> Value {
        writeln!(self.w, "{c}").unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

fn probe_sequence() -> Vec<Value> {
    let mut s: Vec<Value> = ["query-version", "query-target", "query-qmp-schema", "query-commands", "query-kvm", "qom-list-types"]
        .iter()
        .map(|c| json!({ "execute": c }))
        .collect();
    for d in [
        "virtio-blk-pci", "virtio-net-pci", "virtio-scsi-pci", "virtio-net-ccw", "virtio-scsi-ccw", "vfio-pci", "scsi-hd",
        "ide-hd", "PIIX4_PM", "usb-redir", "usb-storage", "kvm-pit", "VGA", "vmware-svga", "qxl", "virtio-gpu-pci",
        "virtio-gpu-device", "ICH9-LPC", "virtio-balloon-pci", "virtio-balloon-ccw", "virtio-balloon-device", "intel-iommu",
        "mch", "nvdimm", "pcie-root-port", "usb-host", "vhost-user-fs-device", "virtio-mem-pci", "virtio-iommu-pci",
        // and the ones Godwit has
        "virtio-blk-device", "virtio-net-device", "isa-serial",
    ] {
        s.push(json!({ "execute": "device-list-properties", "arguments": { "typename": d } }));
    }
    for t in ["memory-backend-file", "memory-backend-memfd", "max-x86_64-cpu"] {
        s.push(json!({ "execute": "qom-list-properties", "arguments": { "typename": t } }));
    }
    s.push(json!({ "execute": "query-machines" }));
    s.push(json!({ "execute": "qom-list-properties", "arguments": { "typename": "none-machine" } }));
    for c in ["query-cpu-definitions", "query-tpm-models", "query-tpm-types", "query-command-line-options",
              "query-migrate-capabilities", "query-sev-capabilities", "query-sgx-capabilities"] {
        s.push(json!({ "execute": c }));
    }
    s.push(json!({"execute":"query-cpu-model-expansion","arguments":{"type":"static","model":{"name":"host"}}}));
    s.push(json!({"execute":"query-cpu-model-expansion","arguments":{"type":"static","model":{"name":"host","props":{"migratable":false}}}}));
    s.push(json!({"execute":"query-cpu-model-expansion","arguments":{"type":"full","model":{"name":"host","props":{"migratable":false,"hv-passthrough":true}}}}));
    s
}

fn names(v: &Value) -> Vec<String> {
    v.as_array().expect("an array").iter().map(|e| e["name"].as_str().expect("named").to_string()).collect()
}

/// Checks one reply the way libvirt reads it; returns the `return` value.
fn check(cmd: &Value, reply: &Value) -> Value {
    let name = cmd["execute"].as_str().unwrap();
    if let Some(err) = reply.get("error") {
        let class = err["class"].as_str().unwrap();
        let tolerated = match name {
            "device-list-properties" => class == "DeviceNotFound",
            "query-tpm-models" | "query-tpm-types" | "query-sev-capabilities" | "query-sgx-capabilities" => class == "CommandNotFound",
            _ => false,
        };
        assert!(tolerated, "{cmd} -> {reply}: libvirt would give up on this binary");
        return Value::Null;
    }
    let r = reply.get("return").unwrap_or_else(|| panic!("{cmd} -> {reply}")).clone();
    match name {
        "query-version" => {
            let q = &r["qemu"];
            let v = (q["major"].as_u64().unwrap(), q["minor"].as_u64().unwrap());
            assert!(v >= (4, 2), "libvirt 9.0 needs >= 4.2: {r}");
            assert!(r["package"].as_str().unwrap().contains("godwit"));
        }
        "query-target" => assert_eq!(r["arch"], "x86_64"),
        "query-kvm" => assert!(r["enabled"].is_boolean() && r["present"].is_boolean(), "{r}"),
        "qom-list-types" => assert!(names(&r).contains(&"virtio-mmio".to_string()), "{r}"),
        "query-machines" => {
            let m = r.as_array().unwrap().iter().find(|m| m["name"] == "microvm").expect("microvm");
            assert!(m["cpu-max"].as_u64().unwrap() >= 1 && m["default-ram-id"].is_string(), "{m}");
        }
        "query-cpu-definitions" => assert!(names(&r).contains(&"host".to_string())),
        "query-command-line-options" => {
            for o in r.as_array().unwrap() {
                assert!(o["option"].is_string() && o["parameters"].is_array(), "{o}");
            }
        }
        "query-migrate-capabilities" => {
            let caps = r.as_array().unwrap();
            assert!(caps.iter().all(|c| c["capability"].is_string() && c["state"].is_boolean()));
            assert!(caps.iter().any(|c| c["capability"] == "events"), "{r}");
        }
        "query-cpu-model-expansion" => assert_eq!(r["model"]["name"], "host"),
        "device-list-properties" | "qom-list-properties" => {
            assert!(r.as_array().unwrap().iter().all(|p| p["name"].is_string() && p["type"].is_string()), "{r}")
        }
        _ => {}
    }
    r
}

fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn libvirt_probe_sequence_over_a_daemonized_machine_none() {
    let _serial = serial();
    let dir = tmpdir("libvirt-probe");
    let (sock, pidfile) = (dir.path().join("qmp.monitor"), dir.path().join("qmp.pid"));
    let out = Command::new(godwit())
        .args(["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .arg("-pidfile")
        .arg(&pidfile)
        .arg("-daemonize")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "parent: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr));
    // The parent has exited: the socket must listen and the pidfile name the daemon now.
    let pid: i32 = std::fs::read_to_string(&pidfile).expect("pidfile").trim().parse().expect("a pid");
    assert!(!gone(pid), "the daemon {pid} is running");
    let mut q = Qmp::connect(&sock);
    check(&json!({"execute": "qmp_capabilities"}), &q.cmd(&json!({"execute": "qmp_capabilities"})));
    let mut schema = Value::Null;
    let mut commands = Vec::new();
    let mut types = Vec::new();
    for c in probe_sequence() {
        let r = check(&c, &q.cmd(&c));
        match c["execute"].as_str().unwrap() {
            "query-qmp-schema" => schema = r,
            "query-commands" => commands = names(&r),
            "qom-list-types" => types = names(&r),
            _ => {}
        }
    }
    // The schema names every entry and has a command entry for every command answered.
    let entries = schema.as_array().expect("schema");
    assert!(entries.iter().all(|e| e["name"].is_string() && e["meta-type"].is_string()));
    for c in &commands {
        assert!(entries.iter().any(|e| e["name"] == c.as_str() && e["meta-type"] == "command"), "{c} not in the schema");
    }
    assert!(commands.iter().any(|c| c == "query-machines") && !commands.iter().any(|c| c == "query-tpm-models"));
    // SEV/SGX probes happen only for listed types: none listed.
    assert!(!types.iter().any(|t| t.starts_with("sev") || t.starts_with("sgx")));
    let st = check(&json!({"execute": "query-status"}), &q.cmd(&json!({"execute": "query-status"})));
    assert_eq!(st["status"], "prelaunch");
    assert_eq!(q.cmd(&json!({"execute": "quit"})), json!({"return": {}}));
    let t0 = Instant::now();
    while !gone(pid) {
        assert!(t0.elapsed() < T, "the daemon {pid} did not exit after quit");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pidfile.exists(), "the pidfile is removed at exit");
}

#[test]
fn daemonize_failure_is_reported_by_the_parent() {
    let _serial = serial();
    let dir = tmpdir("libvirt-probe-fail");
    // The socket's directory does not exist: the child cannot listen, the parent fails.
    let out = Command::new(godwit())
        .args(["-machine", "none", "-daemonize", "-qmp"])
        .arg(format!("unix:{}/no/such/dir/s,server,nowait", dir.path().display()))
        .arg("-pidfile")
        .arg(dir.path().join("p"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-qmp"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!dir.path().join("p").exists());
}

#[test]
fn inherited_listening_socket_serves_qmp() {
    let _serial = serial();
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tmpdir("libvirt-mon-fd");
    let path = dir.path().join("monitor.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(godwit());
    cmd.args(["-S", "-machine", "none", "-chardev", "socket,id=charmonitor,fd=17,server=on,wait=off"])
        .args(["-mon", "chardev=charmonitor,id=monitor,mode=control"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 in the child between fork and exec: the listener becomes descriptor 17.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it explicitly in that case.
            if fd == 17 {
                if libc::fcntl(17, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 17) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener); // the child holds the only copy now
    let mut q = Qmp::connect(&path);
    assert_eq!(q.cmd(&json!({"execute": "qmp_capabilities"})), json!({"return": {}}));
    assert_eq!(q.cmd(&json!({"execute": "query-status"}))["return"]["status"], "prelaunch");
    assert_eq!(q.cmd(&json!({"execute": "cont"})), json!({"return": {}}));
    assert_eq!(q.cmd(&json!({"execute": "query-status"}))["return"]["status"], "running");
    assert_eq!(q.cmd(&json!({"execute": "quit"})), json!({"return": {}}));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < T, "godwit did not exit after quit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(path.exists(), "the inherited socket's file belongs to the parent and stays");
}

#[test]
fn bad_monitor_descriptors_and_machines_are_refused() {
    let _serial = serial();
    let run = |args: &[&str]| {
        let out = Command::new(godwit()).args(args).stdin(Stdio::null()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&["-machine", "none", "-chardev", "socket,id=m,fd=42,server=on,wait=off", "-mon", "chardev=m,mode=control"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("fd=42") && err.contains("not a socket"), "{err}");
    let (code, err) = run(&["-machine", "pc", "-kernel", "x"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("microvm"), "{err}");
    let (code, err) = run(&["-machine", "none", "-kernel", "x", "-qmp", "unix:/tmp/x,server,nowait"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no guest"), "{err}");
}
