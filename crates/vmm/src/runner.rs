//! vCPU threads and the pause/resume protocol every later feature relies on.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and dispatches port/MMIO exits to the buses.
//! Pausing: under the control lock, set `pause`, set `immediate_exit` in each vCPU's shared
//! `kvm_run` page and kick its thread with a signal. A kicked vCPU returns from `KVM_RUN`
//! (EINTR), then runs `KVM_RUN` once more with `immediate_exit` still set so KVM commits any
//! half-done port/MMIO completion, and parks. `pause()` returns when every live vCPU is parked,
//! so their state can be saved and guest RAM is quiet. Resuming clears the flag and wakes them.

use crate::memory::GuestRam;
use devices::bus::Bus;
use devices::{VmEvents, VmRequest};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::Duration;
use std::thread::JoinHandle;

/// The signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// A vCPU: its KVM handle (locked by its thread while inside KVM_RUN, by the VM while paused).
pub struct Vcpu {
    pub id: usize,
    pub fd: Mutex<VcpuFd>,
    run_page: usize,
}

impl Vcpu {
    pub fn new(id: usize, mut fd: VcpuFd) -> Self {
        let run_page = fd.get_kvm_run() as *mut kvm_bindings::kvm_run as usize;
        Vcpu { id, fd: Mutex::new(fd), run_page }
    }

    fn set_immediate_exit(&self, v: u8) {
        // SAFETY: `run_page` is the vCPU's mmapped kvm_run page, alive as long as the VcpuFd;
        // KVM reads `immediate_exit` on entry, so a racing volatile byte write is intended.
        unsafe { std::ptr::write_volatile(&mut (*(self.run_page as *mut kvm_bindings::kvm_run)).immediate_exit, v) }
    }

    /// Locks the vCPU's fd (only meaningful while the VM is paused).
    pub fn lock(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct Ctl {
    pause: bool,
    quit: bool,
    parked: usize,
    alive: usize,
    /// Bumped on every resume; a vCPU that stopped on an error waits for the next one.
    epoch: u64,
}

/// Shared pause/resume control of all vCPU threads.
pub struct Control {
    st: Mutex<Ctl>,
    cv: Condvar,
    /// Percentage of time the vCPUs are held back (auto-converge), 0 = not throttled.
    throttle: AtomicU8,
    /// While set, parked vCPUs busy-wait for the next resume instead of sleeping (a sleeping
    /// thread wakes milliseconds late on a nested host; an incoming migration's switchover
    /// sets this so the guest runs the moment its state is in).
    spin_park: AtomicBool,
    /// Mirrors `Ctl::epoch` for the spinning vCPUs.
    epoch: std::sync::atomic::AtomicU64,
}

/// The throttle period: a throttled vCPU runs `period * (100 - pct)%` then sleeps the rest.
const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

/// What a vCPU thread needs besides its own fd.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub events: VmEvents,
    pub ram: Arc<GuestRam>,
}

/// The running vCPU threads.
pub struct VcpuSet {
    pub vcpus: Vec<Arc<Vcpu>>,
    ctl: Arc<Control>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    throttler: Mutex<Option<(Arc<AtomicBool>, JoinHandle<()>)>>,
}

impl VcpuSet {
    /// Starts one thread per vCPU, all parked (paused) until [`VcpuSet::resume`].
    pub fn start(vcpus: Vec<Arc<Vcpu>>, ctx: VcpuContext) -> std::io::Result<Self> {
        install_kick_handler();
        let ctl = Arc::new(Control {
            st: Mutex::new(Ctl { pause: true, alive: vcpus.len(), ..Default::default() }),
            cv: Condvar::new(),
            throttle: AtomicU8::new(0),
            spin_park: AtomicBool::new(false),
            epoch: std::sync::atomic::AtomicU64::new(0),
        });
        let mut threads = Vec::new();
        for v in &vcpus {
            let (v, ctl, ctx) = (v.clone(), ctl.clone(), ctx.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("vcpu{}", v.id))
                    .spawn(move || vcpu_loop(v, ctl, ctx))?,
            );
        }
        let set = VcpuSet { vcpus, ctl, threads: Mutex::new(threads), throttler: Mutex::new(None) };
        drop(set.wait_parked(set.lock()));
        Ok(set)
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_parked<'a>(&'a self, mut s: MutexGuard<'a, Ctl>) -> MutexGuard<'a, Ctl> {
        while s.parked < s.alive {
            s = self.ctl.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s
    }

    /// Stops every vCPU at a clean point (all exits completed). Idempotent.
    pub fn pause(&self) {
        let mut s = self.lock();
        if !s.pause {
            s.pause = true;
            let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
            for (v, t) in self.vcpus.iter().zip(threads.iter()) {
                v.set_immediate_exit(1);
                // SAFETY: the pthread id belongs to a thread we spawned and have not joined.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
        }
        drop(self.wait_parked(s));
    }

    /// Kicks every running vCPU out of KVM_RUN (they re-enter at once unless paused or
    /// throttled).
    fn kick_all(&self, s: &Ctl) {
        if s.pause {
            return;
        }
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for (v, t) in self.vcpus.iter().zip(threads.iter()) {
            v.set_immediate_exit(1);
            // SAFETY: the pthread id belongs to a thread we spawned and have not joined.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Holds the vCPUs back `pct` percent of the time (QEMU's auto-converge CPU throttle);
    /// 0 releases them. A kicker thread interrupts them every period; each vCPU then sleeps
    /// its share on its own thread, waking at once for a pause.
    pub fn set_throttle(self: &Arc<Self>, pct: u8) {
        let pct = pct.min(99);
        self.ctl.throttle.store(pct, Ordering::SeqCst);
        let mut t = self.throttler.lock().unwrap_or_else(|p| p.into_inner());
        if pct == 0 {
            // The kicker notices within one period; nobody waits for it (this runs on the
            // migration's critical path).
            if let Some((stop, _detached)) = t.take() {
                stop.store(true, Ordering::SeqCst);
            }
            self.ctl.cv.notify_all();
            return;
        }
        if t.is_none() {
            let stop = Arc::new(AtomicBool::new(false));
            let (me, stop2) = (Arc::downgrade(self), stop.clone());
            if let Ok(h) = std::thread::Builder::new().name("throttle".into()).spawn(move || {
                while !stop2.load(Ordering::SeqCst) {
                    // As QEMU's throttle: each period is one timeslice of running plus the
                    // vCPU's nap (`throttle_sleep`), so the guest runs (100 - pct) % of the
                    // time. A fixed period would cut into the running part too.
                    let pct = me.upgrade().map_or(0, |set| set.ctl.throttle.load(Ordering::SeqCst) as u32).min(99);
                    std::thread::sleep(THROTTLE_PERIOD * 100 / (100 - pct));
                    let Some(set) = me.upgrade() else { return };
                    let s = set.lock();
                    set.kick_all(&s);
                }
            }) {
                *t = Some((stop, h));
            }
        }
    }

    pub fn throttle(&self) -> u8 {
        self.ctl.throttle.load(Ordering::SeqCst)
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.pause = false;
        s.epoch += 1;
        self.ctl.epoch.store(s.epoch, Ordering::SeqCst);
        self.ctl.spin_park.store(false, Ordering::SeqCst);
        self.ctl.cv.notify_all();
    }

    /// Makes parked vCPUs busy-wait until the next [`VcpuSet::resume`] (which ends it), so
    /// that resume takes effect at once. For the last milliseconds before a known resume.
    pub fn prepare_resume(&self) {
        let _s = self.lock();
        self.ctl.spin_park.store(true, Ordering::SeqCst);
        self.ctl.cv.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().pause
    }

    /// Ends every vCPU thread.
    pub fn shutdown(&self) {
        if let Some((stop, h)) = self.throttler.lock().unwrap_or_else(|p| p.into_inner()).take() {
            stop.store(true, Ordering::SeqCst);
            let _ = h.join();
        }
        self.pause();
        {
            let mut s = self.lock();
            s.quit = true;
            self.ctl.cv.notify_all();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuSet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn vcpu_loop(v: Arc<Vcpu>, ctl: Arc<Control>, ctx: VcpuContext) {
    let mut stopped_epoch: Option<u64> = None;
    loop {
        {
            let mut s = ctl.st.lock().unwrap_or_else(|p| p.into_inner());
            let must_wait = |s: &Ctl| s.pause || stopped_epoch == Some(s.epoch);
            if s.quit || must_wait(&s) {
                drop(s);
                commit_pending_exit(&v);
                s = ctl.st.lock().unwrap_or_else(|p| p.into_inner());
                s.parked += 1;
                ctl.cv.notify_all();
                while !s.quit && must_wait(&s) {
                    if ctl.spin_park.load(Ordering::SeqCst) && stopped_epoch.is_none() {
                        let seen = s.epoch;
                        drop(s);
                        while ctl.spin_park.load(Ordering::SeqCst) && ctl.epoch.load(Ordering::SeqCst) == seen {
                            // Yield: on a small host the thread restoring the state needs the CPU.
                            std::thread::yield_now();
                        }
                        s = ctl.st.lock().unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                    s = ctl.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                s.parked -= 1;
                if s.quit {
                    s.alive -= 1;
                    ctl.cv.notify_all();
                    return;
                }
                stopped_epoch = None;
                v.set_immediate_exit(0);
                continue;
            }
        }
        let mut fd = v.lock();
        let outcome = match fd.run() {
            Ok(exit) => handle_exit(v.id, exit, &ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Outcome::Kicked,
            Err(e) => Outcome::Stop(VmRequest::Fatal { vcpu: v.id, message: format!("KVM_RUN failed: {e}") }),
        };
        let outcome = match outcome {
            Outcome::InternalError => Outcome::Stop(VmRequest::Fatal {
                vcpu: v.id,
                message: describe_internal_error(v.id, &mut fd, &ctx.ram),
            }),
            o => o,
        };
        drop(fd);
        if let Outcome::Kicked = outcome {
            throttle_sleep(&v, &ctl);
        }
        if let Outcome::Stop(req) = outcome {
            let s = ctl.st.lock().unwrap_or_else(|p| p.into_inner());
            stopped_epoch = Some(s.epoch);
            drop(s);
            ctx.events.send(req);
        }
    }
}

/// After a kick: if the VM is throttled (and not being paused), sleep this vCPU's share of the
/// throttle period, waking early for a pause.
fn throttle_sleep(v: &Vcpu, ctl: &Control) {
    let pct = ctl.throttle.load(Ordering::SeqCst) as u32;
    let s = ctl.st.lock().unwrap_or_else(|p| p.into_inner());
    if s.pause || s.quit {
        return;
    }
    v.set_immediate_exit(0);
    if pct == 0 {
        return;
    }
    let nap = THROTTLE_PERIOD * pct / (100 - pct);
    let _ = ctl.cv.wait_timeout_while(s, nap, |s| !s.pause && !s.quit && ctl.throttle.load(Ordering::SeqCst) > 0);
}

/// With `immediate_exit` set, KVM_RUN completes a pending port/MMIO read and returns EINTR
/// without running guest code.
fn commit_pending_exit(v: &Vcpu) {
    v.set_immediate_exit(1);
    let mut fd = v.lock();
    let _ = fd.run();
}

enum Outcome {
    Continue,
    /// KVM_RUN returned EINTR: a pause or a throttle kick.
    Kicked,
    InternalError,
    Stop(VmRequest),
}

fn handle_exit(id: usize, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Outcome {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(port as u64, data) {
                tracing::trace!("vcpu{id}: write to unclaimed port {port:#x}");
            }
            Outcome::Continue
        }
        VcpuExit::IoIn(port, data) => {
            ctx.pio.read(port as u64, data);
            Outcome::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.mmio.read(addr, data);
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                tracing::trace!("vcpu{id}: write to unclaimed MMIO {addr:#x}");
            }
            Outcome::Continue
        }
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => Outcome::Continue,
        VcpuExit::Shutdown => Outcome::Stop(VmRequest::Reset),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::Stop(VmRequest::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => Outcome::Stop(VmRequest::Reset),
            other => Outcome::Stop(VmRequest::Fatal { vcpu: id, message: format!("system event {other}") }),
        },
        VcpuExit::InternalError => Outcome::InternalError,
        VcpuExit::FailEntry(reason, cpu) => Outcome::Stop(VmRequest::Fatal {
            vcpu: id,
            message: format!("KVM entry failure (hardware reason {reason:#x}, host cpu {cpu})"),
        }),
        other => Outcome::Stop(VmRequest::Fatal { vcpu: id, message: format!("unexpected KVM exit {other:?}") }),
    }
}

/// "KVM internal error (suberror 1: emulation failure) on vCPU 0 at RIP 0x…: f0 48 0f c7 …"
fn describe_internal_error(id: usize, fd: &mut VcpuFd, ram: &GuestRam) -> String {
    // SAFETY: reading the `internal` member of the exit union, valid for KVM_EXIT_INTERNAL_ERROR.
    let suberror = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let what = match suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        _ => "unknown",
    };
    let mut msg = format!("KVM internal error (suberror {suberror}: {what}) on vCPU {id}");
    if let (Ok(regs), Ok(sregs)) = (fd.get_regs(), fd.get_sregs()) {
        let linear = sregs.cs.base.wrapping_add(regs.rip);
        msg += &format!(" at RIP {:#x} (CS base {:#x}, CPL {})", regs.rip, sregs.cs.base, sregs.cs.dpl);
        let phys = if sregs.cr0 & 0x8000_0000 != 0 {
            fd.translate_gva(linear).ok().filter(|t| t.valid != 0).map(|t| t.physical_address)
        } else {
            Some(linear)
        };
        match phys.and_then(|p| ram.host_slice(p, 15).map(|b| b.to_vec())) {
            Some(bytes) => {
                msg += ", instruction bytes:";
                for b in bytes {
                    msg += &format!(" {b:02x}");
                }
            }
            None => msg += ", instruction bytes unreadable",
        }
    }
    msg
}
