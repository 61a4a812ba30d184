//! Can userfaultfd serve KVM guest memory on this host? Post-copy migration depends on it, so
//! this test proves it (or shows exactly what fails) on the real VM core and the real test
//! guest, without any migration code in the way.
//!
//! `uffd_serves_kvm_guest_memory`: guest RAM (the anonymous mapping `vm-memory` made) is
//! emptied with `MADV_DONTNEED`, registered with a userfaultfd in MISSING mode and fed, page by
//! page, by a handler thread that `UFFDIO_COPY`s from a copy of it, twice:
//! 1. **at boot**: the kernel was loaded, nothing ran yet; the guest boots from served pages
//!    (PVH start info, the 32-bit entry, its page tables, the AP trampoline, user mode
//!    workload, the virtio-blk disk ledger);
//! 2. **mid-run**: a running `mode=dirty` guest with its disk ledger is paused, its RAM copied
//!    and emptied, a VMM thread writes guest RAM through `vm-memory` (a device write), and the
//!    guest resumes with every page missing.
//!
//! After each phase the guest must keep its heartbeats and answer `v` with `LEDGER OK` and
//! `DISK OK`. The test also checks who faulted: the vCPU threads and the kernel workers KVM
//! hands guest faults to (asynchronous page faults) — guest user mode, guest kernel mode and
//! KVM's own reads: the page holding the guest's PML4, which only KVM's page walker reads,
//! must fault — and the test thread (its `vm-memory` write, the path every device write
//! takes). Faults of the virtio-blk thread are reported when they happen (the guest usually
//! touches its rings and buffers before the device does).

use migration::uffd::{Uffd, PAGE};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};
use vmm::vm::DiskSpec;
use vmm::{Vm, VmConfig};

fn guest_bin() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_godwit")).parent().expect("target dir").join("godwit-guest");
    assert!(p.exists(), "test guest {} is missing: cargo build --release --workspace", p.display());
    p
}

/// Serial output split into lines.
struct Lines {
    buf: Vec<u8>,
    tx: Sender<String>,
}

impl Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        for &c in b {
            if c == b'\n' {
                let l = String::from_utf8_lossy(&self.buf).trim_end().to_string();
                self.buf.clear();
                let _ = self.tx.send(l);
            } else {
                self.buf.push(c);
            }
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn wait_for(rx: &Receiver<String>, pat: &str, t: Duration, seen: &mut Vec<String>) -> String {
    let end = Instant::now() + t;
    loop {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) => {
                seen.push(l.clone());
                if l.contains("GUEST FAULT") || l.contains("GUEST PANIC") {
                    panic!("guest failed: {l}");
                }
                if l.contains(pat) {
                    return l;
                }
            }
            Err(_) => panic!(
                "no {pat:?} within {t:?} (guest stuck on a page the handler did not serve, or KVM_RUN failed); last lines:\n{}",
                seen.iter().rev().take(10).rev().cloned().collect::<Vec<_>>().join("\n")
            ),
        }
    }
}

fn seq(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("seq="))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// What the handler saw, per faulting thread name.
#[derive(Default)]
struct Served {
    by_thread: HashMap<String, u64>,
    pages: std::collections::HashSet<u64>,
    first_hva: Vec<(u64, String)>,
}

/// The RAM image pages are served from (host address of RAM start, bytes).
struct Image {
    host: u64,
    bytes: Vec<u8>,
}

/// The faulting thread's name: one of ours, else the kernel's (e.g. a KVM async page-fault
/// worker doing the fault on a vCPU's behalf).
fn thread_name(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .or_else(|_| std::fs::read_to_string(format!("/proc/{tid}/comm")).map(|n| format!("kernel:{}", n.trim())))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| format!("tid{tid}"))
}

fn handler(uffd: Arc<Uffd>, image: Arc<Mutex<Image>>, served: Arc<Mutex<Served>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let f = match uffd.next_fault(Duration::from_millis(50)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => panic!("uffd read: {e}"),
        };
        let page = f.addr & !(PAGE - 1);
        let img = image.lock().unwrap();
        let off = (page - img.host) as usize;
        let src = &img.bytes[off..off + PAGE as usize];
        uffd.copy(page, src).expect("UFFDIO_COPY");
        drop(img);
        let name = thread_name(f.tid);
        let mut s = served.lock().unwrap();
        *s.by_thread.entry(name.clone()).or_default() += 1;
        s.pages.insert(page);
        if s.first_hva.len() < 8 {
            s.first_hva.push((page, name));
        }
    }
}

/// Copies RAM into the image, then empties RAM (every page missing from now on).
fn snapshot_and_empty(vm: &Vm, image: &Mutex<Image>) {
    let slot = vm.ram().slots()[0];
    // SAFETY: the slot's host mapping, alive as long as the VM; vCPUs are paused. Pages still
    // missing from an earlier phase fault here and the handler (serving the old image) fills
    // them first, so the copy is the guest's true memory. (The image lock is not held here:
    // the handler needs it to serve those faults.)
    let now = unsafe { std::slice::from_raw_parts(slot.host as *const u8, slot.size as usize) }.to_vec();
    let mut img = image.lock().unwrap();
    img.host = slot.host;
    img.bytes = now;
    drop(img);
    vm.ram().discard(slot.gpa, slot.size).expect("MADV_DONTNEED guest RAM");
}

fn cr3(vm: &Vm) -> u64 {
    let sections = vm.save_state().expect("save state");
    let s = sections.iter().find(|s| s.id == "vcpu.0").expect("vcpu.0 section");
    vmm::vcpu::VcpuState::from_section(s, 0).expect("vcpu state").sregs.cr3
}

fn verify(vm: &Vm, rx: &Receiver<String>, seen: &mut Vec<String>, served: &Mutex<Served>) {
    let hb = wait_for(rx, "HEARTBEAT", Duration::from_secs(20), seen);
    let n = seq(&hb);
    wait_for(rx, &format!("HEARTBEAT seq={}", n + 3), Duration::from_secs(20), seen);
    vm.serial().lock().unwrap().enqueue(b"v");
    let l = wait_for(rx, "LEDGER", Duration::from_secs(30), seen);
    assert!(l.contains("LEDGER OK"), "{l}");
    let d = wait_for(rx, "DISK", Duration::from_secs(30), seen);
    if !d.contains("DISK OK") {
        let s = served.lock().unwrap();
        panic!("{d}; faults so far per thread: {:?}; last lines:\n{}", s.by_thread, seen.join("\n"));
    }
}

#[test]
fn uffd_serves_kvm_guest_memory() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("this test needs /dev/kvm (read/write): {e}");
    }
    let uffd = Arc::new(Uffd::new().unwrap_or_else(|e| panic!("post-copy impossible here: {e}")));
    let (tx, rx) = channel();
    let disk = virtio::MemDisk::new(4 << 20);
    let vm = Vm::new(
        VmConfig {
            mem_size: 128 << 20,
            vcpus: 2,
            kernel: guest_bin(),
            cmdline: "mode=dirty mib=16 rate=20 hb_ms=100 disk=on disk_mib=1 cpus=2".into(),
            initrd: None,
        },
        Box::new(Lines { buf: Vec::new(), tx }),
        vec![DiskSpec { backend: Box::new(disk), config: virtio::BlockConfig::default() }],
    )
    .expect("create VM");
    assert_eq!(vm.ram().slots().len(), 1);
    let slot = vm.ram().slots()[0];
    let image = Arc::new(Mutex::new(Image { host: slot.host, bytes: Vec::new() }));
    let served = Arc::new(Mutex::new(Served::default()));
    let stop = Arc::new(AtomicBool::new(false));

    // Phase 1: boot from served pages.
    snapshot_and_empty(&vm, &image);
    uffd.register_missing(slot.host, slot.size).unwrap_or_else(|e| panic!("cannot register guest RAM: {e}"));
    let h = {
        let (u, i, s, st) = (uffd.clone(), image.clone(), served.clone(), stop.clone());
        std::thread::Builder::new().name("uffd-handler".into()).spawn(move || handler(u, i, s, st)).unwrap()
    };
    let t = Instant::now();
    vm.resume();
    let mut seen = Vec::new();
    wait_for(&rx, "GUEST READY", Duration::from_secs(30), &mut seen);
    eprintln!("phase 1: guest booted from userfaultfd-served RAM in {:?}", t.elapsed());
    verify(&vm, &rx, &mut seen, &served);
    let boot = std::mem::take(&mut *served.lock().unwrap());
    eprintln!("phase 1 faults served per thread: {:?} ({} pages)", boot.by_thread, boot.pages.len());

    // Phase 2: a running guest loses all its RAM at once and gets it back on demand.
    vm.pause();
    let cr3 = cr3(&vm) & !0xfff;
    snapshot_and_empty(&vm, &image);
    // (Copying RAM faulted in, from this thread, the pages phase 1 never touched.)
    *served.lock().unwrap() = Served::default();
    // A device write through vm-memory into a missing page (last page of RAM, unused by the
    // guest): the writing thread blocks until the handler installs the page, then writes.
    let last = GuestAddress(slot.size - PAGE);
    vm.ram().memory().write_obj(0x600d_f00du64, last).expect("vm-memory write");
    assert_eq!(vm.ram().memory().read_obj::<u64>(last).unwrap(), 0x600d_f00d);
    let t = Instant::now();
    vm.resume();
    verify(&vm, &rx, &mut seen, &served);
    stop.store(true, Ordering::SeqCst);
    h.join().unwrap();
    let run = std::mem::take(&mut *served.lock().unwrap());
    eprintln!(
        "phase 2 faults served per thread: {:?} ({} pages in {:?}); first: {:?}",
        run.by_thread,
        run.pages.len(),
        t.elapsed(),
        run.first_hva.iter().map(|(a, n)| (format!("gpa {:#x}", a - slot.host), n)).collect::<Vec<_>>()
    );
    vm.shutdown();

    for (phase, s) in [("boot", &boot), ("mid-run", &run)] {
        // KVM resolves most guest faults on a kernel worker (asynchronous page faults) on
        // behalf of the vCPU; the rest fault on the vCPU thread itself.
        let guest: u64 =
            s.by_thread.iter().filter(|(n, _)| n.starts_with("vcpu") || n.starts_with("kernel:kworker")).map(|(_, c)| c).sum();
        assert!(guest > 100, "{phase}: too few faults on behalf of the vCPUs: {:?}", s.by_thread);
    }
    // The virtio-blk thread faults only when it touches a page before the guest does (the
    // guest usually writes its rings and buffers first), so it is reported, not required;
    // the vm-memory write below is the device-write path made certain.
    eprintln!("virtio-blk thread faults: boot {:?}, mid-run {:?}", boot.by_thread.get("virtio-blk"), run.by_thread.get("virtio-blk"));
    // The test thread's vm-memory write faulted (served before the vCPUs resumed).
    assert!(run.pages.contains(&(slot.host + slot.size - PAGE)), "the vm-memory write did not fault");
    // The page of the guest's top-level page table is read by KVM's page walker (the guest
    // never reads it as data): it must have faulted, from a vCPU thread.
    assert!(run.pages.contains(&(slot.host + cr3)), "the PML4 page {cr3:#x} never faulted");
    let pml4_by = run.first_hva.iter().find(|(a, _)| *a == slot.host + cr3).map(|(_, n)| n.clone());
    if let Some(n) = pml4_by {
        assert!(n.starts_with("vcpu") || n.starts_with("kernel:"), "PML4 faulted from {n}");
    }
}
