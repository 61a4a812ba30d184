//! The QEMU options a management layer (libvirt) passes beyond Godwit's own: `-machine` with
//! its properties (`none` for a probe, `microvm`), `-daemonize`, `-chardev socket` (a path,
//! or a listening descriptor inherited from the parent) and `-mon chardev=..,mode=control`,
//! `-no-shutdown`. Parsing lives here, apart from `cli.rs`, and so does starting the `-mon`
//! monitors and the `-daemonize` split (the parent exits once the monitors listen).
//! `docs/libvirt.md` lists what each option does in Godwit.

use monitor::{ChardevSpec, Monitor, MonitorServer, Protocol, ServeOptions};
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

/// Options with an argument handled here.
pub const WITH_ARG: &[&str] = &["-machine", "-M", "-chardev", "-mon"];

/// Whether `opt` (with an argument) is handled by [`Compat::apply`].
pub fn takes(opt: &str) -> bool {
    WITH_ARG.contains(&opt) || crate::libvirt_args::WITH_ARG.contains(&opt)
}
/// Flags handled here.
pub const FLAGS: &[&str] = &["-daemonize", "-no-shutdown"];

/// What `-chardev` describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevBackend {
    /// A listening unix socket: bound here to `path`, or inherited as descriptor `fd`.
    SocketServer { path: Option<PathBuf>, fd: Option<RawFd> },
    /// A pseudo-terminal (its path is reported by `query-chardev`).
    Pty,
    /// Discards output.
    Null,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chardev {
    pub id: String,
    pub backend: ChardevBackend,
}

/// `-mon chardev=ID,mode=control|readline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mon {
    pub chardev: String,
    pub control: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Compat {
    /// `-machine none`: no guest, only the monitors (a management layer's probe).
    pub machine_none: bool,
    /// `-machine memory-backend=ID`.
    pub memory_backend: Option<String>,
    pub daemonize: bool,
    pub no_shutdown: bool,
    pub chardevs: Vec<Chardev>,
    pub mons: Vec<Mon>,
    /// libvirt's other start-up options (`crate::libvirt_args`).
    pub extra: crate::libvirt_args::Extra,
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("'{key}' expects on or off, not '{v}'")),
    }
}

/// Splits `a,b=c,d=e` into the leading bare word (if any) and key=value pairs.
fn split_opts(v: &str) -> (Option<&str>, Vec<(&str, &str)>) {
    let mut first = None;
    let mut kv = Vec::new();
    for (i, part) in v.split(',').enumerate() {
        match part.split_once('=') {
            Some((k, val)) => kv.push((k, val)),
            None if i == 0 => first = Some(part),
            None => kv.push((part, "on")),
        }
    }
    (first, kv)
}

impl Compat {
    pub fn flag(&mut self, opt: &str) {
        match opt {
            "-daemonize" => self.daemonize = true,
            "-no-shutdown" => self.no_shutdown = true,
            _ => {}
        }
    }

    /// Applies `opt value`; the error is the reason the value is refused.
    pub fn apply(&mut self, opt: &str, v: &str) -> Result<(), String> {
        match opt {
            "-machine" | "-M" => self.machine(v),
            "-chardev" => self.chardev(v),
            "-mon" => self.mon(v),
            o if crate::libvirt_args::WITH_ARG.contains(&o) => self.extra.apply(o, v),
            _ => Err(format!("'{opt}' is not a compatibility option")),
        }
    }

    fn machine(&mut self, v: &str) -> Result<(), String> {
        let (first, kv) = split_opts(v);
        let mut ty = first.map(String::from);
        for (k, val) in kv {
            match k {
                "type" => ty = Some(val.to_string()),
                "accel" => {
                    // QEMU tries the listed accelerators in order; KVM is Godwit's only one.
                    if val.split(':').next() != Some("kvm") {
                        return Err(format!("accel={val}: KVM is the only accelerator"));
                    }
                }
                "usb" if !on_off(k, val)? => {}
                "usb" => return Err("usb=on: Godwit has no USB controller".into()),
                // Godwit does not exclude guest RAM from core dumps, and does not dump on its own.
                "dump-guest-core" => {
                    on_off(k, val)?;
                }
                // Linux guests always get Godwit's ACPI tables (they find their CPUs and virtio
                // devices and power off through them); see docs/libvirt.md.
                "acpi" if matches!(val, "on" | "off" | "auto") => {}
                "acpi" => return Err(format!("acpi={val}: on, off or auto")),
                "memory-backend" if !val.is_empty() => self.memory_backend = Some(val.to_string()),
                _ => return Err(format!("unknown or unsupported machine property '{k}'")),
            }
        }
        match ty.as_deref() {
            None | Some("microvm") => self.machine_none = false,
            Some("none") => self.machine_none = true,
            Some(t) => return Err(format!("machine type '{t}' is not available: Godwit implements microvm (and none)")),
        }
        Ok(())
    }

    fn chardev(&mut self, v: &str) -> Result<(), String> {
        let (first, kv) = split_opts(v);
        let kind = first.ok_or("the backend type (socket, pty, null) comes first")?;
        let mut id = None;
        let (mut path, mut fd, mut server, mut wait) = (None, None, false, true);
        for (k, val) in kv {
            match k {
                "id" => id = Some(val.to_string()),
                "path" if kind == "socket" => path = Some(PathBuf::from(val)),
                "fd" if kind == "socket" => {
                    let n: RawFd = val.parse().map_err(|_| format!("fd={val}: not a descriptor number"))?;
                    if n < 3 {
                        return Err(format!("fd={val}: not an inherited socket"));
                    }
                    fd = Some(n);
                }
                "server" if kind == "socket" => server = on_off(k, val)?,
                "wait" if kind == "socket" => wait = on_off(k, val)?,
                "logfile" | "logappend" => return Err("chardev logfiles are not supported".into()),
                _ => return Err(format!("unknown or unsupported {kind} chardev property '{k}'")),
            }
        }
        let id = id.ok_or("a chardev needs id=")?;
        if self.chardevs.iter().any(|c| c.id == id) {
            return Err(format!("duplicate chardev id '{id}'"));
        }
        let backend = match kind {
            "socket" => {
                if !server {
                    return Err("only server sockets (server=on) are supported".into());
                }
                if wait {
                    return Err("server sockets need wait=off here".into());
                }
                match (&path, fd) {
                    (Some(_), None) | (None, Some(_)) => ChardevBackend::SocketServer { path, fd },
                    _ => return Err("a socket chardev needs exactly one of path= or fd=".into()),
                }
            }
            "pty" => ChardevBackend::Pty,
            "null" => ChardevBackend::Null,
            other => return Err(format!("chardev backend '{other}' is not supported (socket, pty, null)")),
        };
        self.chardevs.push(Chardev { id, backend });
        Ok(())
    }

    fn mon(&mut self, v: &str) -> Result<(), String> {
        let (first, kv) = split_opts(v);
        let mut chardev = first.map(String::from);
        let mut control = false;
        for (k, val) in kv {
            match k {
                "chardev" => chardev = Some(val.to_string()),
                "id" => {}
                "mode" => {
                    control = match val {
                        "control" => true,
                        "readline" => false,
                        _ => return Err(format!("mode={val}: control or readline")),
                    }
                }
                "pretty" => {
                    on_off(k, val)?;
                }
                _ => return Err(format!("unknown monitor property '{k}'")),
            }
        }
        let chardev = chardev.ok_or("-mon needs chardev=ID")?;
        self.mons.push(Mon { chardev, control });
        Ok(())
    }

    /// Checks that every `-mon` names a socket chardev (call after parsing).
    pub fn check(&self) -> Result<(), String> {
        for m in &self.mons {
            match self.chardevs.iter().find(|c| c.id == m.chardev) {
                None => return Err(format!("-mon: chardev '{}' not found", m.chardev)),
                Some(Chardev { backend: ChardevBackend::SocketServer { .. }, .. }) => {}
                Some(_) => return Err(format!("-mon: chardev '{}' must be a server socket", m.chardev)),
            }
        }
        Ok(())
    }
}

/// `-daemonize` with a guest: refused while stdio carries the serial port or the monitor
/// (they would be cut off), otherwise forks (see `daemon.rs`).
pub fn daemonize_vm(opts: &crate::cli::Options) -> Result<crate::daemon::Ready, String> {
    if opts.serial == crate::cli::SerialTarget::Stdio {
        return Err("-daemonize: the serial port is on stdio; use -serial none|file:PATH or -chardev + -device isa-serial".into());
    }
    if opts.monitors.is_empty() && opts.compat.mons.is_empty() || opts.monitors.iter().any(|m| m == "stdio" || m == "mon:stdio") {
        return Err("-daemonize: the monitor is on stdio; use -monitor none|unix:PATH,server,nowait or -mon".into());
    }
    crate::daemon::daemonize()
}

/// The serial pty (`-device isa-serial,chardev=` a pty) and the user-named devices, for
/// `query-chardev` and `qom-list /machine/peripheral`.
pub fn attach_serial_and_register(opts: &crate::cli::Options, out: &crate::console::ConsoleOut, vm: &vmm::Vm) -> Result<(), String> {
    if let Some(label) = &opts.compat.extra.serial_pty {
        crate::pty::attach(label, out, vm.serial().clone())?;
    }
    for (id, ty) in &opts.compat.extra.peripherals {
        monitor::hostinfo::register_peripheral(id, ty);
    }
    Ok(())
}

/// `-no-shutdown`: the guest powered off; the vCPUs stop, SHUTDOWN (guest) is sent, and the VM
/// waits in `shutdown` for `system_reset` or `quit`.
pub fn guest_shutdown_stays(m: &Arc<crate::machine::Machine>) {
    m.vm.pause();
    // SHUTDOWN, then STOP (QEMU's order), both under the run-state lock: a client that saw
    // SHUTDOWN and asks `query-status` must get `shutdown`, not the state from before.
    let _ = m.state.update(|_| {
        m.events.emit(monitor::Event::Shutdown { guest: true, reason: monitor::ShutdownCause::GuestShutdown });
        Ok::<_, std::convert::Infallible>(monitor::runstate::RunState::Shutdown)
    });
}

/// The kernel thread id of vCPU `i` (its thread is named `vcpuN`), for `query-cpus-fast`;
/// 0 if it cannot be found.
pub fn vcpu_thread_id(i: usize) -> i64 {
    let want = format!("vcpu{i}");
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0 };
    for e in dir.flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == want {
            if let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) {
                return tid;
            }
        }
    }
    0
}

/// The descriptor of the running `migrate fd:NAME`, kept open until the next one.
static MIGRATION_FD: std::sync::Mutex<Option<std::os::fd::OwnedFd>> = std::sync::Mutex::new(None);

/// `fd:NAME` (a socket named by `getfd`, as libvirt migrates) → `fd:N` for the migration
/// engine; other URIs unchanged. One descriptor is one connection, so not with multifd.
pub fn resolve_fd_uri(m: &crate::machine::Machine, uri: &str) -> Result<String, monitor::CommandError> {
    use std::os::fd::AsRawFd;
    let Some(name) = uri.strip_prefix("fd:") else { return Ok(uri.to_string()) };
    if m.mig.params().multifd {
        return Err(monitor::CommandError::generic("multifd needs several connections: use tcp:, not fd:"));
    }
    if m.migration_running() {
        return Err(monitor::CommandError::generic("There's a migration process in progress"));
    }
    let fd = monitor::hostinfo::take_fd(name)
        .ok_or_else(|| monitor::CommandError::generic(format!("File descriptor named '{name}' has not been found")))?;
    let n = fd.as_raw_fd();
    *MIGRATION_FD.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
    Ok(format!("fd:{n}"))
}

/// Takes an inherited descriptor as a listening unix socket, refusing anything else.
fn inherited_listener(fd: RawFd) -> Result<std::os::unix::net::UnixListener, String> {
    let get = |opt: libc::c_int| -> Result<libc::c_int, String> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
        if r != 0 {
            return Err(format!("fd={fd}: not a socket ({})", std::io::Error::last_os_error()));
        }
        Ok(v)
    };
    if get(libc::SO_DOMAIN)? != libc::AF_UNIX {
        return Err(format!("fd={fd}: not a unix socket"));
    }
    if get(libc::SO_ACCEPTCONN)? == 0 {
        return Err(format!("fd={fd}: the socket is not listening"));
    }
    // SAFETY: the descriptor is a listening unix socket inherited from the parent, and it is
    // taken over exactly once (the chardev id is unique and `-mon` uses it once).
    let l = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // SAFETY: fcntl on a valid descriptor; CLOEXEC so children do not inherit the monitor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(l)
}

/// Starts a monitor server for each `-mon`.
pub fn start_mons(mon: &Arc<Monitor>, c: &Compat) -> Result<Vec<MonitorServer>, String> {
    c.check()?;
    let mut used = Vec::new();
    let mut servers = Vec::new();
    for m in &c.mons {
        if used.contains(&m.chardev) {
            return Err(format!("-mon: chardev '{}' is used twice", m.chardev));
        }
        used.push(m.chardev.clone());
        let protocol = if m.control { Protocol::Qmp } else { Protocol::Hmp };
        let Some(ChardevBackend::SocketServer { path, fd }) =
            c.chardevs.iter().find(|x| x.id == m.chardev).map(|x| &x.backend)
        else {
            continue; // check() above refused this
        };
        let server = match (path, fd) {
            (_, Some(fd)) => MonitorServer::from_unix_listener(mon.clone(), inherited_listener(*fd)?, protocol, ServeOptions::default()),
            (Some(p), None) => {
                let spec = ChardevSpec::Unix { path: p.clone(), server: true, wait: false };
                MonitorServer::start(mon.clone(), &spec, protocol, ServeOptions::default())
            }
            (None, None) => continue,
        };
        let server = server.map_err(|e| format!("-mon chardev={}: {e}", m.chardev))?;
        if let monitor::ListenAddr::Unix(p) = server.local_addr() {
            monitor::hostinfo::register_chardev(&m.chardev, &format!("unix:{},server=on", p.display()));
        }
        servers.push(server);
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Compat, String> {
        let mut c = Compat::default();
        for (o, v) in pairs {
            c.apply(o, v)?;
        }
        c.check()?;
        Ok(c)
    }

    #[test]
    fn libvirt_machine_options() {
        let c = parse(&[("-machine", "none,accel=kvm:tcg")]).unwrap();
        assert!(c.machine_none);
        let c = parse(&[("-machine", "microvm,usb=off,dump-guest-core=off,memory-backend=microvm.ram")]).unwrap();
        assert!(!c.machine_none);
        assert_eq!(c.memory_backend.as_deref(), Some("microvm.ram"));
        assert!(parse(&[("-machine", "pc")]).unwrap_err().contains("microvm"));
        assert!(parse(&[("-machine", "none,accel=tcg")]).unwrap_err().contains("KVM"));
        assert!(parse(&[("-machine", "microvm,usb=on")]).is_err());
        assert!(parse(&[("-machine", "microvm,usb=maybe")]).is_err());
        assert!(parse(&[("-machine", "microvm,frob=1")]).is_err());
        assert!(parse(&[("-machine", "microvm,acpi=on")]).is_ok() && parse(&[("-machine", "microvm,acpi=off")]).is_ok());
        assert!(parse(&[("-machine", "microvm,acpi=maybe")]).is_err());
    }

    #[test]
    fn monitor_chardevs() {
        let c = parse(&[
            ("-chardev", "socket,id=charmonitor,fd=17,server=on,wait=off"),
            ("-mon", "chardev=charmonitor,id=monitor,mode=control"),
        ])
        .unwrap();
        assert_eq!(c.chardevs[0].backend, ChardevBackend::SocketServer { path: None, fd: Some(17) });
        assert!(c.mons[0].control);
        assert!(parse(&[("-chardev", "pty,id=charserial0")]).is_ok());
        assert!(parse(&[("-chardev", "socket,id=a,path=/x,fd=5,server=on,wait=off")]).is_err());
        assert!(parse(&[("-chardev", "socket,id=a,path=/x,server=on")]).is_err(), "wait=on");
        assert!(parse(&[("-chardev", "socket,id=a,path=/x")]).is_err(), "client socket");
        assert!(parse(&[("-chardev", "socket,path=/x,server=on,wait=off")]).is_err(), "no id");
        assert!(parse(&[("-chardev", "socket,id=a,fd=x,server=on,wait=off")]).is_err());
        assert!(parse(&[("-chardev", "pty,id=a"), ("-chardev", "null,id=a")]).is_err(), "duplicate id");
        assert!(parse(&[("-chardev", "spicevmc,id=a")]).is_err());
        assert!(parse(&[("-mon", "chardev=nope,mode=control")]).is_err());
        assert!(parse(&[("-chardev", "pty,id=p"), ("-mon", "chardev=p,mode=control")]).is_err());
        assert!(parse(&[("-mon", "chardev=a,mode=json")]).is_err());
    }

    #[test]
    fn inherited_descriptor_must_be_a_listening_unix_socket() {
        let f = std::fs::File::open("/dev/null").unwrap();
        use std::os::fd::AsRawFd;
        assert!(inherited_listener(f.as_raw_fd()).unwrap_err().contains("not a socket"));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(inherited_listener(a.as_raw_fd()).unwrap_err().contains("not listening"));
    }
}
