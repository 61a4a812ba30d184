//! The CPL3 part: configuration, the BSP's main loop (heartbeats, serial commands, its share
//! of the workload), the APs' worker loop, `v` (verify), `s` (status) and `q` (quit).
//! All counters live in guest RAM (`U`), so they carry across snapshots and migrations.

use crate::config::{self, Config};
use crate::fmt::Line;
use crate::kernel::{rdtsc, sys, Racy, CMDLINE, K, MAX_CPUS, MEMMAP};
use crate::disk::{Disk, VerifyResult};
use crate::virtio::{Blk, ProbeError};
use crate::workload::{self, Worker, PAGE};
use core::sync::atomic::{AtomicU64, Ordering::*};

#[inline(always)]
pub fn syscall(nr: u64, a: u64, b: u64, c: u64) -> u64 {
    let ret: u64;
    unsafe {
        core::arch::asm!("int3", inlateout("rax") nr => ret, in("rdi") a, in("rsi") b, in("rdx") c,
                         options(nostack));
    }
    ret
}

fn idle(deadline: u64) {
    syscall(sys::IDLE, deadline, 0, 0);
}

#[repr(C, align(64))]
pub struct CpuStat {
    pub dirtied: AtomicU64,
    pub gen: AtomicU64,
    pub paused: AtomicU64,
    pub start: AtomicU64,
    pub end: AtomicU64,
}

pub struct UState {
    pub seq: AtomicU64,
    pub pause: AtomicU64,
    pub stop: AtomicU64,
    pub running: AtomicU64,
    pub region: AtomicU64,
    pub pages: AtomicU64,
    pub ledger: AtomicU64,
    pub mem_mib: AtomicU64,
    pub disk_written: AtomicU64,
    pub cpu: [CpuStat; MAX_CPUS],
}
pub static U: UState = unsafe { core::mem::zeroed() };
static CFG: Racy<Config> = Racy::new(Config::DEFAULT);

pub fn cfg() -> &'static Config {
    unsafe { &*CFG.get() }
}

fn ncpus() -> usize {
    (K.ncpus.load(Relaxed) as usize).clamp(1, MAX_CPUS)
}

fn total_dirtied() -> u64 {
    (0..ncpus()).map(|i| U.cpu[i].dirtied.load(Relaxed)).sum()
}

fn max_gen() -> u64 {
    (0..ncpus()).map(|i| U.cpu[i].gen.load(Relaxed)).max().unwrap_or(0)
}

fn input_pop() -> Option<u8> {
    let t = K.in_tail.load(Relaxed);
    if t == K.in_head.load(Acquire) {
        return None;
    }
    let b = K.in_buf[(t & 63) as usize].load(Relaxed);
    K.in_tail.store(t.wrapping_add(1), Release);
    Some(b)
}

pub extern "C" fn ap_user(cpu: u64) -> ! {
    let cpu = cpu as usize;
    let cfg = cfg();
    syscall(sys::TIMER_START, cfg.hz, 0, 0);
    U.running.fetch_add(1, AcqRel);
    let mut w = Worker::new(cpu);
    loop {
        if U.stop.load(Acquire) != 0 {
            syscall(sys::HALT, 0, 0, 0);
        }
        if U.pause.load(Acquire) != 0 {
            U.cpu[cpu].paused.store(1, Release);
            while U.pause.load(Acquire) != 0 && U.stop.load(Acquire) == 0 {
                idle(u64::MAX);
            }
            U.cpu[cpu].paused.store(0, Release);
            continue;
        }
        if cfg.dirty {
            if w.run(64) < 64 {
                idle(u64::MAX);
            }
        } else {
            idle(u64::MAX);
        }
    }
}

pub extern "C" fn bsp_user(_: u64) -> ! {
    let len = (K.cmdline_len.load(Relaxed) as usize).min(crate::kernel::MAX_CMDLINE);
    let line: &[u8] = unsafe { &(&*CMDLINE.get())[..len] };
    let c = config::parse(line);
    unsafe { *CFG.get() = c };
    let tsc_hz = K.tsc_hz.load(Relaxed);
    let ms = tsc_hz / 1000;
    syscall(sys::TIMER_START, c.hz, 0, 0);

    // Let the APs arrive: until `cpus` have come, or `smp_wait_ms` after the SIPI and after the
    // last arrival (at most 1 s; 10 s with a `cpus` hint).
    let sipi = K.sipi_tsc.load(Relaxed);
    loop {
        let now = rdtsc();
        let arrived = crate::boot::ap_arrive_count() + 1;
        let since = now.wrapping_sub(sipi);
        if c.cpus != 0 {
            if arrived >= c.cpus || since >= 10_000 * ms {
                break;
            }
        } else {
            let last = K.last_arrival_tsc.load(Relaxed).max(sipi);
            let w = c.smp_wait_ms * ms;
            if (since >= w && now.wrapping_sub(last) >= w) || since >= 1000 * ms {
                break;
            }
        }
        idle(now + ms);
    }
    let n = syscall(sys::CLOSE_GATE, 0, 0, 0) as usize;

    // Memory, region, ledger, shares.
    let nmap = (K.mem_entries.load(Relaxed) as usize).min(crate::kernel::MAX_MEMMAP);
    let map = unsafe { &*MEMMAP.get() };
    let ram: u64 = map[..nmap].iter().filter(|e| e.kind == 1).map(|e| e.size).sum();
    U.mem_mib.store((ram + (1 << 19)) >> 20, Relaxed);
    let mut blk = None;
    if c.disk {
        match Blk::probe() {
            Ok(b) => blk = Some(b),
            Err(e) => {
                let why = match e {
                    ProbeError::NoDevice => "no virtio-blk device",
                    ProbeError::ReadOnly => "virtio-blk device is read-only",
                    ProbeError::Features => "virtio-blk feature negotiation failed (need VIRTIO_F_VERSION_1)",
                    ProbeError::Queue => "virtio-blk queue unusable",
                };
                Line::new().s("GUEST WARN disk=on but ").s(why).send();
            }
        }
    }
    let nic = if c.net {
        match crate::net::Nic::probe(c.ip, c.mac) {
            Ok(n) => {
                let mut l = Line::new();
                l.s("GUEST NET mac=");
                for (i, b) in n.mac.iter().enumerate() {
                    let hex = b"0123456789abcdef";
                    if i > 0 {
                        l.s(":");
                    }
                    l.byte(hex[(b >> 4) as usize]).byte(hex[(b & 15) as usize]);
                }
                l.s(" ip=");
                for (i, b) in n.ip.iter().enumerate() {
                    if i > 0 {
                        l.s(".");
                    }
                    l.u(*b as u64);
                }
                l.send();
                Some(n)
            }
            Err(e) => {
                let why = match e {
                    crate::net::ProbeError::NoDevice => "no virtio-net device",
                    crate::net::ProbeError::Features => "virtio-net feature negotiation failed",
                    crate::net::ProbeError::Queue => "virtio-net queues unusable",
                };
                Line::new().s("GUEST WARN net=on but ").s(why).send();
                None
            }
        }
    } else {
        None
    };
    let mut sectors = 0;
    if let Some(b) = &blk {
        sectors = (c.disk_mib * 2048).min(b.capacity);
        if sectors < c.disk_mib * 2048 {
            Line::new().s("GUEST WARN disk region reduced to sectors=").u(sectors).send();
        }
    }
    let want = c.mib * 256;
    let lay = workload::place(want, (sectors * 8 + PAGE - 1) & !(PAGE - 1));
    if lay.pages < want {
        Line::new().s("GUEST WARN region reduced to pages=").u(lay.pages).s(" (asked ").u(want).s(")").send();
    }
    unsafe { core::ptr::write_bytes(lay.ledger as *mut u64, 0, lay.pages as usize) };
    U.region.store(lay.region, Relaxed);
    U.pages.store(lay.pages, Relaxed);
    U.ledger.store(lay.ledger, Relaxed);
    for i in 0..n {
        let s = lay.pages * i as u64 / n as u64;
        let e = lay.pages * (i as u64 + 1) / n as u64;
        U.cpu[i].start.store(s, Relaxed);
        U.cpu[i].end.store(e, Relaxed);
    }
    let disk = blk.map(|b| {
        let ledger = lay.region + lay.pages * PAGE;
        Disk::new(b, sectors, ledger, unsafe { crate::boot::boot_tsc })
    });
    syscall(sys::RELEASE, 0, 0, 0);
    let t0 = rdtsc();
    while (U.running.load(Acquire) as usize) < n - 1 && rdtsc() - t0 < 2000 * ms {
        idle(rdtsc() + ms);
    }
    let up = U.running.load(Acquire) + 1;

    Line::new()
        .s("GUEST INFO tsc_khz=").u(tsc_hz / 1000)
        .s(" apic_khz=").u(K.apic_hz.load(Relaxed) / 1000)
        .s(" calib=").u(K.calib_src.load(Relaxed))
        .s(" region=").x(lay.region)
        .s(" pages=").u(lay.pages)
        .s(" ledger=").x(lay.ledger)
        .s(" smp_us=").u(K.last_arrival_tsc.load(Relaxed).saturating_sub(sipi) / (ms / 1000).max(1))
        .s(" boot_ms=").u((rdtsc() - unsafe { crate::boot::boot_tsc }) / ms)
        .send();
    Line::new().s("GUEST READY cpus=").u(up).s(" mem=").u(U.mem_mib.load(Relaxed)).send();
    if c.diskbench != crate::diskbench::Op::None {
        crate::diskbench::run(&c, lay.region, lay.pages * PAGE);
    }

    let hb_period = c.hb_ms * ms;
    let hb = Heartbeat { compact: c.compact, disk: c.disk, period: hb_period, next: rdtsc() + hb_period };
    let mut b = Bsp { cfg: c, tsc_hz, hb, worker: Worker::new(0), disk, disk_warned: false, nic };
    b.main_loop()
}

/// The heartbeat clock (TSC based) and line.
struct Heartbeat {
    compact: bool,
    disk: bool,
    period: u64,
    next: u64,
}

impl Heartbeat {
    fn beat(&mut self, now: u64) {
        if now < self.next {
            if self.next - now > 2 * self.period {
                self.next = now + self.period; // TSC went backwards
            }
            return;
        }
        let seq = U.seq.load(Relaxed) + 1;
        U.seq.store(seq, Relaxed);
        let mut l = Line::new();
        if self.compact {
            l.s("H ").u(seq);
        } else {
            l.s("HEARTBEAT seq=").u(seq)
                .s(" ticks=").u(K.ticks.load(Relaxed))
                .s(" gen=").u(max_gen())
                .s(" dirtied=").u(total_dirtied());
            if self.disk {
                l.s(" disk=").u(U.disk_written.load(Relaxed));
            }
        }
        l.send();
        self.next += self.period;
        if self.next <= now {
            self.next = now + self.period; // fell behind (pause, migration)
        }
    }
}

struct Bsp {
    cfg: Config,
    tsc_hz: u64,
    hb: Heartbeat,
    worker: Worker,
    disk: Option<Disk>,
    disk_warned: bool,
    nic: Option<crate::net::Nic>,
}

impl Bsp {
    fn heartbeat(&mut self, now: u64) {
        self.hb.beat(now);
    }

    fn main_loop(&mut self) -> ! {
        loop {
            let now = rdtsc();
            self.heartbeat(now);
            while let Some(ch) = input_pop() {
                match ch {
                    b'v' => self.verify(),
                    b's' => self.status(),
                    b'q' => self.quit(),
                    b'c' => self.corrupt_check(),
                    b'P' => self.power_off(),
                    _ => {}
                }
            }
            if let Some(n) = self.nic.as_mut() {
                n.poll();
            }
            if let Some(d) = self.disk.as_mut() {
                d.step();
                if d.failed() && !self.disk_warned {
                    self.disk_warned = true;
                    Line::new().s("GUEST WARN disk I/O error status=").u(d.error as u64).send();
                }
            }
            if self.cfg.dirty {
                if self.worker.run(16) < 16 {
                    idle(self.hb.next);
                }
            } else {
                idle(self.hb.next);
            }
        }
    }
    /// Pause the APs at a clean point (between two pages); the BSP is at one already.
    fn pause_all(&mut self) {
        U.pause.store(1, SeqCst);
        let ms = self.tsc_hz / 1000;
        let t0 = rdtsc();
        loop {
            let all = (1..ncpus()).all(|i| U.cpu[i].paused.load(Acquire) != 0);
            let now = rdtsc();
            if all {
                break;
            }
            if now - t0 > 5000 * ms {
                Line::new().s("GUEST WARN a CPU did not pause").send();
                break;
            }
            self.heartbeat(now);
            idle(self.hb.next.min(now + ms));
        }
    }

    fn verify(&mut self) {
        self.pause_all();
        self.verify_paused();
        if self.cfg.disk {
            self.verify_disk();
        }
        U.pause.store(0, SeqCst);
    }

    fn verify_disk(&mut self) {
        let mut l = Line::new();
        let hb = &mut self.hb;
        match self.disk.as_mut() {
            None => {
                l.s("DISK BAD sector=0 expected=0 found=0 reason=nodevice");
            }
            Some(d) => {
                d.quiesce(|| hb.beat(rdtsc()));
                match d.verify(|| hb.beat(rdtsc())) {
                    VerifyResult::Ok { sectors, gen, unwritten } => {
                        l.s("DISK OK sectors=").u(sectors).s(" gen=").u(gen).s(" unwritten=").u(unwritten);
                    }
                    VerifyResult::Bad { sector, expected, found, word } => {
                        l.s("DISK BAD sector=").u(sector).s(" expected=").u(expected).s(" found=").u(found)
                            .s(" word=").u(word as u64);
                    }
                    VerifyResult::Failed(st) => {
                        l.s("DISK BAD sector=0 expected=0 found=0 reason=ioerror status=").u(st as u64);
                    }
                }
            }
        }
        l.send();
    }

    fn verify_paused(&mut self) {
        let pages = U.pages.load(Relaxed);
        let region = U.region.load(Relaxed);
        let ledger = U.ledger.load(Relaxed) as *const u64;
        let mut gen = 0;
        let mut bad = None;
        for i in 0..pages {
            if i % 256 == 0 {
                self.heartbeat(rdtsc());
            }
            let g = unsafe { core::ptr::read_volatile(ledger.add(i as usize)) };
            gen = gen.max(g);
            let p = (region + i * PAGE) as *const u64;
            if let Some(w) = unsafe { workload::check(p, i, g) } {
                bad = Some((i, g, w));
                break;
            }
        }
        let mut l = Line::new();
        match bad {
            None => {
                l.s("LEDGER OK pages=").u(pages).s(" gen=").u(gen);
            }
            Some((i, g, w)) => {
                let p = (region + i * PAGE) as *const u64;
                let (hdr, val) = unsafe { (p.add(1).read_volatile(), p.add(w).read_volatile()) };
                l.s("LEDGER BAD page=").u(i).s(" expected=").u(g).s(" found=").u(hdr)
                    .s(" word=").u(w as u64).s(" value=").x(val);
            }
        }
        l.send();
    }

    /// Test hook for the verifiers themselves: with the workers paused, flip one word of the
    /// middle page and verify (must print LEDGER BAD for that page); with a disk, also raise the
    /// expected generation of the middle sector of the disk region by one, as if its last write
    /// had been lost, and verify the disk (must print DISK BAD for that sector). Then undo both.
    fn corrupt_check(&mut self) {
        let pages = U.pages.load(Relaxed);
        self.pause_all();
        if pages > 0 {
            let p = (U.region.load(Relaxed) + pages / 2 * PAGE + 8 * 100) as *mut u64;
            unsafe {
                let old = p.read_volatile();
                p.write_volatile(old ^ 0x10);
                self.verify_paused();
                p.write_volatile(old);
            }
        }
        let hb = &mut self.hb;
        if let Some(d) = self.disk.as_mut().filter(|d| d.sectors > 0) {
            d.quiesce(|| hb.beat(rdtsc()));
            let e = unsafe { d.ledger().add((d.sectors / 2) as usize) };
            unsafe {
                let old = e.read_volatile();
                e.write_volatile(old + 1);
                self.verify_disk();
                e.write_volatile(old);
            }
        }
        U.pause.store(0, SeqCst);
    }

    fn status(&mut self) {
        let c = &self.cfg;
        let mut l = Line::new();
        l.s("STATUS seq=").u(U.seq.load(Relaxed))
            .s(" ticks=").u(K.ticks.load(Relaxed))
            .s(" gen=").u(max_gen())
            .s(" dirtied=").u(total_dirtied())
            .s(" cpus=").u(ncpus() as u64)
            .s(" mode=").s(if c.dirty { "dirty" } else { "idle" })
            .s(" pages=").u(U.pages.load(Relaxed))
            .s(" rate=").u(c.rate)
            .s(" hz=").u(c.hz)
            .s(" hb_ms=").u(c.hb_ms)
            .s(" tsc_khz=").u(self.tsc_hz / 1000)
            .s(" uptime_ms=").u((rdtsc() - unsafe { crate::boot::boot_tsc }) / (self.tsc_hz / 1000))
            .s(" disk=").u(U.disk_written.load(Relaxed))
            .s(" disk_sectors=").u(self.disk.as_ref().map_or(0, |d| d.sectors))
            .s(" disk_error=").u(self.disk.as_ref().map_or(0, |d| d.error as u64))
            .s(" net_rx=").u(crate::net::STATS.rx.load(Relaxed))
            .s(" net_tx=").u(crate::net::STATS.tx.load(Relaxed))
            .s(" net_arp=").u(crate::net::STATS.arp.load(Relaxed))
            .s(" net_icmp=").u(crate::net::STATS.icmp.load(Relaxed))
            .s(" net_other=").u(crate::net::STATS.other.load(Relaxed))
            .s(" cpu_dirtied=");
        for i in 0..ncpus() {
            if i > 0 {
                l.s(",");
            }
            l.u(U.cpu[i].dirtied.load(Relaxed));
        }
        l.s(" cpu_ticks=");
        for i in 0..ncpus() {
            if i > 0 {
                l.s(",");
            }
            l.u(K.cpu_ticks[i].load(Relaxed));
        }
        l.send();
    }

    /// The power button (or `P`): stop, say so, and enter ACPI S5 through the sleep register.
    fn power_off(&mut self) -> ! {
        U.stop.store(1, SeqCst);
        Line::new().s("GUEST POWEROFF").send();
        syscall(sys::POWEROFF, 0, 0, 0);
        loop {}
    }

    fn quit(&mut self) -> ! {
        U.stop.store(1, SeqCst);
        let st = self.cfg.qstatus;
        Line::new().s("GUEST EXIT status=").u(st).send();
        syscall(sys::EXIT, st, 0, 0);
        loop {}
    }
}
