//! The stdio multiplexer (QEMU's `mon:stdio` / `-nographic` console): one terminal shared by
//! the guest's serial port and the HMP monitor. Input goes to whichever has the focus;
//! `Ctrl-a c` switches it, `Ctrl-a x` quits, `Ctrl-a h` prints help, `Ctrl-a b` sends a break,
//! `Ctrl-a Ctrl-a` sends a literal `Ctrl-a`. Output of both is merged through one
//! [`MuxWriter`].
//!
//! The VMM wires it like this: the UART's output writer is [`StdioMux::serial_output`]; the
//! bytes typed for the guest arrive at the [`SerialSink`] given to [`StdioMux::new`] (the VMM
//! queues them into the UART's receive FIFO at the guest's pace); [`StdioMux::run`] reads
//! stdin on the calling thread. Monitor commands run on a thread of their own, so a long
//! command (a foreground `migrate`) never stalls the serial console.

use crate::hmp::{self, HmpSession, LineEditor, LineEvent};
use crate::monitor::Monitor;
use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// `Ctrl-a`, the escape key.
pub const ESCAPE: u8 = 0x01;

/// Receives the bytes typed for the guest's serial port.
pub trait SerialSink: Send {
    fn input(&mut self, bytes: &[u8]);
    /// `Ctrl-a b`: a break condition on the line (magic SysRq for Linux guests).
    fn send_break(&mut self) {}
}

impl<F: FnMut(&[u8]) + Send> SerialSink for F {
    fn input(&mut self, bytes: &[u8]) {
        self(bytes)
    }
}

/// The merged output (stdout). Cloneable; every clone writes to the same place, one write at a
/// time.
#[derive(Clone)]
pub struct MuxWriter {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
}

impl MuxWriter {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        MuxWriter {
            out: Arc::new(Mutex::new(out)),
        }
    }
}

impl Write for MuxWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut o = self.out.lock().unwrap_or_else(|e| e.into_inner());
        o.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// Who receives typed input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Serial,
    Monitor,
}

/// Why [`StdioMux::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MuxExit {
    /// Input ended.
    Eof,
    /// `Ctrl-a x`: the quit callback was called.
    Quit,
}

/// Options of the mux.
#[derive(Debug, Clone, Copy)]
pub struct MuxOptions {
    /// Echo and line editing for the monitor (stdin is a raw terminal).
    pub echo: bool,
    /// Who has the focus at start.
    pub initial_focus: Focus,
    pub max_line: usize,
}

impl Default for MuxOptions {
    fn default() -> Self {
        MuxOptions {
            echo: true,
            initial_focus: Focus::Serial,
            max_line: hmp::MAX_LINE,
        }
    }
}

enum MonMsg {
    Input(Vec<u8>),
    FocusIn,
}

/// The multiplexer. See the module docs.
pub struct StdioMux {
    serial: Box<dyn SerialSink>,
    out: MuxWriter,
    quit: Box<dyn FnMut() + Send>,
    focus: Focus,
    got_escape: bool,
    monitor_tx: Option<mpsc::Sender<MonMsg>>,
    monitor_thread: Option<JoinHandle<()>>,
}

const HELP: &str = "\r\n\
C-a h    print this help\r\n\
C-a x    exit\r\n\
C-a b    send break (magic sysrq)\r\n\
C-a c    switch between console and monitor\r\n\
C-a C-a  sends C-a\r\n";

impl StdioMux {
    /// `serial` receives the guest's input, `output` is where everything is shown (stdout),
    /// `quit` runs on `Ctrl-a x` (the VMM calls its backend's `quit(ShutdownCause::HostUi)`).
    /// Without a `monitor`, `Ctrl-a c` does nothing (QEMU's `-monitor none -nographic`).
    pub fn new(
        monitor: Option<Arc<Monitor>>,
        serial: Box<dyn SerialSink>,
        output: Box<dyn Write + Send>,
        quit: Box<dyn FnMut() + Send>,
        opts: MuxOptions,
    ) -> io::Result<StdioMux> {
        let out = MuxWriter::new(output);
        let (monitor_tx, monitor_thread) = match monitor {
            Some(m) => {
                let (tx, rx) = mpsc::channel();
                let mut w = out.clone();
                let t = std::thread::Builder::new()
                    .name("monitor-stdio".into())
                    .spawn(move || monitor_loop(m, rx, &mut w, opts))?;
                (Some(tx), Some(t))
            }
            None => (None, None),
        };
        let mut mux = StdioMux {
            serial,
            out,
            quit,
            focus: Focus::Serial,
            got_escape: false,
            monitor_tx,
            monitor_thread,
        };
        if opts.initial_focus == Focus::Monitor {
            mux.switch_focus();
        }
        Ok(mux)
    }

    /// A writer for the UART's output (merged into the mux output).
    pub fn serial_output(&self) -> MuxWriter {
        self.out.clone()
    }

    pub fn focus(&self) -> Focus {
        self.focus
    }

    fn switch_focus(&mut self) {
        let Some(tx) = &self.monitor_tx else { return };
        self.focus = match self.focus {
            Focus::Serial => {
                let _ = tx.send(MonMsg::FocusIn);
                Focus::Monitor
            }
            Focus::Monitor => Focus::Serial,
        };
    }

    fn deliver(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match (self.focus, &self.monitor_tx) {
            (Focus::Monitor, Some(tx)) => {
                let _ = tx.send(MonMsg::Input(bytes.to_vec()));
            }
            _ => self.serial.input(bytes),
        }
    }

    /// Processes typed bytes. Returns `Some(MuxExit::Quit)` after `Ctrl-a x`.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<MuxExit> {
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if self.got_escape {
                self.got_escape = false;
                start = i + 1;
                match b {
                    ESCAPE => self.deliver(&[ESCAPE]),
                    b'h' | b'?' => {
                        let _ = self.out.write_all(HELP.as_bytes());
                        let _ = self.out.flush();
                    }
                    b'x' => {
                        let _ = self.out.write_all(b"\r\ngodwit: terminated\r\n");
                        let _ = self.out.flush();
                        (self.quit)();
                        return Some(MuxExit::Quit);
                    }
                    b'b' if self.focus == Focus::Serial => self.serial.send_break(),
                    b'c' => self.switch_focus(),
                    _ => {} // unknown escapes are swallowed, as QEMU does
                }
            } else if b == ESCAPE {
                self.deliver(&bytes[start..i]);
                self.got_escape = true;
                start = i + 1;
            }
        }
        if start < bytes.len() {
            self.deliver(&bytes[start..]);
        }
        None
    }

    /// Reads `input` (stdin) until EOF or `Ctrl-a x`.
    pub fn run(mut self, input: &mut dyn Read) -> io::Result<MuxExit> {
        let mut buf = [0u8; 4096];
        let exit = loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break MuxExit::Eof,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if let Some(exit) = self.feed(&buf[..n]) {
                break exit;
            }
        };
        // Let the monitor finish what it was given (its thread ends when the channel closes).
        self.monitor_tx = None;
        if exit == MuxExit::Eof {
            if let Some(t) = self.monitor_thread.take() {
                let _ = t.join();
            }
        }
        Ok(exit)
    }
}

fn monitor_loop(
    monitor: Arc<Monitor>,
    rx: mpsc::Receiver<MonMsg>,
    out: &mut MuxWriter,
    opts: MuxOptions,
) {
    let mut session = HmpSession::new(monitor.clone(), true);
    // `echo` means stdin is a raw terminal: redraw migration progress in place there.
    session.set_live_progress(opts.echo);
    let mut editor = LineEditor::new(opts.max_line, opts.echo);
    let mut greeted = false;
    let (mut events, mut echo) = (Vec::new(), Vec::new());
    for msg in rx {
        let r = (|| -> io::Result<()> {
            match msg {
                MonMsg::FocusIn => {
                    if !greeted {
                        greeted = true;
                        out.write_all(hmp::banner(&monitor).as_bytes())?;
                    }
                    out.write_all(hmp::PROMPT.as_bytes())?;
                    out.write_all(editor.pending())?;
                }
                MonMsg::Input(bytes) => {
                    // Byte by byte, so typed-ahead lines echo after the previous output.
                    for b in bytes {
                        editor.feed(&[b], &mut events, &mut echo);
                        out.write_all(&echo)?;
                        echo.clear();
                        for ev in events.drain(..) {
                            match ev {
                                LineEvent::Line(line) => session.execute_line(&line, out)?,
                                LineEvent::TooLong => {
                                    hmp::write_crlf(out, "line too long, ignored\n")?
                                }
                            }
                            out.write_all(hmp::PROMPT.as_bytes())?;
                        }
                    }
                }
            }
            out.flush()
        })();
        if let Err(e) = r {
            tracing::warn!("monitor output failed: {e}");
            return;
        }
    }
}
