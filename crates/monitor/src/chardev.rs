//! QEMU's legacy chardev specs as `-monitor`, `-qmp` and `-serial` take them, parsed into a
//! typed [`ChardevSpec`]: `stdio`, `mon:stdio`, `none`, `null`, `file:PATH`,
//! `unix:PATH[,server[=on|off]][,wait[=on|off]|,nowait]`,
//! `tcp:[HOST]:PORT[,server...][,wait...][,nodelay]`. A literal comma in a path is written `,,`
//! as in QEMU.

use crate::error::MonitorError;
use std::fmt;
use std::path::PathBuf;

/// A parsed chardev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevSpec {
    /// The process's stdin/stdout.
    Stdio,
    /// stdio shared by the serial port and the HMP monitor, switched with `Ctrl-a c`.
    MonStdio,
    /// Nothing connected.
    None,
    /// Discard output, never any input.
    Null,
    /// Output appended to a file.
    File { path: PathBuf },
    /// A unix socket. Only `server` mode is served.
    Unix {
        path: PathBuf,
        server: bool,
        wait: bool,
    },
    /// A TCP socket; an empty host means all addresses. Only `server` mode is served.
    Tcp {
        host: String,
        port: u16,
        server: bool,
        wait: bool,
        nodelay: bool,
    },
}

fn bad(spec: &str, reason: impl Into<String>) -> MonitorError {
    MonitorError::BadChardev {
        spec: spec.to_string(),
        reason: reason.into(),
    }
}

/// Splits on `,` keeping `,,` as a literal comma.
fn split_options(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(p) = parts.last_mut() {
                    p.push(',');
                }
            } else {
                parts.push(String::new());
            }
        } else {
            if let Some(p) = parts.last_mut() {
                p.push(c);
            }
        }
    }
    parts
}

fn on_off(spec: &str, key: &str, v: Option<&str>) -> Result<bool, MonitorError> {
    match v {
        None | Some("on") => Ok(true),
        Some("off") => Ok(false),
        Some(other) => Err(bad(
            spec,
            format!("'{key}' expects 'on' or 'off', got '{other}'"),
        )),
    }
}

impl ChardevSpec {
    /// Parses a spec as given on the command line.
    pub fn parse(spec: &str) -> Result<ChardevSpec, MonitorError> {
        match spec {
            "stdio" => return Ok(ChardevSpec::Stdio),
            "mon:stdio" => return Ok(ChardevSpec::MonStdio),
            "none" => return Ok(ChardevSpec::None),
            "null" => return Ok(ChardevSpec::Null),
            "" => return Err(bad(spec, "empty")),
            _ => {}
        }
        let (kind, rest) = spec.split_once(':').ok_or_else(|| {
            bad(
                spec,
                "expected stdio, mon:stdio, none, null, file:, unix: or tcp:",
            )
        })?;
        let parts = split_options(rest);
        let addr = parts[0].clone();
        let (mut server, mut wait, mut nodelay) = (false, None, false);
        for opt in &parts[1..] {
            let (key, val) = match opt.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (opt.as_str(), None),
            };
            match key {
                "server" => server = on_off(spec, key, val)?,
                "wait" => wait = Some(on_off(spec, key, val)?),
                "nowait" if val.is_none() => wait = Some(false),
                "nodelay" => nodelay = on_off(spec, key, val)?,
                _ => return Err(bad(spec, format!("unsupported option '{opt}'"))),
            }
        }
        let socket_opts = parts.len() > 1;
        match kind {
            "file" => {
                if socket_opts || addr.is_empty() {
                    return Err(bad(spec, "file: takes a path and no options"));
                }
                Ok(ChardevSpec::File {
                    path: PathBuf::from(addr),
                })
            }
            "unix" => {
                if addr.is_empty() {
                    return Err(bad(spec, "missing socket path"));
                }
                if nodelay {
                    return Err(bad(spec, "'nodelay' applies to tcp only"));
                }
                Ok(ChardevSpec::Unix {
                    path: PathBuf::from(addr),
                    server,
                    wait: wait.unwrap_or(server),
                })
            }
            "tcp" => {
                let (host, port) = addr
                    .rsplit_once(':')
                    .ok_or_else(|| bad(spec, "expected tcp:HOST:PORT"))?;
                let port: u16 = port
                    .parse()
                    .map_err(|_| bad(spec, format!("invalid port '{port}'")))?;
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                Ok(ChardevSpec::Tcp {
                    host: host.to_string(),
                    port,
                    server,
                    wait: wait.unwrap_or(server),
                    nodelay,
                })
            }
            "mon" => Err(bad(spec, "only mon:stdio is supported")),
            "telnet" | "websocket" | "udp" | "pty" | "vc" | "pipe" | "serial" | "tty" => Err(bad(
                spec,
                format!("chardev backend '{kind}' is not supported"),
            )),
            _ => Err(bad(spec, format!("unknown chardev backend '{kind}'"))),
        }
    }

    /// True for `unix`/`tcp` specs in server mode, the only socket mode the monitor serves.
    pub fn is_server(&self) -> bool {
        matches!(
            self,
            ChardevSpec::Unix { server: true, .. } | ChardevSpec::Tcp { server: true, .. }
        )
    }
}

impl fmt::Display for ChardevSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let onoff = |b: bool| if b { "on" } else { "off" };
        match self {
            ChardevSpec::Stdio => f.write_str("stdio"),
            ChardevSpec::MonStdio => f.write_str("mon:stdio"),
            ChardevSpec::None => f.write_str("none"),
            ChardevSpec::Null => f.write_str("null"),
            ChardevSpec::File { path } => write!(f, "file:{}", path.display()),
            ChardevSpec::Unix { path, server, wait } => {
                write!(f, "unix:{}", path.display().to_string().replace(',', ",,"))?;
                if *server {
                    write!(f, ",server=on,wait={}", onoff(*wait))?;
                }
                Ok(())
            }
            ChardevSpec::Tcp {
                host,
                port,
                server,
                wait,
                nodelay,
            } => {
                if host.contains(':') {
                    write!(f, "tcp:[{host}]:{port}")?;
                } else {
                    write!(f, "tcp:{host}:{port}")?;
                }
                if *server {
                    write!(f, ",server=on,wait={}", onoff(*wait))?;
                }
                if *nodelay {
                    f.write_str(",nodelay=on")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_monitor_specs() {
        assert_eq!(ChardevSpec::parse("stdio").unwrap(), ChardevSpec::Stdio);
        assert_eq!(
            ChardevSpec::parse("mon:stdio").unwrap(),
            ChardevSpec::MonStdio
        );
        assert_eq!(
            ChardevSpec::parse("unix:/tmp/a,,b.sock,server,nowait").unwrap(),
            ChardevSpec::Unix {
                path: "/tmp/a,b.sock".into(),
                server: true,
                wait: false
            }
        );
        assert_eq!(
            ChardevSpec::parse("unix:/tmp/m,server").unwrap(),
            ChardevSpec::Unix {
                path: "/tmp/m".into(),
                server: true,
                wait: true
            }
        );
        assert_eq!(
            ChardevSpec::parse("tcp:127.0.0.1:4444,server=on,wait=off").unwrap(),
            ChardevSpec::Tcp {
                host: "127.0.0.1".into(),
                port: 4444,
                server: true,
                wait: false,
                nodelay: false
            }
        );
        assert_eq!(
            ChardevSpec::parse("tcp::4444,server,nowait,nodelay").unwrap(),
            ChardevSpec::Tcp {
                host: "".into(),
                port: 4444,
                server: true,
                wait: false,
                nodelay: true
            }
        );
        assert_eq!(
            ChardevSpec::parse("tcp:[::1]:5,server,nowait").unwrap(),
            ChardevSpec::Tcp {
                host: "::1".into(),
                port: 5,
                server: true,
                wait: false,
                nodelay: false
            }
        );
        assert_eq!(
            ChardevSpec::parse("file:/tmp/out").unwrap(),
            ChardevSpec::File {
                path: "/tmp/out".into()
            }
        );
    }

    #[test]
    fn rejects_bad_specs_with_a_reason() {
        for s in [
            "",
            "bogus",
            "tcp:host",
            "tcp:host:99999,server",
            "unix:,server",
            "unix:/x,server,frob",
            "unix:/x,server=maybe",
            "telnet::4444,server,nowait",
            "mon:unix:/x",
        ] {
            let e = ChardevSpec::parse(s).unwrap_err().to_string();
            assert!(e.starts_with("invalid chardev"), "{s}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "unix:/tmp/a,,b,server=on,wait=off",
            "tcp:[::1]:5,server=on,wait=on",
            "stdio",
        ] {
            let spec = ChardevSpec::parse(s).unwrap();
            assert_eq!(ChardevSpec::parse(&spec.to_string()).unwrap(), spec);
        }
    }
}
