//! The QMP commands a management layer (libvirt) sends when it probes a binary: what the
//! binary is (`query-target`, `query-kvm`, `query-machines`, `query-cpu-definitions`,
//! `query-cpu-model-expansion`), which QOM types and device properties it has
//! (`qom-list-types`, `device-list-properties`, `qom-list-properties`), which command-line
//! options it takes (`query-command-line-options`), and `query-qmp-schema`, an introspection
//! document generated from Godwit's own command tables (never a copy of QEMU's schema).
//!
//! Every answer comes from the tables below, which describe what Godwit really implements: a
//! device Godwit does not have answers `DeviceNotFound` (the class libvirt tolerates), a QOM
//! class it does not have lists no properties (see [`handle`]'s `qom-list-properties`),
//! and probe commands for features Godwit lacks (TPM, SEV, SGX) are simply absent, so they
//! answer `CommandNotFound`.

use crate::error::{CommandError, ErrorClass};
use crate::qmp::commands::Args;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The commands this module answers, in `query-commands` order.
pub const PROBE_COMMANDS: &[&str] = &[
    "query-qmp-schema",
    "query-target",
    "query-kvm",
    "query-machines",
    "query-cpu-definitions",
    "query-cpu-model-expansion",
    "qom-list-types",
    "device-list-properties",
    "qom-list-properties",
    "query-command-line-options",
];

static CPU_MAX: AtomicUsize = AtomicUsize::new(1);

/// Tells the probe answers the VMM's vCPU limit (`cpu-max` of `query-machines`).
pub fn set_cpu_max(n: usize) {
    CPU_MAX.store(n.max(1), Ordering::Relaxed);
}

/// A QOM type Godwit has: name, parent, abstract, and (for devices and objects) the
/// properties it accepts, as (name, QOM type).
struct QomType {
    name: &'static str,
    parent: &'static str,
    is_abstract: bool,
    is_device: bool,
    props: &'static [(&'static str, &'static str)],
}

const fn t(
    name: &'static str,
    parent: &'static str,
    is_device: bool,
    props: &'static [(&'static str, &'static str)],
) -> QomType {
    QomType { name, parent, is_abstract: false, is_device, props }
}

const fn abs(name: &'static str, parent: &'static str) -> QomType {
    QomType { name, parent, is_abstract: true, is_device: false, props: &[] }
}

/// The types Godwit implements (the microvm machine, its virtio-mmio devices, the serial
/// port, the host CPU model, the objects `-object` takes).
const TYPES: &[QomType] = &[
    abs("object", ""),
    abs("device", "object"),
    abs("sys-bus-device", "device"),
    abs("machine", "object"),
    abs("x86-machine", "machine"),
    abs("virtio-device", "device"),
    abs("x86_64-cpu", "device"),
    t("microvm-machine", "x86-machine", false, &[
        ("memory-backend", "string"),
        ("usb", "bool"),
        ("dump-guest-core", "bool"),
        ("acpi", "OnOffAuto"),
    ]),
    t("none-machine", "machine", false, &[("memory-backend", "string"), ("dump-guest-core", "bool")]),
    t("virtio-mmio", "sys-bus-device", false, &[]),
    t("virtio-blk-device", "virtio-device", true, &[
        ("drive", "str"),
        ("serial", "str"),
        ("bootindex", "int32"),
    ]),
    t("virtio-net-device", "virtio-device", true, &[("netdev", "str"), ("mac", "str")]),
    t("isa-serial", "device", true, &[("chardev", "str"), ("index", "uint32")]),
    t("host-x86_64-cpu", "x86_64-cpu", true, &[("migratable", "bool")]),
    t("memory-backend-ram", "object", false, &[("size", "int"), ("share", "bool")]),
    t("secret", "object", false, &[("format", "QCryptoSecretFormat"), ("file", "string"), ("data", "string")]),
    t("tls-creds-x509", "object", false, &[("dir", "string"), ("endpoint", "QCryptoTLSCredsEndpoint"), ("verify-peer", "bool")]),
    t("tls-creds-psk", "object", false, &[("dir", "string"), ("endpoint", "QCryptoTLSCredsEndpoint"), ("username", "string")]),
];

fn find_type(name: &str) -> Option<&'static QomType> {
    TYPES.iter().find(|t| t.name == name)
}

fn is_a(ty: &QomType, ancestor: &str) -> bool {
    let mut cur = Some(ty);
    while let Some(c) = cur {
        if c.name == ancestor {
            return true;
        }
        cur = find_type(c.parent);
    }
    false
}

fn not_found(what: &str, name: &str) -> CommandError {
    CommandError::new(ErrorClass::DeviceNotFound, format!("{what} '{name}' not found"))
}

/// Answers `name` if it is a probe command; `None` otherwise.
pub fn handle(name: &str, args: &Map<String, Value>) -> Option<Result<Value, CommandError>> {
    let a = Args::new(args);
    let r = match name {
        "query-qmp-schema" => a.finish().map(|_| schema()),
        "query-target" => a.finish().map(|_| json!({ "arch": "x86_64" })),
        "query-kvm" => a.finish().map(|_| {
            let present = std::path::Path::new("/dev/kvm").exists();
            // KVM is Godwit's only accelerator: it is enabled exactly when it is there.
            json!({ "enabled": present, "present": present })
        }),
        "query-machines" => a.finish().map(|_| machines()),
        "query-cpu-definitions" => a.finish().map(|_| {
            json!([{ "name": "host", "typename": "host-x86_64-cpu", "static": false,
                     "migration-safe": false, "deprecated": false, "unavailable-features": [] }])
        }),
        "query-cpu-model-expansion" => cpu_model_expansion(args),
        "qom-list-types" => qom_list_types(a),
        "device-list-properties" => properties(a, true),
        "qom-list-properties" => properties(a, false),
        "query-command-line-options" => command_line_options(a),
        _ => return None,
    };
    Some(r)
}

fn machines() -> Value {
    let cpu_max = CPU_MAX.load(Ordering::Relaxed);
    json!([
        { "name": "microvm", "is-default": true, "cpu-max": cpu_max, "hotpluggable-cpus": false,
          "numa-mem-supported": false, "deprecated": false, "default-cpu-type": "host-x86_64-cpu",
          "default-ram-id": "microvm.ram", "acpi": true },
        { "name": "none", "cpu-max": 1, "hotpluggable-cpus": false, "numa-mem-supported": false,
          "deprecated": false, "acpi": false }
    ])
}

fn object<'a>(map: &'a Map<String, Value>, name: &str) -> Result<Option<&'a Map<String, Value>>, CommandError> {
    match map.get(name) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(CommandError::generic(format!("Invalid parameter type for '{name}', expected: object"))),
    }
}

fn only(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), CommandError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(CommandError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

fn cpu_model_expansion(args: &Map<String, Value>) -> Result<Value, CommandError> {
    only(args, &["type", "model"])?;
    let kind = Args::new(args).str("type")?;
    let model = object(args, "model")?.ok_or_else(|| CommandError::generic("Parameter 'model' is missing"))?;
    if !matches!(kind.as_str(), "static" | "full") {
        return Err(CommandError::generic(format!("Parameter 'type' does not accept value '{kind}'")));
    }
    only(model, &["name", "props"])?;
    let name = Args::new(model).str("name")?;
    let props = object(model, "props")?.cloned().unwrap_or_default();
    if name != "host" {
        return Err(CommandError::generic(format!(
            "The CPU type '{name}' is not a recognized X86 CPU type (Godwit has only 'host')"
        )));
    }
    // The guest sees the host's CPUID as KVM reports it; the only model property is
    // `migratable`. Hyper-V enlightenments are not offered, so `hv-passthrough` expands to
    // nothing.
    let mut out = Map::new();
    for (k, v) in props {
        match (k.as_str(), &v) {
            ("migratable", Value::Bool(_)) => {
                out.insert(k.clone(), v.clone());
            }
            ("hv-passthrough", Value::Bool(_)) => {}
            (k, _) => return Err(CommandError::generic(format!("Property 'host-x86_64-cpu.{k}' not found"))),
        }
    }
    Ok(json!({ "model": { "name": "host", "props": out } }))
}

fn qom_list_types(mut a: Args<'_>) -> Result<Value, CommandError> {
    let implements = a.opt_str("implements")?;
    let with_abstract = a.opt_bool("abstract")?.unwrap_or(false);
    a.finish()?;
    Ok(Value::Array(
        TYPES
            .iter()
            .filter(|t| with_abstract || !t.is_abstract)
            .filter(|t| implements.as_deref().is_none_or(|i| is_a(t, i)))
            .map(|t| {
                let mut v = json!({ "name": t.name });
                if !t.parent.is_empty() {
                    v["parent"] = json!(t.parent);
                }
                if t.is_abstract {
                    v["abstract"] = json!(true);
                }
                v
            })
            .collect(),
    ))
}

fn properties(mut a: Args<'_>, devices_only: bool) -> Result<Value, CommandError> {
    let name = a.str("typename")?;
    a.finish()?;
    let ty = match find_type(&name) {
        Some(t) => t,
        None if devices_only => return Err(not_found("Device", &name)),
        // libvirt 9.0 crashes (a NULL list) when `qom-list-properties` answers DeviceNotFound
        // for the classes it expects every QEMU to have (memory-backend-file, ...): a class
        // Godwit lacks has no properties. It is absent from `qom-list-types`, which is where
        // libvirt learns whether the type exists.
        None => return Ok(Value::Array(Vec::new())),
    };
    if devices_only && !ty.is_device {
        return Err(CommandError::generic(format!("Parameter 'typename' expects device type, '{name}' is not one")));
    }
    Ok(Value::Array(ty.props.iter().map(|(n, ty)| json!({ "name": n, "type": ty })).collect()))
}

/// The `-option key=value` options Godwit parses, with their keys (`query-command-line-options`).
const CLI_OPTIONS: &[(&str, &[(&str, &str)])] = &[
    ("drive", &[("file", "string"), ("format", "string"), ("if", "string"), ("id", "string"), ("readonly", "boolean"),
                ("snapshot", "boolean"), ("cache", "string"), ("werror", "string"), ("rerror", "string"), ("serial", "string")]),
    ("machine", &[("type", "string"), ("accel", "string"), ("usb", "boolean"), ("dump-guest-core", "boolean"),
                  ("memory-backend", "string"), ("acpi", "string")]),
    ("smp-opts", &[("cpus", "number"), ("maxcpus", "number"), ("sockets", "number"), ("dies", "number"), ("cores", "number"), ("threads", "number")]),
    ("name", &[("guest", "string"), ("debug-threads", "boolean")]),
    ("boot-opts", &[("strict", "boolean")]),
    ("overcommit", &[("mem-lock", "boolean")]),
    ("msg", &[("timestamp", "boolean")]),
    ("rtc", &[("base", "string")]),
    ("accel", &[("accel", "string")]),
    ("chardev", &[("backend", "string"), ("id", "string"), ("path", "string"), ("fd", "string"), ("server", "boolean"), ("wait", "boolean")]),
    ("mon", &[("chardev", "string"), ("mode", "string"), ("id", "string")]),
];

fn command_line_options(mut a: Args<'_>) -> Result<Value, CommandError> {
    let option = a.opt_str("option")?;
    a.finish()?;
    let list: Vec<Value> = CLI_OPTIONS
        .iter()
        .filter(|(o, _)| option.as_deref().is_none_or(|x| x == *o))
        .map(|(o, params)| {
            json!({ "option": o, "parameters": params.iter().map(|(n, ty)| json!({ "name": n, "type": ty })).collect::<Vec<_>>() })
        })
        .collect();
    if let Some(o) = option {
        if list.is_empty() {
            return Err(CommandError::generic(format!("Invalid parameter 'option': no option '{o}'")));
        }
    }
    Ok(Value::Array(list))
}

/// An argument member: name, type, optional.
type Member = (&'static str, &'static str, bool);

/// Argument members of the commands that take arguments: (command, [(member, type, optional)]).
/// A command not listed takes none.
const COMMAND_ARGS: &[(&str, &[Member])] = &[
    ("qmp_capabilities", &[("enable", "[str]", true)]),
    ("human-monitor-command", &[("command-line", "str", false), ("cpu-index", "int", true)]),
    ("snapshot-save", &[("job-id", "str", false), ("tag", "str", false), ("vmstate", "str", false), ("devices", "[str]", false)]),
    ("snapshot-load", &[("job-id", "str", false), ("tag", "str", false), ("vmstate", "str", false), ("devices", "[str]", false)]),
    ("snapshot-delete", &[("job-id", "str", false), ("tag", "str", false), ("devices", "[str]", false)]),
    ("job-dismiss", &[("id", "str", false)]),
    ("migrate", &[("uri", "str", false), ("detach", "bool", true), ("resume", "bool", true), ("blk", "bool", true), ("inc", "bool", true)]),
    ("migrate-incoming", &[("uri", "str", false)]),
    ("migrate-set-parameters", &[("max-bandwidth", "int", true), ("downtime-limit", "int", true), ("tls-creds", "str", true), ("tls-hostname", "str", true)]),
    ("migrate-set-capabilities", &[("capabilities", "[any]", false)]),
    ("migrate-continue", &[("state", "str", false)]),
    ("migrate-recover", &[("uri", "str", false)]),
    ("announce-self", &[("initial", "int", true), ("max", "int", true), ("rounds", "int", true), ("step", "int", true), ("interfaces", "[str]", true), ("id", "str", true)]),
    ("query-cpu-model-expansion", &[("type", "str", false), ("model", "any", false)]),
    ("qom-list-types", &[("implements", "str", true), ("abstract", "bool", true)]),
    ("device-list-properties", &[("typename", "str", false)]),
    ("qom-list-properties", &[("typename", "str", false)]),
    ("query-command-line-options", &[("option", "str", true)]),
    ("qom-list", &[("path", "str", false)]),
    ("getfd", &[("fdname", "str", false)]),
    ("closefd", &[("fdname", "str", false)]),
];

/// Every command Godwit's QMP answers: the session's own, the VM commands, the block layer's
/// and the probe commands.
pub fn all_commands() -> impl Iterator<Item = &'static str> {
    crate::qmp::commands::QMP_COMMANDS
        .iter()
        .chain(crate::block::QMP_COMMANDS)
        .chain(PROBE_COMMANDS)
        .chain(crate::hostinfo::COMMANDS)
        .copied()
}

/// `query-qmp-schema`, built from the command tables: one `command` entry per command (its
/// `arg-type` an object type listing the members from [`COMMAND_ARGS`], or none), one
/// `event` entry per event Godwit emits, and the builtin types they refer to. Type names
/// are numbers, as in QEMU's introspection. Commands whose arguments are not described in
/// [`COMMAND_ARGS`] (the block layer's) get an argument type without members: the schema
/// never claims a member Godwit does not parse.
pub fn schema() -> Value {
    let mut entries = Vec::new();
    let mut types = Vec::new();
    let empty = json!({ "name": "0", "meta-type": "object", "members": [] });
    types.push(empty);
    let mut next = 1usize;
    for cmd in all_commands() {
        let arg_type = match COMMAND_ARGS.iter().find(|(c, _)| *c == cmd) {
            None => "0".to_string(),
            Some((_, members)) => {
                let id = next.to_string();
                next += 1;
                let members: Vec<Value> = members
                    .iter()
                    .map(|(n, ty, opt)| {
                        let mut m = json!({ "name": n, "type": ty });
                        if *opt {
                            m["default"] = Value::Null;
                        }
                        m
                    })
                    .collect();
                types.push(json!({ "name": id, "meta-type": "object", "members": members }));
                id
            }
        };
        let ret_type = if cmd.starts_with("query-") || cmd.starts_with("qom-") || cmd == "device-list-properties" || cmd == "human-monitor-command" {
            "any"
        } else {
            "0"
        };
        entries.push(json!({ "name": cmd, "meta-type": "command", "arg-type": arg_type, "ret-type": ret_type }));
    }
    for ev in ["STOP", "RESUME", "POWERDOWN", "SHUTDOWN", "RESET", "MIGRATION", "MIGRATION_PASS", "JOB_STATUS_CHANGE"] {
        entries.push(json!({ "name": ev, "meta-type": "event", "arg-type": "0" }));
    }
    for (name, json_type) in [("str", "string"), ("int", "int"), ("bool", "boolean"), ("any", "value")] {
        types.push(json!({ "name": name, "meta-type": "builtin", "json-type": json_type }));
    }
    for elem in ["str", "any"] {
        types.push(json!({ "name": format!("[{elem}]"), "meta-type": "array", "element-type": elem }));
    }
    entries.extend(types);
    Value::Array(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn call(name: &str, args: Value) -> Result<Value, CommandError> {
        handle(name, args.as_object().unwrap()).expect("a probe command")
    }

    #[test]
    fn unknown_devices_and_types_answer_device_not_found() {
        for ty in ["virtio-blk-pci", "vfio-pci", "qxl", "virtio-gpu-device", "virtio-balloon-device"] {
            let e = call("device-list-properties", json!({ "typename": ty })).unwrap_err();
            assert_eq!(e.class, ErrorClass::DeviceNotFound, "{ty}");
        }
        for ty in ["memory-backend-file", "memory-backend-memfd", "max-x86_64-cpu"] {
            assert_eq!(call("qom-list-properties", json!({ "typename": ty })).unwrap(), json!([]), "{ty}");
        }
        // A type Godwit has but that is no device is an ordinary error.
        let e = call("device-list-properties", json!({ "typename": "microvm-machine" })).unwrap_err();
        assert_eq!(e.class, ErrorClass::GenericError);
        assert!(call("device-list-properties", json!({})).is_err());
        assert!(call("device-list-properties", json!({ "typename": 3 })).is_err());
    }

    #[test]
    fn known_devices_list_their_properties() {
        let p = call("device-list-properties", json!({ "typename": "virtio-blk-device" })).unwrap();
        let names: Vec<&str> = p.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"drive"));
        let p = call("qom-list-properties", json!({ "typename": "none-machine" })).unwrap();
        assert!(p.as_array().unwrap().iter().all(|v| v["name"].is_string() && v["type"].is_string()));
    }

    #[test]
    fn qom_list_types_follows_the_hierarchy() {
        let all = call("qom-list-types", json!({})).unwrap();
        let names: HashSet<&str> = all.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert!(names.contains("virtio-mmio") && names.contains("microvm-machine"));
        assert!(!names.contains("device"), "abstract types only on request");
        let dev = call("qom-list-types", json!({ "implements": "virtio-device" })).unwrap();
        let names: HashSet<&str> = dev.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert_eq!(names, HashSet::from(["virtio-blk-device", "virtio-net-device"]));
        let machines = call("qom-list-types", json!({ "implements": "machine", "abstract": true })).unwrap();
        assert_eq!(machines.as_array().unwrap().len(), 4);
    }

    #[test]
    fn machines_and_cpus() {
        set_cpu_max(8);
        let m = call("query-machines", json!({})).unwrap();
        let micro = m.as_array().unwrap().iter().find(|v| v["name"] == "microvm").unwrap();
        assert_eq!(micro["cpu-max"], 8);
        assert_eq!(micro["default-ram-id"], "microvm.ram");
        let defs = call("query-cpu-definitions", json!({})).unwrap();
        assert_eq!(defs[0]["name"], "host");
        let x = call("query-cpu-model-expansion", json!({"type": "full", "model": {"name": "host", "props": {"migratable": false, "hv-passthrough": true}}})).unwrap();
        assert_eq!(x["model"]["props"], json!({ "migratable": false }));
        assert!(call("query-cpu-model-expansion", json!({"type": "static", "model": {"name": "max"}})).is_err());
        assert!(call("query-cpu-model-expansion", json!({"type": "odd", "model": {"name": "host"}})).is_err());
        assert!(call("query-cpu-model-expansion", json!({"type": "full"})).is_err());
        assert!(call("query-cpu-model-expansion", json!({"type": "full", "model": {"name": "host", "props": {"pcid": true}}})).is_err());
        assert!(call("query-target", json!({"x": 1})).is_err());
    }

    #[test]
    fn command_line_options_filter() {
        let all = call("query-command-line-options", json!({})).unwrap();
        assert!(all.as_array().unwrap().iter().all(|o| o["option"] != "sandbox"), "no seccomp sandbox");
        let one = call("query-command-line-options", json!({ "option": "machine" })).unwrap();
        assert_eq!(one.as_array().unwrap().len(), 1);
        assert!(call("query-command-line-options", json!({ "option": "spice" })).is_err());
    }

    #[test]
    fn schema_names_every_entry_and_resolves_every_type() {
        let s = schema();
        let entries = s.as_array().unwrap();
        let names: HashSet<&str> = entries.iter().map(|e| e["name"].as_str().expect("every entry named")).collect();
        assert_eq!(names.len(), entries.len(), "names are unique");
        for cmd in all_commands() {
            let e = entries.iter().find(|e| e["name"] == cmd).unwrap_or_else(|| panic!("{cmd} missing"));
            assert_eq!(e["meta-type"], "command");
            for key in ["arg-type", "ret-type"] {
                assert!(names.contains(e[key].as_str().unwrap()), "{cmd} {key}");
            }
        }
        for e in entries.iter().filter(|e| e["meta-type"] == "object") {
            for m in e["members"].as_array().unwrap() {
                assert!(names.contains(m["type"].as_str().unwrap()), "{m}");
            }
        }
        // Only what Godwit accepts: no device_add, no TPM.
        assert!(!names.contains("device_add") && !names.contains("query-tpm-models"));
        let migrate = entries.iter().find(|e| e["name"] == "migrate").unwrap();
        let args = entries.iter().find(|e| e["name"] == migrate["arg-type"]).unwrap();
        assert!(args["members"].as_array().unwrap().iter().any(|m| m["name"] == "uri" && m.get("default").is_none()));
    }

    #[test]
    fn other_names_are_not_probe_commands() {
        assert!(handle("query-tpm-models", &Map::new()).is_none());
        assert!(handle("query-status", &Map::new()).is_none());
    }
}
