//! `tls-authz`: which TLS clients a migration destination lets in, with QEMU's
//! `authz-simple` object (`-object authz-simple,id=ID,identity=NAME`). With x509 credentials
//! NAME is the client certificate's distinguished name as GnuTLS (and so QEMU) writes it:
//! RFC 4514, last RDN first, `,` between RDNs (`CN=host.example.org,O=Example,C=GB`; on QEMU's
//! command line a comma inside a value is doubled: `identity=CN=a,,O=b`). With PSK
//! credentials NAME is the client's username.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// Splits a QEMU `-object` option string at single commas; `,,` is a literal comma.
pub fn split_opts(spec: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                out.last_mut().map(|s| s.push(','));
            } else {
                out.push(String::new());
            }
        } else {
            out.last_mut().map(|s| s.push(c));
        }
    }
    out
}

static OBJECTS: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();

fn objects() -> std::sync::MutexGuard<'static, HashMap<String, String>> {
    OBJECTS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner())
}

/// Parses and registers an `authz-simple` object; `Ok(false)` for another object type.
pub fn register_object(spec: &str) -> Result<bool, String> {
    let parts = split_opts(spec);
    let ty = parts.first().map(String::as_str).unwrap_or("");
    if ty != "authz-simple" && ty != "qom-type=authz-simple" {
        return Ok(false);
    }
    let (mut id, mut identity) = (None, None);
    for p in &parts[1..] {
        match p.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("identity", v)) => identity = Some(v.to_string()),
            _ => return Err(format!("authz-simple: property '{p}' not found")),
        }
    }
    let id = id.ok_or("authz-simple: Parameter 'id' is missing")?;
    let identity = identity.ok_or_else(|| format!("authz-simple '{id}': Parameter 'identity' is missing"))?;
    let mut o = objects();
    if o.contains_key(&id) {
        return Err(format!("attempt to add duplicate property '{id}' to object"));
    }
    o.insert(id, identity);
    Ok(true)
}

/// The identity an `authz-simple` object lets in.
pub fn identity(id: &str) -> Option<String> {
    objects().get(id).cloned()
}

fn escape(v: &str) -> String {
    let mut s = String::new();
    for (i, c) in v.chars().enumerate() {
        let edge = (i == 0 && (c == ' ' || c == '#')) || (i + 1 == v.chars().count() && c == ' ');
        if edge || matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// The subject distinguished name of a DER certificate, RFC 4514 style (as GnuTLS prints it).
pub fn subject_dn(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable client certificate: {e}"))?;
    let reg = x509_parser::objects::oid_registry();
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let name = x509_parser::objects::oid2abbrev(atv.attr_type(), reg).map(str::to_string).unwrap_or_else(|_| atv.attr_type().to_id_string());
            let value = atv.as_str().map(escape).unwrap_or_else(|_| "#".to_string() + &hex(atv.attr_value().data));
            parts.push(format!("{name}={value}"));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_option_escapes() {
        assert_eq!(split_opts("authz-simple,id=a,identity=CN=x,,O=y"), vec!["authz-simple", "id=a", "identity=CN=x,O=y"]);
        assert!(register_object("authz-simple,id=t1,identity=CN=x,,O=y").unwrap());
        assert_eq!(identity("t1").as_deref(), Some("CN=x,O=y"));
        assert!(!register_object("tls-creds-x509,id=z").unwrap());
        assert!(register_object("authz-simple,id=t2").unwrap_err().contains("identity"));
        assert!(register_object("authz-simple,id=t1,identity=a").unwrap_err().contains("duplicate"));
    }

    #[test]
    fn distinguished_names_as_gnutls_writes_them() {
        let mut p = rcgen::CertificateParams::new(vec!["h".to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CountryName, "GB");
        p.distinguished_name.push(rcgen::DnType::OrganizationName, "Example, Ltd");
        p.distinguished_name.push(rcgen::DnType::CommonName, "laptop.example.com");
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.self_signed(&k).unwrap();
        assert_eq!(subject_dn(c.der()).unwrap(), "CN=laptop.example.com,O=Example\\, Ltd,C=GB");
        assert!(subject_dn(b"junk").is_err());
    }
}
