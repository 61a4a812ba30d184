//! Throughput and CPU cost of one migration channel on loopback, plain TCP against TLS
//! (PSK credentials made on the fly): `cargo run --release -p migration --example
//! tls_throughput [MiB]`. The writer sends 1 MiB buffers as the RAM sender does; the numbers
//! say what TLS costs per byte on this host, without a guest or a VMM around it.

use migration::tls::{client, server, Endpoint, TlsCreds, TlsSetup};
use migration::transport::Channel;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

fn cpu_s() -> f64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn run(name: &str, mib: usize, tls: Option<(Arc<TlsCreds>, Arc<TlsCreds>)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stls = tls.as_ref().map(|t| t.0.clone());
    let rx = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut ch: Box<dyn Channel> = match stls {
            Some(c) => server(&TlsSetup { creds: c, hostname: String::new(), authz: None }, s).unwrap(),
            None => Box::new(s),
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        loop {
            match ch.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => panic!("read: {e}"),
            }
        }
        got
    });
    let s = TcpStream::connect(addr).unwrap();
    let mut ch: Box<dyn Channel> = match &tls {
        Some(t) => client(&TlsSetup { creds: t.1.clone(), hostname: "localhost".into(), authz: None }, s, "localhost").unwrap(),
        None => Box::new(s),
    };
    let buf: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let (t0, c0) = (Instant::now(), cpu_s());
    for _ in 0..mib {
        ch.write_all(&buf).unwrap();
    }
    drop(ch);
    let got = rx.join().unwrap();
    let (dt, dc) = (t0.elapsed().as_secs_f64(), cpu_s() - c0);
    assert_eq!(got, mib << 20, "{name}: bytes lost");
    println!("{name:6} {mib} MiB in {dt:.3} s = {:.0} MB/s, CPU {dc:.2} s (both ends) = {:.2} CPU-s/GiB", (mib << 20) as f64 / dt / 1e6, dc / (mib as f64 / 1024.0));
}

fn main() {
    if std::env::args().any(|a| a == "aead") {
        return aead_speed();
    }
    let mib: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2048);
    let dir = std::env::temp_dir().join(format!("tls-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("keys.psk"), "qemu:00112233445566778899aabbccddeeff\n").unwrap();
    let d = dir.display();
    let mk = |id: &str, ep: &str| Arc::new(TlsCreds::from_object(&format!("tls-creds-psk,id={id},dir={d},endpoint={ep}")).unwrap().unwrap());
    let (s, c) = (mk("s", "server"), mk("c", "client"));
    assert_eq!(s.endpoint, Endpoint::Server);
    if std::env::args().nth(2).as_deref() != Some("tls-only") {
        run("plain", mib, None);
    }
    run("tls", mib, Some((s, c)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[allow(dead_code)]
fn aead_speed() {
    use ring::aead::*;
    for (n, alg) in [("aes128gcm", &AES_128_GCM), ("aes256gcm", &AES_256_GCM), ("chacha", &CHACHA20_POLY1305)] {
        let key = LessSafeKey::new(UnboundKey::new(alg, &vec![7u8; alg.key_len()]).unwrap());
        let mut buf = vec![1u8; 16384];
        let t = Instant::now();
        for i in 0..65536u64 {
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&i.to_be_bytes());
            let _ = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf).unwrap();
        }
        println!("{n}: {:.0} MB/s", 1024.0 * 1024.0 * 1024.0 / t.elapsed().as_secs_f64() / 1e6);
    }
}
