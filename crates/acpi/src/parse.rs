//! Reads ACPI tables back: headers and checksums, RSDP, XSDT, FADT, MADT, and the static AML
//! subset Godwit's DSDT uses (scopes, devices, named integers, strings, buffers, packages) with
//! the resource descriptors inside `_CRS` buffers.
//!
//! Written for tests and for checking what a guest sees in its memory, so every length comes
//! from the input and is bounds-checked: malformed bytes give a [`ParseError`], never a panic.

use std::fmt;

/// Why bytes are not a well-formed table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{what}: needs {need} bytes, has {have}")]
    Short {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{0}: checksum does not sum to zero")]
    Checksum(String),
    #[error("expected signature {expected}, found {found:?}")]
    Signature {
        expected: &'static str,
        found: String,
    },
    #[error("AML at offset {offset:#x}: {reason}")]
    Aml { offset: usize, reason: String },
}

type Result<T> = std::result::Result<T, ParseError>;

fn get<'a>(b: &'a [u8], off: usize, len: usize, what: &'static str) -> Result<&'a [u8]> {
    off.checked_add(len)
        .and_then(|end| b.get(off..end))
        .ok_or(ParseError::Short {
            what,
            need: off.saturating_add(len),
            have: b.len(),
        })
}
fn u16_at(b: &[u8], off: usize, what: &'static str) -> Result<u16> {
    let s = get(b, off, 2, what)?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], off: usize, what: &'static str) -> Result<u32> {
    let s = get(b, off, 4, what)?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], off: usize, what: &'static str) -> Result<u64> {
    let s = get(b, off, 8, what)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

/// The byte sum of `b` (0 for a table with a correct checksum).
pub fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

/// A system description table header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub signature: String,
    pub length: u32,
    pub revision: u8,
    pub oem_id: String,
    pub oem_table_id: String,
}

/// Parses and checks a table header: signature `sig`, length within `b`, checksum over the
/// table's `length` bytes.
pub fn header(b: &[u8], sig: &'static str) -> Result<Header> {
    let h = get(b, 0, 36, "table header")?;
    let signature = String::from_utf8_lossy(&h[0..4]).into_owned();
    if signature.as_bytes() != sig.as_bytes() {
        return Err(ParseError::Signature {
            expected: sig,
            found: signature,
        });
    }
    let length = u32_at(b, 4, "table header")?;
    if length < 36 {
        return Err(ParseError::Short {
            what: "table length field",
            need: 36,
            have: length as usize,
        });
    }
    let t = get(b, 0, length as usize, "table")?;
    if sum(t) != 0 {
        return Err(ParseError::Checksum(signature));
    }
    Ok(Header {
        signature,
        length,
        revision: h[8],
        oem_id: String::from_utf8_lossy(&h[10..16]).into_owned(),
        oem_table_id: String::from_utf8_lossy(&h[16..24]).into_owned(),
    })
}

/// The Root System Description Pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rsdp {
    pub revision: u8,
    pub oem_id: String,
    pub rsdt: u32,
    pub length: u32,
    pub xsdt: u64,
}

/// Parses an RSDP, checking both checksums (first 20 bytes, whole structure).
pub fn rsdp(b: &[u8]) -> Result<Rsdp> {
    let r = get(b, 0, 36, "RSDP")?;
    if &r[0..8] != b"RSD PTR " {
        return Err(ParseError::Signature {
            expected: "RSD PTR ",
            found: String::from_utf8_lossy(&r[0..8]).into(),
        });
    }
    if sum(&r[0..20]) != 0 {
        return Err(ParseError::Checksum("RSDP (ACPI 1.0 part)".into()));
    }
    let length = u32_at(r, 20, "RSDP")?;
    if sum(get(b, 0, length as usize, "RSDP")?) != 0 {
        return Err(ParseError::Checksum("RSDP (extended)".into()));
    }
    Ok(Rsdp {
        revision: r[15],
        oem_id: String::from_utf8_lossy(&r[9..15]).into_owned(),
        rsdt: u32_at(r, 16, "RSDP")?,
        length,
        xsdt: u64_at(r, 24, "RSDP")?,
    })
}

/// The XSDT's entries (64-bit table addresses).
pub fn xsdt(b: &[u8]) -> Result<(Header, Vec<u64>)> {
    let h = header(b, "XSDT")?;
    let n = (h.length as usize - 36) / 8;
    let entries = (0..n)
        .map(|i| u64_at(b, 36 + 8 * i, "XSDT entry"))
        .collect::<Result<_>>()?;
    Ok((h, entries))
}

/// A Generic Address Structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gas {
    pub space: u8,
    pub bit_width: u8,
    pub bit_offset: u8,
    pub access_size: u8,
    pub address: u64,
}

fn gas(b: &[u8], off: usize) -> Result<Gas> {
    let g = get(b, off, 12, "FADT generic address")?;
    Ok(Gas {
        space: g[0],
        bit_width: g[1],
        bit_offset: g[2],
        access_size: g[3],
        address: u64_at(g, 4, "GAS")?,
    })
}

/// The FADT fields Godwit sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fadt {
    pub header: Header,
    pub minor_revision: u8,
    pub dsdt: u32,
    pub x_dsdt: u64,
    pub sci_int: u16,
    pub iapc_boot_arch: u16,
    pub flags: u32,
    pub reset_reg: Gas,
    pub reset_value: u8,
    pub sleep_control: Gas,
    pub sleep_status: Gas,
}

/// FADT flag: hardware-reduced ACPI.
pub const FADT_HW_REDUCED: u32 = 1 << 20;
/// FADT flag: the reset register is supported.
pub const FADT_RESET_REG_SUP: u32 = 1 << 10;

/// Parses a FADT of revision 5 or later (the sleep registers are at 244 and 256).
pub fn fadt(b: &[u8]) -> Result<Fadt> {
    let h = header(b, "FACP")?;
    let t = get(b, 0, h.length as usize, "FADT")?;
    get(t, 0, 268, "FADT (revision 5+)")?;
    Ok(Fadt {
        minor_revision: t[131],
        dsdt: u32_at(t, 40, "FADT")?,
        x_dsdt: u64_at(t, 140, "FADT")?,
        sci_int: u16_at(t, 46, "FADT")?,
        iapc_boot_arch: u16_at(t, 109, "FADT")?,
        flags: u32_at(t, 112, "FADT")?,
        reset_reg: gas(t, 116)?,
        reset_value: t[128],
        sleep_control: gas(t, 244)?,
        sleep_status: gas(t, 256)?,
        header: h,
    })
}

/// One interrupt controller structure of the MADT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MadtEntry {
    LocalApic {
        uid: u8,
        apic_id: u8,
        flags: u32,
    },
    IoApic {
        id: u8,
        address: u32,
        gsi_base: u32,
    },
    InterruptOverride {
        bus: u8,
        source: u8,
        gsi: u32,
        flags: u16,
    },
    LocalApicNmi {
        uid: u8,
        flags: u16,
        lint: u8,
    },
    Other {
        kind: u8,
        length: u8,
    },
}

/// The MADT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Madt {
    pub header: Header,
    pub local_apic_address: u32,
    pub flags: u32,
    pub entries: Vec<MadtEntry>,
}

/// Parses a MADT and its entries (each entry's length is checked against its type).
pub fn madt(b: &[u8]) -> Result<Madt> {
    let h = header(b, "APIC")?;
    let t = get(b, 0, h.length as usize, "MADT")?;
    let local_apic_address = u32_at(t, 36, "MADT")?;
    let flags = u32_at(t, 40, "MADT")?;
    let mut entries = Vec::new();
    let mut off = 44;
    while off < t.len() {
        let e = get(t, off, 2, "MADT entry header")?;
        let (kind, len) = (e[0], e[1] as usize);
        let need = match kind {
            0 => 8,
            1 => 12,
            2 => 10,
            4 => 6,
            _ => 2,
        };
        if len < need {
            return Err(ParseError::Short {
                what: "MADT entry",
                need,
                have: len,
            });
        }
        let e = get(t, off, len, "MADT entry")?;
        entries.push(match kind {
            0 => MadtEntry::LocalApic {
                uid: e[2],
                apic_id: e[3],
                flags: u32_at(e, 4, "MADT")?,
            },
            1 => MadtEntry::IoApic {
                id: e[2],
                address: u32_at(e, 4, "MADT")?,
                gsi_base: u32_at(e, 8, "MADT")?,
            },
            2 => MadtEntry::InterruptOverride {
                bus: e[2],
                source: e[3],
                gsi: u32_at(e, 4, "MADT")?,
                flags: u16_at(e, 8, "MADT")?,
            },
            4 => MadtEntry::LocalApicNmi {
                uid: e[2],
                flags: u16_at(e, 3, "MADT")?,
                lint: e[5],
            },
            k => MadtEntry::Other {
                kind: k,
                length: e[1],
            },
        });
        off += len;
    }
    Ok(Madt {
        header: h,
        local_apic_address,
        flags,
        entries,
    })
}

/// A value a `Name` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmlValue {
    Integer(u64),
    String(String),
    Buffer(Vec<u8>),
    Package(Vec<AmlValue>),
    /// A name reference inside a package.
    Reference(String),
}

impl fmt::Display for AmlValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmlValue::Integer(i) => write!(f, "{i:#x}"),
            AmlValue::String(s) => write!(f, "{s:?}"),
            AmlValue::Buffer(b) => write!(f, "Buffer({} bytes)", b.len()),
            AmlValue::Package(p) => write!(f, "Package({} elements)", p.len()),
            AmlValue::Reference(r) => write!(f, "{r}"),
        }
    }
}

/// The namespace a static DSDT defines: devices and named objects, by absolute path
/// (`\_SB_.COM1._HID`), in definition order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    pub devices: Vec<String>,
    pub names: Vec<(String, AmlValue)>,
    /// Methods by absolute path (their bodies are not decoded).
    pub methods: Vec<String>,
    pub regions: Vec<Region>,
}

/// An `OperationRegion` with integer offset and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub path: String,
    /// Region space (0 memory, 1 I/O ports, ...).
    pub space: u8,
    pub offset: u64,
    pub len: u64,
}

impl Namespace {
    pub fn get(&self, path: &str) -> Option<&AmlValue> {
        self.names.iter().find(|(p, _)| p == path).map(|(_, v)| v)
    }
}

/// Parses a DSDT (header, checksum, then the AML body).
pub fn dsdt(b: &[u8]) -> Result<(Header, Namespace)> {
    let h = header(b, "DSDT")?;
    let body = get(b, 36, h.length as usize - 36, "DSDT")?;
    Ok((h, aml(body)?))
}

/// Parses a static AML term list.
pub fn aml(body: &[u8]) -> Result<Namespace> {
    let mut ns = Namespace::default();
    let mut c = Cursor { b: body, pos: 0 };
    term_list(&mut c, body.len(), &[], &mut ns, 0)?;
    Ok(ns)
}

const MAX_DEPTH: usize = 16;

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn err<T>(&self, reason: impl Into<String>) -> Result<T> {
        Err(ParseError::Aml {
            offset: self.pos,
            reason: reason.into(),
        })
    }
    fn byte(&mut self) -> Result<u8> {
        match self.b.get(self.pos) {
            Some(&x) => {
                self.pos += 1;
                Ok(x)
            }
            None => self.err("unexpected end"),
        }
    }
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let Some(s) = self
            .pos
            .checked_add(n)
            .and_then(|e| self.b.get(self.pos..e))
        else {
            return self.err(format!("{n} bytes past the end"));
        };
        self.pos += n;
        Ok(s)
    }
    fn uint(&mut self, n: usize) -> Result<u64> {
        Ok(self
            .take(n)?
            .iter()
            .rev()
            .fold(0u64, |a, &x| (a << 8) | x as u64))
    }
    /// Reads a PkgLength; returns the absolute end offset of the package.
    fn pkg_end(&mut self, limit: usize) -> Result<usize> {
        let start = self.pos;
        let lead = self.byte()?;
        let follow = (lead >> 6) as usize;
        let mut len = if follow == 0 {
            (lead & 0x3f) as usize
        } else {
            (lead & 0x0f) as usize
        };
        for i in 0..follow {
            len |= (self.byte()? as usize) << (4 + 8 * i);
        }
        let end = start + len;
        if end > limit || end < self.pos {
            return self.err(format!(
                "package length {len} runs past its parent (end {limit:#x})"
            ));
        }
        Ok(end)
    }
    fn name_seg(&mut self) -> Result<String> {
        let s = self.take(4)?.to_vec();
        let ok = (s[0].is_ascii_uppercase() || s[0] == b'_')
            && s[1..]
                .iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
        if !ok {
            return self.err(format!(
                "bad name segment {:?}",
                String::from_utf8_lossy(&s)
            ));
        }
        Ok(String::from_utf8_lossy(&s).into_owned())
    }
    /// Reads a NameString and resolves it against `scope` into an absolute path.
    fn name_string(&mut self, scope: &[String]) -> Result<String> {
        let mut base: Vec<String> = scope.to_vec();
        match self.b.get(self.pos) {
            Some(b'\\') => {
                self.pos += 1;
                base.clear();
            }
            Some(b'^') => {
                while self.b.get(self.pos) == Some(&b'^') {
                    self.pos += 1;
                    if base.pop().is_none() {
                        return self.err("parent prefix above the root");
                    }
                }
            }
            _ => {}
        }
        let segs = match self.byte()? {
            0x00 => vec![],
            0x2e => vec![self.name_seg()?, self.name_seg()?],
            0x2f => {
                let n = self.byte()?;
                (0..n).map(|_| self.name_seg()).collect::<Result<_>>()?
            }
            _ => {
                self.pos -= 1;
                vec![self.name_seg()?]
            }
        };
        base.extend(segs);
        Ok(format!("\\{}", base.join(".")))
    }
}

fn split(path: &str) -> Vec<String> {
    path.trim_start_matches('\\')
        .split('.')
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

fn term_list(
    c: &mut Cursor,
    end: usize,
    scope: &[String],
    ns: &mut Namespace,
    depth: usize,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return c.err("nesting too deep");
    }
    while c.pos < end {
        match c.byte()? {
            0x10 => {
                let pend = c.pkg_end(end)?;
                let path = c.name_string(scope)?;
                term_list(c, pend, &split(&path), ns, depth + 1)?;
                c.pos = pend;
            }
            0x5b => match c.byte()? {
                0x82 => {
                    let pend = c.pkg_end(end)?;
                    let path = c.name_string(scope)?;
                    ns.devices.push(path.clone());
                    term_list(c, pend, &split(&path), ns, depth + 1)?;
                    c.pos = pend;
                }
                // OperationRegion: name, space, offset and length (integers here).
                0x80 => {
                    let path = c.name_string(scope)?;
                    let space = c.byte()?;
                    let offset = data_object(c, end, scope, depth + 1)?;
                    let len = data_object(c, end, scope, depth + 1)?;
                    match (offset, len) {
                        (AmlValue::Integer(offset), AmlValue::Integer(len)) => ns.regions.push(Region {
                            path,
                            space,
                            offset,
                            len,
                        }),
                        _ => return c.err("operation region offset/length are not integers"),
                    }
                }
                // Field: its units are not read back, only skipped.
                0x81 => {
                    c.pos = c.pkg_end(end)?;
                }
                op => return c.err(format!("unsupported extended opcode 5b {op:02x}")),
            },
            // Method: its name is recorded, its body (code, not data) skipped.
            0x14 => {
                let pend = c.pkg_end(end)?;
                let path = c.name_string(scope)?;
                ns.methods.push(path);
                c.pos = pend;
            }
            0x08 => {
                let path = c.name_string(scope)?;
                let v = data_object(c, end, scope, depth)?;
                ns.names.push((path, v));
            }
            op => {
                c.pos -= 1;
                return c.err(format!("unsupported opcode {op:02x}"));
            }
        }
    }
    if c.pos != end {
        return c.err("term list overruns its package");
    }
    Ok(())
}

fn data_object(c: &mut Cursor, end: usize, scope: &[String], depth: usize) -> Result<AmlValue> {
    if depth > MAX_DEPTH {
        return c.err("nesting too deep");
    }
    let op = c.byte()?;
    Ok(match op {
        0x00 => AmlValue::Integer(0),
        0x01 => AmlValue::Integer(1),
        0xff => AmlValue::Integer(u64::MAX),
        0x0a => AmlValue::Integer(c.uint(1)?),
        0x0b => AmlValue::Integer(c.uint(2)?),
        0x0c => AmlValue::Integer(c.uint(4)?),
        0x0e => AmlValue::Integer(c.uint(8)?),
        0x0d => {
            let start = c.pos;
            let Some(n) =
                c.b.get(start..end.min(c.b.len()))
                    .and_then(|s| s.iter().position(|&x| x == 0))
            else {
                return c.err("unterminated string");
            };
            let s = c.take(n)?.to_vec();
            c.pos += 1;
            if !s.iter().all(|x| (1..=0x7f).contains(x)) {
                return c.err("non-ASCII string");
            }
            AmlValue::String(String::from_utf8_lossy(&s).into_owned())
        }
        0x11 => {
            let pend = c.pkg_end(end)?;
            let size = match data_object(c, pend, scope, depth + 1)? {
                AmlValue::Integer(n) => n,
                _ => return c.err("buffer size is not an integer"),
            };
            let Some(have) = pend.checked_sub(c.pos) else {
                return c.err("buffer size runs past the buffer");
            };
            if size != have as u64 {
                return c.err(format!("buffer says {size} bytes, holds {have}"));
            }
            let v = c.take(have)?.to_vec();
            AmlValue::Buffer(v)
        }
        0x12 => {
            let pend = c.pkg_end(end)?;
            let n = c.byte()? as usize;
            let mut els = Vec::with_capacity(n);
            while c.pos < pend {
                let next = c.b.get(c.pos).copied().unwrap_or(0);
                if next == b'\\' || next == b'^' || next == b'_' || next.is_ascii_uppercase() {
                    els.push(AmlValue::Reference(c.name_string(scope)?));
                } else {
                    els.push(data_object(c, pend, scope, depth + 1)?);
                }
            }
            if c.pos != pend || els.len() != n {
                return c.err(format!("package says {n} elements, holds {}", els.len()));
            }
            AmlValue::Package(els)
        }
        op => {
            c.pos -= 1;
            return c.err(format!("unsupported data opcode {op:02x}"));
        }
    })
}

/// Decodes a compressed EISA ID (as `EisaId("PNP0501")` stores it) back to its string.
pub fn eisa_id(v: u64) -> String {
    let v = (v as u32).swap_bytes();
    let l = |s: u32| (((v >> s) & 0x1f) as u8 + 0x40) as char;
    format!("{}{}{}{:04X}", l(26), l(21), l(16), v & 0xffff)
}

/// A resource descriptor of a `_CRS` buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// Small IRQ descriptor: a mask of ISA IRQs, and the flags byte if present.
    Irq {
        mask: u16,
        flags: Option<u8>,
    },
    Io {
        decode16: bool,
        min: u16,
        max: u16,
        align: u8,
        len: u8,
    },
    Memory32Fixed {
        writable: bool,
        base: u32,
        len: u32,
    },
    /// Extended interrupt descriptor: flags (bit 0 consumer, 1 edge, 2 active-low, 3 shared).
    Interrupt {
        flags: u8,
        gsis: Vec<u32>,
    },
    Other {
        tag: u8,
        len: usize,
    },
}

/// Parses a resource template up to its end tag; checks that the end tag is there.
pub fn resources(b: &[u8]) -> Result<Vec<Resource>> {
    let mut out = Vec::new();
    let mut c = Cursor { b, pos: 0 };
    loop {
        let tag = c.byte()?;
        if tag & 0x80 == 0 {
            let (kind, len) = (tag >> 3, (tag & 7) as usize);
            let d = c.take(len)?;
            match kind {
                0x0f => return Ok(out), // end tag
                0x04 if len >= 2 => out.push(Resource::Irq {
                    mask: u16::from_le_bytes([d[0], d[1]]),
                    flags: d.get(2).copied(),
                }),
                0x08 if len == 7 => out.push(Resource::Io {
                    decode16: d[0] & 1 == 1,
                    min: u16::from_le_bytes([d[1], d[2]]),
                    max: u16::from_le_bytes([d[3], d[4]]),
                    align: d[5],
                    len: d[6],
                }),
                _ => out.push(Resource::Other { tag, len }),
            }
        } else {
            let len = c.uint(2)? as usize;
            let d = c.take(len)?;
            match tag {
                0x86 if len == 9 => out.push(Resource::Memory32Fixed {
                    writable: d[0] & 1 == 1,
                    base: u32_at(d, 1, "Memory32Fixed")?,
                    len: u32_at(d, 5, "Memory32Fixed")?,
                }),
                0x89 if len >= 2 => {
                    let n = d[1] as usize;
                    if len < 2 + 4 * n {
                        return c.err("extended interrupt descriptor shorter than its count");
                    }
                    let gsis = (0..n)
                        .map(|i| u32_at(d, 2 + 4 * i, "Interrupt"))
                        .collect::<Result<_>>()?;
                    out.push(Resource::Interrupt { flags: d[0], gsis });
                }
                _ => out.push(Resource::Other { tag, len }),
            }
        }
    }
}
