//! Starts what `-monitor`, `-qmp` and the stdio console ask for. As with QEMU's `-nographic`,
//! stdio carries the serial console multiplexed with the human monitor (`Ctrl-a c`) unless
//! the monitor is put elsewhere (`-monitor unix:...`) or disabled (`-monitor none`).

use crate::cli::{Options, SerialTarget};
use crate::console::{self, ConsoleOut};
use crate::machine::{Machine, MachineBackend};
use monitor::{Backend, ChardevSpec, Monitor, MonitorServer, Protocol, ServeOptions, ShutdownCause};
use std::sync::Arc;

pub fn start(m: &Arc<Machine>, opts: &Options, out: &ConsoleOut) -> Result<Vec<MonitorServer>, String> {
    let backend: Arc<dyn Backend> = Arc::new(MachineBackend(m.clone()));
    let mon = Monitor::new(backend.clone(), m.events.clone());
    let mut servers = Vec::new();
    let mut hmp_on_stdio = opts.monitors.is_empty() && opts.compat.mons.is_empty();
    for spec in &opts.monitors {
        let parsed = ChardevSpec::parse(spec).map_err(|e| format!("-monitor {spec}: {e}"))?;
        match parsed {
            ChardevSpec::Stdio | ChardevSpec::MonStdio => hmp_on_stdio = true,
            ChardevSpec::None | ChardevSpec::Null => {}
            other => servers.push(
                MonitorServer::start(mon.clone(), &other, Protocol::Hmp, ServeOptions::default())
                    .map_err(|e| format!("-monitor {spec}: {e}"))?,
            ),
        }
    }
    for spec in &opts.qmps {
        let parsed = ChardevSpec::parse(spec).map_err(|e| format!("-qmp {spec}: {e}"))?;
        servers.push(
            MonitorServer::start(mon.clone(), &parsed, Protocol::Qmp, ServeOptions::default())
                .map_err(|e| format!("-qmp {spec}: {e}"))?,
        );
    }
    servers.extend(crate::compat::start_mons(&mon, &opts.compat)?);
    if opts.serial == SerialTarget::Stdio || hmp_on_stdio {
        console::raw_terminal();
        let b = backend.clone();
        let quit = Box::new(move || {
            let _ = b.quit(ShutdownCause::HostUi);
        });
        // With `-serial file:PATH` (or none) stdio carries the monitor alone: the console keeps
        // going to its file, and stdin reaches only the monitor.
        let serial_on_stdio = opts.serial == SerialTarget::Stdio;
        console::spawn_stdio(m.vm.serial().clone(), out, serial_on_stdio, hmp_on_stdio.then_some(mon), quit)
            .map_err(|e| format!("stdio console: {e}"))?;
    }
    Ok(servers)
}
