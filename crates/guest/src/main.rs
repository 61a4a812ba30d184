//! Godwit test guest: a freestanding PVH kernel that proves a VM lost nothing across a
//! snapshot or a live migration (heartbeats, a page ledger, later a disk ledger).
//! The contract (command line, output lines) is in docs/guest.md.
//!
//! CPL0 (`kernel`, `boot`) only sets up and runs tiny handlers; all work runs at CPL3 (`user`).
#![no_std]
#![no_main]

mod boot;
mod config;
mod disk;
mod diskbench;
mod fmt;
mod kernel;
mod mem;
mod net;
mod user;
mod virtio;
mod workload;

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let cs: u16;
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    let (file, line) = match info.location() {
        Some(l) => (l.file(), l.line()),
        None => ("?", 0),
    };
    if cs & 3 == 3 {
        fmt::Line::new().s("GUEST PANIC at ").s(file).s(":").u(line as u64).send();
        user::syscall(kernel::sys::HALT, 0, 0, 0);
        loop {}
    } else {
        unsafe { kernel::kpanic(file, line) }
    }
}

/// Referenced by the precompiled `core` (built with unwinding); never called with panic=abort.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
