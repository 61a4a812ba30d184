//! Settings: defaults, then the kernel command line (`godwit.agent_KEY=VALUE`, read from
//! /proc/cmdline when the agent is PID 1, or from the file given with `--cmdline`), then the
//! environment (`GODWIT_AGENT_KEY=VALUE`), then arguments (`--KEY VALUE` or `--KEY=VALUE`).
//! Keys are the field names below with `_` or `-` (`disk_mib`, `disk-mib`); `godwit.agent_port`
//! is the TCP port. Paths take `none` to switch a workload off.

use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// TCP port of the line service (0: any free port, printed in the READY line).
    pub port: u16,
    /// Address to listen on.
    pub listen: String,
    /// Heartbeat period.
    pub hb_ms: u64,
    /// Memory ledger region in MiB (0: none).
    pub mib: u64,
    /// MiB/s the memory ledger rewrites (0: as fast as it can).
    pub rate: u64,
    /// Block device (or file) of the disk ledger.
    pub disk: Option<PathBuf>,
    /// The disk ledger uses the first `disk_mib` MiB.
    pub disk_mib: u64,
    /// MiB/s written to the disk ledger (0: as fast as the device takes it).
    pub disk_rate: u64,
    /// Device mounted (ext4) at `fs_dir` for the file workload; none: use `fs_dir` as it is.
    pub fs_dev: Option<PathBuf>,
    /// Directory of the file workload (none: no file workload).
    pub fs_dir: Option<PathBuf>,
    /// One file rewritten (and fsync'd) every `fs_ms`.
    pub fs_ms: u64,
    /// Files in the file workload, 64 KiB each.
    pub fs_files: u64,
}

impl Config {
    /// Defaults. As PID 1 the guest's devices; as a normal process no device at all (never
    /// write to a host disk by default).
    pub fn defaults(pid1: bool) -> Config {
        Config {
            port: 7777,
            listen: "0.0.0.0".into(),
            hb_ms: 1000,
            mib: 64,
            rate: 16,
            disk: pid1.then(|| "/dev/vda".into()),
            disk_mib: 16,
            disk_rate: 2,
            fs_dev: pid1.then(|| "/dev/vdb".into()),
            fs_dir: pid1.then(|| "/mnt".into()),
            fs_ms: 250,
            fs_files: 16,
        }
    }

    /// Applies one `key=value`; an error names what was wrong.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let key = key.replace('-', "_");
        let num = |v: &str| v.parse::<u64>().map_err(|_| format!("{key}: '{v}' is not a number"));
        let path = |v: &str| if v == "none" || v.is_empty() { None } else { Some(PathBuf::from(v)) };
        match key.as_str() {
            "port" | "agent_port" => self.port = value.parse().map_err(|_| format!("port: '{value}' is not a TCP port"))?,
            "listen" => self.listen = value.to_string(),
            "hb_ms" => self.hb_ms = num(value)?.clamp(10, 3_600_000),
            "mib" => self.mib = num(value)?.min(1 << 20),
            "rate" => self.rate = num(value)?,
            "disk" => self.disk = path(value),
            "disk_mib" => self.disk_mib = num(value)?.min(1 << 20),
            "disk_rate" => self.disk_rate = num(value)?,
            "fs_dev" => self.fs_dev = path(value),
            "fs_dir" => self.fs_dir = path(value),
            "fs_ms" => self.fs_ms = num(value)?.clamp(1, 3_600_000),
            "fs_files" => self.fs_files = num(value)?.clamp(1, 4096),
            _ => return Err(format!("unknown setting '{key}'")),
        }
        Ok(())
    }

    /// `godwit.agent_KEY=VALUE` words of a kernel command line; other words are ignored,
    /// bad values are returned as warnings.
    pub fn apply_cmdline(&mut self, cmdline: &str) -> Vec<String> {
        let mut warn = Vec::new();
        for w in cmdline.split_whitespace() {
            let Some(kv) = w.strip_prefix("godwit.agent_") else { continue };
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if let Err(e) = self.set(k, v) {
                warn.push(e);
            }
        }
        warn
    }

    pub fn apply_env(&mut self, vars: impl Iterator<Item = (String, String)>) -> Vec<String> {
        let mut warn = Vec::new();
        for (k, v) in vars {
            if let Some(key) = k.strip_prefix("GODWIT_AGENT_") {
                if let Err(e) = self.set(&key.to_ascii_lowercase(), &v) {
                    warn.push(e);
                }
            }
        }
        warn
    }
}

/// `--cmdline FILE` and the `(key, value)` settings of the arguments.
pub type Args = (Option<PathBuf>, Vec<(String, String)>);

/// Parses the arguments; errors are fatal for a normal process.
pub fn parse_args(args: &[String]) -> Result<Args, String> {
    let mut cmdline = None;
    let mut sets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(k) = a.strip_prefix("--") else { return Err(format!("unexpected argument '{a}'")) };
        let (k, v) = match k.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (k.to_string(), it.next().ok_or_else(|| format!("--{k} needs a value"))?.clone()),
        };
        if k == "cmdline" {
            cmdline = Some(PathBuf::from(v));
        } else {
            sets.push((k, v));
        }
    }
    Ok((cmdline, sets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        let mut c = Config::defaults(true);
        assert_eq!(c.disk.as_deref(), Some(std::path::Path::new("/dev/vda")));
        let w = c.apply_cmdline("console=ttyS0 godwit.agent_port=9000 godwit.agent_mib=8 godwit.agent_rate=x godwit.ip=1.2.3.4/24");
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!((c.port, c.mib, c.rate), (9000, 8, 16));
        let w = c.apply_env(vec![("GODWIT_AGENT_DISK".into(), "none".into()), ("PATH".into(), "/bin".into())].into_iter());
        assert!(w.is_empty());
        assert_eq!(c.disk, None);
        let args: Vec<String> = ["--disk-mib", "4", "--fs_dir=/tmp/x", "--cmdline", "/c"].iter().map(|s| s.to_string()).collect();
        let (cl, sets) = parse_args(&args).unwrap();
        assert_eq!(cl, Some(PathBuf::from("/c")));
        for (k, v) in sets {
            c.set(&k, &v).unwrap();
        }
        assert_eq!(c.disk_mib, 4);
        assert_eq!(c.fs_dir, Some(PathBuf::from("/tmp/x")));
        assert!(c.set("bogus", "1").is_err());
        assert!(parse_args(&["--port".to_string()]).is_err());
        assert!(parse_args(&["port".to_string()]).is_err());
        // A normal process touches no device unless told to.
        let n = Config::defaults(false);
        assert_eq!((n.disk, n.fs_dev, n.fs_dir), (None, None, None));
    }
}
