//! Facts about the process the VMM registers at start-up and QMP reports as they are:
//! the character devices (`query-chardev`: a serial pty's path, the monitor sockets) and the
//! user-named devices under `/machine/peripheral` (`qom-list`, as libvirt reads device
//! aliases) — and the descriptors clients pass over a unix monitor socket with SCM_RIGHTS,
//! which `getfd NAME` names and `migrate fd:NAME` (or `closefd`) takes. One VM per process,
//! so these tables are process-wide; a descriptor received but not yet named is replaced
//! (and closed) by the next one received.

use crate::error::{CommandError, ErrorClass};
use crate::qmp::commands::Args;
use serde_json::{json, Map, Value};
use std::sync::Mutex;

/// The commands this module answers.
pub const COMMANDS: &[&str] = &["query-chardev", "qom-list", "getfd", "closefd"];

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

static RECEIVED: Mutex<Option<OwnedFd>> = Mutex::new(None);
static NAMED: Mutex<Vec<(String, OwnedFd)>> = Mutex::new(Vec::new());

/// A unix monitor connection whose reads also collect descriptors sent with SCM_RIGHTS.
pub struct FdConn(pub std::os::unix::net::UnixStream);

impl std::io::Read for FdConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut cmsg = [0u64; 16]; // room for a few descriptors, aligned
        // SAFETY: msghdr zeroed then pointed at buffers that outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg) as _;
        // SAFETY: recvmsg on our socket with the buffers above.
        let n = unsafe { libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: walking the control messages the kernel wrote into `cmsg`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        let fd = OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i)));
                        *RECEIVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(n as usize)
    }
}

impl std::io::Write for FdConn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Takes the descriptor `getfd` named `name` (for `migrate fd:NAME`).
pub fn take_fd(name: &str) -> Option<OwnedFd> {
    let mut n = NAMED.lock().unwrap_or_else(|p| p.into_inner());
    let i = n.iter().position(|(k, _)| k == name)?;
    Some(n.remove(i).1)
}

fn getfd(name: String) -> Result<Value, CommandError> {
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(CommandError::generic("Parameter 'fdname' may not start with a digit"));
    }
    let fd = RECEIVED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| CommandError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
    let mut n = NAMED.lock().unwrap_or_else(|p| p.into_inner());
    n.retain(|(k, _)| *k != name); // the earlier one is closed
    n.push((name, fd));
    Ok(json!({}))
}

fn closefd(name: &str) -> Result<Value, CommandError> {
    take_fd(name).map(|_| json!({})).ok_or_else(|| CommandError::generic(format!("File descriptor named '{name}' not found")))
}

static CHARDEVS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static PERIPHERALS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Records a chardev: its label (`-chardev id=`) and QEMU-style filename (`pty:/dev/pts/3`,
/// `unix:/path,server=on`). A label registered again replaces the earlier entry.
pub fn register_chardev(label: &str, filename: &str) {
    let mut c = CHARDEVS.lock().unwrap_or_else(|p| p.into_inner());
    c.retain(|(l, _)| l != label);
    c.push((label.to_string(), filename.to_string()));
}

/// Records a device with a user-given id (`-device ...,id=ID`) and its QOM type.
pub fn register_peripheral(id: &str, type_name: &str) {
    let mut p = PERIPHERALS.lock().unwrap_or_else(|p| p.into_inner());
    p.retain(|(i, _)| i != id);
    p.push((id.to_string(), type_name.to_string()));
}

/// Answers `name` if it is one of [`COMMANDS`].
pub fn handle(name: &str, args: &Map<String, Value>) -> Option<Result<Value, CommandError>> {
    let mut a = Args::new(args);
    Some(match name {
        "query-chardev" => a.finish().map(|_| {
            let c = CHARDEVS.lock().unwrap_or_else(|p| p.into_inner());
            Value::Array(c.iter().map(|(l, f)| json!({ "label": l, "filename": f, "frontend-open": true })).collect())
        }),
        "getfd" => a.str("fdname").and_then(|n| a.finish().map(|_| n)).and_then(getfd),
        "closefd" => a.str("fdname").and_then(|n| a.finish().map(|_| n)).and_then(|n| closefd(&n)),
        "qom-list" => a.str("path").and_then(|p| a.finish().map(|_| p)).and_then(|path| qom_list(&path)),
        _ => return None,
    })
}

fn qom_list(path: &str) -> Result<Value, CommandError> {
    let path = path.trim_end_matches('/');
    let p = PERIPHERALS.lock().unwrap_or_else(|p| p.into_inner());
    if path == "/machine/peripheral" {
        return Ok(Value::Array(
            std::iter::once(json!({ "name": "type", "type": "string" }))
                .chain(p.iter().map(|(id, t)| json!({ "name": id, "type": format!("child<{t}>") })))
                .collect(),
        ));
    }
    if let Some(id) = path.strip_prefix("/machine/peripheral/") {
        if p.iter().any(|(i, _)| i == id) {
            return Ok(json!([{ "name": "type", "type": "string" }, { "name": "realized", "type": "bool" }]));
        }
    }
    Err(CommandError::new(ErrorClass::DeviceNotFound, format!("Device '{path}' not found")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: Value) -> Result<Value, CommandError> {
        handle(name, args.as_object().unwrap()).unwrap()
    }

    #[test]
    fn chardevs_and_peripherals_are_reported_as_registered() {
        register_chardev("charserial0", "pty:/dev/pts/7");
        register_chardev("charserial0", "pty:/dev/pts/8");
        let c = call("query-chardev", json!({})).unwrap();
        let serial: Vec<&Value> = c.as_array().unwrap().iter().filter(|v| v["label"] == "charserial0").collect();
        assert_eq!(serial.len(), 1);
        assert_eq!(serial[0]["filename"], "pty:/dev/pts/8");
        register_peripheral("virtio-disk0", "virtio-blk-device");
        let l = call("qom-list", json!({ "path": "/machine/peripheral" })).unwrap();
        assert!(l.as_array().unwrap().iter().any(|v| v["name"] == "virtio-disk0" && v["type"] == "child<virtio-blk-device>"));
        assert!(call("qom-list", json!({ "path": "/machine/peripheral/virtio-disk0" })).is_ok());
        assert_eq!(call("qom-list", json!({ "path": "/machine/nope" })).unwrap_err().class, ErrorClass::DeviceNotFound);
        assert!(call("qom-list", json!({})).is_err());
        assert!(call("query-chardev", json!({ "x": 1 })).is_err());
        assert!(handle("query-status", &Map::new()).is_none());
    }

    #[test]
    fn descriptors_sent_with_scm_rights_are_named_by_getfd() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(call("getfd", json!({ "fdname": "m" })).unwrap_err().desc.contains("SCM_RIGHTS"));
        let (p0, _p1) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = p0.as_raw_fd();
        let mut byte = *b"x";
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut cmsg = [0u64; 4];
        // SAFETY: building one SCM_RIGHTS message in buffers that outlive sendmsg.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd);
            assert_eq!(libc::sendmsg(a.as_raw_fd(), &msg, 0), 1);
        }
        let mut conn = FdConn(b);
        let mut buf = [0u8; 4];
        assert_eq!(conn.read(&mut buf).unwrap(), 1);
        assert!(call("getfd", json!({ "fdname": "1x" })).is_err());
        assert_eq!(call("getfd", json!({ "fdname": "migrate" })).unwrap(), json!({}));
        let got = take_fd("migrate").expect("named descriptor");
        assert_ne!(got.as_raw_fd(), fd, "a new descriptor for the same socket");
        assert!(take_fd("migrate").is_none());
        assert!(call("closefd", json!({ "fdname": "migrate" })).is_err());
    }
}
