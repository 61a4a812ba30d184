//! The command line: space-separated `key=value` words, unknown keys and bad values ignored.
//! Parsed at CPL3 by the BSP before the APs are released. See docs/guest.md.

#[derive(Clone, Copy)]
pub struct Config {
    pub dirty: bool,
    pub mib: u64,
    /// MiB/s over all CPUs, 0 = unlimited.
    pub rate: u64,
    pub hb_ms: u64,
    pub compact: bool,
    pub hz: u64,
    pub qstatus: u64,
    /// Expected number of vCPUs (0 = unknown: wait `smp_wait_ms` after the last arrival).
    pub cpus: u64,
    pub smp_wait_ms: u64,
    pub disk: bool,
    pub disk_mib: u64,
    /// Run the virtio-net responder (`net=on`) at `ip`, with `mac` if given.
    pub net: bool,
    pub ip: [u8; 4],
    pub mac: Option<[u8; 6]>,
    /// `diskbench=`: the throughput workload (see `diskbench`), `secs=` its length, `qd=` the
    /// requests kept in flight.
    pub diskbench: crate::diskbench::Op,
    pub secs: u64,
    pub qd: u64,
    /// `entropy=P`: percent of each dirty page's body that is pseudo-random (incompressible);
    /// the rest repeats one word (compresses to almost nothing). 100 = the default pattern.
    pub entropy: u64,
}

impl Config {
    pub const DEFAULT: Config = Config {
        dirty: false,
        mib: 64,
        rate: 0,
        hb_ms: 1000,
        compact: false,
        hz: 100,
        qstatus: 0,
        cpus: 0,
        smp_wait_ms: 20,
        disk: false,
        disk_mib: 8,
        net: false,
        ip: [10, 0, 2, 15],
        mac: None,
        diskbench: crate::diskbench::Op::None,
        secs: 5,
        qd: 1,
        entropy: 100,
    };
}

fn num(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    let mut n = 0u64;
    for &c in v {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + (c - b'0') as u64;
    }
    Some(n)
}

/// `a.b.c.d`.
fn ipv4(v: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = v.split(|&b| b == b'.');
    for o in out.iter_mut() {
        let n = num(parts.next()?)?;
        *o = u8::try_from(n).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac(v: &[u8]) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = v.split(|&b| b == b':');
    for o in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        *o = (hex(p[0])? * 16 + hex(p[1])?) as u8;
    }
    parts.next().is_none().then_some(out)
}

pub fn parse(line: &[u8]) -> Config {
    let mut c = Config::DEFAULT;
    for word in line.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
        let Some(eq) = word.iter().position(|&b| b == b'=') else { continue };
        let (k, v) = (&word[..eq], &word[eq + 1..]);
        match k {
            b"mode" => match v {
                b"idle" => c.dirty = false,
                b"dirty" => c.dirty = true,
                _ => {}
            },
            b"hb" => match v {
                b"full" => c.compact = false,
                b"compact" => c.compact = true,
                _ => {}
            },
            b"net" => match v {
                b"on" => c.net = true,
                b"off" => c.net = false,
                _ => {}
            },
            b"ip" => {
                if let Some(ip) = ipv4(v) {
                    c.ip = ip;
                }
            }
            b"mac" => {
                if let Some(m) = mac(v) {
                    c.mac = Some(m);
                }
            }
            b"diskbench" => c.diskbench = crate::diskbench::Op::parse(v),
            b"disk" => match v {
                b"on" => c.disk = true,
                b"off" => c.disk = false,
                _ => {}
            },
            _ => {
                let Some(n) = num(v) else { continue };
                match k {
                    b"mib" => c.mib = n.min(1 << 20),
                    b"rate" => c.rate = n.min(1 << 20),
                    b"hb_ms" if n > 0 => c.hb_ms = n.min(3_600_000),
                    b"hz" if n > 0 => c.hz = n.min(5000),
                    b"qstatus" => c.qstatus = n & 0xff,
                    b"cpus" => c.cpus = n,
                    b"smp_wait_ms" => c.smp_wait_ms = n.min(10_000),
                    b"disk_mib" => c.disk_mib = n.min(1 << 20),
                    b"secs" if n > 0 => c.secs = n.min(3600),
                    b"qd" if n > 0 => c.qd = n.min(crate::virtio::SLOTS as u64),
                    b"entropy" => c.entropy = n.min(100),
                    _ => {}
                }
            }
        }
    }
    c
}
