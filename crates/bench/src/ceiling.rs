//! The ceiling a migration stream is measured against: one loopback TCP stream, plain
//! `write_all`/`read` with 1 MiB buffers, in this process, in the same run.

use crate::vm::{BenchError, Res};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

/// Copies `bytes` over loopback TCP; returns MiB/s.
pub fn loopback_mibs(bytes: u64) -> Res<f64> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e| BenchError::Io(what.clone(), e)
    };
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("bind"))?;
    let addr = l.local_addr().map_err(io("local_addr"))?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        let buf = vec![0x5au8; 1 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    });
    let (mut s, _) = l.accept().map_err(io("accept"))?;
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < bytes {
        let n = s.read(&mut buf).map_err(io("read"))?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| BenchError::Failed("loopback writer panicked".into()))?
        .map_err(io("write"))?;
    if got != bytes {
        return Err(BenchError::Failed(format!(
            "loopback copy got {got} of {bytes} bytes"
        )));
    }
    Ok(got as f64 / (1024.0 * 1024.0) / secs)
}

/// The other ceiling of a first pass: how fast this host hands out fresh memory. A destination
/// writes every page of round 0 into memory it never touched, so each page costs a fault and
/// zeroing — and, on a nested host whose own memory is populated lazily below it, a fault in
/// the host under this one too. Touches `bytes` of new anonymous memory once, with the page
/// size a Godwit destination fills its RAM with on this host (`vmm::pagesize`); returns MiB/s.
pub fn first_touch_mibs(bytes: usize) -> Res<f64> {
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, 0)
    };
    if p == libc::MAP_FAILED {
        return Err(BenchError::Io("mmap".into(), std::io::Error::last_os_error()));
    }
    let advice = if vmm::pagesize::small_pages_while_receiving() { libc::MADV_NOHUGEPAGE } else { libc::MADV_HUGEPAGE };
    // SAFETY: our mapping.
    unsafe { libc::madvise(p, bytes, advice) };
    let t = Instant::now();
    // SAFETY: writes inside the mapping.
    unsafe { std::ptr::write_bytes(p as *mut u8, 0x5a, bytes) };
    let secs = t.elapsed().as_secs_f64();
    // SAFETY: our mapping, no longer used.
    unsafe { libc::munmap(p, bytes) };
    Ok(bytes as f64 / (1024.0 * 1024.0) / secs)
}
