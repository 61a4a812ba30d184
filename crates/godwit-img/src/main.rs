//! `godwit-img`: Godwit's qemu-img. Same command-line syntax and (close to byte-identical)
//! output for create, info, check, snapshot, convert, map and resize on qcow2 and raw images.

mod chain;
mod cmds;
mod info;
mod out;

use std::process::ExitCode;

/// A command-line or runtime failure, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage.
    #[error("{0}")]
    Usage(String),
    /// Library error with context.
    #[error("{0}: {1}")]
    Img(String, qcow2::Error),
    /// Other I/O.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// An image on NFS that could not be reached or opened.
    #[error("{0}")]
    Nfs(String),
}

/// Parsed arguments: options with values, flags, positionals.
pub struct Args {
    pub opts: Vec<(String, String)>,
    pub flags: Vec<String>,
    pub pos: Vec<String>,
}

impl Args {
    pub fn opt(&self, k: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
    }
    pub fn flag(&self, k: &str) -> bool {
        self.flags.iter().any(|f| f == k)
    }
}

/// Split `argv` given which short/long options take a value.
pub fn parse(argv: &[String], with_value: &[&str], flags: &[&str]) -> Result<Args, CliError> {
    let mut a = Args {
        opts: Vec::new(),
        flags: Vec::new(),
        pos: Vec::new(),
    };
    let mut i = 0;
    while i < argv.len() {
        let s = &argv[i];
        if s == "--" {
            a.pos.extend(argv[i + 1..].iter().cloned());
            break;
        }
        if let Some(long) = s.strip_prefix("--") {
            let (k, v) = match long.split_once('=') {
                Some((k, v)) => (format!("--{k}"), Some(v.to_string())),
                None => (s.clone(), None),
            };
            if with_value.contains(&k.as_str()) {
                let v = match v {
                    Some(v) => v,
                    None => {
                        i += 1;
                        argv.get(i).cloned().ok_or_else(|| {
                            CliError::Usage(format!("option '{k}' requires an argument"))
                        })?
                    }
                };
                a.opts.push((k, v));
            } else if flags.contains(&k.as_str()) && v.is_none() {
                a.flags.push(k);
            } else {
                return Err(CliError::Usage(format!("unrecognized option '{s}'")));
            }
        } else if s.len() > 1
            && s.starts_with('-')
            && !s[1..].starts_with(|c: char| c.is_ascii_digit())
        {
            let k = s[..2].to_string();
            if with_value.contains(&k.as_str()) {
                let v = if s.len() > 2 {
                    s[2..].to_string()
                } else {
                    i += 1;
                    argv.get(i).cloned().ok_or_else(|| {
                        CliError::Usage(format!("option requires an argument -- '{}'", &k[1..]))
                    })?
                };
                a.opts.push((k, v));
            } else if flags.contains(&k.as_str()) && s.len() == 2 {
                a.flags.push(k);
            } else {
                return Err(CliError::Usage(format!("invalid option -- '{}'", &s[1..])));
            }
        } else {
            a.pos.push(s.clone());
        }
        i += 1;
    }
    Ok(a)
}

/// qemu-img size syntax: a number with an optional k/M/G/T/P/E suffix (binary), or bytes.
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let bad = || {
        CliError::Usage(format!("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes. ('{s}')"))
    };
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => return Err(bad()),
            };
            (&t[..t.len() - 1], m)
        }
        _ => (t, 1),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    if f.is_nan() || f < 0.0 || f * mult as f64 >= 9.2e18 {
        return Err(bad());
    }
    Ok((f * mult as f64) as u64)
}

fn usage() -> &'static str {
    "usage: godwit-img COMMAND [OPTIONS]\n\
     commands:\n\
     \x20 create -f qcow2|raw [-b BACKING -F FMT [-u]] [-o cluster_size=N,compat=0.10|1.1,refcount_bits=N] FILE SIZE\n\
     \x20 info [-f FMT] [--output=human|json] [--backing-chain] FILE\n\
     \x20 check [-f FMT] [-r leaks|all] [--output=human|json] FILE\n\
     \x20 snapshot [-l | -c NAME | -a NAME | -d NAME] FILE\n\
     \x20 convert [-f FMT] [-O FMT] [-o OPTS] [-B BACKING [-F FMT]] [-l snapshot.name=NAME|snapshot.id=ID] IN OUT\n\
     \x20 map [-f FMT] [--output=human|json] FILE\n\
     \x20 commit [-d] FILE\n\
     \x20 rebase [-u] -b BACKING [-F FMT] FILE\n\
     \x20 resize [-f FMT] FILE [+]SIZE"
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first() else {
        eprintln!("godwit-img: Not enough arguments\nTry 'godwit-img --help' for more information");
        return ExitCode::from(1);
    };
    let rest = &argv[1..];
    let r = match cmd.as_str() {
        "create" => cmds::create(rest),
        "info" => info::info(rest),
        "commit" => chain::commit(rest),
        "rebase" => chain::rebase(rest),
        "check" => cmds::check(rest),
        "snapshot" => cmds::snapshot(rest),
        "convert" => cmds::convert(rest),
        "map" => info::map(rest),
        "resize" => cmds::resize(rest),
        "-h" | "--help" | "help" => {
            println!("{}", usage());
            Ok(0)
        }
        "-V" | "--version" => {
            println!("godwit-img version {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        other => Err(CliError::Usage(format!("Command not found: {other}"))),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("godwit-img: {e}");
            ExitCode::from(1)
        }
    }
}
