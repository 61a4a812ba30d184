//! Runs the suite's runner. On a host whose KVM cannot run Linux user space (the nested
//! `kvm_pvm`, or no vmx/svm flag) every part must be reported NOT RUN with that reason, never
//! PASS, and the runner exits 0. On a host with hardware KVM the whole suite runs (root, the
//! kit, godwit built next to the runner, QEMU optional) and must pass.

use std::process::Command;

fn hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let vmx = cpuinfo.lines().filter(|l| l.starts_with("flags")).flat_map(|l| l.split_whitespace()).any(|f| f == "vmx" || f == "svm");
    vmx && !std::path::Path::new("/sys/module/kvm_pvm").exists() && std::path::Path::new("/dev/kvm").exists()
}

#[test]
fn the_suite_reports_every_part_and_passes_or_says_why_not() {
    let out = Command::new(env!("CARGO_BIN_EXE_godwit-linux-e2e")).output().expect("run godwit-linux-e2e");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("{text}{err}");
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with("godwit ") || l.starts_with("qemu ")).collect();
    let parts = ["boot-smp2", "ledgers", "tcp", "precopy", "postcopy", "auto-converge", "savevm-loadvm", "cold-migration", "poweroff"];
    for vmm in ["godwit", "qemu"] {
        for p in parts {
            assert_eq!(
                rows.iter().filter(|r| r.split_whitespace().take(2).collect::<Vec<_>>() == [vmm, p]).count(),
                1,
                "one row for {vmm} {p}:\n{text}"
            );
        }
    }
    assert_eq!(rows.len(), 2 * parts.len(), "{text}");
    if hardware_kvm() {
        assert_eq!(out.status.code(), Some(0), "the suite failed on a hardware-KVM host:\n{text}\n{err}");
        for r in &rows {
            assert!(!r.contains(" FAIL ("), "{r}");
            if r.starts_with("godwit ") {
                assert!(r.contains(" PASS"), "every Godwit part runs and passes here: {r}");
            }
        }
    } else {
        assert_eq!(out.status.code(), Some(0), "NOT RUN is not a failure:\n{text}\n{err}");
        for r in &rows {
            assert!(
                r.contains(" NOT RUN (this host's KVM cannot run Linux user space: kvm_pvm"),
                "on this host every part is NOT RUN with the reason: {r}"
            );
            assert!(!r.contains(" PASS"), "{r}");
        }
        assert!(text.contains("linux-e2e: 0 passed, 0 failed, 18 not run"), "{text}");
    }
}
