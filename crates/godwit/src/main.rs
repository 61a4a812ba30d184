//! `godwit`: parse a QEMU-style command line, build the VM, start the monitors, serve an
//! incoming migration if asked, and run until the guest or the user ends it. All logic lives
//! in the library crates; this file wires them together.

mod capabilities;
mod cli;
mod compat;
mod console;
mod daemon;
mod drives;
mod forecast;
mod incoming;
mod machine;
mod monitors;
mod ioerror;
mod lazyload;
mod libvirt_args;
mod nics;
mod nomachine;
mod pty;
mod report;
mod savevm_sink;
mod snapshots;
mod snapload;
mod storage;
mod transport_params;
mod vmglue;

use devices::VmRequest;
use machine::Machine;
use monitor::events::EventBus;
use monitor::runstate::RunState;
use std::process::ExitCode;
use std::sync::Arc;
use vmm::{Vm, VmConfig};

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    console::restore_terminal();
    eprintln!("godwit: {msg}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("GODWIT_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let opts = match cli::parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    if opts.help {
        print!("{}", cli::USAGE);
        return ExitCode::SUCCESS;
    }
    if opts.version {
        println!("godwit {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    monitor::probe::set_cpu_max(vmm::MAX_VCPUS);
    if opts.compat.machine_none {
        return nomachine::run(&opts).unwrap_or_else(fail);
    }
    let Some(kernel) = opts.kernel.clone() else {
        return fail("no kernel given (-kernel FILE)");
    };
    let ready = match opts.compat.daemonize.then(|| compat::daemonize_vm(&opts)).transpose() {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if let Some(p) = &opts.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            return fail(format!("cannot write pid file '{}': {e}", p.display()));
        }
    }
    for spec in &opts.objects {
        match migration::authz::register_object(spec) {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => return fail(format!("-object {spec}: {e}")),
        }
        match migration::tls::TlsCreds::from_object(spec) {
            Ok(Some(c)) => {
                if let Err(e) = migration::tls::register(c) {
                    return fail(format!("-object {spec}: {e}"));
                }
            }
            Ok(None) => {
                return fail(format!("-object {spec}: only tls-creds-x509, tls-creds-psk and authz-simple objects are supported"))
            }
            Err(e) => return fail(format!("-object {spec}: {e}")),
        }
    }
    let console_out = match console::ConsoleOut::open(&opts.serial) {
        Ok(o) => o,
        Err(e) => return fail(format!("serial: {e}")),
    };
    let config = VmConfig {
        mem_size: opts.mem_mib << 20,
        vcpus: opts.smp,
        kernel,
        cmdline: opts.append.clone(),
        initrd: opts.initrd.clone(),
    };
    let specs = match drives::resolve(&opts.drives, &opts.devices) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let net_specs = match nics::resolve(&opts.netdevs, &opts.devices, &opts.nets).and_then(|n| nics::open(&n)) {
        Ok(n) => n,
        Err(e) => return fail(e),
    };
    let mut disks = Vec::new();
    for s in &specs {
        match drives::SharedDisk::open(s, opts.incoming.is_some()) {
            Ok(d) => disks.push(d),
            Err(e) => return fail(e),
        }
    }
    let disk_specs = disks
        .iter()
        .enumerate()
        .map(|(i, d)| vmm::vm::DiskSpec {
            backend: d.device_backend(),
            config: virtio::BlockConfig {
                serial: d.spec.serial.clone().unwrap_or_else(|| format!("godwit-disk{i}")),
                read_only: d.spec.read_only,
                policy: virtio::ErrorPolicy {
                    werror: d.spec.werror.unwrap_or(virtio::ErrorAction::Enospc),
                    rerror: d.spec.rerror.unwrap_or(virtio::ErrorAction::Report),
                    hook: Some(ioerror::hook(i)),
                },
                ..Default::default()
            },
        })
        .collect();
    let vm = match Vm::with_nics(config, console_out.boxed(), disk_specs, net_specs) {
        Ok(vm) => Arc::new(vm),
        Err(e) => return fail(e),
    };
    if let Err(e) = compat::attach_serial_and_register(&opts, &console_out, &vm) {
        return fail(e);
    }
    let events = EventBus::new();
    let initial = if opts.incoming.is_some() {
        RunState::Inmigrate
    } else if opts.start_paused {
        RunState::Prelaunch
    } else {
        RunState::Running
    };
    let machine = Machine::new(vm.clone(), initial, events, disks);
    machine.autostart.store(!opts.start_paused, std::sync::atomic::Ordering::SeqCst);
    ioerror::serve(machine.clone());

    if let Some(uri) = &opts.incoming {
        if uri != "defer" {
            machine.incoming_started.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = incoming::start(&machine, uri) {
                return fail(e);
            }
        }
    }
    let _servers = match monitors::start(&machine, &opts, &console_out) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if let Some(r) = ready {
        r.done();
    }
    if let Some(tag) = &opts.loadvm {
        if let Err(e) = snapshots::load(&machine, tag) {
            return fail(format!("-loadvm {tag}: {}", e.desc));
        }
    }
    if initial == RunState::Running {
        // Under the state lock: a lazy -loadvm that already failed has stopped the VM for good.
        let _ = machine.state.update(|st| {
            if st == RunState::Running {
                vm.resume();
            }
            Ok::<_, ()>(st)
        });
    }
    let code = run(&machine, &opts);
    machine.before_exit();
    close_disks(&machine);
    console::restore_terminal();
    code
}

/// At exit, as QEMU does: stop the vCPUs, drain the disks' in-flight requests, flush and close
/// the images, so a qcow2 image is left clean (no cluster allocated by a request cut in half).
fn close_disks(m: &Arc<Machine>) {
    // A lazy loadvm still serving RAM lets go first (a thread waiting on a page is released).
    lazyload::cancel();
    if let Err(e) = m.vm.quiesce() {
        eprintln!("godwit: warning: draining the disks at exit: {e}");
    }
    for d in &m.disks {
        if let Err(e) = d.release() {
            eprintln!("godwit: warning: closing '{}': {e}", d.spec.file.display());
        }
    }
}

/// Serves the VM's requests until one ends it.
fn run(m: &Arc<Machine>, opts: &cli::Options) -> ExitCode {
    loop {
        match m.vm.next_request() {
            VmRequest::DebugExit(status) => return ExitCode::from(status),
            // -no-shutdown: a guest that powers off stays, stopped in the shutdown state.
            VmRequest::PowerOff if opts.compat.no_shutdown => compat::guest_shutdown_stays(m),
            VmRequest::PowerOff => {
                // As QEMU: the event, then the exit (best effort: a QMP client may see the
                // connection close before it).
                m.events.emit(monitor::Event::Shutdown { guest: true, reason: monitor::ShutdownCause::GuestShutdown });
                return ExitCode::SUCCESS;
            }
            VmRequest::Quit => return ExitCode::SUCCESS,
            VmRequest::Reset if opts.no_reboot => return ExitCode::SUCCESS,
            VmRequest::Reset => {
                // RAM starts afresh: a lazy loadvm still filling it must stop.
                lazyload::cancel();
                if let Err(e) = m.vm.reset() {
                    return fail(format!("reset failed: {e}"));
                }
            }
            VmRequest::Fatal { vcpu, message } if vcpu == usize::MAX => return fail(message),
            VmRequest::Fatal { vcpu, message } => return fail(format!("vCPU {vcpu}: {message}")),
        }
    }
}
