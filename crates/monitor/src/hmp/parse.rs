//! HMP command lines (the command table itself is in `table.rs`): the tokenizer (QEMU-style double-quoted strings), QEMU's `/Nfu` memory-dump format, the small
//! address-expression language of `x`/`xp`, and the parser from a line to an [`HmpCommand`].
//! Every error is one line of text, in QEMU's wording where QEMU has one.

use crate::command::{Command, MigrateArgs, SnapshotRequest};
use crate::migration::{parse_on_off, CapabilityStatus, MigrationCapability, MigrationParameters};
use std::path::PathBuf;

pub use super::table::{HmpEntry, COMMANDS, INFO_COMMANDS};

/// The `/Nfu` of `x`/`xp`: how many units, which format, what unit size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpFormat {
    pub count: u64,
    /// One of `x d u o c`.
    pub format: char,
    /// Unit size in bytes: 1, 2, 4 or 8.
    pub size: u8,
}

/// `info` subcommands that need more than one backend call or session state to render.
#[derive(Debug, Clone, PartialEq)]
pub enum HmpCommand {
    /// Blank line.
    Nothing,
    Help(Option<String>),
    /// `cpu N`.
    SelectCpu(u32),
    /// `x`/`xp`.
    Dump {
        physical: bool,
        fmt: DumpFormat,
        addr: u64,
    },
    /// `info cpus` (marks the selected CPU).
    InfoCpus,
    /// `info migrate` (status plus capabilities).
    InfoMigrate,
    /// `migrate` (waits in the foreground unless `-d`).
    Migrate(MigrateArgs),
    /// Any other VM command; rendering follows from the reply.
    Vm(Command),
}

/// Per-session defaults `x` remembers between calls (QEMU keeps the last format and size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpDefaults {
    pub format: char,
    pub size: u8,
}

impl Default for DumpDefaults {
    fn default() -> Self {
        DumpDefaults {
            format: 'x',
            size: 4,
        }
    }
}

/// Splits a command line into words. `"..."` groups words, with `\\`, `\"`, `\n`, `\r`, `\t`
/// escapes inside.
pub fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&c) = chars.peek() else { break };
        let mut word = String::new();
        if c == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated string".into()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => word.push('\n'),
                        Some('r') => word.push('\r'),
                        Some('t') => word.push('\t'),
                        Some(e @ ('\\' | '"' | '\'')) => word.push(e),
                        Some(e) => return Err(format!("unsupported escape code: '\\{e}'")),
                        None => return Err("unterminated string".into()),
                    },
                    Some(ch) => word.push(ch),
                }
            }
        } else {
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
        }
        out.push(word);
    }
    Ok(out)
}

/// Parses one line. `defaults` is updated when a dump format is given, as QEMU does.
pub fn parse_line(line: &str, defaults: &mut DumpDefaults) -> Result<HmpCommand, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(HmpCommand::Nothing);
    }
    let (name, rest) = match trimmed.find(char::is_whitespace) {
        Some(i) => (&trimmed[..i], trimmed[i..].trim_start()),
        None => (trimmed, ""),
    };
    // `x/4x 0x10` is valid QEMU syntax: the format may touch the command name.
    let (name, rest) = match name.find('/') {
        Some(i) if i > 0 && matches!(&name[..i], "x" | "xp") => (&name[..i], &trimmed[i..]),
        _ => (name, rest),
    };
    match name {
        "x" | "xp" => return parse_dump(name, rest, defaults),
        "info" => return parse_info(rest),
        _ => {}
    }
    let args = tokenize(rest).map_err(|e| format!("{name}: {e}"))?;
    let arity = |min: usize, max: usize| -> Result<(), String> {
        if args.len() > max {
            Err(format!("{name}: extraneous characters at the end of line"))
        } else if args.len() < min {
            Err(format!("{name}: missing argument"))
        } else {
            Ok(())
        }
    };
    let vm = |c: Command| Ok(HmpCommand::Vm(c));
    match name {
        "help" | "?" => {
            arity(0, 1)?;
            Ok(HmpCommand::Help(args.into_iter().next()))
        }
        "stop" | "s" => arity(0, 0).and_then(|()| vm(Command::Stop)),
        "cont" | "c" => arity(0, 0).and_then(|()| vm(Command::Cont)),
        "system_reset" => arity(0, 0).and_then(|()| vm(Command::SystemReset)),
        "announce_self" => arity(0, 2).and_then(|()| vm(Command::AnnounceSelf(Default::default()))),
        "system_powerdown" => arity(0, 0).and_then(|()| vm(Command::SystemPowerdown)),
        "quit" | "q" => arity(0, 0).and_then(|()| vm(Command::Quit)),
        "cpu" => {
            arity(1, 1)?;
            let n = parse_number(&args[0])
                .ok_or_else(|| format!("cpu: invalid CPU index '{}'", args[0]))?;
            let n =
                u32::try_from(n).map_err(|_| format!("cpu: invalid CPU index '{}'", args[0]))?;
            Ok(HmpCommand::SelectCpu(n))
        }
        "savevm" => {
            arity(0, 1)?;
            let tag = args.into_iter().next().unwrap_or_default();
            vm(Command::SnapshotSave(SnapshotRequest {
                tag,
                ..Default::default()
            }))
        }
        "loadvm" | "delvm" => {
            arity(1, 1)?;
            let req = SnapshotRequest {
                tag: args[0].clone(),
                ..Default::default()
            };
            if req.tag.is_empty() {
                return Err(format!("{name}: missing argument"));
            }
            vm(if name == "loadvm" {
                Command::SnapshotLoad(req)
            } else {
                Command::SnapshotDelete(req)
            })
        }
        "migrate" => parse_migrate(&args),
        "migrate_cancel" => arity(0, 0).and_then(|()| vm(Command::MigrateCancel)),
        "migrate_start_postcopy" => arity(0, 0).and_then(|()| vm(Command::MigrateStartPostcopy)),
        "migrate_continue" => {
            arity(1, 1)?;
            vm(Command::MigrateContinue { state: args[0].clone() })
        }
        "migrate_incoming" | "migrate_recover" => {
            arity(1, 1)?;
            let uri = args[0].clone();
            vm(if name == "migrate_incoming" {
                Command::MigrateIncoming { uri }
            } else {
                Command::MigrateRecover { uri }
            })
        }
        "migrate_set_parameter" => {
            arity(2, 2)?;
            let mut p = MigrationParameters::default();
            p.set_from_hmp(&args[0], &args[1])?;
            vm(Command::MigrateSetParameters(p))
        }
        "migrate_set_capability" => {
            arity(2, 2)?;
            let capability: MigrationCapability = args[0].parse()?;
            let state = parse_on_off(&args[1]).ok_or_else(|| {
                format!(
                    "migrate_set_capability: expected 'on' or 'off', got '{}'",
                    args[1]
                )
            })?;
            vm(Command::MigrateSetCapabilities(vec![CapabilityStatus {
                capability,
                state,
            }]))
        }
        _ => match crate::block::parse_hmp(name, &args) {
            Some(r) => r.map(|c| HmpCommand::Vm(Command::Block(c))),
            None => Err(format!("unknown command: '{name}'")),
        },
    }
}

fn parse_info(rest: &str) -> Result<HmpCommand, String> {
    let args = tokenize(rest).map_err(|e| format!("info: {e}"))?;
    let Some(sub) = args.first() else {
        return Ok(HmpCommand::Help(Some("info".into())));
    };
    if args.len() > 1 {
        return Err(format!(
            "info {sub}: extraneous characters at the end of line"
        ));
    }
    let vm = |c: Command| Ok(HmpCommand::Vm(c));
    match sub.as_str() {
        "status" => vm(Command::QueryStatus),
        "version" => vm(Command::QueryVersion),
        "cpus" => Ok(HmpCommand::InfoCpus),
        "snapshots" => vm(Command::QuerySnapshots),
        "migrate" => Ok(HmpCommand::InfoMigrate),
        "migrate_parameters" => vm(Command::QueryMigrateParameters),
        "migrate_capabilities" => vm(Command::QueryMigrateCapabilities),
        "migrate_forecast" => vm(Command::QueryMigrateForecast),
        "network" => vm(Command::QueryNetwork),
        _ => match crate::block::parse_hmp_info(sub) {
            Some(c) => vm(Command::Block(c)),
            None => Err(format!("unknown command: 'info {sub}'")),
        },
    }
}

/// `migrate [-d] [-r [FILE]] URI`. With `-r`, two remaining words mean FILE and URI (a report
/// file); one means URI alone (QEMU's resume flag).
fn parse_migrate(args: &[String]) -> Result<HmpCommand, String> {
    let mut m = MigrateArgs::default();
    let mut r_flag = false;
    let mut positional = Vec::new();
    for a in args {
        if positional.is_empty() && a.starts_with('-') && a.len() > 1 {
            for f in a[1..].chars() {
                match f {
                    'd' => m.detach = true,
                    'r' => r_flag = true,
                    _ => return Err(format!("migrate: unsupported option -{f}")),
                }
            }
        } else {
            positional.push(a.clone());
        }
    }
    match (r_flag, positional.len()) {
        (_, 0) => return Err("migrate: missing argument".into()),
        (false, 1) | (true, 1) => {
            m.resume = r_flag;
            m.uri = positional.remove(0);
        }
        (true, 2) => {
            m.report_file = Some(PathBuf::from(positional.remove(0)));
            m.uri = positional.remove(0);
        }
        _ => return Err("migrate: extraneous characters at the end of line".into()),
    }
    Ok(HmpCommand::Migrate(m))
}

fn parse_dump(name: &str, rest: &str, defaults: &mut DumpDefaults) -> Result<HmpCommand, String> {
    let rest = rest.trim_start();
    let (fmt, expr) = if let Some(spec) = rest.strip_prefix('/') {
        let end = spec.find(char::is_whitespace).unwrap_or(spec.len());
        let (spec, expr) = spec.split_at(end);
        (parse_format(spec, defaults)?, expr)
    } else {
        (
            DumpFormat {
                count: 1,
                format: defaults.format,
                size: defaults.size,
            },
            rest,
        )
    };
    if expr.trim().is_empty() {
        return Err(format!("{name}: address expected"));
    }
    let addr = eval_expr(expr).map_err(|e| format!("{name}: {e}"))?;
    Ok(HmpCommand::Dump {
        physical: name == "xp",
        fmt,
        addr,
    })
}

/// Parses `Nfu` (after the `/`), QEMU's rules: count defaults to 1, format and size to the
/// last ones used; `i` (disassembly) is refused.
pub fn parse_format(spec: &str, defaults: &mut DumpDefaults) -> Result<DumpFormat, String> {
    let digits = spec.bytes().take_while(u8::is_ascii_digit).count();
    let count = if digits == 0 {
        1
    } else {
        spec[..digits]
            .parse::<u64>()
            .map_err(|_| format!("invalid count in format: '{}'", &spec[..digits]))?
    };
    let mut format = None;
    let mut size = None;
    for c in spec[digits..].chars() {
        match c {
            'x' | 'd' | 'u' | 'o' | 'c' => format = Some(c),
            'i' => return Err("instruction disassembly (/i) is not supported".into()),
            'b' => size = Some(1),
            'h' => size = Some(2),
            'w' => size = Some(4),
            'g' | 'L' => size = Some(8),
            _ => return Err(format!("invalid char in format: '{c}'")),
        }
    }
    let format = format.unwrap_or(defaults.format);
    let size = size.unwrap_or(defaults.size);
    *defaults = DumpDefaults { format, size };
    Ok(DumpFormat {
        count,
        format,
        size,
    })
}

/// A number as QEMU's monitor reads it: `0x` hex, leading `0` octal, else decimal.
pub fn parse_number(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Evaluates an address expression: numbers (with optional K/M/G suffix), `+ - * / % & | ^`,
/// unary `- ~ +`, parentheses. Arithmetic wraps like QEMU's 64-bit integers.
pub fn eval_expr(s: &str) -> Result<u64, String> {
    let mut p = ExprParser {
        s: s.as_bytes(),
        pos: 0,
        depth: 0,
    };
    let v = p.sum()?;
    p.skip_ws();
    if p.pos < p.s.len() {
        return Err(format!(
            "invalid char '{}' in expression",
            p.s[p.pos] as char
        ));
    }
    Ok(v)
}

struct ExprParser<'a> {
    s: &'a [u8],
    pos: usize,
    depth: u32,
}

impl ExprParser<'_> {
    fn skip_ws(&mut self) {
        while self
            .s
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    fn sum(&mut self) -> Result<u64, String> {
        let mut v = self.product()?;
        while let Some(op @ (b'+' | b'-' | b'&' | b'|' | b'^')) = self.peek() {
            self.pos += 1;
            let r = self.product()?;
            v = match op {
                b'+' => v.wrapping_add(r),
                b'-' => v.wrapping_sub(r),
                b'&' => v & r,
                b'|' => v | r,
                _ => v ^ r,
            };
        }
        Ok(v)
    }

    fn product(&mut self) -> Result<u64, String> {
        let mut v = self.unary()?;
        while let Some(op @ (b'*' | b'/' | b'%')) = self.peek() {
            self.pos += 1;
            let r = self.unary()?;
            v = match op {
                b'*' => v.wrapping_mul(r),
                _ if r == 0 => return Err("division by zero".into()),
                b'/' => v / r,
                _ => v % r,
            };
        }
        Ok(v)
    }

    fn unary(&mut self) -> Result<u64, String> {
        self.depth += 1;
        if self.depth > 64 {
            return Err("expression too deeply nested".into());
        }
        let r = self.unary_inner();
        self.depth -= 1;
        r
    }

    fn unary_inner(&mut self) -> Result<u64, String> {
        match self.peek() {
            None => Err("unexpected end of expression".into()),
            Some(b'+') => {
                self.pos += 1;
                self.unary()
            }
            Some(b'-') => {
                self.pos += 1;
                Ok(self.unary()?.wrapping_neg())
            }
            Some(b'~') => {
                self.pos += 1;
                Ok(!self.unary()?)
            }
            Some(b'(') => {
                self.pos += 1;
                let v = self.sum()?;
                if self.peek() != Some(b')') {
                    return Err("')' expected".into());
                }
                self.pos += 1;
                Ok(v)
            }
            Some(b'$') => Err("registers are not supported in expressions".into()),
            Some(c) if c.is_ascii_digit() => {
                let start = self.pos;
                while self
                    .s
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                {
                    self.pos += 1;
                }
                let word = std::str::from_utf8(&self.s[start..self.pos]).unwrap_or("");
                let (num, shift) = match word.as_bytes().last() {
                    Some(b'K') if !word.starts_with("0x") => (&word[..word.len() - 1], 10),
                    Some(b'M') => (&word[..word.len() - 1], 20),
                    Some(b'G') => (&word[..word.len() - 1], 30),
                    _ => (word, 0),
                };
                let n = parse_number(num).ok_or_else(|| format!("invalid number '{word}'"))?;
                n.checked_shl(shift)
                    .filter(|v| shift == 0 || v >> shift == n)
                    .ok_or_else(|| format!("number too large: '{word}'"))
            }
            Some(c) => Err(format!("invalid char '{}' in expression", c as char)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<HmpCommand, String> {
        parse_line(line, &mut DumpDefaults::default())
    }

    #[test]
    fn simple_commands_and_aliases() {
        assert_eq!(parse("  "), Ok(HmpCommand::Nothing));
        assert_eq!(parse("c"), Ok(HmpCommand::Vm(Command::Cont)));
        assert_eq!(parse("stop"), Ok(HmpCommand::Vm(Command::Stop)));
        assert_eq!(parse("q"), Ok(HmpCommand::Vm(Command::Quit)));
        assert_eq!(
            parse("info status"),
            Ok(HmpCommand::Vm(Command::QueryStatus))
        );
        assert_eq!(parse("info"), Ok(HmpCommand::Help(Some("info".into()))));
        assert_eq!(parse("foo"), Err("unknown command: 'foo'".into()));
        assert_eq!(parse("info foo"), Err("unknown command: 'info foo'".into()));
        assert_eq!(
            parse("stop now"),
            Err("stop: extraneous characters at the end of line".into())
        );
        assert_eq!(parse("loadvm"), Err("loadvm: missing argument".into()));
        assert_eq!(parse("announce_self"), Ok(HmpCommand::Vm(Command::AnnounceSelf(Default::default()))));
        assert!(parse("announce_self a b c").is_err());
    }

    #[test]
    fn snapshot_and_migration_commands() {
        assert_eq!(
            parse("savevm \"my snap\""),
            Ok(HmpCommand::Vm(Command::SnapshotSave(SnapshotRequest {
                tag: "my snap".into(),
                ..Default::default()
            })))
        );
        assert_eq!(
            parse("migrate -d tcp:h:1"),
            Ok(HmpCommand::Migrate(MigrateArgs {
                uri: "tcp:h:1".into(),
                detach: true,
                ..Default::default()
            }))
        );
        assert_eq!(
            parse("migrate -r tcp:h:1"),
            Ok(HmpCommand::Migrate(MigrateArgs {
                uri: "tcp:h:1".into(),
                resume: true,
                ..Default::default()
            }))
        );
        assert_eq!(
            parse("migrate -d -r rep.json tcp:h:1"),
            Ok(HmpCommand::Migrate(MigrateArgs {
                uri: "tcp:h:1".into(),
                detach: true,
                report_file: Some("rep.json".into()),
                ..Default::default()
            }))
        );
        assert!(parse("migrate -x u").is_err());
        assert!(parse("migrate a b").is_err());
        assert!(
            matches!(parse("migrate_set_parameter downtime-limit 30"), Ok(HmpCommand::Vm(Command::MigrateSetParameters(p))) if p.downtime_limit == Some(30))
        );
        assert!(parse("migrate_set_parameter downtime-limit lots").is_err());
        assert!(parse("migrate_set_capability auto-converge maybe").is_err());
        assert!(parse("migrate_set_capability warp-speed on").is_err());
    }

    #[test]
    fn dump_formats_follow_qemu_rules() {
        let mut d = DumpDefaults::default();
        assert_eq!(
            parse_line("x /10xb 0x100", &mut d),
            Ok(HmpCommand::Dump {
                physical: false,
                fmt: DumpFormat {
                    count: 10,
                    format: 'x',
                    size: 1
                },
                addr: 0x100
            })
        );
        // Size is remembered.
        assert_eq!(
            parse_line("xp/2d 16+16", &mut d),
            Ok(HmpCommand::Dump {
                physical: true,
                fmt: DumpFormat {
                    count: 2,
                    format: 'd',
                    size: 1
                },
                addr: 32
            })
        );
        assert_eq!(
            parse_line("xp 0x10", &mut d),
            Ok(HmpCommand::Dump {
                physical: true,
                fmt: DumpFormat {
                    count: 1,
                    format: 'd',
                    size: 1
                },
                addr: 16
            })
        );
        assert_eq!(
            parse_line("x /4z 0", &mut d),
            Err("invalid char in format: 'z'".into())
        );
        assert!(parse_line("x /4i 0", &mut d)
            .unwrap_err()
            .contains("not supported"));
        assert_eq!(
            parse_line("x /4x", &mut d),
            Err("x: address expected".into())
        );
    }

    #[test]
    fn expressions() {
        assert_eq!(eval_expr("0x10 + 2*3"), Ok(22));
        assert_eq!(eval_expr("(1+1)*4K"), Ok(8192));
        assert_eq!(eval_expr("010"), Ok(8));
        assert_eq!(eval_expr("-1"), Ok(u64::MAX));
        assert!(eval_expr("1/0").is_err());
        assert!(eval_expr("$rip").is_err());
        assert!(eval_expr("(((1").is_err());
        assert!(eval_expr(&"(".repeat(10_000)).is_err());
        assert!(eval_expr("0xfffffffffffffffffff").is_err());
    }

    #[test]
    fn tokenizer_handles_quotes() {
        assert_eq!(
            tokenize(r#"a "b c" "d\"e""#),
            Ok(vec!["a".into(), "b c".into(), "d\"e".into()])
        );
        assert!(tokenize("\"open").is_err());
    }
}
