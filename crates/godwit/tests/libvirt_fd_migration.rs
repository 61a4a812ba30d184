//! Migration the way libvirt hands the connection over: the management process connects to the
//! destination itself, passes the socket over the QMP unix socket with SCM_RIGHTS (`getfd
//! migrate`), then `migrate {"uri": "fd:migrate"}`. The guest's ledger is checked on the
//! destination. Also: `fd:` with no such name and `getfd` without a descriptor are errors.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &std::path::Path) -> Qmp {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let mut q = Qmp { w: s.try_clone().unwrap(), r: BufReader::new(s) };
        q.reply();
        q
    }
    fn reply(&mut self) -> Value {
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON '{line}': {e}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    }
    fn cmd(&mut self, c: Value) -> Value {
        writeln!(self.w, "{c}").unwrap();
        self.reply()
    }
    /// Sends `c` with descriptor `fd` attached (SCM_RIGHTS), as libvirt's `getfd`.
    fn cmd_with_fd(&mut self, c: Value, fd: i32) -> Value {
        let mut text = format!("{c}\n").into_bytes();
        let mut iov = libc::iovec { iov_base: text.as_mut_ptr().cast(), iov_len: text.len() };
        let mut cmsg = [0u64; 4];
        // SAFETY: one SCM_RIGHTS message built in buffers that outlive sendmsg.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let h = libc::CMSG_FIRSTHDR(&msg);
            (*h).cmsg_level = libc::SOL_SOCKET;
            (*h).cmsg_type = libc::SCM_RIGHTS;
            (*h).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(h) as *mut i32, fd);
            libc::sendmsg(self.w.as_raw_fd(), &msg, 0)
        };
        assert_eq!(n, text.len() as isize, "sendmsg");
        self.reply()
    }
}

#[test]
fn migrate_over_a_socket_passed_with_getfd() {
    let dir = tmpdir("libvirt-fd-mig");
    let sock = dir.join("src.qmp");
    let append = "mode=dirty mib=16 rate=10 hb_ms=50";
    let port = free_port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let mut dst = Vm::guest(&["-m", "128", "-incoming", &incoming], append);
    dst.wait_stderr("waiting for an incoming migration", T);
    let spec = format!("unix:{},server,nowait", sock.display());
    let mut src = Vm::guest(&["-m", "128", "-qmp", &spec], append);
    src.wait_for("GUEST READY", T);
    src.wait_for("HEARTBEAT", T);
    let mut q = Qmp::connect(&sock);
    assert_eq!(q.cmd(json!({"execute": "qmp_capabilities"})), json!({"return": {}}));
    let e = q.cmd(json!({"execute": "getfd", "arguments": {"fdname": "migrate"}}));
    assert!(e["error"]["desc"].as_str().unwrap().contains("SCM_RIGHTS"), "{e}");
    let e = q.cmd(json!({"execute": "migrate", "arguments": {"uri": "fd:nope"}}));
    assert!(e["error"]["desc"].as_str().unwrap().contains("nope"), "{e}");
    // libvirt connects to the destination itself and hands the socket over.
    let conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let r = q.cmd_with_fd(json!({"execute": "getfd", "arguments": {"fdname": "migrate"}}), conn.as_raw_fd());
    assert_eq!(r, json!({"return": {}}));
    drop(conn);
    let r = q.cmd(json!({"execute": "migrate", "arguments": {"uri": "fd:migrate"}}));
    assert_eq!(r, json!({"return": {}}));
    let t0 = Instant::now();
    loop {
        let m = q.cmd(json!({"execute": "query-migrate"}));
        match m["return"]["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => panic!("migration ended: {m}"),
            _ => {}
        }
        assert!(t0.elapsed() < T, "migration did not complete: {m}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(q.cmd(json!({"execute": "query-status"}))["return"]["status"], "postmigrate");
    src.collect_for(Duration::from_millis(300));
    let first = dst.wait_for("HEARTBEAT", T);
    assert_seq_continues(&src.seen, &dst.seen, &first);
    dst.send(b"v");
    dst.wait_for("LEDGER OK", T);
    dst.send(b"q");
    assert_eq!(dst.wait_exit(T), Some(0));
    // The source may already have ended after the completed migration; quit it otherwise.
    let _ = writeln!(q.w, "{}", json!({"execute": "quit"}));
    assert!(src.wait_exit(T).is_some(), "the source ends");
}
