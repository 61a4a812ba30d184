//! A throwaway NFS server for tests and benchmarks: Debian's `nfs-ganesha` (VFS back end)
//! exporting a temporary directory, run in a network namespace of its own — the "storage
//! host" — with its own `rpcbind`, so it can listen on the standard ports (NFSv3, which QEMU's
//! `nfs://` driver speaks, needs rpcbind and port 2049; NFSv4 needs neither) without touching
//! the machine's.
//!
//! The storage host has a bridge; the caller's namespace (the "root host") and any number of
//! extra "hosts" (network namespaces made here, e.g. a migration's source and destination)
//! are plugged into it with veth pairs, so every host reaches the server and each other on
//! one /24. `rpcbind` gets a private `/run` (a directory of the server's, bind-mounted in a
//! mount namespace), which a restarted ganesha finds again. [`Ganesha::kill`] SIGKILLs the
//! server (a crash), [`Ganesha::restart`] brings it back on the same export; dropping the
//! value stops everything started here and removes the namespaces.
//!
//! Needs root (network namespaces), iproute2, util-linux's `unshare`, and the Debian packages
//! `nfs-ganesha nfs-ganesha-vfs rpcbind`; [`Ganesha::start`] says which is missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The Debian packages a test server needs.
pub const PACKAGES: &str = "nfs-ganesha nfs-ganesha-vfs rpcbind";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A host plugged into the storage network.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace (`None`: the caller's own).
    pub ns: Option<String>,
    /// Its address on the storage network.
    pub addr: String,
}

/// A running test server; see the module documentation.
pub struct Ganesha {
    /// The storage host's namespace.
    pub ns: String,
    /// The server's address.
    pub addr: String,
    dir: PathBuf,
    net: (u32, u32),
    child: Option<Child>,
    hosts: Vec<String>,
    links: u32,
    /// The caller's own host.
    pub root: Host,
}

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

fn need(path: &str, what: &str) -> Result<(), String> {
    if Path::new(path).exists() {
        Ok(())
    } else {
        Err(format!("{path} is missing: a test NFS server needs {what} (Debian packages: {PACKAGES})"))
    }
}

impl Ganesha {
    /// Starts a server exporting a fresh directory under `base` as `/export`. The server owns
    /// that directory (`ganesha-PID-N`, unique to this process): dropping the server removes it.
    pub fn start(base: &Path) -> Result<Ganesha, String> {
        need("/usr/bin/ganesha.nfsd", "nfs-ganesha")?;
        let fsal = ["/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so", "/usr/lib/ganesha/libfsalvfs.so"];
        if !fsal.iter().any(|p| Path::new(p).exists()) {
            return Err(format!("ganesha's VFS back end (libfsalvfs.so) is missing: install nfs-ganesha-vfs (Debian packages: {PACKAGES})"));
        }
        need("/usr/sbin/rpcbind", "rpcbind")?;
        if Command::new("ip").arg("-V").output().is_err() || Command::new("unshare").arg("--version").output().is_err() {
            return Err("a test NFS server needs iproute2 (ip) and util-linux (unshare)".into());
        }
        let idx = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let net = (80 + idx % 100, pid % 250);
        let ns = format!("gw-nfs-{pid}-{idx}");
        let dir = base.join(format!("ganesha-{pid}-{idx}"));
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["export", "rec", "run"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run("ip", &["netns", "add", &ns])?;
        let mut g = Ganesha {
            addr: format!("10.{}.{}.1", net.0, net.1),
            ns: ns.clone(),
            dir,
            net,
            child: None,
            hosts: Vec::new(),
            links: 0,
            root: Host { ns: None, addr: String::new() },
        };
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &ns, "addr", "add", &format!("{}/24", g.addr), "dev", "br0"])?;
        run("ip", &["-n", &ns, "link", "set", "br0", "up"])?;
        g.root = g.plug(None)?;
        std::fs::write(g.dir.join("ganesha.conf"), g.config()).map_err(|e| e.to_string())?;
        g.spawn(true)?;
        Ok(g)
    }

    fn config(&self) -> String {
        let d = self.dir.display();
        format!(
            "NFS_CORE_PARAM {{ Protocols = 3, 4; NFS_Port = 2049; MNT_Port = 20048; Enable_RQUOTA = false;\n\
             \x20 Enable_NLM = false; Mount_Path_Pseudo = true; }}\n\
             NFSV4 {{ Graceless = true; Lease_Lifetime = 15; RecoveryBackend = fs; RecoveryRoot = {d}/rec; }}\n\
             EXPORT {{ Export_Id = 1; Path = {d}/export; Pseudo = /export; Access_Type = RW;\n\
             \x20 Squash = No_Root_Squash; SecType = sys; Protocols = 3, 4; Transports = TCP; Attr_Expiration_Time = 0;\n\
             \x20 FSAL {{ Name = VFS; }} }}\n\
             LOG {{ Default_Log_Level = WARN; }}\n"
        )
    }

    /// Plugs a namespace (`None`: the caller's) into the storage bridge.
    fn plug(&mut self, host_ns: Option<&str>) -> Result<Host, String> {
        self.links += 1;
        let k = self.links;
        let inner = format!("gn{}x{}s{k}", self.net.1, self.net.0);
        let outer = format!("gn{}x{}h{k}", self.net.1, self.net.0);
        let _ = Command::new("ip").args(["link", "del", &outer]).output();
        run("ip", &["link", "add", &outer, "type", "veth", "peer", "name", &inner])?;
        run("ip", &["link", "set", &inner, "netns", &self.ns])?;
        run("ip", &["-n", &self.ns, "link", "set", &inner, "master", "br0"])?;
        run("ip", &["-n", &self.ns, "link", "set", &inner, "up"])?;
        let addr = format!("10.{}.{}.{}", self.net.0, self.net.1, k + 1);
        let mut pre: Vec<&str> = Vec::new();
        if let Some(h) = host_ns {
            run("ip", &["link", "set", &outer, "netns", h])?;
            pre = vec!["-n", h];
        }
        let ipn = |args: &[&str]| {
            let mut a = pre.clone();
            a.extend_from_slice(args);
            run("ip", &a)
        };
        ipn(&["addr", "add", &format!("{addr}/24"), "dev", &outer])?;
        ipn(&["link", "set", &outer, "up"])?;
        ipn(&["link", "set", "lo", "up"])?;
        Ok(Host { ns: host_ns.map(str::to_string), addr })
    }

    /// A new network namespace plugged into the storage network (removed on drop).
    pub fn add_host(&mut self, name: &str) -> Result<Host, String> {
        let ns = format!("{}-{name}", self.ns);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run("ip", &["netns", "add", &ns])?;
        self.hosts.push(ns.clone());
        self.plug(Some(&ns))
    }

    fn spawn(&mut self, with_rpcbind: bool) -> Result<(), String> {
        let d = self.dir.display().to_string();
        let rpcbind = if with_rpcbind { "rpcbind -w -f & sleep 0.3; " } else { "" };
        let script = format!(
            "mount --bind {d}/run /run && {rpcbind}exec ganesha.nfsd -F -L {d}/ganesha.log -f {d}/ganesha.conf -p {d}/ganesha.pid"
        );
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "unshare", "-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting ganesha: {e}"))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until the export answers an NFSv4 open.
    fn wait_ready(&mut self) -> Result<(), String> {
        let marker = self.export().join(".ready");
        std::fs::write(&marker, b"ready").map_err(|e| e.to_string())?;
        let url = crate::NfsUrl::parse(&self.url(".ready", "version=4&hard-timeout=1")).map_err(|e| e.to_string())?;
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Err(format!("ganesha exited ({st}); log:\n{}", self.log()));
                }
            }
            match crate::NfsStorage::open(&url, crate::NfsOptions { read_only: true, ..Default::default() }) {
                Ok(_) => return Ok(()),
                Err(crate::Error::NoLibnfs(e)) => return Err(e),
                Err(e) if Instant::now() > end => return Err(format!("ganesha never served its export: {e}; log:\n{}", self.log())),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("ganesha.log")).unwrap_or_default()
    }

    /// The exported directory (as the server host sees it).
    pub fn export(&self) -> PathBuf {
        self.dir.join("export")
    }

    /// `nfs://ADDR/export/FILE[?OPTS]`.
    pub fn url(&self, file: &str, opts: &str) -> String {
        let mut u = format!("nfs://{}/export/{file}", self.addr);
        if !opts.is_empty() {
            u.push('?');
            u.push_str(opts);
        }
        u
    }

    /// SIGKILLs the server (rpcbind stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again after [`Ganesha::kill`].
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn(false)
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        self.kill();
        // rpcbind (and anything else started in the storage namespace): by pid.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.ns]).output() {
            for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = p.parse::<i32>() {
                    // SAFETY: kill(2) on a pid in our own namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for h in self.hosts.iter().chain(std::iter::once(&self.ns)) {
            let _ = Command::new("ip").args(["netns", "del", h]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("gn{}x{}h1", self.net.1, self.net.0)]).output();
        // The server's directory (export, configuration, log) goes with it, unless a failing
        // test is unwinding: then it stays for inspection.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
