//! The rest of the start-up command line libvirt 9.0 generates for a microvm domain, turned
//! into Godwit's own options once the whole line is read ([`finish`]): JSON `-blockdev` file +
//! format node pairs become drives named by their format node, JSON `-device`/`-netdev`/
//! `-object` become the key=value forms, `-device isa-serial,chardev=ID` routes the serial
//! port to that chardev (a pty), `-object memory-backend-ram` must match `-m` and `-machine
//! memory-backend=`. Options that change nothing in Godwit (`-audiodev none`, `-overcommit
//! mem-lock=off`, `-msg timestamp=on`, `-uuid`) are checked and recorded; ones asking for
//! what Godwit cannot do (`-sandbox on`, `-overcommit mem-lock=on`, other audio drivers)
//! are refused. `docs/libvirt.md` has the table.

use crate::cli::{Options, SerialTarget};
use serde_json::{Map, Value};

/// Options with an argument handled here (through `Compat::apply`).
pub const WITH_ARG: &[&str] = &["-blockdev", "-audiodev", "-overcommit", "-uuid", "-sandbox", "-msg"];

/// What these options leave for start-up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Extra {
    /// `-blockdev` nodes, as given (JSON text).
    pub blockdevs: Vec<String>,
    pub uuid: Option<String>,
    /// The chardev id the serial port goes to (`-device isa-serial,chardev=ID`), a pty.
    pub serial_pty: Option<String>,
    /// Devices with an `id=`: (id, QOM type), for `qom-list /machine/peripheral`.
    pub peripherals: Vec<(String, String)>,
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(format!("'{key}' expects on or off, not '{v}'")),
    }
}

fn kv(v: &str) -> impl Iterator<Item = (&str, &str)> {
    v.split(',').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, "on")))
}

fn json_obj(v: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(v) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("expected a JSON object".into()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

impl Extra {
    pub fn apply(&mut self, opt: &str, v: &str) -> Result<(), String> {
        match opt {
            "-blockdev" => {
                if !v.trim_start().starts_with('{') {
                    return Err("only the JSON form of -blockdev is supported".into());
                }
                json_obj(v)?;
                self.blockdevs.push(v.to_string());
            }
            "-audiodev" => {
                // Godwit has no sound device; a `none` backend is all there is to accept.
                let driver = if v.trim_start().starts_with('{') {
                    json_obj(v)?.get("driver").and_then(Value::as_str).map(String::from)
                } else {
                    kv(v).find(|(k, _)| *k == "driver").map(|(_, d)| d.to_string()).or_else(|| v.split(',').next().map(String::from))
                };
                if driver.as_deref() != Some("none") {
                    return Err("Godwit has no audio: only the 'none' audio driver is accepted".into());
                }
            }
            "-overcommit" => {
                for (k, val) in kv(v) {
                    match k {
                        "mem-lock" if !on_off(k, val)? => {}
                        "mem-lock" => return Err("mem-lock=on: Godwit does not lock guest memory".into()),
                        "cpu-pm" if !on_off(k, val)? => {}
                        "cpu-pm" => return Err("cpu-pm=on: Godwit does not pass CPU power management to guests".into()),
                        _ => return Err(format!("unknown -overcommit property '{k}'")),
                    }
                }
            }
            "-uuid" => {
                let ok = v.len() == 36
                    && v.char_indices().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() });
                if !ok {
                    return Err("not a UUID (8-4-4-4-12 hex digits)".into());
                }
                self.uuid = Some(v.to_string());
            }
            "-sandbox" => {
                let first = v.split(',').next().unwrap_or("");
                if on_off("sandbox", first)? {
                    return Err("Godwit has no seccomp sandbox (it does not list 'sandbox' in query-command-line-options)".into());
                }
            }
            "-msg" => {
                // Godwit's error messages carry no timestamps; libvirt's log lines have their own.
                for (k, val) in kv(v) {
                    match k {
                        "timestamp" | "guest-name" => {
                            on_off(k, val)?;
                        }
                        _ => return Err(format!("unknown -msg property '{k}'")),
                    }
                }
            }
            _ => return Err(format!("'{opt}' is not handled here")),
        }
        Ok(())
    }
}

/// `"a,b"` as a QEMU option value: commas doubled.
fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

/// A JSON object as `driver,key=value,...` (`first` names the member that comes first).
fn to_keyval(m: &Map<String, Value>, first: &str) -> Result<String, String> {
    let head = m.get(first).and_then(Value::as_str).ok_or_else(|| format!("'{first}' is missing"))?;
    let mut out = esc(head);
    for (k, v) in m {
        if k == first {
            continue;
        }
        let v = match v {
            Value::String(s) => esc(s),
            Value::Bool(b) => (if *b { "on" } else { "off" }).to_string(),
            Value::Number(n) => n.to_string(),
            _ => return Err(format!("member '{k}' must be a string, number or boolean")),
        };
        out.push_str(&format!(",{k}={v}"));
    }
    Ok(out)
}

fn str_member<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, String> {
    match m.get(k) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("'{k}' must be a string")),
    }
}

fn bool_member(m: &Map<String, Value>, k: &str) -> Result<Option<bool>, String> {
    match m.get(k) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("'{k}' must be a boolean")),
    }
}

/// A node's `cache: {direct, no-flush}` as a `-drive cache=` mode (what the file node says
/// is what the drive uses; libvirt repeats it on the format node).
fn cache_mode(m: &Map<String, Value>) -> Result<&'static str, String> {
    let Some(c) = m.get("cache") else { return Ok("writeback") };
    let c = c.as_object().ok_or("'cache' must be an object")?;
    for k in c.keys() {
        if !matches!(k.as_str(), "direct" | "no-flush") {
            return Err(format!("cache property '{k}' is not supported"));
        }
    }
    match (bool_member(c, "direct")?.unwrap_or(false), bool_member(c, "no-flush")?.unwrap_or(false)) {
        (false, false) => Ok("writeback"),
        (true, false) => Ok("none"),
        (false, true) => Ok("unsafe"),
        (true, true) => Err("cache direct + no-flush together are not supported".into()),
    }
}

/// `-blockdev` nodes → `-drive` specs named by the format node (which the device's `drive=`
/// names). A file node stands alone as a raw drive only if nothing uses it as `file`. A
/// format node named as another's `backing` (libvirt's nodes for a backing chain, read from
/// the images' headers) is no drive of its own: the overlay's drive opens its chain from its
/// header, as QEMU does without `backing` given.
fn blockdevs_to_drives(nodes: &[String]) -> Result<Vec<String>, String> {
    let mut files: Vec<(String, String, bool, &str)> = Vec::new(); // node-name, filename, read-only, cache
    let mut formats: Vec<Map<String, Value>> = Vec::new();
    for text in nodes {
        let m = json_obj(text).map_err(|e| format!("-blockdev {text}: {e}"))?;
        let err = |e: String| format!("-blockdev {text}: {e}");
        let name = str_member(&m, "node-name").map_err(err)?.ok_or_else(|| err("node-name is required".into()))?.to_string();
        if files.iter().any(|f| f.0 == name) || formats.iter().any(|f| f.get("node-name").and_then(Value::as_str) == Some(&name)) {
            return Err(err(format!("duplicate node-name '{name}'")));
        }
        match str_member(&m, "driver").map_err(err)? {
            Some("file") => {
                for k in m.keys() {
                    if !matches!(k.as_str(), "driver" | "node-name" | "filename" | "auto-read-only" | "discard" | "read-only" | "cache") {
                        return Err(err(format!("file node property '{k}' is not supported")));
                    }
                }
                let filename = str_member(&m, "filename").map_err(err)?.ok_or_else(|| err("filename is required".into()))?;
                let ro = bool_member(&m, "read-only").map_err(err)?.unwrap_or(false);
                let cache = cache_mode(&m).map_err(err)?;
                files.push((name, filename.to_string(), ro, cache));
            }
            Some("raw") | Some("qcow2") => {
                for (k, v) in &m {
                    let ok = match k.as_str() {
                        "driver" | "node-name" | "file" | "read-only" | "discard" | "cache" => true,
                        "backing" => v.is_null() || v.is_string(),
                        _ => false,
                    };
                    if !ok {
                        return Err(err(format!("format node property '{k}' is not supported")));
                    }
                }
                cache_mode(&m).map_err(err)?;
                formats.push(m);
            }
            Some(d) => return Err(err(format!("block driver '{d}' is not supported (file, raw, qcow2)"))),
            None => return Err(err("driver is required".into())),
        }
    }
    let mut backings = Vec::new();
    for f in &formats {
        let name = str_member(f, "node-name")?.unwrap_or_default();
        if let Some(b) = f.get("backing").and_then(Value::as_str) {
            if b == name || !formats.iter().any(|x| x.get("node-name").and_then(Value::as_str) == Some(b)) {
                return Err(format!("-blockdev {name}: backing '{b}' is not another format node"));
            }
            backings.push(b);
        }
    }
    let mut drives = Vec::new();
    let mut used = Vec::new();
    for f in &formats {
        let name = str_member(f, "node-name")?.unwrap_or_default();
        let child = str_member(f, "file")?.ok_or_else(|| format!("-blockdev {name}: 'file' (the file node) is required"))?;
        if backings.contains(&name) {
            // Part of a backing chain: its file is accounted for, it is no drive.
            if !files.iter().any(|x| x.0 == child) {
                return Err(format!("-blockdev {name}: no file node named '{child}'"));
            }
            used.push(child);
            continue;
        }
        let (_, path, file_ro, cache) = files
            .iter()
            .find(|x| x.0 == child)
            .ok_or_else(|| format!("-blockdev {name}: no file node named '{child}'"))?;
        if used.contains(&child) {
            return Err(format!("-blockdev {name}: file node '{child}' is used twice"));
        }
        used.push(child);
        let ro = bool_member(f, "read-only")?.unwrap_or(false) || *file_ro;
        let driver = str_member(f, "driver")?.unwrap_or("raw");
        drives.push(format!(
            "file={},format={driver},if=none,id={},node-name={},readonly={},cache={cache}",
            esc(path),
            esc(name),
            esc(name),
            if ro { "on" } else { "off" }
        ));
    }
    for (name, path, ro, cache) in &files {
        if !used.contains(&name.as_str()) {
            drives.push(format!(
                "file={},format=raw,if=none,id={},node-name={},readonly={},cache={cache}",
                esc(path),
                esc(name),
                esc(name),
                if *ro { "on" } else { "off" }
            ));
        }
    }
    Ok(drives)
}

/// The key=value form of the objects handled here (`secret,id=..,file=..`,
/// `memory-backend-ram,id=..,size=BYTES`, as libvirt writes them when the schema has no
/// `object-add`) as the JSON members; `None` for other types.
fn legacy_object(spec: &str) -> Option<Map<String, Value>> {
    let ty = spec.split(',').next()?;
    if !matches!(ty, "secret" | "memory-backend-ram") {
        return None;
    }
    let mut m = Map::new();
    m.insert("qom-type".into(), Value::String(ty.into()));
    for (k, v) in kv(spec).skip(1) {
        m.insert(k.into(), Value::String(v.into()));
    }
    Some(m)
}

/// `-name guest=N[,debug-threads=on]` or `-name N`: the name. Godwit's threads always carry
/// names (`vcpu0`, ...), so `debug-threads` changes nothing.
fn parse_name(v: &str) -> Result<String, String> {
    if !v.contains('=') {
        return Ok(v.to_string());
    }
    let mut name = None;
    for (k, val) in kv(v) {
        match k {
            "guest" => name = Some(val.to_string()),
            "debug-threads" => {
                on_off(k, val)?;
            }
            _ => return Err(format!("unsupported -name property '{k}'")),
        }
    }
    name.ok_or_else(|| "guest= is missing".into())
}

/// Rewrites libvirt's forms into Godwit's own options; called once the line is parsed.
pub fn finish(o: &mut Options) -> Result<(), String> {
    if let Some(n) = &o.name {
        o.name = Some(parse_name(n).map_err(|e| format!("-name {n}: {e}"))?);
    }
    // -object: JSON forms.
    let mut objects = Vec::new();
    let mut ram_backends: Vec<(String, u64)> = Vec::new();
    for spec in std::mem::take(&mut o.objects) {
        let m = if spec.trim_start().starts_with('{') {
            json_obj(&spec).map_err(|e| format!("-object {spec}: {e}"))?
        } else {
            match legacy_object(&spec) {
                Some(m) => m,
                None => {
                    objects.push(spec); // tls-creds-*, read by the migration crate
                    continue;
                }
            }
        };
        let err = |e: &str| format!("-object {spec}: {e}");
        let id = str_member(&m, "id").map_err(|e| err(&e))?.ok_or_else(|| err("id is required"))?;
        match str_member(&m, "qom-type").map_err(|e| err(&e))? {
            // libvirt's master key for encrypted secrets; Godwit has no secret consumers
            // (no LUKS, no authenticated storage), so the key is checked and left alone.
            Some("secret") => {
                for k in m.keys() {
                    if !matches!(k.as_str(), "qom-type" | "id" | "format" | "file" | "data") {
                        return Err(err(&format!("secret property '{k}' is not supported")));
                    }
                }
                if let Some(f) = str_member(&m, "file").map_err(|e| err(&e))? {
                    std::fs::metadata(f).map_err(|e| err(&format!("'{f}': {e}")))?;
                }
            }
            Some("memory-backend-ram") => {
                for (k, v) in &m {
                    let ok = match k.as_str() {
                        "qom-type" | "id" | "size" => true,
                        "share" | "prealloc" => v == &Value::Bool(false) || v == "off" || v == "false",
                        _ => false,
                    };
                    if !ok {
                        return Err(err(&format!("memory-backend-ram property '{k}={v}' is not supported")));
                    }
                }
                let size = match m.get("size") {
                    Some(Value::Number(n)) => n.as_u64(),
                    Some(Value::String(t)) => t.parse::<u64>().ok(),
                    _ => None,
                };
                let size = size.ok_or_else(|| err("size (bytes) is required"))?;
                ram_backends.push((id.to_string(), size));
            }
            Some("tls-creds-x509") | Some("tls-creds-psk") => objects.push(to_keyval(&m, "qom-type").map_err(|e| err(&e))?),
            Some(t) => return Err(err(&format!("object type '{t}' is not supported"))),
            None => return Err(err("qom-type is required")),
        }
    }
    o.objects = objects;
    if let Some(id) = &o.compat.memory_backend {
        let (_, size) = ram_backends
            .iter()
            .find(|(i, _)| i == id)
            .ok_or_else(|| format!("-machine memory-backend={id}: no -object memory-backend-ram with that id"))?;
        if *size != o.mem_mib << 20 {
            return Err(format!("-machine memory-backend={id}: its size {size} differs from -m ({} MiB)", o.mem_mib));
        }
    }
    // -device / -netdev: JSON forms; isa-serial routes the serial port.
    let mut devices = Vec::new();
    for spec in std::mem::take(&mut o.devices) {
        let legacy = if spec.trim_start().starts_with('{') {
            let m = json_obj(&spec).map_err(|e| format!("-device {spec}: {e}"))?;
            to_keyval(&m, "driver").map_err(|e| format!("-device {spec}: {e}"))?
        } else {
            spec.clone()
        };
        let driver = legacy.split(',').next().unwrap_or("").to_string();
        if let Some((_, id)) = kv(&legacy).skip(1).find(|(k, _)| *k == "id") {
            o.compat.extra.peripherals.push((id.to_string(), driver.clone()));
        }
        if legacy.split(',').next() == Some("isa-serial") {
            let mut chardev = None;
            for (k, v) in kv(&legacy).skip(1) {
                match (k, v) {
                    ("chardev", c) => chardev = Some(c.to_string()),
                    ("id", _) | ("index", "0") => {}
                    _ => return Err(format!("-device {spec}: isa-serial property '{k}={v}' is not supported (one serial port)")),
                }
            }
            let c = chardev.ok_or_else(|| format!("-device {spec}: chardev= is required"))?;
            match o.compat.chardevs.iter().find(|x| x.id == c).map(|x| &x.backend) {
                Some(crate::compat::ChardevBackend::Pty) => o.extra_serial_pty(c),
                Some(crate::compat::ChardevBackend::Null) => o.serial = SerialTarget::None,
                Some(_) => return Err(format!("-device {spec}: the serial port can go to a pty or null chardev")),
                None => return Err(format!("-device {spec}: no chardev '{c}'")),
            }
            continue;
        }
        devices.push(legacy);
    }
    o.devices = devices;
    let mut netdevs = Vec::new();
    for spec in std::mem::take(&mut o.netdevs) {
        if spec.trim_start().starts_with('{') {
            let m = json_obj(&spec).map_err(|e| format!("-netdev {spec}: {e}"))?;
            netdevs.push(to_keyval(&m, "type").map_err(|e| format!("-netdev {spec}: {e}"))?);
        } else {
            netdevs.push(spec);
        }
    }
    o.netdevs = netdevs;
    let drives = blockdevs_to_drives(&o.compat.extra.blockdevs)?;
    o.drives.extend(drives);
    Ok(())
}

impl Options {
    fn extra_serial_pty(&mut self, chardev: String) {
        self.serial = SerialTarget::None;
        self.compat.extra.serial_pty = Some(chardev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        crate::cli::parse(args.iter().map(|s| s.to_string())).map_err(|e| e.to_string())
    }

    #[test]
    fn blockdev_pairs_become_named_drives() {
        let o = parse(&[
            "-blockdev", r#"{"driver":"file","filename":"/img/a,b.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
            "-blockdev", r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":null}"#,
            "-device", r#"{"driver":"virtio-blk-device","drive":"libvirt-1-format","id":"virtio-disk0","bootindex":1}"#,
        ])
        .unwrap();
        assert_eq!(o.drives, vec!["file=/img/a,,b.qcow2,format=qcow2,if=none,id=libvirt-1-format,node-name=libvirt-1-format,readonly=off,cache=writeback"]);
        let o2 = parse(&[
            "-blockdev", r#"{"driver":"file","filename":"/i","node-name":"s","cache":{"direct":true,"no-flush":false}}"#,
            "-blockdev", r#"{"node-name":"f","driver":"raw","file":"s","cache":{"direct":true,"no-flush":false}}"#,
        ])
        .unwrap();
        assert!(o2.drives[0].ends_with(",cache=none"), "{:?}", o2.drives);
        assert!(parse(&["-blockdev", r#"{"driver":"file","filename":"/i","node-name":"s","cache":{"direct":true,"no-flush":true}}"#]).is_err());
        assert!(parse(&["-blockdev", r#"{"driver":"file","filename":"/i","node-name":"s","cache":{"x":true}}"#]).is_err());
        assert_eq!(o.devices, vec!["virtio-blk-device,bootindex=1,drive=libvirt-1-format,id=virtio-disk0"]);
        let d = crate::drives::resolve(&o.drives, &o.devices).unwrap();
        assert_eq!(d[0].node_name.as_deref(), Some("libvirt-1-format"));
        assert_eq!(d[0].file, std::path::PathBuf::from("/img/a,b.qcow2"));
    }

    #[test]
    fn a_backing_chain_is_one_drive_on_its_top_node() {
        let o = parse(&[
            "-blockdev", r#"{"driver":"file","filename":"/img/base.qcow2","node-name":"libvirt-2-storage","auto-read-only":true,"discard":"unmap"}"#,
            "-blockdev", r#"{"node-name":"libvirt-2-format","read-only":true,"driver":"qcow2","file":"libvirt-2-storage","backing":null}"#,
            "-blockdev", r#"{"driver":"file","filename":"/img/vm.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
            "-blockdev", r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":"libvirt-2-format"}"#,
        ])
        .unwrap();
        assert_eq!(o.drives, vec!["file=/img/vm.qcow2,format=qcow2,if=none,id=libvirt-1-format,node-name=libvirt-1-format,readonly=off,cache=writeback"]);
        let e = |a: &[&str]| parse(a).unwrap_err();
        let f = r#"{"driver":"file","filename":"/i","node-name":"s"}"#;
        assert!(e(&["-blockdev", f, "-blockdev", r#"{"node-name":"t","driver":"qcow2","file":"s","backing":"nope"}"#]).contains("backing"));
        assert!(e(&["-blockdev", f, "-blockdev", r#"{"node-name":"t","driver":"qcow2","file":"s","backing":"t"}"#]).contains("backing"));
    }

    #[test]
    fn bad_blockdevs_are_refused() {
        let e = |a: &[&str]| parse(a).unwrap_err();
        assert!(e(&["-blockdev", "driver=file,filename=x"]).contains("JSON"));
        assert!(e(&["-blockdev", r#"{"driver":"nbd","node-name":"n"}"#]).contains("nbd"));
        assert!(e(&["-blockdev", r#"{"driver":"raw","node-name":"f","file":"nope"}"#]).contains("no file node"));
        assert!(e(&["-blockdev", r#"{"driver":"file","node-name":"s","filename":"x","aio":"io_uring"}"#]).contains("aio"));
        assert!(e(&["-blockdev", r#"{"driver":"file","filename":"x"}"#]).contains("node-name"));
        assert!(e(&["-blockdev", "{not json"]).contains("JSON"));
    }

    #[test]
    fn objects_machine_memory_and_serial() {
        let dir = std::env::temp_dir().join(format!("godwit-la-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("master-key.aes");
        std::fs::write(&key, [0u8; 32]).unwrap();
        let secret = format!(r#"{{"qom-type":"secret","id":"masterKey0","format":"raw","file":"{}"}}"#, key.display());
        let o = parse(&[
            "-name", "guest=mvm,debug-threads=on", "-object", &secret,
            "-machine", "microvm,usb=off,dump-guest-core=off,memory-backend=microvm.ram", "-m", "256",
            "-object", r#"{"qom-type":"memory-backend-ram","id":"microvm.ram","size":268435456}"#,
            "-overcommit", "mem-lock=off", "-uuid", "9ccfd1c8-7455-4ccb-b910-d96707fca7fb", "-chardev", "pty,id=charserial0",
            "-device", r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
            "-audiodev", r#"{"id":"audio1","driver":"none"}"#, "-msg", "timestamp=on", "-sandbox", "off",
        ])
        .unwrap();
        assert_eq!(o.name.as_deref(), Some("mvm"));
        assert!(o.objects.is_empty() && o.devices.is_empty());
        assert_eq!(o.serial, SerialTarget::None);
        assert_eq!(o.compat.extra.serial_pty.as_deref(), Some("charserial0"));
        // The key=value forms libvirt uses when the schema has no object-add.
        let legacy_secret = format!("secret,id=masterKey0,format=raw,file={}", key.display());
        let o = parse(&["-object", &legacy_secret, "-machine", "microvm,memory-backend=microvm.ram", "-m", "128",
                        "-object", "memory-backend-ram,id=microvm.ram,size=134217728"]).unwrap();
        assert!(o.objects.is_empty());
        let e = |a: &[&str]| parse(a).unwrap_err();
        assert!(e(&["-machine", "microvm,memory-backend=r", "-object", "memory-backend-ram,id=r,size=1"]).contains("differs"));
        assert!(e(&["-object", "memory-backend-ram,id=r,size=1,share=on"]).contains("share"));
        assert!(e(&["-machine", "microvm,memory-backend=r", "-m", "128", "-object", r#"{"qom-type":"memory-backend-ram","id":"r","size":1}"#]).contains("differs"));
        assert!(e(&["-machine", "microvm,memory-backend=r"]).contains("no -object"));
        assert!(e(&["-object", r#"{"qom-type":"memory-backend-file","id":"r","size":1}"#]).contains("not supported"));
        assert!(e(&["-object", r#"{"qom-type":"secret","id":"k","file":"/no/such/key"}"#]).contains("/no/such/key"));
        assert!(e(&["-sandbox", "on,obsolete=deny"]).contains("sandbox"));
        assert!(e(&["-overcommit", "mem-lock=on"]).contains("lock"));
        assert!(e(&["-audiodev", r#"{"id":"a","driver":"pa"}"#]).contains("audio"));
        assert!(e(&["-uuid", "nope"]).contains("UUID"));
        assert!(e(&["-device", r#"{"driver":"isa-serial","chardev":"nope"}"#]).contains("nope"));
        assert!(e(&["-name", "guest=a,process=b"]).contains("process"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
