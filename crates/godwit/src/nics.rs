//! Network options, QEMU's syntax: `-netdev tap,id=ID,ifname=NAME[,script=no|PATH]
//! [,downscript=no|PATH]` or `-netdev tap,id=ID,fd=N` (a tap the parent opened, as libvirt
//! passes it) with `-device virtio-net-device,netdev=ID[,mac=MAC]`, and the legacy
//! `-net nic[,macaddr=MAC][,model=virtio] -net tap[,ifname=NAME][,script=..][,downscript=..]`
//! (the i-th `-net nic` is connected to the i-th `-net tap`; `-net none` is accepted).
//!
//! Resolution checks everything before any tap is opened: unknown netdev ids, a netdev used by
//! two cards, malformed MACs, unsupported backends. NICs come in command-line order: `-device`
//! cards first, then legacy ones; a card without `mac=` gets QEMU's default `52:54:00:12:34:56`
//! plus its index, so both ends of a migration agree when they use the same command line.
//! The taps are opened by [`open`] before the VM is built, so a missing permission is reported
//! as one line before anything else happens.

use net::{MacAddr, Tap, TapOptions};
use std::collections::HashMap;
use std::path::PathBuf;

/// One NIC to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// The netdev id (legacy cards: `net<N>`), for messages.
    pub netdev: String,
    pub mac: MacAddr,
    pub tap: TapOptions,
}

/// Splits QEMU's `a,b=c` (a `,,` is a literal comma).
fn split(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        let last = out.last_mut().expect("never empty");
        if c == ',' && it.peek() == Some(&',') {
            it.next();
            last.push(',');
        } else if c == ',' {
            out.push(String::new());
        } else {
            last.push(c);
        }
    }
    out
}

fn script(v: &str) -> Option<PathBuf> {
    (!v.is_empty() && v != "no").then(|| PathBuf::from(v))
}

/// Parses the properties of a tap backend (after `tap,`); returns (id, options).
fn parse_tap(props: &[String], what: &str) -> Result<(Option<String>, TapOptions), String> {
    let mut id = None;
    let mut t = TapOptions::default();
    for p in props {
        let (k, v) = p.split_once('=').ok_or_else(|| format!("{what}: expected key=value, got '{p}'"))?;
        match k {
            "id" | "name" => id = Some(v.to_string()),
            "ifname" => t.ifname = v.to_string(),
            "script" => t.script = script(v),
            "downscript" => t.downscript = script(v),
            "vhost" if v == "off" => {}
            "queues" if v == "1" => {}
            "vlan" => {}
            "fd" => {
                let fd = v.parse::<i32>().ok().filter(|fd| *fd >= 0);
                t.fd = Some(fd.ok_or_else(|| format!("{what}: fd={v} is not a descriptor number"))?);
            }
            "fds" | "helper" | "br" | "vhostfd" | "vhost" | "queues" | "sndbuf" | "vnet_hdr" => {
                return Err(format!("{what}: '{k}={v}' is not supported by Godwit"))
            }
            _ => return Err(format!("{what}: unknown tap property '{k}'")),
        }
    }
    if t.fd.is_some() && (!t.ifname.is_empty() || t.script.is_some() || t.downscript.is_some()) {
        return Err(format!("{what}: ifname=, script= and downscript= cannot be used with fd= (the tap is already open)"));
    }
    Ok((id, t))
}

fn parse_mac(v: &str, what: &str) -> Result<MacAddr, String> {
    v.parse::<MacAddr>().map_err(|e| format!("{what}: {e}"))
}

/// Resolves `-netdev`, `-device virtio-net-device` and `-net` options into NICs.
pub fn resolve(netdevs: &[String], devices: &[String], legacy: &[String]) -> Result<Vec<NicSpec>, String> {
    let mut backends: HashMap<String, TapOptions> = HashMap::new();
    let mut order = Vec::new();
    for nd in netdevs {
        let what = format!("-netdev {nd}");
        let parts = split(nd);
        match parts[0].as_str() {
            "tap" => {}
            "" => return Err(format!("{what}: the backend type is missing (Godwit supports tap)")),
            other => return Err(format!("{what}: netdev type '{other}' is not supported (Godwit supports tap)")),
        }
        let (id, tap) = parse_tap(&parts[1..], &what)?;
        let id = id.ok_or_else(|| format!("{what}: id= is required"))?;
        if backends.insert(id.clone(), tap).is_some() {
            return Err(format!("{what}: duplicate netdev id '{id}'"));
        }
        order.push(id);
    }
    let mut out: Vec<NicSpec> = Vec::new();
    let mut used: HashMap<String, ()> = HashMap::new();
    for dev in devices {
        let parts = split(dev);
        if !matches!(parts[0].as_str(), "virtio-net-device" | "virtio-net" | "virtio-net-pci") {
            continue; // other -device drivers are resolved elsewhere
        }
        let what = format!("-device {dev}");
        let mut netdev = None;
        let mut mac = None;
        for p in &parts[1..] {
            let (k, v) = p.split_once('=').ok_or_else(|| format!("{what}: expected key=value, got '{p}'"))?;
            match k {
                "netdev" => netdev = Some(v.to_string()),
                "mac" => mac = Some(parse_mac(v, &what)?),
                "id" | "bus" | "addr" => {}
                _ => return Err(format!("{what}: unknown property '{k}'")),
            }
        }
        let id = netdev.ok_or_else(|| format!("{what}: netdev= is required"))?;
        let tap = backends.get(&id).cloned().ok_or_else(|| format!("{what}: no -netdev with id '{id}'"))?;
        if used.insert(id.clone(), ()).is_some() {
            return Err(format!("{what}: netdev '{id}' is already used by another card"));
        }
        let n = out.len() as u8;
        out.push(NicSpec { netdev: id, mac: mac.unwrap_or_else(|| MacAddr::default_for(n)), tap });
    }
    for id in &order {
        if !used.contains_key(id) {
            eprintln!("godwit: warning: -netdev {id} has no card (-device virtio-net-device,netdev={id})");
        }
    }
    // Legacy -net: nics and taps paired in order.
    let mut nics = Vec::new();
    let mut taps = Vec::new();
    for n in legacy {
        let what = format!("-net {n}");
        let parts = split(n);
        match parts[0].as_str() {
            "none" => {}
            "nic" => {
                let mut mac = None;
                for p in &parts[1..] {
                    let (k, v) = p.split_once('=').ok_or_else(|| format!("{what}: expected key=value, got '{p}'"))?;
                    match k {
                        "macaddr" => mac = Some(parse_mac(v, &what)?),
                        "model" if matches!(v, "virtio" | "virtio-net-device" | "virtio-net" | "virtio-net-pci") => {}
                        "model" => return Err(format!("{what}: NIC model '{v}' is not supported (Godwit has virtio)")),
                        "vlan" | "name" | "id" | "netdev" => {}
                        _ => return Err(format!("{what}: unknown property '{k}'")),
                    }
                }
                nics.push(mac);
            }
            "tap" => taps.push(parse_tap(&parts[1..], &what)?.1),
            "user" => return Err(format!("{what}: user-mode networking is not supported (Godwit supports tap)")),
            other => return Err(format!("{what}: '-net {other}' is not supported (nic, tap or none)")),
        }
    }
    if nics.len() != taps.len() {
        return Err(format!(
            "-net: {} '-net nic' but {} '-net tap' (Godwit connects the i-th nic to the i-th tap)",
            nics.len(),
            taps.len()
        ));
    }
    for (i, (mac, tap)) in nics.into_iter().zip(taps).enumerate() {
        let n = out.len() as u8;
        out.push(NicSpec { netdev: format!("net{i}"), mac: mac.unwrap_or_else(|| MacAddr::default_for(n)), tap });
    }
    Ok(out)
}

/// Opens every tap (before the VM exists, so errors come first and alone).
pub fn open(specs: &[NicSpec]) -> Result<Vec<vmm::netdev::NetSpec>, String> {
    specs
        .iter()
        .map(|s| {
            let tap = Tap::open(&s.tap).map_err(|e| format!("-netdev {}: {e}", s.netdev))?;
            Ok(vmm::netdev::NetSpec { tap, config: virtio::NetConfig::new(s.mac) })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn netdev_and_device() {
        let n = resolve(
            &v(&["tap,id=n0,ifname=tap0,script=no,downscript=/bin/true"]),
            &v(&["virtio-blk-device,drive=d0", "virtio-net-device,netdev=n0,mac=52:54:00:00:00:07"]),
            &[],
        )
        .unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].mac.to_string(), "52:54:00:00:00:07");
        assert_eq!(n[0].tap.ifname, "tap0");
        assert_eq!(n[0].tap.script, None);
        assert_eq!(n[0].tap.downscript, Some(PathBuf::from("/bin/true")));
    }

    #[test]
    fn an_inherited_tap_descriptor() {
        let n = resolve(&v(&["tap,id=n0,fd=23"]), &v(&["virtio-net-device,netdev=n0"]), &[]).unwrap();
        assert_eq!((n[0].tap.fd, n[0].tap.ifname.as_str()), (Some(23), ""));
        for bad in ["tap,id=n0,fd=x", "tap,id=n0,fd=-1"] {
            let e = resolve(&v(&[bad]), &[], &[]).unwrap_err();
            assert!(e.contains("is not a descriptor number"), "{e}");
        }
        let e = resolve(&v(&["tap,id=n0,fd=23,ifname=tap0"]), &[], &[]).unwrap_err();
        assert!(e.contains("cannot be used with fd="), "{e}");
        assert!(resolve(&v(&["tap,id=n0,fds=23:24"]), &[], &[]).unwrap_err().contains("not supported"));
    }

    #[test]
    fn legacy_pairs_and_default_macs() {
        let n = resolve(&[], &[], &v(&["nic", "tap,ifname=t0", "nic,macaddr=52:54:00:aa:bb:cc,model=virtio", "tap,ifname=t1"])).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(n[1].mac.to_string(), "52:54:00:aa:bb:cc");
        assert_eq!((n[0].tap.ifname.as_str(), n[1].tap.ifname.as_str()), ("t0", "t1"));
        assert!(resolve(&[], &[], &v(&["none"])).unwrap().is_empty());
    }

    #[test]
    fn errors_are_one_clear_line() {
        let e = resolve(&v(&["tap,id=n0,ifname=t"]), &v(&["virtio-net-device,netdev=nope"]), &[]).unwrap_err();
        assert!(e.contains("no -netdev with id 'nope'"), "{e}");
        let e = resolve(&v(&["tap,id=n0"]), &v(&["virtio-net-device,netdev=n0,mac=52:54:00:zz:00:01"]), &[]).unwrap_err();
        assert!(e.contains("malformed MAC address"), "{e}");
        let e = resolve(&[], &[], &v(&["nic,macaddr=1:2:3", "tap"])).unwrap_err();
        assert!(e.contains("malformed MAC address"), "{e}");
        assert!(resolve(&v(&["user,id=u"]), &[], &[]).unwrap_err().contains("not supported"));
        assert!(resolve(&v(&["tap,ifname=x"]), &[], &[]).unwrap_err().contains("id= is required"));
        assert!(resolve(&[], &[], &v(&["nic"])).unwrap_err().contains("-net tap"));
        let e = resolve(&v(&["tap,id=a"]), &v(&["virtio-net-device,netdev=a", "virtio-net-device,netdev=a"]), &[]).unwrap_err();
        assert!(e.contains("already used"), "{e}");
    }
}
