//! Test helpers for migration over real links: certificates generated at run time (rcgen),
//! QEMU-layout credential directories, PSK files, and a TCP proxy that forwards every
//! connection it accepts and can corrupt or cut one of them.
#![allow(dead_code)]

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// A certificate authority that signs test certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).expect("CA cert");
        Ca { cert, key }
    }

    fn issue(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        p.distinguished_name.push(DnType::CommonName, names[0]);
        p.extended_key_usages = vec![purpose];
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes QEMU's server layout (ca-cert.pem, server-cert.pem, server-key.pem) into `dir`.
    pub fn server_dir(&self, dir: &Path, names: &[&str]) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let (c, k) = self.issue(names, ExtendedKeyUsagePurpose::ServerAuth);
        std::fs::write(dir.join("ca-cert.pem"), self.cert.pem()).unwrap();
        std::fs::write(dir.join("server-cert.pem"), c).unwrap();
        std::fs::write(dir.join("server-key.pem"), k).unwrap();
        dir.to_path_buf()
    }

    /// Writes QEMU's client layout (ca-cert.pem = `trust`'s, client-cert.pem and
    /// client-key.pem signed by this CA, CN=godwit-source) into `dir`.
    pub fn client_dir(&self, dir: &Path, trust: &Ca) -> PathBuf {
        self.client_dir_named(dir, trust, "godwit-source")
    }

    /// As [`Ca::client_dir`] with the certificate's CN (and name) `cn`.
    pub fn client_dir_named(&self, dir: &Path, trust: &Ca, cn: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let (c, k) = self.issue(&[cn], ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(dir.join("ca-cert.pem"), trust.cert.pem()).unwrap();
        std::fs::write(dir.join("client-cert.pem"), c).unwrap();
        std::fs::write(dir.join("client-key.pem"), k).unwrap();
        dir.to_path_buf()
    }
}

/// Writes `keys.psk` (QEMU's `user:hexkey`) into `dir`.
pub fn psk_dir(dir: &Path, user: &str, hexkey: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("keys.psk"), format!("{user}:{hexkey}\n")).unwrap();
    dir.to_path_buf()
}

/// What the proxy does to the connection with index `conn` (0 = the first accepted).
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    None,
    /// Flip one byte at this offset of the source's bytes on that connection.
    FlipAt { conn: usize, at: u64 },
    /// Close that connection (both ways) once this many bytes from the source went through.
    CutAfter { conn: usize, after: u64 },
}

/// A forwarding proxy on a free loopback port.
pub struct Proxy {
    pub port: u16,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Bytes forwarded from sources, all connections.
    pub forwarded: Arc<AtomicU64>,
    /// Set to cut every connection (at the next bytes either way).
    pub cut: Arc<std::sync::atomic::AtomicBool>,
}

pub fn proxy(to: u16, fault: Fault) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let forwarded = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (acc, fwd, cut2) = (accepted.clone(), forwarded.clone(), cut.clone());
    std::thread::spawn(move || {
        for (idx, a) in l.incoming().enumerate() {
            let Ok(mut a) = a else { return };
            acc.fetch_add(1, Ordering::SeqCst);
            let Ok(mut b) = TcpStream::connect(("127.0.0.1", to)) else { return };
            let (Ok(mut a2), Ok(mut b2)) = (a.try_clone(), b.try_clone()) else { return };
            let c = cut2.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = b2.read(&mut buf) {
                    if n == 0 || c.load(Ordering::SeqCst) || a2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = a2.shutdown(std::net::Shutdown::Both);
                let _ = b2.shutdown(std::net::Shutdown::Both);
            });
            let (fwd, c) = (fwd.clone(), cut2.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                let mut off = 0u64;
                loop {
                    let n = match a.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if c.load(Ordering::SeqCst) {
                        let _ = a.shutdown(std::net::Shutdown::Both);
                        let _ = b.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    match fault {
                        Fault::FlipAt { conn, at } if conn == idx && at >= off && at < off + n as u64 => {
                            buf[(at - off) as usize] ^= 0x40
                        }
                        Fault::CutAfter { conn, after } if conn == idx && off + n as u64 >= after => {
                            let _ = a.shutdown(std::net::Shutdown::Both);
                            let _ = b.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                        _ => {}
                    }
                    off += n as u64;
                    fwd.fetch_add(n as u64, Ordering::SeqCst);
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Proxy { port, accepted, forwarded, cut }
}
