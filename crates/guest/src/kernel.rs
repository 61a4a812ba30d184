//! The CPL0 part of the guest: setup (start_info, page tables above 4 GiB, GDT/TSS/IDT, LAPIC,
//! PIT calibration, AP start-up) and the small handlers (timer, serial input poll, the `int3`
//! system call, faults).
//!
//! CPL0 code is interpreted on this project's host (see HOST-KVM.md): everything here lives
//! in the `.ktext` section, must not use SSE/AVX (tests-qemu.sh checks the disassembly), does
//! no formatting beyond the fault line, and never copies much memory.

use crate::boot::{self, SEL_KCODE, SEL_TSS0, TRAMPOLINE};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering::*};

pub const MAX_CPUS: usize = 32;
pub const KSTACK: usize = 8192;
pub const KSTACK_SHIFT: u32 = 13;
pub const USTACK: usize = 65536;
const IST_STACK: usize = 4096;
/// Page directories for RAM between 4 GiB and 64 GiB.
const PD_HI: usize = 60;

pub const VEC_TIMER: u64 = 0x40;
pub const VEC_WAKE: u64 = 0x41;
pub const VEC_SPURIOUS: u64 = 0xff;

/// System call numbers (`int3` from CPL3, number in rax, arguments in rdi, rsi, rdx).
pub mod sys {
    pub const WRITE: u64 = 0;
    pub const IDLE: u64 = 1;
    pub const EXIT: u64 = 2;
    pub const HALT: u64 = 3;
    pub const TIMER_START: u64 = 4;
    pub const CLOSE_GATE: u64 = 5;
    pub const RELEASE: u64 = 6;
    pub const POWEROFF: u64 = 7;
}

pub const COM1: u16 = 0x3f8;
pub const EXIT_PORT: u16 = 0xf4;
/// Godwit's ACPI sleep control register (hardware-reduced FADT) and the value for S5.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
const SLEEP_S5: u8 = (5 << 2) | (1 << 5);
/// Godwit's GED event register: bit 0 = the power button was pressed (read clears it). Where
/// nothing answers the port (QEMU's microvm) a read gives 0xff, which is not an event.
const GED_EVENT_PORT: u16 = 0x603;
const PIT_HZ: u64 = 1_193_182;

/// Shared data written once at CPL0 before user code reads it.
pub struct Racy<T>(UnsafeCell<T>);
unsafe impl<T> Sync for Racy<T> {}
impl<T> Racy<T> {
    pub const fn new(v: T) -> Self {
        Racy(UnsafeCell::new(v))
    }
    pub fn get(&self) -> *mut T {
        self.0.get()
    }
}

#[repr(C, align(4096))]
pub struct Pages<const N: usize>(pub [u8; N]);

#[no_mangle]
pub static mut kstacks: Pages<{ KSTACK * MAX_CPUS }> = Pages([0; KSTACK * MAX_CPUS]);
static mut IST_STACKS: Pages<{ IST_STACK * MAX_CPUS }> = Pages([0; IST_STACK * MAX_CPUS]);
pub static mut USTACKS: Pages<{ USTACK * MAX_CPUS }> = Pages([0; USTACK * MAX_CPUS]);
static mut PDS_HI: Pages<{ 4096 * PD_HI }> = Pages([0; 4096 * PD_HI]);
static mut TSS: [[u32; 26]; MAX_CPUS] = [[0; 26]; MAX_CPUS];
static mut IDT: Pages<4096> = Pages([0; 4096]);

/// One PVH memory map entry: (address, size, type).
#[derive(Clone, Copy)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u64,
}
pub const MAX_MEMMAP: usize = 64;
pub static MEMMAP: Racy<[MemEntry; MAX_MEMMAP]> =
    Racy::new([MemEntry { addr: 0, size: 0, kind: 0 }; MAX_MEMMAP]);
pub const MAX_CMDLINE: usize = 1024;
pub static CMDLINE: Racy<[u8; MAX_CMDLINE]> = Racy::new([0; MAX_CMDLINE]);

/// Kernel state shared with user code (all of it in guest RAM, so it survives snapshots).
pub struct KState {
    pub tsc_hz: AtomicU64,
    /// LAPIC timer counts per second at divide-by-16.
    pub apic_hz: AtomicU64,
    /// 1 = PIT, 2 = CPUID leaf 0x40000010, 3 = guessed.
    pub calib_src: AtomicU64,
    tsc_apic_mul: AtomicU64,
    lapic: AtomicU64,
    pub sipi_tsc: AtomicU64,
    pub last_arrival_tsc: AtomicU64,
    pub ncpus: AtomicU64,
    /// Timer ticks of the BSP.
    pub ticks: AtomicU64,
    next_tick: AtomicU64,
    tick_period: AtomicU64,
    wake_tsc: AtomicU64,
    armed: AtomicU64,
    go: AtomicU64,
    serial_lock: AtomicU64,
    pub in_head: AtomicU64,
    pub in_tail: AtomicU64,
    pub in_buf: [AtomicU8; 64],
    pub cpu_ticks: [AtomicU64; MAX_CPUS],
    pub apic_id: [AtomicU64; MAX_CPUS],
    pub mem_entries: AtomicU64,
    pub cmdline_len: AtomicU64,
    pub start_info_ok: AtomicU64,
}
pub static K: KState = unsafe { core::mem::zeroed() };

/// Registers saved by `isr_common`, then the CPU's interrupt frame.
#[repr(C)]
pub struct Frame {
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    vec: u64,
    err: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

// ---------------------------------------------------------------- low-level helpers

#[inline(always)]
unsafe fn outb(port: u16, v: u8) {
    asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags));
}
#[inline(always)]
unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags));
    v
}
#[inline(always)]
pub fn rdtsc() -> u64 {
    unsafe { core::arch::x86_64::_rdtsc() }
}
#[inline(always)]
unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack));
    (hi as u64) << 32 | lo as u64
}
#[inline(always)]
unsafe fn wrmsr(msr: u32, v: u64) {
    asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack));
}
#[inline(always)]
unsafe fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LO: u64 = 0x300;
const LAPIC_ICR_HI: u64 = 0x310;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_LVT_LINT1: u64 = 0x360;
const LAPIC_LVT_ERR: u64 = 0x370;
const LAPIC_TMICT: u64 = 0x380;
const LAPIC_TMCCT: u64 = 0x390;
const LAPIC_TDCR: u64 = 0x3e0;

#[inline(always)]
unsafe fn lapic_rd(off: u64) -> u32 {
    read_volatile((K.lapic.load(Relaxed) + off) as *const u32)
}
#[inline(always)]
unsafe fn lapic_wr(off: u64, v: u32) {
    write_volatile((K.lapic.load(Relaxed) + off) as *mut u32, v)
}

/// Index of the running CPU, from the kernel stack it is on.
#[inline(always)]
fn this_cpu() -> usize {
    let rsp: u64;
    unsafe { asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags)) };
    let base = &raw const kstacks as u64;
    (rsp.wrapping_sub(base) >> KSTACK_SHIFT) as usize
}

// ---------------------------------------------------------------- serial

#[link_section = ".ktext"]
unsafe fn serial_init() {
    outb(COM1 + 1, 0x00); // no UART interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // 115200
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0x07); // FIFOs on, cleared
    outb(COM1 + 4, 0x03); // DTR RTS
}

#[link_section = ".ktext"]
unsafe fn serial_lock(max_spins: u64) {
    let mut n = 0u64;
    while K.serial_lock.swap(1, Acquire) != 0 {
        n += 1;
        if n >= max_spins {
            return;
        }
    }
}
#[link_section = ".ktext"]
unsafe fn serial_unlock() {
    K.serial_lock.store(0, Release);
}

/// Write bytes, up to 16 per check of LSR.THRE (FIFO empty).
#[link_section = ".ktext"]
unsafe fn serial_put(p: *const u8, len: u64) {
    let mut i = 0u64;
    while i < len {
        let mut spins = 0u32;
        while inb(COM1 + 5) & 0x20 == 0 && spins < 1_000_000 {
            spins += 1;
        }
        let end = if len - i > 16 { i + 16 } else { len };
        while i < end {
            outb(COM1, read_volatile(p.add(i as usize)));
            i += 1;
        }
    }
}

#[link_section = ".ktext"]
unsafe fn kput_str(s: &str) {
    serial_put(s.as_ptr(), s.len() as u64);
}

#[link_section = ".ktext"]
unsafe fn kput_hex(v: u64) {
    let mut buf = [0u8; 18];
    buf[0] = b'0';
    buf[1] = b'x';
    let mut i = 0;
    while i < 16 {
        let d = ((v >> (60 - 4 * i)) & 0xf) as u8;
        write_volatile(&mut buf[2 + i], if d < 10 { b'0' + d } else { b'a' + d - 10 });
        i += 1;
    }
    serial_put(buf.as_ptr(), 18);
}

/// Put one byte into the input ring (dropped when it is full).
#[link_section = ".ktext"]
unsafe fn input_push(b: u8) {
    let head = K.in_head.load(Relaxed);
    if head.wrapping_sub(K.in_tail.load(Acquire)) < 64 {
        K.in_buf[(head & 63) as usize].store(b, Relaxed);
        K.in_head.store(head.wrapping_add(1), Release);
    }
}

/// Move received bytes into the input ring (BSP timer handler); a power-button press becomes
/// the command `P`.
#[link_section = ".ktext"]
unsafe fn poll_input() {
    let ev = inb(GED_EVENT_PORT);
    if ev != 0xff && ev & 1 != 0 {
        input_push(b'P');
    }
    let mut n = 0;
    while n < 16 && inb(COM1 + 5) & 1 != 0 {
        input_push(inb(COM1));
        n += 1;
    }
}

// ---------------------------------------------------------------- setup

/// Copy the command line and memory map out of the PVH start_info block.
#[link_section = ".ktext"]
unsafe fn copy_start_info() {
    let si = boot::start_info_ptr;
    if si == 0 || read_volatile(si as *const u32) != 0x336e_c578 {
        return;
    }
    K.start_info_ok.store(1, Relaxed);
    let version = read_volatile((si + 4) as *const u32);
    let cmd = read_volatile((si + 24) as *const u64);
    let out = CMDLINE.get() as *mut u8;
    let mut n = 0usize;
    if cmd != 0 {
        while n < MAX_CMDLINE - 1 {
            let b = read_volatile((cmd + n as u64) as *const u8);
            if b == 0 {
                break;
            }
            write_volatile(out.add(n), b);
            n += 1;
        }
    }
    K.cmdline_len.store(n as u64, Relaxed);
    if version >= 1 {
        let mm = read_volatile((si + 40) as *const u64);
        let cnt = read_volatile((si + 48) as *const u32) as usize;
        let cnt = if cnt > MAX_MEMMAP { MAX_MEMMAP } else { cnt };
        let map = MEMMAP.get() as *mut MemEntry;
        let mut i = 0;
        while i < cnt && mm != 0 {
            let e = mm + 24 * i as u64;
            let d = map.add(i);
            write_volatile(&raw mut (*d).addr, read_volatile(e as *const u64));
            write_volatile(&raw mut (*d).size, read_volatile((e + 8) as *const u64));
            write_volatile(&raw mut (*d).kind, read_volatile((e + 16) as *const u32) as u64);
            i += 1;
        }
        K.mem_entries.store(i as u64, Relaxed);
    }
}

/// Identity-map RAM above 4 GiB (up to 64 GiB) with 2 MiB pages.
#[link_section = ".ktext"]
unsafe fn extend_page_tables() {
    let map = MEMMAP.get() as *const MemEntry;
    let mut top = 0u64;
    let mut i = 0;
    while i < K.mem_entries.load(Relaxed) as usize {
        let e = map.add(i);
        if read_volatile(&raw const (*e).kind) == 1 {
            let end = read_volatile(&raw const (*e).addr) + read_volatile(&raw const (*e).size);
            if end > top {
                top = end;
            }
        }
        i += 1;
    }
    let gib = (top + (1 << 30) - 1) >> 30;
    let gib = if gib > 4 + PD_HI as u64 { 4 + PD_HI as u64 } else { gib };
    let pdpt = &raw mut boot::pdpt as *mut u64;
    let pds = &raw mut PDS_HI as *mut u64;
    let mut g = 4u64;
    while g < gib {
        let pd = pds.add(512 * (g as usize - 4));
        let mut e = 0u64;
        while e < 512 {
            write_volatile(pd.add(e as usize), ((g << 30) + (e << 21)) | 0x87);
            e += 1;
        }
        write_volatile(pdpt.add(g as usize), pd as u64 | 0x7);
        g += 1;
    }
    asm!("mov rax, cr3", "mov cr3, rax", out("rax") _, options(nostack));
}

/// TSS and its GDT descriptor for every CPU slot, and the IDT.
#[link_section = ".ktext"]
unsafe fn setup_tables() {
    let gdt = &raw mut boot::gdt as *mut u64;
    let mut i = 0usize;
    while i < MAX_CPUS {
        let t = (&raw mut TSS as *mut u32).add(26 * i);
        let rsp0 = &raw const kstacks as u64 + ((i as u64 + 1) << KSTACK_SHIFT);
        let ist1 = &raw const IST_STACKS as u64 + (i as u64 + 1) * IST_STACK as u64;
        write_volatile(t.add(1), rsp0 as u32);
        write_volatile(t.add(2), (rsp0 >> 32) as u32);
        write_volatile(t.add(9), ist1 as u32);
        write_volatile(t.add(10), (ist1 >> 32) as u32);
        write_volatile(t.add(25), 104 << 16); // I/O map base beyond the limit: no bitmap
        let base = t as u64;
        let lo = 103 | (base & 0xff_ffff) << 16 | 0x89 << 40 | ((base >> 24) & 0xff) << 56;
        write_volatile(gdt.add(6 + 2 * i), lo);
        write_volatile(gdt.add(7 + 2 * i), base >> 32);
        i += 1;
    }
    let idt = &raw mut IDT as *mut u64;
    let stubs = &raw const boot::isr_stubs as u64;
    let mut v = 0u64;
    while v < 256 {
        let h = stubs + 16 * v;
        let attr: u64 = if v == 3 { 0xee } else { 0x8e };
        let ist: u64 = if v == 8 { 1 } else { 0 };
        let lo = (h & 0xffff) | SEL_KCODE << 16 | ist << 32 | attr << 40 | ((h >> 16) & 0xffff) << 48;
        write_volatile(idt.add(2 * v as usize), lo);
        write_volatile(idt.add(2 * v as usize + 1), h >> 32);
        v += 1;
    }
}

/// Load the IDT and this CPU's TSS.
#[link_section = ".ktext"]
unsafe fn load_tables(cpu: usize) {
    #[repr(C, packed)]
    struct Dtr {
        limit: u16,
        base: u64,
    }
    let dtr = Dtr { limit: 4095, base: &raw const IDT as u64 };
    asm!("lidt [{}]", in(reg) &dtr, options(nostack, readonly));
    let sel = (SEL_TSS0 + 16 * cpu as u64) as u16;
    asm!("ltr {0:x}", in(reg) sel, options(nostack, nomem));
}

#[link_section = ".ktext"]
unsafe fn lapic_init(cpu: usize) {
    lapic_wr(LAPIC_SVR, 0x100 | VEC_SPURIOUS as u32);
    lapic_wr(LAPIC_TPR, 0);
    lapic_wr(LAPIC_LVT_LINT0, 0x1_0000);
    lapic_wr(LAPIC_LVT_LINT1, 0x1_0000);
    lapic_wr(LAPIC_LVT_ERR, 0x1_0000);
    lapic_wr(LAPIC_LVT_TIMER, 0x1_0000 | VEC_TIMER as u32);
    lapic_wr(LAPIC_TDCR, 0x3); // divide by 16
    if cpu < MAX_CPUS {
        K.apic_id[cpu].store((lapic_rd(LAPIC_ID) >> 24) as u64, Relaxed);
    }
}

#[link_section = ".ktext"]
unsafe fn pit_read() -> u64 {
    outb(0x43, 0x00); // latch channel 0
    let lo = inb(0x40) as u64;
    let hi = inb(0x40) as u64;
    hi << 8 | lo
}

/// One reading of (PIT count, TSC, LAPIC current count), the tightest of a few: the vCPU can be
/// descheduled between the reads, so keep the one whose TSC bracket is shortest.
#[link_section = ".ktext"]
unsafe fn pit_sample() -> (u64, u64, u64) {
    let mut best = (0u64, 0u64, 0u64, u64::MAX);
    let mut i = 0;
    while i < 6 {
        let t0 = rdtsc();
        let a = lapic_rd(LAPIC_TMCCT) as u64;
        let p = pit_read();
        let t1 = rdtsc();
        if t1.wrapping_sub(t0) < best.3 {
            best = (p, t0 + (t1.wrapping_sub(t0) >> 1), a, t1.wrapping_sub(t0));
        }
        i += 1;
    }
    (best.0, best.1, best.2)
}

/// Measure the TSC and LAPIC timer rates against 20 ms of PIT channel 0.
#[link_section = ".ktext"]
unsafe fn calibrate() {
    lapic_wr(LAPIC_LVT_TIMER, 0x1_0000 | VEC_TIMER as u32);
    lapic_wr(LAPIC_TMICT, 0xffff_ffff);
    outb(0x43, 0x30); // channel 0, lo/hi, mode 0
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let (p0, t0, a0) = pit_sample();
    let target = PIT_HZ / 50;
    let mut ok = false;
    let mut n = 0u32;
    while n < 200_000 {
        if p0.wrapping_sub(pit_read()) & 0xffff >= target {
            ok = true;
            break;
        }
        n += 1;
    }
    let (p1, t1, a1) = pit_sample();
    let elapsed = p0.wrapping_sub(p1) & 0xffff;
    lapic_wr(LAPIC_TMICT, 0);
    if ok && t1 > t0 && a0 > a1 {
        let elapsed = if elapsed == 0 { 1 } else { elapsed };
        K.tsc_hz.store((t1 - t0) * PIT_HZ / elapsed, Relaxed);
        K.apic_hz.store((a0 - a1) * PIT_HZ / elapsed, Relaxed);
        K.calib_src.store(1, Relaxed);
    } else {
        // No PIT: KVM's paravirtual timing leaf if present, else a guess.
        let (max, _, _, _) = cpuid(0x4000_0000);
        let (tsc_khz, bus_khz, _, _) = if max >= 0x4000_0010 { cpuid(0x4000_0010) } else { (0, 0, 0, 0) };
        if tsc_khz != 0 {
            K.tsc_hz.store(tsc_khz as u64 * 1000, Relaxed);
            let bus = if bus_khz != 0 { bus_khz as u64 * 1000 } else { 1_000_000_000 };
            K.apic_hz.store(bus / 16, Relaxed);
            K.calib_src.store(2, Relaxed);
        } else {
            K.tsc_hz.store(2_000_000_000, Relaxed);
            K.apic_hz.store(62_500_000, Relaxed);
            K.calib_src.store(3, Relaxed);
        }
    }
    let tsc = K.tsc_hz.load(Relaxed);
    let tsc = if tsc < 1_000_000 { 1_000_000 } else { tsc };
    K.tsc_hz.store(tsc, Relaxed);
    let mul = (K.apic_hz.load(Relaxed) << 32) / tsc;
    K.tsc_apic_mul.store(mul, Relaxed);
}

#[link_section = ".ktext"]
unsafe fn delay_tsc(cycles: u64) {
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < cycles {}
}

#[link_section = ".ktext"]
unsafe fn send_ipi_all_but_self(icr: u32) {
    lapic_wr(LAPIC_ICR_HI, 0);
    lapic_wr(LAPIC_ICR_LO, 0x000c_0000 | icr);
    let mut n = 0;
    while lapic_rd(LAPIC_ICR_LO) & 0x1000 != 0 && n < 100_000 {
        n += 1;
    }
}

/// Copy the trampoline below 1 MiB and broadcast INIT, SIPI, SIPI.
#[link_section = ".ktext"]
unsafe fn start_aps() {
    let src = &raw const boot::tramp_start;
    let len = (&raw const boot::tramp_end as usize) - (src as usize);
    let mut i = 0;
    while i < len {
        write_volatile((TRAMPOLINE as *mut u8).add(i), read_volatile(src.add(i)));
        i += 1;
    }
    let us = K.tsc_hz.load(Relaxed) / 1_000_000;
    K.sipi_tsc.store(rdtsc(), Relaxed);
    send_ipi_all_but_self(0x4500); // INIT, assert
    delay_tsc(1000 * us);
    let sipi = 0x4600 | (TRAMPOLINE >> 12) as u32;
    send_ipi_all_but_self(sipi);
    delay_tsc(200 * us);
    send_ipi_all_but_self(sipi);
}

#[link_section = ".ktext"]
fn ustack_top(cpu: usize) -> u64 {
    // 16-byte aligned minus 8: as if the entry function had been called.
    &raw const USTACKS as u64 + ((cpu as u64 + 1) * USTACK as u64) - 8
}

#[no_mangle]
#[link_section = ".ktext"]
pub unsafe extern "C" fn bsp_main() -> ! {
    serial_init();
    copy_start_info();
    extend_page_tables();
    setup_tables();
    load_tables(0);
    outb(0x21, 0xff); // mask both PICs
    outb(0xa1, 0xff);
    let base = rdmsr(0x1b);
    wrmsr(0x1b, base | 0x800);
    K.lapic.store(base & 0xf_ffff_f000, Relaxed);
    lapic_init(0);
    calibrate();
    K.ncpus.store(1, Relaxed);
    start_aps();
    boot::enter_user(crate::user::bsp_user as *const () as u64, ustack_top(0), 0)
}

#[no_mangle]
#[link_section = ".ktext"]
pub unsafe extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    load_tables(cpu);
    lapic_init(cpu);
    K.last_arrival_tsc.fetch_max(rdtsc(), Relaxed);
    while K.go.load(Acquire) == 0 {
        boot::kidle_hlt();
    }
    boot::enter_user(crate::user::ap_user as *const () as u64, ustack_top(cpu), cpu as u64)
}

// ---------------------------------------------------------------- handlers

/// Program the BSP's one-shot timer for the earlier of the next tick and the wake deadline.
#[link_section = ".ktext"]
unsafe fn arm_bsp(now: u64) {
    let mut dl = K.next_tick.load(Relaxed);
    let w = K.wake_tsc.load(Relaxed);
    if w > now && w < dl {
        dl = w;
    }
    let delta = if dl > now { dl - now } else { 1 };
    let count = ((delta as u128 * K.tsc_apic_mul.load(Relaxed) as u128) >> 32) as u64;
    let count = if count == 0 { 1 } else if count > 0xffff_ffff { 0xffff_ffff } else { count };
    lapic_wr(LAPIC_TMICT, count as u32);
    K.armed.store(dl, Relaxed);
}

#[link_section = ".ktext"]
unsafe fn timer_irq(cpu: usize) {
    if cpu == 0 {
        let now = rdtsc();
        let period = K.tick_period.load(Relaxed);
        let nt = K.next_tick.load(Relaxed);
        if now.wrapping_add(period >> 6) >= nt {
            K.ticks.fetch_add(1, Relaxed);
            K.cpu_ticks[0].fetch_add(1, Relaxed);
            let mut n = nt.wrapping_add(period);
            if n <= now {
                n = now + period; // fell behind (pause, migration): resynchronise
            }
            K.next_tick.store(n, Relaxed);
        } else if nt > now + 2 * period {
            K.next_tick.store(now + period, Relaxed); // TSC went backwards
        }
        poll_input();
        arm_bsp(now);
    } else if cpu < MAX_CPUS {
        K.cpu_ticks[cpu].fetch_add(1, Relaxed);
    }
    lapic_wr(LAPIC_EOI, 0);
}

#[link_section = ".ktext"]
unsafe fn timer_start(cpu: usize, hz: u64) {
    let hz = if hz == 0 { 100 } else if hz > 5000 { 5000 } else { hz };
    if cpu == 0 {
        let period = K.tsc_hz.load(Relaxed) / hz;
        K.tick_period.store(period, Relaxed);
        K.next_tick.store(rdtsc() + period, Relaxed);
        lapic_wr(LAPIC_TDCR, 0x3);
        lapic_wr(LAPIC_LVT_TIMER, VEC_TIMER as u32); // one-shot
        arm_bsp(rdtsc());
    } else {
        lapic_wr(LAPIC_TDCR, 0x3);
        lapic_wr(LAPIC_LVT_TIMER, 0x2_0000 | VEC_TIMER as u32); // periodic
        let c = K.apic_hz.load(Relaxed) / hz;
        lapic_wr(LAPIC_TMICT, if c == 0 { 1 } else { c as u32 });
    }
}

/// Halt until the next interrupt; on the BSP make sure one comes by `deadline` (TSC).
#[link_section = ".ktext"]
unsafe fn idle(cpu: usize, deadline: u64) {
    if cpu == 0 {
        let now = rdtsc();
        if deadline <= now {
            return;
        }
        K.wake_tsc.store(deadline, Relaxed);
        if deadline < K.armed.load(Relaxed) || lapic_rd(LAPIC_TMCCT) == 0 {
            arm_bsp(now);
        }
    }
    boot::kidle_hlt();
}

#[link_section = ".ktext"]
unsafe fn syscall(f: &mut Frame, cpu: usize) {
    let mut ret = 0u64;
    match f.rax {
        sys::WRITE => {
            serial_lock(u64::MAX);
            serial_put(f.rdi as *const u8, f.rsi);
            serial_unlock();
        }
        sys::IDLE => idle(cpu, f.rdi),
        sys::EXIT => {
            outb(EXIT_PORT, f.rdi as u8);
            boot::khalt_forever();
        }
        sys::HALT => boot::khalt_forever(),
        sys::POWEROFF => {
            outb(SLEEP_CONTROL_PORT, SLEEP_S5);
            boot::khalt_forever();
        }
        sys::TIMER_START => timer_start(cpu, f.rdi),
        sys::CLOSE_GATE => {
            let prev = boot::ap_arrive.fetch_or(1 << 63, AcqRel);
            ret = (prev & !(1 << 63)) + 1;
            K.ncpus.store(ret, Relaxed);
        }
        sys::RELEASE => {
            K.go.store(1, Release);
            send_ipi_all_but_self(VEC_WAKE as u32);
        }
        _ => ret = u64::MAX,
    }
    f.rax = ret;
}

#[link_section = ".ktext"]
unsafe fn fault(f: &Frame) -> ! {
    let cr2: u64;
    asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack));
    serial_lock(10_000_000);
    kput_str("\nGUEST FAULT vec=");
    kput_hex(f.vec);
    kput_str(" rip=");
    kput_hex(f.rip);
    kput_str(" err=");
    kput_hex(f.err);
    kput_str(" cr2=");
    kput_hex(cr2);
    kput_str(" cs=");
    kput_hex(f.cs);
    kput_str(" rsp=");
    kput_hex(f.rsp);
    kput_str(" apic=");
    kput_hex((lapic_rd(LAPIC_ID) >> 24) as u64);
    kput_str("\n");
    serial_unlock();
    boot::khalt_forever()
}

#[no_mangle]
#[link_section = ".ktext"]
pub unsafe extern "C" fn isr_dispatch(f: &mut Frame) {
    let cpu = this_cpu();
    match f.vec {
        VEC_TIMER => timer_irq(cpu),
        3 if f.cs & 3 == 3 => syscall(f, cpu),
        VEC_WAKE => lapic_wr(LAPIC_EOI, 0),
        VEC_SPURIOUS => {}
        _ => fault(f),
    }
}

/// A panic at CPL0: print where and halt.
#[link_section = ".ktext"]
pub unsafe fn kpanic(file: &str, line: u32) -> ! {
    serial_lock(10_000_000);
    kput_str("\nGUEST PANIC cpl=0 at ");
    kput_str(file);
    kput_str(":");
    kput_hex(line as u64);
    kput_str("\n");
    boot::khalt_forever()
}
