//! The serial console on the host side: guest output to stdout (or a file, or nowhere), host
//! stdin into the UART's receive FIFO. A terminal on stdin is put in raw mode (as QEMU's
//! `-nographic` does) and restored at exit.

use crate::cli::SerialTarget;
use devices::bus::lock;
use devices::serial::{Serial, SerialOut};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// Opens the writer the UART sends guest output to.
pub fn serial_output(t: &SerialTarget) -> std::io::Result<SerialOut> {
    Ok(match t {
        SerialTarget::Stdio => Box::new(StdoutRaw),
        SerialTarget::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        SerialTarget::None => Box::new(std::io::sink()),
    })
}

/// Unbuffered stdout: every guest byte is visible at once (tests and users watch it live).
struct StdoutRaw;
impl Write for StdoutRaw {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut out = std::io::stdout().lock();
        out.write_all(b)?;
        if b.contains(&b'\n') {
            out.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

/// Puts a terminal stdin into raw mode; [`restore_terminal`] undoes it.
pub fn raw_terminal() {
    // SAFETY: plain termios calls on fd 0 with a zeroed struct filled by tcgetattr.
    unsafe {
        if libc::isatty(0) != 1 {
            return;
        }
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) != 0 {
            return;
        }
        let _ = SAVED_TERMIOS.set(t);
        let mut raw = t;
        libc::cfmakeraw(&mut raw);
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        libc::tcsetattr(0, libc::TCSANOW, &raw);
    }
}

pub fn restore_terminal() {
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: restoring the attributes read earlier.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
    }
}

/// Feeds stdin into the UART, waiting when its FIFO is full. Ends at EOF.
pub fn spawn_stdin_feeder(serial: Arc<Mutex<Serial>>) {
    let _ = std::thread::Builder::new().name("stdin".into()).spawn(move || {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let took = lock(&serial).enqueue(rest);
                rest = &rest[took..];
                if !rest.is_empty() {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    });
}
