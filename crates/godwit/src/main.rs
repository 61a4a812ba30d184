//! `godwit`: parse a QEMU-style command line, build the VM, run it until the guest or the user
//! ends it. All logic lives in the library crates; this file wires them together.

mod cli;
mod console;

use devices::VmRequest;
use std::process::ExitCode;
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
    let Some(kernel) = opts.kernel.clone() else {
        return fail("no kernel given (-kernel FILE)");
    };
    if let Some(p) = &opts.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            return fail(format!("cannot write pid file '{}': {e}", p.display()));
        }
    }
    let out = match console::serial_output(&opts.serial) {
        Ok(o) => o,
        Err(e) => return fail(format!("serial: {e}")),
    };
    let config = VmConfig { mem_size: opts.mem_mib << 20, vcpus: opts.smp, kernel, cmdline: opts.append.clone() };
    let vm = match Vm::new(config, out) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    if opts.serial == cli::SerialTarget::Stdio {
        console::raw_terminal();
        console::spawn_stdin_feeder(vm.serial().clone());
    }
    if !opts.start_paused {
        vm.resume();
    }
    let code = run(&vm, &opts);
    console::restore_terminal();
    code
}

/// Serves the VM's requests until one ends it.
fn run(vm: &Vm, opts: &cli::Options) -> ExitCode {
    loop {
        match vm.next_request() {
            VmRequest::DebugExit(status) => return ExitCode::from(status),
            VmRequest::PowerOff | VmRequest::Quit => return ExitCode::SUCCESS,
            VmRequest::Reset if opts.no_reboot => return ExitCode::SUCCESS,
            VmRequest::Reset => {
                if let Err(e) = vm.reset() {
                    return fail(format!("reset failed: {e}"));
                }
            }
            VmRequest::Fatal { vcpu, message } => return fail(format!("vCPU {vcpu}: {message}")),
        }
    }
}
