//! Linux direct boot end to end (issue 4).
//!
//! - A synthetic bzImage (`crates/vmm/tests/linux_common`) checks the 64-bit boot protocol
//!   entry, the zero page, the initrd, the ACPI reset register (then `-no-reboot`) and the ACPI
//!   S5 sleep register ending Godwit with status 0. These take well under a second of guest time.
//! - Debian's cloud kernel, with the initramfs from `scripts/build-initramfs.sh`, booted both as
//!   the ELF `vmlinux` (PVH entry, from `scripts/extract-vmlinux.sh`) and as the bzImage:
//!   its banner, its e820 map equal to ours, our ACPI tables in its table list and the vCPU
//!   count from our MADT. On this host's nested KVM the kernel then stops with an emulation
//!   failure that Godwit must report clearly (exit 1, guest RIP and instruction bytes); on a
//!   KVM that runs it, the initramfs reports `BOOT-OK` and powers off, ending Godwit with 0.
//!   Both outcomes are checked in full; a hang fails the test at its (generous) timeout.

mod common;
#[path = "../../vmm/tests/linux_common/mod.rs"]
mod linux_common;

use common::*;
use linux_common::{bzimage, Fake};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const FAST: Duration = Duration::from_secs(60);

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn e820_len(mem_mib: u64) -> usize {
    vmm::boot::memory_map(&vmm::memory::GuestRam::new(mem_mib << 20).unwrap()).len()
}

#[test]
fn synthetic_bzimage_resets_through_acpi_then_powers_off() {
    let d = tmpdir("linux-fake");
    let k = write(&d, "bzImage", &bzimage(Fake::default()));
    let rd = write(&d, "initrd", b"GODWITRD-and-more-bytes");
    let (k, rd) = (k.to_str().unwrap(), rd.to_str().unwrap());
    let mut vm = Vm::spawn(&[
        "-m",
        "64",
        "-smp",
        "2",
        "-kernel",
        k,
        "-initrd",
        rd,
        "-append",
        "console=ttyS0 hi",
    ]);
    let expect = format!("e{} console=ttyS0 hi GODWITRD", e820_len(64));
    let first = vm.wait_for("B1", FAST);
    assert_eq!(
        first.trim_end(),
        format!("B1 {expect}"),
        "boot 1 saw a different zero page"
    );
    // The guest wrote the FADT reset value: Godwit reset the machine (RAM kept: the counter).
    let second = vm.wait_for("B2", FAST);
    assert_eq!(second.trim_end(), format!("B2 {expect}"));
    // Then it wrote SLP_TYP 5 | SLP_EN to the sleep control register.
    assert_eq!(
        vm.wait_exit(FAST),
        Some(0),
        "stderr: {}",
        vm.stderr.lock().unwrap()
    );
    assert!(
        !vm.seen.iter().any(|l| l.contains('!')),
        "guest check failed: {:?}",
        vm.seen
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn synthetic_bzimage_reset_honours_no_reboot() {
    let d = tmpdir("linux-noreboot");
    let k = write(&d, "bzImage", &bzimage(Fake::default()));
    let mut vm = Vm::spawn(&[
        "-m",
        "64",
        "-no-reboot",
        "-kernel",
        k.to_str().unwrap(),
        "-append",
        "x",
    ]);
    let first = vm.wait_for("B1", FAST);
    assert_eq!(first.trim_end(), format!("B1 e{} x", e820_len(64)));
    assert_eq!(vm.wait_exit(FAST), Some(0));
    vm.collect_for(Duration::from_millis(200));
    assert!(
        !vm.seen.iter().any(|l| l.contains("B2")),
        "rebooted despite -no-reboot: {:?}",
        vm.seen
    );
    let _ = std::fs::remove_dir_all(&d);
}

fn fails_in_one_line(args: &[&str], expect: &[&str]) {
    let (code, err) = run_to_end(args);
    assert_eq!(code, 1, "args {args:?}: exit {code}, stderr: {err}");
    for e in expect {
        assert!(err.contains(e), "args {args:?}: stderr {err:?} lacks {e:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err:?}"
    );
}

#[test]
fn bad_kernel_images_fail_clearly() {
    require_kvm();
    let d = tmpdir("linux-bad");
    let p = |name: &str, f: Fake| write(&d, name, &bzimage(f)).to_str().unwrap().to_string();
    let truncated = p(
        "truncated",
        Fake {
            truncate: 64,
            ..Fake::default()
        },
    );
    fails_in_one_line(
        &["-kernel", &truncated],
        &["godwit: kernel '", "truncated bzImage"],
    );
    let not64 = p(
        "not64",
        Fake {
            xloadflags: 0,
            ..Fake::default()
        },
    );
    fails_in_one_line(&["-kernel", &not64], &["no 64-bit entry point"]);
    let big = p(
        "big",
        Fake {
            init_size: 200 << 20,
            ..Fake::default()
        },
    );
    fails_in_one_line(
        &["-m", "128", "-kernel", &big],
        &["needs 216 MiB", "has 128 MiB", "raise -m"],
    );
    let garbage = write(&d, "garbage", &[0x42u8; 4096]);
    fails_in_one_line(
        &["-kernel", garbage.to_str().unwrap()],
        &["not a loadable PVH ELF kernel"],
    );
    let ok = p("ok", Fake::default());
    fails_in_one_line(
        &["-kernel", &ok, "-initrd", "/nonexistent/initrd"],
        &["initrd '/nonexistent/initrd'", "cannot open"],
    );
    let _ = std::fs::remove_dir_all(&d);
}

// ---- Debian's cloud kernel ----------------------------------------------------------------------

struct RealKernel {
    bzimage: PathBuf,
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(name)
}

fn run_script(name: &str, args: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(script(name))
        .args(args)
        .output()
        .expect("run bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed:\n{text}"
    );
    text
}

/// Builds the initramfs (installing busybox-static and linux-image-cloud-amd64 if missing),
/// finds the matching /boot/vmlinuz and extracts its vmlinux. Once per test binary.
fn real_kernel() -> &'static RealKernel {
    static K: OnceLock<RealKernel> = OnceLock::new();
    K.get_or_init(|| {
        // Under the target dir, one folder per test process; folders of processes that are gone
        // (a test that panicked) are removed here, so nothing piles up.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-real");
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !Path::new("/proc").join(&pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let d = base.join(std::process::id().to_string());
        std::fs::create_dir_all(&d).unwrap();
        let initramfs = d.join("initramfs.cpio.gz");
        let log = run_script("build-initramfs.sh", &["-o", initramfs.to_str().unwrap()]);
        let kver = log
            .split(" for ")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .unwrap_or_else(|| panic!("cannot tell the kernel version from: {log}"))
            .to_string();
        let bzimage = PathBuf::from(format!("/boot/vmlinuz-{kver}"));
        assert!(
            bzimage.exists(),
            "{} is missing: install linux-image-cloud-amd64 (apt-get install linux-image-cloud-amd64)",
            bzimage.display()
        );
        let vmlinux = d.join("vmlinux");
        run_script("extract-vmlinux.sh", &[bzimage.to_str().unwrap(), vmlinux.to_str().unwrap()]);
        RealKernel { bzimage, vmlinux, initramfs }
    })
}

const MEM_MIB: u64 = 512;
const VCPUS: usize = 2;
const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 rdinit=/init panic=-1";

/// The e820 lines Linux prints for our map ("BIOS-e820: [mem 0x…-0x…] usable").
fn expected_e820() -> Vec<String> {
    let ram = vmm::memory::GuestRam::new(MEM_MIB << 20).unwrap();
    vmm::boot::memory_map(&ram)
        .into_iter()
        .map(|(a, s, t)| {
            let kind = if t == 1 { "usable" } else { "reserved" };
            format!("BIOS-e820: [mem {:#018x}-{:#018x}] {kind}", a, a + s - 1)
        })
        .collect()
}

/// The table list Linux prints for our ACPI tables ("ACPI: FACP 0x… 000114 (v06 GODWIT …").
fn expected_acpi() -> Vec<String> {
    let t = vmm::linux::acpi_tables(VCPUS, &[]).unwrap();
    let l = t.layout;
    let mut v = vec![format!("ACPI: RSDP 0x{:016X} 000024 (v02 GODWIT)", l.rsdp)];
    for (sig, a) in [
        ("XSDT", l.xsdt),
        ("FACP", l.fadt),
        ("DSDT", l.dsdt),
        ("APIC", l.madt),
    ] {
        let b = t.table_at(a).unwrap();
        v.push(format!(
            "ACPI: {sig} 0x{a:016X} {:06X} (v{:02} GODWIT GODWITVM",
            b.len(),
            b[8]
        ));
    }
    v
}

/// Starts the real kernel and checks its early boot up to the CPU count from our MADT.
fn early_boot(kernel: &Path, timeout: Duration) -> Vm {
    let k = real_kernel();
    let (mem, smp) = (MEM_MIB.to_string(), VCPUS.to_string());
    let args = [
        "-m",
        &mem,
        "-smp",
        &smp,
        "-kernel",
        kernel.to_str().unwrap(),
    ];
    let mut vm = Vm::spawn(
        &[
            &args[..],
            &["-initrd", k.initramfs.to_str().unwrap(), "-append", CMDLINE],
        ]
        .concat(),
    );
    let start = Instant::now();
    let banner = vm.wait_for("Linux version ", timeout);
    assert!(banner.contains("cloud-amd64"), "{banner}");
    eprintln!("banner after {:?}: {}", start.elapsed(), banner.trim_end());
    let cpus = vm.wait_for("smpboot: Allowing ", timeout);
    eprintln!("CPU count after {:?}: {}", start.elapsed(), cpus.trim_end());
    assert!(cpus.contains(&format!("Allowing {VCPUS} CPUs")), "{cpus}");
    let seen: Vec<String> = vm.seen.iter().map(|l| l.trim_end().to_string()).collect();
    let e820: Vec<&str> = seen
        .iter()
        .filter_map(|l| l.find("BIOS-e820: ").map(|i| &l[i..]))
        .collect();
    assert_eq!(
        e820,
        expected_e820(),
        "the kernel's e820 map differs from ours"
    );
    for want in expected_acpi() {
        assert!(
            seen.iter().any(|l| l.contains(&want)),
            "kernel did not list {want:?}; saw:\n{}",
            seen.join("\n")
        );
    }
    assert!(
        seen.iter()
            .any(|l| l.contains("ACPI: Using ACPI (MADT) for SMP configuration")),
        "{seen:?}"
    );
    // The initrd is where we put it (top of RAM, page aligned): the kernel reports its range.
    let size = std::fs::metadata(&k.initramfs).unwrap().len();
    let top = (MEM_MIB << 20).min(0xC000_0000);
    let want = format!(
        "RAMDISK: [mem {:#010x}-{:#010x}]",
        (top - size) & !0xfff,
        top - 1
    );
    assert!(
        seen.iter().any(|l| l.contains(&want)),
        "kernel did not report {want:?}"
    );
    vm
}

/// After early boot: either this host's emulation failure, reported clearly, or (on a KVM that
/// runs the kernel) the initramfs's report and an ACPI power-off with status 0.
fn finish(vm: &mut Vm, timeout: Duration) {
    let code = vm.wait_exit(timeout);
    let err = vm.stderr.lock().unwrap().clone();
    match code {
        Some(1) => {
            let line = err.lines().find(|l| l.contains("KVM internal error")).unwrap_or_else(|| {
                panic!("exit 1 without a KVM internal error report: {err}")
            });
            assert!(line.starts_with("godwit: vCPU "), "{line}");
            assert!(line.contains("emulation failure") && line.contains(" at RIP 0x"), "{line}");
            let bytes = line.split("instruction bytes:").nth(1).unwrap_or_else(|| panic!("no bytes: {line}"));
            assert_eq!(bytes.split_whitespace().filter(|b| u8::from_str_radix(b, 16).is_ok()).count(), 15, "{line}");
            eprintln!("stopped as expected on this host: {line}");
        }
        Some(0) => {
            vm.collect_for(Duration::from_millis(100));
            let all = vm.seen.join("\n");
            assert!(all.contains("GODWIT-INITRAMFS: init started"), "{all}");
            assert!(all.contains(&format!("cpus: {VCPUS}")), "{all}");
            assert!(all.contains("BOOT-OK"), "{all}");
            eprintln!("the kernel booted to its initramfs and powered off");
        }
        other => panic!(
            "godwit neither stopped with a clear error nor powered off within {timeout:?} (exit {other:?}); \
             last lines:\n{}\nstderr: {err}",
            vm.seen.iter().rev().take(10).rev().cloned().collect::<Vec<_>>().join("\n")
        ),
    }
}

#[test]
fn debian_vmlinux_boots_through_pvh_with_our_acpi_and_e820() {
    require_kvm();
    let k = real_kernel();
    // Interpreted kernel code on this host: tens of seconds; the timeouts only catch hangs.
    let mut vm = early_boot(&k.vmlinux, Duration::from_secs(600));
    finish(&mut vm, Duration::from_secs(600));
}

#[test]
fn debian_bzimage_boots_through_the_64bit_protocol_with_our_acpi_and_e820() {
    require_kvm();
    let k = real_kernel();
    // The bzImage's own decompressor runs first (interpreted here: minutes on a busy host).
    let _vm = early_boot(&k.bzimage, Duration::from_secs(1200));
    // Stopping here keeps the test short; the vmlinux test follows the boot to its end.
}
