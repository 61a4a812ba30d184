//! The serial console on the host side. Guest output goes to stdout (through QEMU-style
//! `mon:stdio` multiplexing with the monitor, `Ctrl-a c` to switch), a file, or nowhere; host
//! stdin goes into the UART's receive FIFO at the guest's pace. A terminal on stdin is put in
//! raw mode (as QEMU's `-nographic` does) and restored at exit.

use crate::cli::SerialTarget;
use devices::bus::lock;
use devices::serial::{Serial, SerialOut};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

/// The UART's writer; its target can be swapped once the stdio mux exists.
#[derive(Clone)]
pub struct ConsoleOut(Arc<Mutex<Box<dyn Write + Send>>>);

impl ConsoleOut {
    pub fn open(t: &SerialTarget) -> std::io::Result<Self> {
        let w: Box<dyn Write + Send> = match t {
            SerialTarget::Stdio => Box::new(StdoutRaw),
            SerialTarget::File(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
            SerialTarget::None => Box::new(std::io::sink()),
        };
        Ok(ConsoleOut(Arc::new(Mutex::new(w))))
    }
    pub fn redirect(&self, w: Box<dyn Write + Send>) {
        *lock(&self.0) = w;
    }
    pub fn boxed(&self) -> SerialOut {
        Box::new(self.clone())
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// Unbuffered stdout: every guest byte is visible at once (tests and users watch it live).
pub struct StdoutRaw;
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

/// Queues typed bytes into the UART, waiting while its FIFO is full.
pub fn feed_serial(serial: &Mutex<Serial>, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let took = lock(serial).enqueue(rest);
        rest = &rest[took..];
        if !rest.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Runs the stdio mux (serial + optional monitor) on its own thread until stdin ends. When the
/// serial port is not on stdio (`serial_on_stdio` false), its output stays where it was opened
/// and stdin is not fed to it.
pub fn spawn_stdio(
    serial: Arc<Mutex<Serial>>,
    out: &ConsoleOut,
    serial_on_stdio: bool,
    monitor: Option<Arc<monitor::Monitor>>,
    quit: Box<dyn FnMut() + Send>,
) -> std::io::Result<()> {
    let interactive = unsafe { libc::isatty(0) == 1 };
    let sink = move |b: &[u8]| {
        if serial_on_stdio {
            feed_serial(&serial, b)
        }
    };
    let mux = monitor::StdioMux::new(
        monitor,
        Box::new(sink),
        Box::new(StdoutRaw),
        quit,
        monitor::MuxOptions {
            echo: interactive,
            // The monitor has stdio to itself when the console went elsewhere.
            initial_focus: if serial_on_stdio { monitor::mux::Focus::Serial } else { monitor::mux::Focus::Monitor },
            ..Default::default()
        },
    )?;
    if serial_on_stdio {
        out.redirect(Box::new(mux.serial_output()));
    }
    std::thread::Builder::new().name("stdio".into()).spawn(move || {
        let _ = mux.run(&mut std::io::stdin());
    })?;
    Ok(())
}
