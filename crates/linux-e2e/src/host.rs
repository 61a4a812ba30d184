//! What this host can run, and the Linux kit (`scripts/linux-kit.sh DIR`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The reason every part that needs Linux user space is not run on a nested `kvm_pvm` host.
pub const PVM_REASON: &str = "this host's KVM cannot run Linux user space: kvm_pvm";

/// Why Linux user space cannot run under KVM here, or None on a hardware-KVM host.
/// `sys_module` and `cpuinfo` are parameters so the decision can be tested.
pub fn blocker(sys_module: &Path, cpuinfo: &str, dev_kvm: &Path) -> Option<String> {
    if sys_module.join("kvm_pvm").exists() {
        return Some(format!(
            "{PVM_REASON} (nested, software-paged: a guest's user-mode syscall never reaches its kernel)"
        ));
    }
    let flags = cpuinfo.lines().filter(|l| l.starts_with("flags")).flat_map(|l| l.split_whitespace());
    if !flags.into_iter().any(|f| f == "vmx" || f == "svm") {
        return Some(format!("{PVM_REASON} or another software KVM (no vmx/svm flag in /proc/cpuinfo)"));
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev_kvm) {
        return Some(format!("no usable {}: {e}", dev_kvm.display()));
    }
    None
}

pub fn this_host_blocker() -> Option<String> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    blocker(Path::new("/sys/module"), &cpuinfo, Path::new("/dev/kvm"))
}

/// What the kit printed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Kit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub profile: String,
}

/// Parses `key=value` lines (the kit's stdout).
pub fn parse_kit(out: &str) -> Result<Kit, String> {
    let mut k = Kit::default();
    for l in out.lines() {
        match l.split_once('=') {
            Some(("kernel", v)) => k.kernel = v.into(),
            Some(("initrd", v)) => k.initrd = v.into(),
            Some(("append", v)) => k.append = v.to_string(),
            Some(("profile", v)) => k.profile = v.to_string(),
            _ => {}
        }
    }
    if k.kernel.as_os_str().is_empty() || k.initrd.as_os_str().is_empty() {
        return Err(format!("the kit printed no kernel= or initrd= line: {out}"));
    }
    Ok(k)
}

/// Runs the kit script into `dir`.
pub fn build_kit(script: &Path, dir: &Path) -> Result<Kit, String> {
    let out = Command::new("bash").arg(script).arg(dir).output().map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{} failed: {}", script.display(), err.lines().last().unwrap_or("")));
    }
    let kit = parse_kit(&String::from_utf8_lossy(&out.stdout))?;
    if kit.profile == "pvm" {
        return Err("the kit applied the kvm_pvm host profile on a host with hardware KVM".into());
    }
    Ok(kit)
}

/// A program on PATH, or None.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection() {
        let d = std::env::temp_dir().join(format!("e2e-host-{}", std::process::id()));
        std::fs::create_dir_all(d.join("mods/kvm_pvm")).unwrap();
        std::fs::create_dir_all(d.join("none")).unwrap();
        let vmx = "processor : 0\nflags : fpu vme vmx sse\n";
        let novmx = "processor : 0\nflags : fpu vme sse\n";
        let kvm = d.join("kvm");
        std::fs::write(&kvm, b"").unwrap();
        assert!(blocker(&d.join("mods"), vmx, &kvm).unwrap().starts_with(PVM_REASON));
        assert!(blocker(&d.join("none"), novmx, &kvm).unwrap().starts_with(PVM_REASON));
        assert_eq!(blocker(&d.join("none"), vmx, &kvm), None);
        assert!(blocker(&d.join("none"), vmx, &d.join("nokvm")).unwrap().contains("no usable"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn kit_lines() {
        let k = parse_kit("profile=none\nkernel=/k/vmlinux\nbzimage=/k/bz\ninitrd=/k/i.gz\nappend=console=ttyS0 rdinit=/init godwit.workload=agent\n").unwrap();
        assert_eq!(k.kernel, PathBuf::from("/k/vmlinux"));
        assert_eq!(k.append, "console=ttyS0 rdinit=/init godwit.workload=agent");
        assert_eq!(k.profile, "none");
        assert!(parse_kit("profile=none\n").is_err());
    }
}
