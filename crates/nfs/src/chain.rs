//! Backing chains of images on NFS: the qcow2 crate's [`Opener`] for `nfs://` names.
//!
//! Names are resolved as QEMU resolves them for a protocol image: a relative backing name is
//! relative to the directory of the overlay's URL (`nfs://srv/export/vm/disk.qcow2` naming
//! `../base.qcow2` opens `nfs://srv/export/base.qcow2`), an absolute `nfs://` name is used as
//! is, an absolute host path is a host file. Unlike QEMU, a relative name keeps the overlay's
//! URL options (`?version=`, `:PORT`, `hard-timeout=`...): the backing file is on the same
//! server and is reached the same way. Backing layers are opened read-only, without the NFSv4
//! writer lock (QEMU's NFS driver takes no locks either); host files go to the qcow2 crate's
//! [`FileOpener`] (read-only, shared locks).
//!
//! Loop detection knows an NFS image by `nfs://SERVER/PATH` ([`identity`]), whatever the
//! options it was reached with.

use crate::storage::{NfsOptions, NfsStorage};
use crate::url::{is_nfs_url, NfsUrl};
use qcow2::backing::{FileOpener, OpenedBacking, Opener};
use qcow2::OpenOptions;
use std::path::{Path, PathBuf};

/// Opens backing files on NFS servers (and host files, as the qcow2 crate does).
#[derive(Debug, Default)]
pub struct NfsOpener;

/// The name loop detection knows the image at `url` by.
pub fn identity(url: &NfsUrl) -> PathBuf {
    PathBuf::from(format!("nfs://{}{}", url.server, url.path))
}

/// Joins the relative backing name `name` to the directory of the overlay URL `overlay`,
/// keeping the overlay's options, with `.` and `..` applied (never above the server's root).
pub fn join_backing_url(overlay: &str, name: &str) -> String {
    let (base, query) = match overlay.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (overlay, None),
    };
    let rest = base.strip_prefix("nfs://").unwrap_or(base);
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    parts.pop(); // the overlay's file name
    let mut above_root = false;
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => above_root |= parts.pop().is_none(),
            p => parts.push(p),
        }
    }
    // A name climbing above the server's root keeps a `..`, which the URL check refuses.
    let lead = if above_root { "/.." } else { "" };
    let mut out = format!("nfs://{authority}{lead}/{}", parts.join("/"));
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn io_err(context: &'static str, e: impl Into<std::io::Error>) -> qcow2::Error {
    qcow2::Error::Io { context, source: e.into() }
}

impl Opener for NfsOpener {
    fn resolve(&self, name: &str, overlay: Option<&Path>) -> PathBuf {
        match overlay.and_then(Path::to_str) {
            Some(o) if is_nfs_url(o) && !name.starts_with('/') && !name.contains("://") => {
                PathBuf::from(join_backing_url(o, name))
            }
            _ => qcow2::backing::resolve_backing_name(name, overlay),
        }
    }

    fn open(&self, path: &Path, opts: &OpenOptions) -> qcow2::Result<OpenedBacking> {
        let Some(s) = path.to_str().filter(|s| is_nfs_url(s)) else {
            return FileOpener.open(path, opts);
        };
        let url = NfsUrl::parse(s).map_err(|e| io_err("parsing the backing file's URL", e))?;
        let storage = NfsStorage::open(&url, NfsOptions { read_only: true, lock: false, sync_writes: false })
            .map_err(|e| io_err("opening the backing file over NFS", e))?;
        Ok(OpenedBacking { storage: Box::new(storage), identity: identity(&url), guard: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_join_the_overlay_directory_with_its_options() {
        let o = "nfs://srv:2049/export/vm/disk.qcow2?version=4&hard-timeout=5";
        assert_eq!(join_backing_url(o, "base.qcow2"), "nfs://srv:2049/export/vm/base.qcow2?version=4&hard-timeout=5");
        assert_eq!(join_backing_url(o, "../base/b.qcow2"), "nfs://srv:2049/export/base/b.qcow2?version=4&hard-timeout=5");
        assert_eq!(join_backing_url("nfs://h/e/d.qcow2", "./x/./y.raw"), "nfs://h/e/x/y.raw");
        // Above the root: the `..` stays, and the URL check refuses it.
        let up = join_backing_url("nfs://h/e/d.qcow2", "../../b.qcow2");
        assert_eq!(up, "nfs://h/../b.qcow2");
        assert!(NfsUrl::parse(&up).is_err());
    }

    #[test]
    fn resolution_follows_qemu() {
        let o = Path::new("nfs://h/export/dir/vm.qcow2");
        let r = |n: &str| NfsOpener.resolve(n, Some(o)).to_string_lossy().into_owned();
        assert_eq!(r("base.qcow2"), "nfs://h/export/dir/base.qcow2");
        assert_eq!(r("nfs://other/export/b.qcow2"), "nfs://other/export/b.qcow2");
        assert_eq!(r("/srv/images/b.qcow2"), "/srv/images/b.qcow2");
        // Local overlays keep the host-file rule.
        let local = NfsOpener.resolve("b.qcow2", Some(Path::new("/img/vm.qcow2")));
        assert_eq!(local, PathBuf::from("/img/b.qcow2"));
        let u = NfsUrl::parse("nfs://h:20490/export/dir/vm.qcow2?version=4").unwrap();
        assert_eq!(identity(&u), PathBuf::from("nfs://h/export/dir/vm.qcow2"));
    }
}
