//! TLS on the migration channels, with QEMU's credential objects:
//!
//! - `tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]` reads QEMU's
//!   file names in DIR: `ca-cert.pem`, `server-cert.pem` + `server-key.pem` (server),
//!   `client-cert.pem` + `client-key.pem` (client; optional when the server does not verify
//!   peers). A server with `verify-peer=on` (the default, as in QEMU) refuses a client whose
//!   certificate does not chain to `ca-cert.pem`; a client checks the server's certificate
//!   against `ca-cert.pem` and the name in `tls-hostname` (default: the URI's host).
//! - `tls-creds-psk,id=ID,dir=DIR,endpoint=...[,username=NAME]` reads `keys.psk` (QEMU's
//!   `user:hexkey` lines; the client uses `username`, default `qemu`). rustls has no TLS 1.3
//!   external-PSK support (rustls issue #174), so Godwit does not put the key into the TLS
//!   handshake: the server presents a throw-away self-signed certificate, and right after the
//!   handshake both ends prove they hold the key with an HMAC-SHA256 over a value exported from
//!   this very TLS session (RFC 5705 keying material). A man in the middle terminates two
//!   different sessions and cannot produce either proof; a wrong key fails on both sides. It
//!   is not GnuTLS-PSK on the wire (Godwit's stream is not QEMU's anyway).
//!
//! rustls with the `ring` provider, TLS 1.3 and 1.2, no OpenSSL. The engine never sees TLS:
//! a secured connection is handed to it as a [`Channel`] that seals and opens records in the
//! calling thread, straight on the socket (see `tls_channel.rs`). A TLS failure after the
//! handshake (a corrupted record, a fatal alert) closes the connection and is reported as the
//! error of that and every later read or write on it.

use crate::transport::Channel;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, Connection, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[path = "tls_channel.rs"]
mod channel;
use channel::pump;
pub use channel::TlsChannel;

/// Errors of TLS credentials and handshakes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Object(String),
    #[error("cannot read {path}: {err}")]
    File { path: PathBuf, err: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    #[error("handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Auth(String),
}

type Result<T> = std::result::Result<T, TlsError>;

/// Which end of a connection the credentials are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Server,
    Client,
}

enum Kind {
    X509 { server: Option<Arc<ServerConfig>>, client: Option<Arc<ClientConfig>>, verify_peer: bool },
    Psk { keys: HashMap<String, Vec<u8>>, username: String, server: Option<Arc<ServerConfig>>, client: Option<Arc<ClientConfig>> },
}

/// A loaded `tls-creds-x509` or `tls-creds-psk` object.
pub struct TlsCreds {
    pub id: String,
    pub endpoint: Endpoint,
    pub dir: PathBuf,
    kind: Kind,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::X509 { verify_peer, .. } => format!("x509 verify-peer={verify_peer}"),
            Kind::Psk { username, .. } => format!("psk username={username}"),
        };
        write!(f, "TlsCreds({} {:?} {} {})", self.id, self.endpoint, self.dir.display(), kind)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let v: std::result::Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::File { path: path.into(), err: e.to_string() })?
        .collect();
    let v = v.map_err(|e| TlsError::File { path: path.into(), err: e.to_string() })?;
    if v.is_empty() {
        return Err(TlsError::File { path: path.into(), err: "no PEM certificate in it".into() });
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File { path: path.into(), err: e.to_string() })
}

fn roots(dir: &Path) -> Result<RootCertStore> {
    let path = dir.join("ca-cert.pem");
    let mut store = RootCertStore::empty();
    for c in certs(&path)? {
        store.add(c).map_err(|e| TlsError::File { path: path.clone(), err: e.to_string() })?;
    }
    Ok(store)
}

/// Accepts any server certificate (PSK mode, or a client with `verify-peer=off`); still checks
/// that the handshake is signed by the key of the certificate presented.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Parses QEMU's `keys.psk`: `username:hexkey` per line.
pub fn parse_psk_file(text: &str) -> std::result::Result<HashMap<String, Vec<u8>>, String> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hex) = line.split_once(':').ok_or_else(|| format!("line {}: expected username:hexkey", i + 1))?;
        if user.is_empty() || hex.len() % 2 != 0 || hex.is_empty() || hex.len() > 1024 {
            return Err(format!("line {}: expected username:hexkey (an even number of hex digits)", i + 1));
        }
        let key: std::result::Result<Vec<u8>, _> =
            (0..hex.len()).step_by(2).map(|k| u8::from_str_radix(&hex[k..k + 2], 16)).collect();
        let key = key.map_err(|_| format!("line {}: the key is not hexadecimal", i + 1))?;
        out.insert(user.to_string(), key);
    }
    if out.is_empty() {
        return Err("no key in it".into());
    }
    Ok(out)
}

fn opt_bool(name: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(TlsError::Object(format!("Parameter '{name}' expects 'on' or 'off'"))),
    }
}

impl TlsCreds {
    /// Parses and loads one `-object` spec (`tls-creds-x509,...` or `tls-creds-psk,...`).
    /// Returns `Ok(None)` for object types that are not TLS credentials.
    pub fn from_object(spec: &str) -> Result<Option<TlsCreds>> {
        let mut parts = spec.split(',');
        let ty = parts.next().unwrap_or("");
        let ty = ty.strip_prefix("qom-type=").unwrap_or(ty);
        if ty != "tls-creds-x509" && ty != "tls-creds-psk" {
            return Ok(None);
        }
        let mut id = None;
        let mut dir = None;
        let mut endpoint = Endpoint::Client;
        let mut verify_peer = true;
        let mut username = "qemu".to_string();
        for p in parts {
            let (k, v) = p.split_once('=').ok_or_else(|| TlsError::Object(format!("{ty}: '{p}' is not NAME=VALUE")))?;
            match k {
                "id" => id = Some(v.to_string()),
                "dir" => dir = Some(PathBuf::from(v)),
                "endpoint" => {
                    endpoint = match v {
                        "server" => Endpoint::Server,
                        "client" => Endpoint::Client,
                        _ => return Err(TlsError::Object(format!("{ty}: endpoint must be 'server' or 'client', not '{v}'"))),
                    }
                }
                "verify-peer" if ty == "tls-creds-x509" => verify_peer = opt_bool(k, v)?,
                "username" if ty == "tls-creds-psk" => username = v.to_string(),
                // Accepted and ignored, as harmless: QEMU's priority strings and cache flags.
                "priority" | "sanity-check" | "loaded" => {}
                _ => return Err(TlsError::Object(format!("{ty}: property '{k}' not found"))),
            }
        }
        let id = id.ok_or_else(|| TlsError::Object(format!("{ty}: Parameter 'id' is missing")))?;
        let dir = dir.ok_or_else(|| TlsError::Object(format!("{ty} '{id}': Parameter 'dir' is missing")))?;
        let kind = if ty == "tls-creds-x509" { load_x509(&dir, endpoint, verify_peer)? } else { load_psk(&dir, endpoint, username)? };
        Ok(Some(TlsCreds { id, endpoint, dir, kind }))
    }

    /// Whether these are PSK credentials.
    pub fn is_psk(&self) -> bool {
        matches!(self.kind, Kind::Psk { .. })
    }
}

fn load_x509(dir: &Path, endpoint: Endpoint, verify_peer: bool) -> Result<Kind> {
    let p = provider();
    let versions = rustls::ALL_VERSIONS;
    match endpoint {
        Endpoint::Server => {
            let chain = certs(&dir.join("server-cert.pem"))?;
            let k = key(&dir.join("server-key.pem"))?;
            let b = ServerConfig::builder_with_provider(p.clone()).with_protocol_versions(versions)?;
            let b = if verify_peer {
                let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(dir)?), p)
                    .build()
                    .map_err(|e| TlsError::Object(format!("client verifier: {e}")))?;
                b.with_client_cert_verifier(v)
            } else {
                b.with_no_client_auth()
            };
            let cfg = b.with_single_cert(chain, k)?;
            Ok(Kind::X509 { server: Some(Arc::new(cfg)), client: None, verify_peer })
        }
        Endpoint::Client => {
            let b = ClientConfig::builder_with_provider(p.clone()).with_protocol_versions(versions)?;
            let b = if verify_peer {
                b.with_root_certificates(roots(dir)?)
            } else {
                b.dangerous().with_custom_certificate_verifier(Arc::new(AnyServer(p)))
            };
            let cert = dir.join("client-cert.pem");
            let cfg = if cert.exists() {
                b.with_client_auth_cert(certs(&cert)?, key(&dir.join("client-key.pem"))?)?
            } else {
                b.with_no_client_auth()
            };
            Ok(Kind::X509 { server: None, client: Some(Arc::new(cfg)), verify_peer })
        }
    }
}

fn load_psk(dir: &Path, endpoint: Endpoint, username: String) -> Result<Kind> {
    let path = dir.join("keys.psk");
    let text = std::fs::read_to_string(&path).map_err(|e| TlsError::File { path: path.clone(), err: e.to_string() })?;
    let keys = parse_psk_file(&text).map_err(|err| TlsError::File { path: path.clone(), err })?;
    if endpoint == Endpoint::Client && !keys.contains_key(&username) {
        return Err(TlsError::File { path, err: format!("no key for username '{username}'") });
    }
    let p = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    let (server, client) = match endpoint {
        Endpoint::Server => {
            let ck = rcgen::generate_simple_self_signed(vec!["godwit-migration-psk".to_string()])
                .map_err(|e| TlsError::Object(format!("generating the session certificate: {e}")))?;
            let cert = CertificateDer::from(ck.cert.der().to_vec());
            let key = PrivateKeyDer::try_from(ck.key_pair.serialize_der()).map_err(|e| TlsError::Object(e.to_string()))?;
            let cfg = ServerConfig::builder_with_provider(p).with_protocol_versions(versions)?.with_no_client_auth().with_single_cert(vec![cert], key)?;
            (Some(Arc::new(cfg)), None)
        }
        Endpoint::Client => {
            let cfg = ClientConfig::builder_with_provider(p.clone())
                .with_protocol_versions(versions)?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServer(p)))
                .with_no_client_auth();
            (None, Some(Arc::new(cfg)))
        }
    };
    Ok(Kind::Psk { keys, username, server, client })
}

static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<TlsCreds>>>> = OnceLock::new();

fn registry() -> std::sync::MutexGuard<'static, HashMap<String, Arc<TlsCreds>>> {
    REGISTRY.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes credentials available to `tls-creds ID`. A second object with the same id is refused.
pub fn register(c: TlsCreds) -> Result<()> {
    let mut r = registry();
    if r.contains_key(&c.id) {
        return Err(TlsError::Object(format!("attempt to add duplicate property '{}' to object", c.id)));
    }
    r.insert(c.id.clone(), Arc::new(c));
    Ok(())
}

/// The credentials object named `id`.
pub fn lookup(id: &str) -> Option<Arc<TlsCreds>> {
    registry().get(id).cloned()
}

/// What a migration needs to secure its channels (from `tls-creds`, `tls-hostname`,
/// `tls-authz`).
#[derive(Clone)]
pub struct TlsSetup {
    pub creds: Arc<TlsCreds>,
    /// The name the server's certificate must carry (client side).
    pub hostname: String,
    /// Server side: the only client identity let in (`tls-authz`, see [`crate::authz`]).
    pub authz: Option<String>,
}

impl TlsSetup {
    /// Resolves the `tls-creds` parameter (empty = no TLS) for `want` endpoint.
    pub fn from_params(creds: &str, hostname: &str, want: Endpoint) -> Result<Option<TlsSetup>> {
        if creds.is_empty() {
            return Ok(None);
        }
        let c = lookup(creds).ok_or_else(|| TlsError::Object(format!("No TLS credentials with id '{creds}'")))?;
        if c.endpoint != want {
            let w = if want == Endpoint::Server { "server" } else { "client" };
            return Err(TlsError::Object(format!("Expecting TLS credentials with a {w} endpoint ('{creds}' is not)")));
        }
        Ok(Some(TlsSetup { creds: c, hostname: hostname.to_string(), authz: None }))
    }
}

/// The source's TLS setup from its migration parameters (`None`: plain).
pub fn source_setup(p: &crate::stats::Params) -> crate::Result<Option<TlsSetup>> {
    TlsSetup::from_params(&p.tls_creds, &p.tls_hostname, Endpoint::Client).map_err(|e| crate::MigrationError::Tls(e.to_string()))
}

/// The destination's TLS setup from its migration parameters (`None`: plain).
pub fn destination_setup(p: &crate::stats::Params) -> crate::Result<Option<TlsSetup>> {
    let err = |m: String| crate::MigrationError::Tls(m);
    let mut setup = TlsSetup::from_params(&p.tls_creds, "", Endpoint::Server).map_err(|e| err(e.to_string()))?;
    if !p.tls_authz.is_empty() {
        let Some(s) = setup.as_mut() else {
            return Err(err("tls-authz is set but tls-creds is not: nobody to authorize".into()));
        };
        let id = crate::authz::identity(&p.tls_authz).ok_or_else(|| err(format!("No authorization object with id '{}'", p.tls_authz)))?;
        s.authz = Some(id);
    }
    Ok(setup)
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const EXPORTER_LABEL: &[u8] = b"EXPORTER-godwit-migration-psk";
/// The server's first application byte: "your credentials were accepted".
const ACCEPTED: u8 = 0x47;

/// rustls reports its errors from `complete_io` inside an `io::Error`: take them out.
fn unwrap_io(e: std::io::Error) -> TlsError {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(r) => TlsError::Rustls(r.clone()),
        None => TlsError::Io(e),
    }
}

fn handshake(conn: &mut Connection, tcp: &mut TcpStream) -> Result<()> {
    while conn.is_handshaking() {
        conn.complete_io(tcp).map_err(unwrap_io)?;
    }
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    Ok(())
}

fn tls_read_exact(conn: &mut Connection, tcp: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match conn.reader().read(&mut buf[got..]) {
            Ok(0) => return Err(TlsError::Auth("the peer closed the connection".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if conn.read_tls(tcp)? == 0 {
                    return Err(TlsError::Auth("the peer closed the connection".into()));
                }
                conn.process_new_packets()?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn tls_write(conn: &mut Connection, tcp: &mut TcpStream, data: &[u8]) -> Result<()> {
    conn.writer().write_all(data)?;
    while conn.wants_write() {
        conn.write_tls(tcp)?;
    }
    Ok(())
}

fn proof(key: &[u8], role: &[u8], exported: &[u8]) -> ring::hmac::Tag {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&k);
    ctx.update(role);
    ctx.update(exported);
    ctx.sign()
}

fn check_proof(key: &[u8], role: &[u8], exported: &[u8], got: &[u8]) -> bool {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut msg = role.to_vec();
    msg.extend_from_slice(exported);
    ring::hmac::verify(&k, &msg, got).is_ok()
}

fn exported(conn: &Connection) -> Result<[u8; 32]> {
    Ok(conn.export_keying_material([0u8; 32], EXPORTER_LABEL, None)?)
}

/// Client side: secures `tcp` (connected to `host`, used as the server name unless
/// `tls-hostname` was set). Fails when the server's certificate does not verify or the server
/// refuses ours.
pub fn client(setup: &TlsSetup, mut tcp: TcpStream, host: &str) -> Result<Box<dyn Channel>> {
    let name = if setup.hostname.is_empty() { host } else { &setup.hostname };
    let sni = ServerName::try_from(name.to_string())
        .map_err(|_| TlsError::Object(format!("'{name}' is not a valid TLS server name (set tls-hostname)")))?;
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut conn: Connection = match &setup.creds.kind {
        Kind::X509 { client: Some(cfg), .. } | Kind::Psk { client: Some(cfg), .. } => {
            rustls::ClientConnection::new(cfg.clone(), sni)?.into()
        }
        _ => return Err(TlsError::Object(format!("TLS credentials '{}' are not for a client", setup.creds.id))),
    };
    let refused = |e: TlsError| match e {
        TlsError::Rustls(rustls::Error::AlertReceived(a)) => {
            TlsError::Auth(format!("the destination refused this TLS client: received alert {a:?}"))
        }
        e => e,
    };
    handshake(&mut conn, &mut tcp).map_err(refused)?;
    if let Kind::Psk { keys, username, .. } = &setup.creds.kind {
        let k = keys.get(username).ok_or_else(|| TlsError::Auth(format!("no PSK for '{username}'")))?;
        let ex = exported(&conn)?;
        let mut msg = vec![username.len().min(255) as u8];
        msg.extend_from_slice(&username.as_bytes()[..username.len().min(255)]);
        msg.extend_from_slice(proof(k, b"client", &ex).as_ref());
        tls_write(&mut conn, &mut tcp, &msg)?;
        let mut ans = [0u8; 33];
        tls_read_exact(&mut conn, &mut tcp, &mut ans[..1]).map_err(refused)?;
        if ans[0] != ACCEPTED {
            return Err(TlsError::Auth(format!("the destination refused the pre-shared key of '{username}'")));
        }
        tls_read_exact(&mut conn, &mut tcp, &mut ans[1..])?;
        if !check_proof(k, b"server", &ex, &ans[1..]) {
            return Err(TlsError::Auth("the destination does not hold our pre-shared key".into()));
        }
    } else {
        let mut ok = [0u8; 1];
        tls_read_exact(&mut conn, &mut tcp, &mut ok).map_err(refused)?;
        if ok[0] != ACCEPTED {
            return Err(TlsError::Auth("the destination sent an unexpected first byte".into()));
        }
    }
    tcp.set_read_timeout(None)?;
    Ok(Box::new(pump(conn, tcp)?))
}

/// Server side: secures an accepted `tcp`. Fails (with the reason) when the peer does not
/// speak TLS, presents no or an unverifiable certificate, or does not hold the PSK.
pub fn server(setup: &TlsSetup, mut tcp: TcpStream) -> Result<Box<dyn Channel>> {
    tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut conn: Connection = match &setup.creds.kind {
        Kind::X509 { server: Some(cfg), .. } | Kind::Psk { server: Some(cfg), .. } => rustls::ServerConnection::new(cfg.clone())?.into(),
        _ => return Err(TlsError::Object(format!("TLS credentials '{}' are not for a server", setup.creds.id))),
    };
    if let Err(e) = handshake(&mut conn, &mut tcp) {
        // Tell the peer why, if it speaks TLS at all.
        let _ = conn.write_tls(&mut tcp);
        close_gently(&mut tcp);
        return Err(match e {
            TlsError::Rustls(rustls::Error::InvalidMessage(_)) => {
                TlsError::Auth(format!("the peer does not speak TLS (plain migration stream?): {e}"))
            }
            TlsError::Rustls(rustls::Error::InvalidCertificate(c)) => {
                TlsError::Auth(format!("the client's certificate does not verify: {c:?}"))
            }
            TlsError::Rustls(rustls::Error::NoCertificatesPresented) => {
                TlsError::Auth("the client presented no certificate (verify-peer is on)".into())
            }
            e => e,
        });
    }
    if let Kind::Psk { keys, .. } = &setup.creds.kind {
        let ex = exported(&conn)?;
        let mut len = [0u8; 1];
        tls_read_exact(&mut conn, &mut tcp, &mut len)?;
        let mut rest = vec![0u8; len[0] as usize + 32];
        tls_read_exact(&mut conn, &mut tcp, &mut rest)?;
        let user = String::from_utf8_lossy(&rest[..len[0] as usize]).into_owned();
        let ok = keys
            .get(&user)
            .filter(|k| check_proof(k, b"client", &ex, &rest[len[0] as usize..]))
            .filter(|_| setup.authz.as_ref().is_none_or(|a| *a == user));
        let Some(k) = ok else {
            let _ = tls_write(&mut conn, &mut tcp, &[0]);
            close_gently(&mut tcp);
            let why = if setup.authz.as_ref().is_some_and(|a| *a != user) { "is not authorized by tls-authz" } else { "does not hold the pre-shared key" };
            return Err(TlsError::Auth(format!("the client '{user}' {why}")));
        };
        let mut ans = vec![ACCEPTED];
        ans.extend_from_slice(proof(k, b"server", &ex).as_ref());
        tls_write(&mut conn, &mut tcp, &ans)?;
    } else {
        if let Some(want) = &setup.authz {
            let dn = match conn.peer_certificates().and_then(|c| c.first()) {
                Some(c) => crate::authz::subject_dn(c.as_ref()).map_err(TlsError::Auth)?,
                None => return Err(TlsError::Auth("tls-authz needs the client's certificate (verify-peer=on)".into())),
            };
            if &dn != want {
                conn.send_close_notify();
                let _ = conn.write_tls(&mut tcp);
                close_gently(&mut tcp);
                return Err(TlsError::Auth(format!("the client '{dn}' is not authorized by tls-authz")));
            }
        }
        tls_write(&mut conn, &mut tcp, &[ACCEPTED])?;
    }
    tcp.set_read_timeout(None)?;
    Ok(Box::new(pump(conn, tcp)?))
}

/// Ends a refused connection so the peer reads our alert or answer: closing with its bytes
/// unread would reset the connection and could discard them on the peer's side.
fn close_gently(tcp: &mut TcpStream) {
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(200) {
        match tcp.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_file_format() {
        let k = parse_psk_file("qemu:00ff10\n# c\n\nalice:abcd\n").unwrap();
        assert_eq!(k["qemu"], vec![0, 0xff, 0x10]);
        assert_eq!(k["alice"], vec![0xab, 0xcd]);
        for bad in ["", "qemu", "qemu:0", "qemu:zz", ":00", "qemu:"] {
            assert!(parse_psk_file(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn objects_parse_and_fail_clearly() {
        assert!(TlsCreds::from_object("memory-backend-ram,id=m").unwrap().is_none());
        let e = TlsCreds::from_object("tls-creds-x509,id=t,dir=/nonexistent,endpoint=server").unwrap_err();
        assert!(e.to_string().contains("server-cert.pem"), "{e}");
        let e = TlsCreds::from_object("tls-creds-x509,id=t,endpoint=server").unwrap_err();
        assert!(e.to_string().contains("'dir' is missing"), "{e}");
        let e = TlsCreds::from_object("tls-creds-psk,id=t,dir=/x,endpoint=middle").unwrap_err();
        assert!(e.to_string().contains("endpoint"), "{e}");
        let e = TlsCreds::from_object("tls-creds-psk,id=t,dir=/x,bogus=1").unwrap_err();
        assert!(e.to_string().contains("'bogus' not found"), "{e}");
    }
}
