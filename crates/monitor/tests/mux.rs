//! The stdio multiplexer in-process: serial bytes reach the serial sink, `Ctrl-a c` moves
//! input to the monitor and back, `Ctrl-a Ctrl-a` sends a literal `Ctrl-a`, escapes split
//! across reads work, `Ctrl-a x` calls the quit callback, outputs are merged.

mod common;

use common::mock_vm;
use monitor::{Focus, MuxExit, MuxOptions, RunState, SerialSink, StdioMux};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// Waits (bounded) until the output contains `needle` — the monitor runs on its own thread.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = self.text();
            if t.contains(needle) {
                return t;
            }
            assert!(Instant::now() < deadline, "never saw {needle:?} in {t:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

struct Sink {
    got: Arc<Mutex<Vec<u8>>>,
    breaks: Arc<Mutex<u32>>,
}

impl SerialSink for Sink {
    fn input(&mut self, bytes: &[u8]) {
        self.got.lock().unwrap().extend_from_slice(bytes);
    }
    fn send_break(&mut self) {
        *self.breaks.lock().unwrap() += 1;
    }
}

type Counter = Arc<Mutex<u32>>;

fn setup(
    opts: MuxOptions,
) -> (
    StdioMux,
    Shared,
    Arc<Mutex<Vec<u8>>>,
    Counter,
    Counter,
    common::Vm,
) {
    let vm = mock_vm(RunState::Running);
    let out = Shared::default();
    let got = Arc::new(Mutex::new(Vec::new()));
    let breaks = Arc::new(Mutex::new(0));
    let quits = Arc::new(Mutex::new(0));
    let q = quits.clone();
    let mux = StdioMux::new(
        Some(vm.monitor.clone()),
        Box::new(Sink {
            got: got.clone(),
            breaks: breaks.clone(),
        }),
        Box::new(out.clone()),
        Box::new(move || *q.lock().unwrap() += 1),
        opts,
    )
    .unwrap();
    (mux, out, got, breaks, quits, vm)
}

#[test]
fn input_routing_and_escapes() {
    let (mut mux, out, got, breaks, quits, vm) = setup(MuxOptions {
        echo: false,
        ..Default::default()
    });
    assert_eq!(mux.focus(), Focus::Serial);
    assert_eq!(mux.feed(b"ls\r"), None);
    assert_eq!(mux.feed(b"a\x01\x01b"), None);
    assert_eq!(mux.feed(b"\x01"), None); // escape split across reads
    assert_eq!(mux.feed(b"b"), None);
    assert_eq!(*breaks.lock().unwrap(), 1);
    assert_eq!(mux.feed(b"\x01z"), None); // unknown escapes are swallowed
    assert_eq!(&*got.lock().unwrap(), b"ls\ra\x01b");

    // To the monitor: banner and prompt, then commands run there, not in the guest.
    mux.feed(b"\x01c");
    assert_eq!(mux.focus(), Focus::Monitor);
    out.wait_for("(qemu) ");
    mux.feed(b"stop\rinfo status\r");
    out.wait_for("VM status: paused\r\n(qemu) ");
    assert_eq!(monitor::Backend::run_state(&*vm.vm), RunState::Paused);
    assert_eq!(
        &*got.lock().unwrap(),
        b"ls\ra\x01b",
        "monitor input leaked to the guest"
    );

    // Back to the guest; the serial output writer merges into the same output.
    mux.feed(b"\x01cxyz");
    assert_eq!(mux.focus(), Focus::Serial);
    assert_eq!(&*got.lock().unwrap(), b"ls\ra\x01bxyz");
    let mut serial_out = mux.serial_output();
    serial_out.write_all(b"GUEST SAYS HI\r\n").unwrap();
    out.wait_for("GUEST SAYS HI");

    mux.feed(b"\x01h");
    out.wait_for("C-a c    switch between console and monitor");
    assert_eq!(mux.feed(b"\x01x"), Some(MuxExit::Quit));
    assert_eq!(*quits.lock().unwrap(), 1);
    assert!(out.text().contains("terminated"));
}

#[test]
fn echo_mode_edits_lines_like_a_terminal() {
    let (mux, out, _got, _b, _q, _vm) = setup(MuxOptions {
        echo: true,
        initial_focus: Focus::Monitor,
        ..Default::default()
    });
    assert_eq!(mux.focus(), Focus::Monitor);
    out.wait_for("(qemu) ");
    let mut input: &[u8] = b"info statux\x7fs\r";
    let exit = mux.run(&mut input).unwrap(); // EOF after the line: waits for the monitor thread
    assert_eq!(exit, MuxExit::Eof);
    let t = out.text();
    assert!(
        t.contains("info statux\x08 \x08s\r\nVM status: running\r\n(qemu) "),
        "{t:?}"
    );
}
