//! A thin binding to libnfs's synchronous API, loaded at run time with `dlopen`.
//!
//! Loading at run time keeps libnfs out of the build: the workspace compiles and links on a
//! machine without it, and only a drive or image on an `nfs://` URL needs the shared library
//! (Debian `libnfs13`, pulled in by `libnfs-dev` or `libnfs-utils`); without it that open fails
//! with [`crate::Error::NoLibnfs`], naming the package. Only the few entry points this crate uses
//! are resolved, each with the C prototype of libnfs 4.x (`nfsc/libnfs.h`) transcribed by hand.
//!
//! libnfs contexts are not thread-safe: every call on one context must be serialised by the
//! caller ([`crate::NfsStorage`] keeps its context behind a mutex).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// Opaque `struct nfs_context`.
#[repr(C)]
pub struct NfsContext {
    _p: [u8; 0],
}

/// Opaque `struct nfsfh`.
#[repr(C)]
pub struct NfsFh {
    _p: [u8; 0],
}

/// `struct nfs_url`.
#[repr(C)]
pub struct NfsUrlC {
    pub server: *mut c_char,
    pub path: *mut c_char,
    pub file: *mut c_char,
}

/// `struct nfs_stat_64`.
#[repr(C)]
#[derive(Default)]
pub struct NfsStat64 {
    pub dev: u64,
    pub ino: u64,
    pub mode: u64,
    pub nlink: u64,
    pub uid: u64,
    pub gid: u64,
    pub rdev: u64,
    pub size: u64,
    pub blksize: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atime_nsec: u64,
    pub mtime_nsec: u64,
    pub ctime_nsec: u64,
    pub used: u64,
}

/// `struct nfs4_flock`.
#[repr(C)]
pub struct Nfs4Flock {
    pub l_type: c_int,
    pub l_whence: c_int,
    pub l_pid: u32,
    pub l_start: u64,
    pub l_len: u64,
}

/// `enum nfs4_fcntl_op`: `NFS4_F_SETLK`.
pub const NFS4_F_SETLK: c_int = 0;

/// The resolved entry points.
#[allow(clippy::type_complexity)]
pub struct Lib {
    pub init_context: unsafe extern "C" fn() -> *mut NfsContext,
    pub destroy_context: unsafe extern "C" fn(*mut NfsContext),
    pub get_error: unsafe extern "C" fn(*mut NfsContext) -> *mut c_char,
    pub parse_url_full: unsafe extern "C" fn(*mut NfsContext, *const c_char) -> *mut NfsUrlC,
    pub destroy_url: unsafe extern "C" fn(*mut NfsUrlC),
    pub set_timeout: unsafe extern "C" fn(*mut NfsContext, c_int),
    pub set_autoreconnect: unsafe extern "C" fn(*mut NfsContext, c_int),
    pub set_client_name: unsafe extern "C" fn(*mut NfsContext, *const c_char),
    pub set_verifier: unsafe extern "C" fn(*mut NfsContext, *const c_char),
    pub mount: unsafe extern "C" fn(*mut NfsContext, *const c_char, *const c_char) -> c_int,
    pub open: unsafe extern "C" fn(*mut NfsContext, *const c_char, c_int, *mut *mut NfsFh) -> c_int,
    pub create: unsafe extern "C" fn(*mut NfsContext, *const c_char, c_int, c_int, *mut *mut NfsFh) -> c_int,
    pub close: unsafe extern "C" fn(*mut NfsContext, *mut NfsFh) -> c_int,
    pub pread: unsafe extern "C" fn(*mut NfsContext, *mut NfsFh, u64, u64, *mut c_void) -> c_int,
    pub pwrite: unsafe extern "C" fn(*mut NfsContext, *mut NfsFh, u64, u64, *const c_void) -> c_int,
    pub fsync: unsafe extern "C" fn(*mut NfsContext, *mut NfsFh) -> c_int,
    pub fstat64: unsafe extern "C" fn(*mut NfsContext, *mut NfsFh, *mut NfsStat64) -> c_int,
    pub ftruncate: unsafe extern "C" fn(*mut NfsContext, *mut NfsFh, u64) -> c_int,
    pub fcntl: unsafe extern "C" fn(*mut NfsContext, *mut NfsFh, c_int, *mut c_void) -> c_int,
    pub get_readmax: unsafe extern "C" fn(*mut NfsContext) -> u64,
    pub get_writemax: unsafe extern "C" fn(*mut NfsContext) -> u64,
    pub get_fd: unsafe extern "C" fn(*mut NfsContext) -> c_int,
}

// SAFETY: plain function pointers into a library that stays loaded for the process lifetime.
unsafe impl Send for Lib {}
unsafe impl Sync for Lib {}

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

/// The library, loaded on first use; the error says what is missing.
pub fn lib() -> Result<&'static Lib, String> {
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn dlerror() -> String {
    // SAFETY: dlerror returns a thread-local C string or NULL.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: non-null, NUL-terminated, valid until the next dl* call on this thread.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

#[allow(clippy::missing_transmute_annotations)]
fn load() -> Result<Lib, String> {
    let mut handle = std::ptr::null_mut();
    let mut why = String::new();
    for name in [c"libnfs.so.13", c"libnfs.so.14", c"libnfs.so"] {
        // SAFETY: dlopen with a valid C string; the handle is never closed.
        handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if !handle.is_null() {
            break;
        }
        why = dlerror();
    }
    if handle.is_null() {
        return Err(why);
    }
    macro_rules! sym {
        ($name:literal) => {{
            // SAFETY: dlsym on a live handle; the symbol is transmuted to the prototype this
            // file documents for it (libnfs 4.x), checked non-null first.
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr() as *const c_char) };
            if p.is_null() {
                return Err(format!("libnfs lacks {}: {}", $name, dlerror()));
            }
            unsafe { std::mem::transmute::<*mut c_void, _>(p) }
        }};
    }
    Ok(Lib {
        init_context: sym!("nfs_init_context"),
        destroy_context: sym!("nfs_destroy_context"),
        get_error: sym!("nfs_get_error"),
        parse_url_full: sym!("nfs_parse_url_full"),
        destroy_url: sym!("nfs_destroy_url"),
        set_timeout: sym!("nfs_set_timeout"),
        set_autoreconnect: sym!("nfs_set_autoreconnect"),
        set_client_name: sym!("nfs4_set_client_name"),
        set_verifier: sym!("nfs4_set_verifier"),
        mount: sym!("nfs_mount"),
        open: sym!("nfs_open"),
        create: sym!("nfs_create"),
        close: sym!("nfs_close"),
        pread: sym!("nfs_pread"),
        pwrite: sym!("nfs_pwrite"),
        fsync: sym!("nfs_fsync"),
        fstat64: sym!("nfs_fstat64"),
        ftruncate: sym!("nfs_ftruncate"),
        fcntl: sym!("nfs_fcntl"),
        get_readmax: sym!("nfs_get_readmax"),
        get_writemax: sym!("nfs_get_writemax"),
        get_fd: sym!("nfs_get_fd"),
    })
}
