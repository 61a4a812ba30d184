//! Puts a terminal into the raw-ish mode QEMU uses for a stdio console: no line buffering, no
//! echo, no signals from `Ctrl-C` (it goes to the guest), no CR/LF translation on input; output
//! processing stays on so `\n` still returns the carriage. Restored when the guard drops.

use std::io;
use std::os::unix::io::RawFd;

/// Restores the terminal's original settings on drop.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Switches `fd` (usually 0) to raw mode. `Ok(None)` when `fd` is not a terminal (a pipe or
    /// file), in which case nothing changes.
    pub fn enable(fd: RawFd) -> io::Result<Option<RawTerminal>> {
        // SAFETY: isatty/tcgetattr/tcsetattr only read or write the termios struct we own.
        unsafe {
            if libc::isatty(fd) != 1 {
                return Ok(None);
            }
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut raw = saved;
            raw.c_iflag &= !(libc::IGNBRK
                | libc::BRKINT
                | libc::PARMRK
                | libc::ISTRIP
                | libc::INLCR
                | libc::IGNCR
                | libc::ICRNL
                | libc::IXON);
            raw.c_oflag |= libc::OPOST;
            raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN | libc::ISIG);
            raw.c_cflag &= !(libc::CSIZE | libc::PARENB);
            raw.c_cflag |= libc::CS8;
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Some(RawTerminal { fd, saved }))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enable` on the same descriptor.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}
