//! `-daemonize` as QEMU does it: the process forks before doing anything; the parent waits on
//! a pipe and exits 0 only once the child says it is ready (its monitors listen, its pidfile
//! is written) — or 1 if the child died first, whose error went to the shared stderr. The
//! child leaves the session (setsid) and, once ready, points stdin/stdout/stderr at /dev/null.

use std::os::fd::RawFd;

/// The child's end of the readiness pipe.
pub struct Ready {
    fd: RawFd,
}

/// Forks; returns only in the child. Must run before any thread is started.
pub fn daemonize() -> Result<Ready, String> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("-daemonize: pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: no thread has been started yet, so the child is a faithful copy.
    match unsafe { libc::fork() } {
        -1 => Err(format!("-daemonize: fork: {}", std::io::Error::last_os_error())),
        0 => {
            // SAFETY: closing our copy of the read end; setsid in the new child.
            unsafe {
                libc::close(fds[0]);
                libc::setsid();
            }
            Ok(Ready { fd: fds[1] })
        }
        _ => {
            // SAFETY: the parent keeps only the read end.
            unsafe { libc::close(fds[1]) };
            let mut b = [0u8; 1];
            let n = loop {
                // SAFETY: reading one byte into `b`.
                let n = unsafe { libc::read(fds[0], b.as_mut_ptr().cast(), 1) };
                if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break n;
            };
            // The child reported ready (1 byte) or died (EOF): nothing else to do here.
            std::process::exit(if n == 1 { 0 } else { 1 })
        }
    }
}

impl Ready {
    /// Detaches stdio and lets the parent exit successfully.
    pub fn done(self) {
        // SAFETY: plain descriptor calls on descriptors this process owns.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
            if null >= 0 {
                for fd in 0..3 {
                    libc::dup2(null, fd);
                }
                if null > 2 {
                    libc::close(null);
                }
            }
            let b = [1u8];
            libc::write(self.fd, b.as_ptr().cast(), 1);
            libc::close(self.fd);
        }
    }
}
