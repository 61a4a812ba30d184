//! The serial port on a pseudo-terminal (`-chardev pty,id=ID` + `-device isa-serial,chardev=ID`,
//! as libvirt starts a domain): Godwit holds the master, whoever opens the slave
//! (`virsh console`, a test) talks to the guest. The pty is raw (no echo, no line editing).
//! Output nobody reads is dropped once the pty's buffer is full, so a guest never blocks on an
//! unwatched console. The path is printed on stderr and reported by `query-chardev`.

use crate::console::{feed_serial, ConsoleOut};
use devices::serial::Serial;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

struct Master(Arc<OwnedFd>);

impl Write for Master {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writing from a valid buffer to our descriptor.
        let n = unsafe { libc::write(self.0.as_raw_fd(), b.as_ptr().cast(), b.len()) };
        if n < 0 {
            // No reader (EAGAIN: the buffer is full; EIO: the slave was never opened or closed):
            // the bytes are dropped, as a console nobody watches.
            return Ok(b.len());
        }
        Ok(n as usize)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn open_master() -> std::io::Result<(OwnedFd, String)> {
    let err = std::io::Error::last_os_error;
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(err());
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: pty calls on our master; ptsname_r writes at most buf.len() bytes.
    unsafe {
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 || libc::ptsname_r(fd, buf.as_mut_ptr(), buf.len()) != 0 {
            return Err(err());
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
    // SAFETY: ptsname_r wrote a NUL-terminated string.
    let path = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
    Ok((master, path))
}

/// Opens the pty, sends the serial output there and its input to the UART; returns the
/// slave's path.
pub fn attach(label: &str, out: &ConsoleOut, serial: Arc<Mutex<Serial>>) -> Result<String, String> {
    let (master, path) = open_master().map_err(|e| format!("-chardev pty,id={label}: {e}"))?;
    let master = Arc::new(master);
    out.redirect(Box::new(Master(master.clone())));
    let reader = master.clone();
    std::thread::Builder::new()
        .name("serial-pty".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                let mut pfd = libc::pollfd { fd: reader.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: polling one descriptor we own.
                let r = unsafe { libc::poll(&mut pfd, 1, 200) };
                if r <= 0 || pfd.revents & libc::POLLIN == 0 {
                    if pfd.revents & libc::POLLHUP != 0 {
                        // No one has the slave open: wait for a client.
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                    continue;
                }
                // SAFETY: reading into `buf` from our descriptor.
                let n = unsafe { libc::read(reader.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    feed_serial(&serial, &buf[..n as usize]);
                } else {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        })
        .map_err(|e| format!("-chardev pty,id={label}: {e}"))?;
    eprintln!("char device redirected to {path} (label {label})");
    monitor::hostinfo::register_chardev(label, &format!("pty:{path}"));
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_pty_passes_bytes_both_ways() {
        let (master, path) = open_master().unwrap();
        let mut m = Master(Arc::new(master));
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        m.write_all(b"hello\n").unwrap();
        let mut buf = [0u8; 16];
        // SAFETY: reading into buf.
        let n = unsafe { libc::read(slave.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        assert_eq!(&buf[..n as usize], b"hello\n", "raw: no CR added");
        // Nothing echoes back into the master.
        let mut b2 = [0u8; 16];
        // SAFETY: non-blocking read from our master.
        let r = unsafe { libc::read(m.0.as_raw_fd(), b2.as_mut_ptr().cast(), b2.len()) };
        assert!(r <= 0, "echo came back");
    }
}
