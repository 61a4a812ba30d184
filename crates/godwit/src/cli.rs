//! The QEMU-style command line. QEMU's single-dash long options (`-smp`, `-kernel`, `-drive
//! file=...,if=none`) do not fit `clap`'s model, so this is a small table-driven parser: each
//! option takes zero or one argument, unknown options and bad values give one clear line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("unknown option '{0}' (try -h)")]
    Unknown(String),
    #[error("option '{0}' needs an argument")]
    MissingArg(String),
    #[error("{0}")]
    Compat(String),
    #[error("invalid value for {opt}: '{value}': {reason}")]
    BadValue { opt: String, value: String, reason: String },
}

/// Where the serial port goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    Stdio,
    File(PathBuf),
    None,
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub mem_mib: u64,
    pub smp: usize,
    pub kernel: Option<PathBuf>,
    pub append: String,
    pub initrd: Option<PathBuf>,
    pub serial: SerialTarget,
    pub name: Option<String>,
    pub start_paused: bool,
    pub no_reboot: bool,
    pub pidfile: Option<PathBuf>,
    pub help: bool,
    pub version: bool,
    /// `-incoming URI|defer`.
    pub incoming: Option<String>,
    /// `-monitor SPEC` (several allowed), QEMU chardev syntax.
    pub monitors: Vec<String>,
    /// `-qmp SPEC` (several allowed).
    pub qmps: Vec<String>,
    /// `-loadvm TAG`.
    pub loadvm: Option<String>,
    /// `-drive SPEC` and bare positional image paths (as `file=PATH`).
    pub drives: Vec<String>,
    /// `-device SPEC`.
    pub devices: Vec<String>,
    /// `-netdev SPEC`.
    pub netdevs: Vec<String>,
    /// Legacy `-net SPEC` (nic, tap, none).
    pub nets: Vec<String>,
    /// `-object SPEC` (TLS credentials for migration).
    pub objects: Vec<String>,
    /// `-machine`, `-daemonize`, `-chardev`, `-mon`, `-no-shutdown` (see `compat.rs`).
    pub compat: crate::compat::Compat,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mem_mib: 128,
            smp: 1,
            kernel: None,
            append: String::new(),
            initrd: None,
            serial: SerialTarget::Stdio,
            name: None,
            start_paused: false,
            no_reboot: false,
            pidfile: None,
            help: false,
            version: false,
            incoming: None,
            monitors: Vec::new(),
            qmps: Vec::new(),
            loadvm: None,
            drives: Vec::new(),
            devices: Vec::new(),
            netdevs: Vec::new(),
            nets: Vec::new(),
            objects: Vec::new(),
            compat: Default::default(),
        }
    }
}

pub const USAGE: &str = "\
usage: godwit [options]
Godwit, a KVM virtual machine monitor for moving running VMs (QEMU-compatible options).

  -m SIZE              guest RAM: MiB by default, or with suffix M/G (default 128M)
  -smp N[,cpus=N,...]  number of vCPUs (default 1)
  -kernel FILE         kernel to boot (PVH ELF: the test guest, or Linux vmlinux)
  -append STRING       kernel command line
  -initrd FILE         initial ramdisk
  -nographic           serial port on stdio (the default)
  -serial stdio|file:PATH|none
  -name NAME           VM name
  -S                   start with the vCPUs paused
  -no-reboot           exit instead of rebooting
  -pidfile FILE        write the process id to FILE
  -incoming URI        wait for a live migration: tcp:HOST:PORT (tcp:0:PORT = any
                       address), unix:PATH, or defer (then QMP migrate-incoming)
  -monitor SPEC        human monitor: stdio, unix:PATH,server,nowait, tcp:HOST:PORT,server,nowait
  -qmp SPEC            QMP server, same syntax
  -loadvm TAG          start from the internal snapshot TAG of the disk image
  -drive file=PATH[,format=raw|qcow2][,if=virtio|none][,id=ID][,readonly=on][,snapshot=on]
         [,cache=writeback|none|directsync|writethrough|unsafe]
                       cache as in QEMU: none/directsync = O_DIRECT, directsync/writethrough
                       = O_DSYNC, unsafe = the guest's flushes are ignored
         [,werror=enospc|stop|report|ignore][,rerror=report|stop|ignore]
                       what a failed disk I/O does (QEMU's defaults: enospc, report); stop
                       pauses the VM (io-error) and 'cont' retries the request
         file=nfs://SERVER[:PORT]/EXPORT/PATH[?version=3|4&nfsport=N&hard-timeout=SECS...]
                       an image on an NFS server, through libnfs (libnfs13); hard-timeout
                       (default 60) bounds the retries before werror/rerror apply
  -device virtio-blk-device,drive=ID
  -netdev tap,id=ID,ifname=NAME[,script=no|PATH][,downscript=no|PATH]
                       a tap backend (opened with a vnet header; no script by default)
  -device virtio-net-device,netdev=ID[,mac=MAC]
                       a virtio-net card on that backend (default MAC 52:54:00:12:34:56+N)
  -net nic[,macaddr=MAC] -net tap[,ifname=NAME][,script=..]
                       legacy form: the i-th nic is connected to the i-th tap
  -object tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]
  -object tls-creds-psk,id=ID,dir=DIR,endpoint=server|client[,username=NAME]
                       TLS credentials for migration (migrate_set_parameter tls-creds ID)
  -object authz-simple,id=ID,identity=DN|USERNAME
                       the one TLS client a destination lets in (migrate_set_parameter tls-authz ID)
  IMAGE                a bare image path is the first disk (format probed)
  -machine/-M microvm|none[,accel=kvm,usb=off,dump-guest-core=..,memory-backend=ID]
                       none: no guest, monitors only (a management layer's probe)
  -daemonize           fork; the parent exits once the monitors listen
  -chardev socket,id=ID,path=PATH|fd=N,server=on,wait=off   -mon chardev=ID,mode=control
                       a monitor on a socket bound here or inherited (libvirt)
  -enable-kvm, -accel kvm, -cpu host, -nodefaults, -no-user-config
                       accepted for QEMU compatibility (KVM is the only accelerator)
  -h, --help           this text
  --version            version
";

/// Parses a size as QEMU's `-m` does: a plain number is MiB; suffixes K, M, G, T (optionally
/// followed by B or iB). Returns MiB.
pub fn parse_mem(v: &str) -> Result<u64, String> {
    let t = v.trim();
    let t = t.strip_prefix("size=").unwrap_or(t);
    let t = t.split(',').next().unwrap_or("");
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return Err("expected a number".into());
    }
    let n: u64 = digits.parse().map_err(|_| "number too large".to_string())?;
    let suffix = t[digits.len()..].to_ascii_uppercase();
    let suffix = suffix.trim_end_matches("IB").trim_end_matches('B');
    let mib = match suffix {
        "" | "M" => Some(n),
        "K" => (n % 1024 == 0).then_some(n / 1024),
        "G" => n.checked_mul(1024),
        "T" => n.checked_mul(1024 * 1024),
        _ => return Err(format!("unknown size suffix '{}'", &t[digits.len()..])),
    };
    let mib = mib.ok_or_else(|| "size too large or not a whole number of MiB".to_string())?;
    if mib == 0 {
        return Err("guest RAM must be at least 1 MiB".into());
    }
    Ok(mib)
}

fn parse_smp(v: &str) -> Result<usize, String> {
    let mut n: Option<usize> = None;
    for (i, part) in v.split(',').enumerate() {
        let (k, val) = match part.split_once('=') {
            Some((k, val)) => (k, val),
            None if i == 0 => ("cpus", part),
            None => return Err(format!("unexpected '{part}'")),
        };
        let num: usize = val.parse().map_err(|_| format!("'{val}' is not a number"))?;
        match k {
            "cpus" => n = Some(num),
            "maxcpus" | "sockets" | "cores" | "threads" | "dies" => {}
            _ => return Err(format!("unknown property '{k}'")),
        }
    }
    match n {
        Some(0) => Err("at least one vCPU is needed".into()),
        Some(n) if n > vmm::MAX_VCPUS => Err(format!("at most {} vCPUs are supported", vmm::MAX_VCPUS)),
        Some(n) => Ok(n),
        None => Err("no vCPU count".into()),
    }
}

fn parse_serial(v: &str) -> Result<SerialTarget, String> {
    match v {
        "stdio" | "mon:stdio" => Ok(SerialTarget::Stdio),
        "none" | "null" => Ok(SerialTarget::None),
        _ => match v.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialTarget::File(PathBuf::from(p))),
            _ => Err("expected stdio, file:PATH or none".into()),
        },
    }
}

/// Options that take an argument and are accepted but ignored (QEMU compatibility).
const IGNORED_WITH_ARG: &[&str] = &["-cpu", "-accel", "-boot", "-display", "-vga", "-rtc"];
const IGNORED_FLAGS: &[&str] = &["-enable-kvm", "-nodefaults", "-no-user-config", "-no-hpet", "-no-acpi"];

pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Options, CliError> {
    let mut o = Options::default();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        // QEMU accepts --opt as well as -opt.
        let opt = if a.starts_with("--") && a.len() > 2 && a != "--help" && a != "--version" { a[1..].to_string() } else { a.clone() };
        let mut arg = |name: &str| it.next().ok_or_else(|| CliError::MissingArg(name.to_string()));
        let bad = |value: &str, reason: String| CliError::BadValue { opt: opt.clone(), value: value.to_string(), reason };
        match opt.as_str() {
            "-h" | "-help" | "--help" => o.help = true,
            "--version" | "-version" => o.version = true,
            "-m" => {
                let v = arg("-m")?;
                o.mem_mib = parse_mem(&v).map_err(|r| bad(&v, r))?;
            }
            "-smp" => {
                let v = arg("-smp")?;
                o.smp = parse_smp(&v).map_err(|r| bad(&v, r))?;
            }
            "-kernel" => o.kernel = Some(PathBuf::from(arg("-kernel")?)),
            "-append" => o.append = arg("-append")?,
            "-initrd" => o.initrd = Some(PathBuf::from(arg("-initrd")?)),
            "-nographic" => {}
            "-serial" => {
                let v = arg("-serial")?;
                o.serial = parse_serial(&v).map_err(|r| bad(&v, r))?;
            }
            "-name" => o.name = Some(arg("-name")?),
            "-S" => o.start_paused = true,
            "-no-reboot" => o.no_reboot = true,
            "-pidfile" => o.pidfile = Some(PathBuf::from(arg("-pidfile")?)),
            "-incoming" => o.incoming = Some(arg("-incoming")?),
            "-monitor" => o.monitors.push(arg("-monitor")?),
            "-qmp" => o.qmps.push(arg("-qmp")?),
            "-loadvm" => o.loadvm = Some(arg("-loadvm")?),
            "-drive" => o.drives.push(arg("-drive")?),
            "-hda" => o.drives.push(format!("file={}", arg("-hda")?)),
            "-device" => o.devices.push(arg("-device")?),
            "-netdev" => o.netdevs.push(arg("-netdev")?),
            "-net" => o.nets.push(arg("-net")?),
            "-object" => o.objects.push(arg("-object")?),
            s if crate::compat::FLAGS.contains(&s) => o.compat.flag(s),
            s if crate::compat::takes(s) => {
                let v = arg(s)?;
                o.compat.apply(s, &v).map_err(|r| bad(&v, r))?;
            }
            s if !s.starts_with('-') => o.drives.push(format!("file={s}")),
            s if IGNORED_FLAGS.contains(&s) => {}
            s if IGNORED_WITH_ARG.contains(&s) => {
                let v = arg(s)?;
                if s == "-accel" && !v.starts_with("kvm") {
                    return Err(bad(&v, "KVM is the only accelerator".into()));
                }
            }
            _ => return Err(CliError::Unknown(a)),
        }
    }
    o.compat.check().map_err(CliError::Compat)?;
    crate::libvirt_args::finish(&mut o).map_err(CliError::Compat)?;
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Options, CliError> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem("512"), Ok(512));
        assert_eq!(parse_mem("1G"), Ok(1024));
        assert_eq!(parse_mem("2g"), Ok(2048));
        assert_eq!(parse_mem("256M"), Ok(256));
        assert_eq!(parse_mem("1GiB"), Ok(1024));
        assert_eq!(parse_mem("4096K"), Ok(4));
        assert!(parse_mem("0").is_err());
        assert!(parse_mem("abc").is_err());
        assert!(parse_mem("5X").is_err());
        assert!(parse_mem("99999999999999999999G").is_err());
    }

    #[test]
    fn full_command_line() {
        let o = p("-M microvm -enable-kvm -cpu host -nodefaults -no-user-config -nographic -m 1G -smp 4 -kernel g.elf -append mode=idle -S -no-reboot -name vm1 -serial none").unwrap();
        assert_eq!(o.mem_mib, 1024);
        assert_eq!(o.smp, 4);
        assert_eq!(o.kernel, Some(PathBuf::from("g.elf")));
        assert_eq!(o.append, "mode=idle");
        assert!(o.start_paused && o.no_reboot);
        assert_eq!(o.serial, SerialTarget::None);
        assert_eq!(p("-smp cpus=2,sockets=1").unwrap().smp, 2);
    }

    #[test]
    fn errors() {
        assert_eq!(p("-bogus"), Err(CliError::Unknown("-bogus".into())));
        assert!(matches!(p("-m"), Err(CliError::MissingArg(_))));
        assert!(matches!(p("-m 0"), Err(CliError::BadValue { .. })));
        assert!(matches!(p("-smp 0"), Err(CliError::BadValue { .. })));
        assert!(matches!(p("-smp 1000"), Err(CliError::BadValue { .. })));
        assert!(matches!(p("-serial tcp:1"), Err(CliError::BadValue { .. })));
        assert!(matches!(p("-accel tcg"), Err(CliError::BadValue { .. })));
    }
}
