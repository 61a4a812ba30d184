//! `nfs://` URLs as QEMU and libnfs write them:
//! `nfs://SERVER[:PORT]/EXPORT/PATH[?version=4&nfsport=N&...]`.
//!
//! The URL is checked here (scheme, server, a path with an export and a file name, options
//! libnfs knows) so a typo fails with a clear message instead of a libnfs parse error, then
//! handed to libnfs, which splits export and file and applies its options. `:PORT` becomes
//! libnfs's `nfsport=PORT`. Godwit adds one option of its own, stripped before libnfs sees the
//! URL: `hard-timeout=SECONDS` (default [`DEFAULT_HARD_TIMEOUT`]), how long an operation keeps
//! retrying and reconnecting, as a hard mount would, before it fails and the drive's error
//! policy (`werror`/`rerror`) applies.

use crate::error::{Error, Result};
use std::fmt;
use std::time::Duration;

/// How long an operation retries before failing, unless `hard-timeout=` says otherwise.
pub const DEFAULT_HARD_TIMEOUT: Duration = Duration::from_secs(60);

/// Options libnfs 4.x takes in a URL.
const LIBNFS_OPTIONS: &[&str] = &[
    "uid",
    "gid",
    "readahead",
    "pagecache",
    "debug",
    "auto-traverse-mounts",
    "dircache",
    "autoreconnect",
    "if",
    "version",
    "nfsport",
    "mountport",
    "tcp-syncnt",
];

/// A checked `nfs://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NfsUrl {
    /// As the user wrote it.
    pub original: String,
    /// Host name or address (without the port).
    pub server: String,
    /// `/EXPORT/.../FILE`.
    pub path: String,
    /// NFS version (3 unless `version=4`).
    pub version: u32,
    /// The retry window of each operation.
    pub hard_timeout: Duration,
    /// What libnfs parses: Godwit's own options removed, `:PORT` as `nfsport=`.
    pub(crate) for_libnfs: String,
}

/// True if `s` names an NFS image.
pub fn is_nfs_url(s: &str) -> bool {
    s.starts_with("nfs://")
}

impl NfsUrl {
    /// Parses and checks `s`.
    pub fn parse(s: &str) -> Result<NfsUrl> {
        let bad = |why: &str| Error::Url { url: s.to_string(), why: why.to_string() };
        let rest = s.strip_prefix("nfs://").ok_or_else(|| bad("it does not start with nfs://"))?;
        if s.len() > 4096 || s.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(bad("it contains spaces or control characters, or is too long"));
        }
        let (loc, query) = match rest.split_once('?') {
            Some((l, q)) => (l, Some(q)),
            None => (rest, None),
        };
        let slash = loc.find('/').ok_or_else(|| bad("no /EXPORT/PATH after the server"))?;
        let (authority, path) = loc.split_at(slash);
        if authority.contains('@') {
            return Err(bad("user names are not supported (use ?uid=N&gid=N)"));
        }
        let (server, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                let port: u16 = p.parse().map_err(|_| bad(&format!("bad port '{p}'")))?;
                (h.to_string(), Some(port))
            }
            _ => (authority.to_string(), None),
        };
        if server.is_empty() {
            return Err(bad("no server"));
        }
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        if parts.len() < 2 || path.ends_with('/') {
            return Err(bad("the path must be /EXPORT/FILE (an export and a file in it)"));
        }
        if parts.iter().any(|p| *p == "." || *p == "..") {
            return Err(bad("'.' and '..' are not allowed in the path"));
        }
        let mut version = 3;
        let mut hard_timeout = DEFAULT_HARD_TIMEOUT;
        let mut keep: Vec<String> = Vec::new();
        let mut has_nfsport = false;
        for kv in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(&format!("option '{kv}' is not key=value")))?;
            match k {
                "hard-timeout" => {
                    let secs: u64 = v.parse().map_err(|_| bad(&format!("hard-timeout '{v}' is not a number of seconds")))?;
                    if secs == 0 || secs > 24 * 3600 {
                        return Err(bad("hard-timeout must be 1..=86400 seconds"));
                    }
                    hard_timeout = Duration::from_secs(secs);
                    continue;
                }
                "version" => {
                    version = match v {
                        "3" => 3,
                        "4" => 4,
                        _ => return Err(bad(&format!("version '{v}' (3 or 4)"))),
                    }
                }
                "nfsport" | "mountport" | "uid" | "gid" | "readahead" | "pagecache" | "debug" | "tcp-syncnt"
                | "autoreconnect" => {
                    if v.parse::<i64>().is_err() {
                        return Err(bad(&format!("option {k}='{v}' is not a number")));
                    }
                    has_nfsport |= k == "nfsport";
                }
                k if LIBNFS_OPTIONS.contains(&k) => {}
                _ => return Err(bad(&format!("unknown option '{k}'"))),
            }
            keep.push(kv.to_string());
        }
        if let Some(p) = port {
            if has_nfsport {
                return Err(bad("both :PORT and nfsport= given"));
            }
            keep.push(format!("nfsport={p}"));
        }
        let mut for_libnfs = format!("nfs://{server}{path}");
        if !keep.is_empty() {
            for_libnfs.push('?');
            for_libnfs.push_str(&keep.join("&"));
        }
        Ok(NfsUrl { original: s.to_string(), server, path: path.to_string(), version, hard_timeout, for_libnfs })
    }
}

impl NfsUrl {
    /// The same file over NFSv4 (for the lock): `version=4`, no `mountport`.
    pub(crate) fn lock_url(&self) -> String {
        let (base, query) = match self.for_libnfs.split_once('?') {
            Some((b, q)) => (b, q),
            None => (self.for_libnfs.as_str(), ""),
        };
        let mut opts: Vec<&str> = query
            .split('&')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("version=") && !kv.starts_with("mountport="))
            .collect();
        opts.push("version=4");
        format!("{base}?{}", opts.join("&"))
    }
}

impl fmt::Display for NfsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_and_libnfs_forms() {
        let u = NfsUrl::parse("nfs://10.0.0.1/export/vm/disk.qcow2").unwrap();
        assert_eq!((u.server.as_str(), u.path.as_str(), u.version), ("10.0.0.1", "/export/vm/disk.qcow2", 3));
        assert_eq!(u.for_libnfs, "nfs://10.0.0.1/export/vm/disk.qcow2");
        let u = NfsUrl::parse("nfs://srv:20490/export/d.qcow2?version=4&hard-timeout=5").unwrap();
        assert_eq!(u.version, 4);
        assert_eq!(u.hard_timeout, Duration::from_secs(5));
        assert_eq!(u.for_libnfs, "nfs://srv/export/d.qcow2?version=4&nfsport=20490");
        assert_eq!(u.to_string(), "nfs://srv:20490/export/d.qcow2?version=4&hard-timeout=5");
        let u = NfsUrl::parse("nfs://srv/export/d.qcow2?mountport=20048&uid=0").unwrap();
        assert_eq!(u.lock_url(), "nfs://srv/export/d.qcow2?uid=0&version=4");
    }

    #[test]
    fn rejects_bad_urls() {
        for s in [
            "file:///x",
            "nfs://",
            "nfs:///export/x",
            "nfs://h/x",
            "nfs://h/export/",
            "nfs://h:99999/e/x",
            "nfs://h/e/x?version=5",
            "nfs://h/e/x?bogus=1",
            "nfs://h/e/x?nfsport=abc",
            "nfs://h/e/../x",
            "nfs://u@h/e/x",
            "nfs://h:1/e/x?nfsport=2",
            "nfs://h/e/x?hard-timeout=0",
            "nfs://h/e/x y",
        ] {
            let e = NfsUrl::parse(s).unwrap_err();
            assert!(e.to_string().starts_with("invalid NFS URL"), "{s}: {e}");
        }
    }
}
