//! `monitor-mock`: the monitor against a fake VM ([`monitor::mock::MockVm`]), for trying the
//! HMP/QMP front ends and for tests that need a real process (no KVM needed).
//!
//! ```text
//! monitor-mock [-qmp SPEC]... [-monitor SPEC]... [-serial mon:stdio|none] [-nographic]
//!              [-S] [-smp N] [-incoming defer] [-heartbeat MS]
//! ```
//! SPEC is a QEMU chardev: `stdio`, `unix:PATH,server,nowait`, `tcp:HOST:PORT,server,nowait`.
//! The fake guest on the serial line answers each line it receives with `guest: LINE`.
//! Listening addresses are printed on stderr (`monitor-mock: qmp on tcp:127.0.0.1:PORT`).

use monitor::mock::MockVm;
use monitor::{
    run_hmp_stream, run_qmp_stream, ChardevSpec, EventBus, ListenAddr, Monitor, MonitorServer,
    MuxOptions, Protocol, RawTerminal, RunState, ServeOptions, ShutdownCause, StdioMux,
};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Opts {
    qmp: Vec<ChardevSpec>,
    hmp: Vec<ChardevSpec>,
    serial: Option<ChardevSpec>,
    nographic: bool,
    paused: bool,
    smp: u32,
    incoming: bool,
    heartbeat: Option<u64>,
}

fn usage() -> ! {
    eprintln!(
        "usage: monitor-mock [-qmp SPEC]... [-monitor SPEC]... [-serial mon:stdio|none] [-nographic] \
         [-S] [-smp N] [-incoming defer] [-heartbeat MS]"
    );
    std::process::exit(1)
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        qmp: vec![],
        hmp: vec![],
        serial: None,
        nographic: false,
        paused: false,
        smp: 1,
        incoming: false,
        heartbeat: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let spec = |s: String| ChardevSpec::parse(&s).map_err(|e| e.to_string());
        match a.as_str() {
            "-qmp" => o.qmp.push(spec(value("-qmp")?)?),
            "-monitor" => o.hmp.push(spec(value("-monitor")?)?),
            "-serial" => o.serial = Some(spec(value("-serial")?)?),
            "-nographic" => o.nographic = true,
            "-S" => o.paused = true,
            "-smp" => {
                o.smp = value("-smp")?
                    .parse()
                    .map_err(|_| "-smp: expected a number".to_string())?
            }
            "-incoming" => {
                if value("-incoming")? != "defer" {
                    return Err("-incoming: only 'defer' is supported by the mock".into());
                }
                o.incoming = true;
            }
            "-heartbeat" => {
                o.heartbeat = Some(
                    value("-heartbeat")?
                        .parse()
                        .map_err(|_| "-heartbeat: expected ms".to_string())?,
                )
            }
            "-h" | "--help" => usage(),
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    if o.nographic && o.serial.is_none() {
        o.serial = Some(ChardevSpec::MonStdio);
    }
    Ok(o)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("monitor-mock: {e}");
            std::process::exit(1);
        }
    };
    let initial = if opts.incoming {
        RunState::Inmigrate
    } else if opts.paused {
        RunState::Prelaunch
    } else {
        RunState::Running
    };
    let events = EventBus::new();
    let vm = MockVm::new(events.clone(), initial, opts.smp);
    vm.set_quit_hook(|| {
        // Leave a moment for the reply to reach the client, as QEMU answers before exiting.
        std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            std::process::exit(0);
        });
    });
    let mon = Monitor::new(vm.clone(), events);

    let mut servers = Vec::new();
    let mut stdio: Option<Protocol> = None;
    for (specs, proto, name) in [
        (&opts.qmp, Protocol::Qmp, "qmp"),
        (&opts.hmp, Protocol::Hmp, "monitor"),
    ] {
        for spec in specs.iter() {
            match spec {
                ChardevSpec::Stdio => stdio = Some(proto),
                ChardevSpec::None => {}
                _ => {
                    match MonitorServer::start(mon.clone(), spec, proto, ServeOptions::default()) {
                        Ok(s) => {
                            match s.local_addr() {
                                ListenAddr::Unix(p) => {
                                    eprintln!("monitor-mock: {name} on unix:{}", p.display())
                                }
                                ListenAddr::Tcp(a) => eprintln!("monitor-mock: {name} on tcp:{a}"),
                            }
                            servers.push(s);
                        }
                        Err(e) => {
                            eprintln!("monitor-mock: {e}");
                            std::process::exit(1);
                        }
                    }
                }
            }
        }
    }

    let mux = opts.serial == Some(ChardevSpec::MonStdio);
    if mux && stdio.is_some() {
        eprintln!("monitor-mock: stdio is already used by -serial mon:stdio");
        std::process::exit(1);
    }
    if mux {
        let _raw = RawTerminal::enable(0).ok().flatten();
        let echo = _raw.is_some();
        let out: Box<dyn Write + Send> = Box::new(std::io::stdout());
        // The fake guest: answers each received line; its output goes through the mux.
        let guest_out: Arc<Mutex<Option<monitor::MuxWriter>>> = Arc::new(Mutex::new(None));
        let guest_line = Arc::new(Mutex::new(Vec::<u8>::new()));
        let (go, gl) = (guest_out.clone(), guest_line.clone());
        let serial = Box::new(move |bytes: &[u8]| {
            let mut line = gl.lock().unwrap_or_else(|e| e.into_inner());
            for &b in bytes {
                if b == b'\r' || b == b'\n' {
                    if let Some(w) = go.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                        let _ = write!(w, "guest: {}\r\n", String::from_utf8_lossy(&line));
                        let _ = w.flush();
                    }
                    line.clear();
                } else if line.len() < 4096 {
                    line.push(b);
                }
            }
        });
        let quit_vm = vm.clone();
        let quit = Box::new(move || {
            let _ = monitor::Backend::quit(&*quit_vm, ShutdownCause::HostUi);
        });
        let mux_opts = MuxOptions {
            echo,
            ..Default::default()
        };
        let mux = match StdioMux::new(Some(mon.clone()), serial, out, quit, mux_opts) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("monitor-mock: {e}");
                std::process::exit(1);
            }
        };
        *guest_out.lock().unwrap_or_else(|e| e.into_inner()) = Some(mux.serial_output());
        if let Some(ms) = opts.heartbeat {
            start_heartbeat(vm.clone(), mux.serial_output(), ms);
        }
        let _ = mux.run(&mut std::io::stdin());
    } else if let Some(proto) = stdio {
        let mut input = std::io::stdin();
        let r = match proto {
            Protocol::Hmp => run_hmp_stream(
                mon.clone(),
                &mut input,
                &mut std::io::stdout(),
                false,
                1 << 20,
            ),
            Protocol::Qmp => run_qmp_stream(
                mon.clone(),
                &mut input as &mut dyn Read,
                Box::new(std::io::stdout()),
                None,
                ServeOptions::default(),
            ),
        };
        if let Err(e) = r {
            eprintln!("monitor-mock: stdio monitor: {e}");
        }
    }
    if servers.is_empty() {
        return;
    }
    loop {
        std::thread::park();
    }
}

fn start_heartbeat(vm: Arc<MockVm>, mut out: monitor::MuxWriter, ms: u64) {
    std::thread::spawn(move || {
        let mut seq = 0u64;
        loop {
            std::thread::sleep(Duration::from_millis(ms.max(1)));
            if monitor::Backend::run_state(&*vm).is_running() {
                seq += 1;
                let _ = write!(out, "HEARTBEAT seq={seq}\r\n");
                let _ = out.flush();
            }
        }
    });
}
