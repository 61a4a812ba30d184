//! Facts about the process the VMM registers at start-up and QMP reports as they are:
//! the character devices (`query-chardev`: a serial pty's path, the monitor sockets) and the
//! user-named devices under `/machine/peripheral` (`qom-list`, as libvirt reads device
//! aliases). One VM per process, so the registry is process-wide.

use crate::error::{CommandError, ErrorClass};
use crate::qmp::commands::Args;
use serde_json::{json, Map, Value};
use std::sync::Mutex;

/// The commands this module answers.
pub const COMMANDS: &[&str] = &["query-chardev", "qom-list"];

static CHARDEVS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static PERIPHERALS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// Records a chardev: its label (`-chardev id=`) and QEMU-style filename (`pty:/dev/pts/3`,
/// `unix:/path,server=on`). A label registered again replaces the earlier entry.
pub fn register_chardev(label: &str, filename: &str) {
    let mut c = CHARDEVS.lock().unwrap_or_else(|p| p.into_inner());
    c.retain(|(l, _)| l != label);
    c.push((label.to_string(), filename.to_string()));
}

/// Records a device with a user-given id (`-device ...,id=ID`) and its QOM type.
pub fn register_peripheral(id: &str, type_name: &str) {
    let mut p = PERIPHERALS.lock().unwrap_or_else(|p| p.into_inner());
    p.retain(|(i, _)| i != id);
    p.push((id.to_string(), type_name.to_string()));
}

/// Answers `name` if it is one of [`COMMANDS`].
pub fn handle(name: &str, args: &Map<String, Value>) -> Option<Result<Value, CommandError>> {
    let mut a = Args::new(args);
    Some(match name {
        "query-chardev" => a.finish().map(|_| {
            let c = CHARDEVS.lock().unwrap_or_else(|p| p.into_inner());
            Value::Array(c.iter().map(|(l, f)| json!({ "label": l, "filename": f, "frontend-open": true })).collect())
        }),
        "qom-list" => a.str("path").and_then(|p| a.finish().map(|_| p)).and_then(|path| qom_list(&path)),
        _ => return None,
    })
}

fn qom_list(path: &str) -> Result<Value, CommandError> {
    let path = path.trim_end_matches('/');
    let p = PERIPHERALS.lock().unwrap_or_else(|p| p.into_inner());
    if path == "/machine/peripheral" {
        return Ok(Value::Array(
            std::iter::once(json!({ "name": "type", "type": "string" }))
                .chain(p.iter().map(|(id, t)| json!({ "name": id, "type": format!("child<{t}>") })))
                .collect(),
        ));
    }
    if let Some(id) = path.strip_prefix("/machine/peripheral/") {
        if p.iter().any(|(i, _)| i == id) {
            return Ok(json!([{ "name": "type", "type": "string" }, { "name": "realized", "type": "bool" }]));
        }
    }
    Err(CommandError::new(ErrorClass::DeviceNotFound, format!("Device '{path}' not found")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, args: Value) -> Result<Value, CommandError> {
        handle(name, args.as_object().unwrap()).unwrap()
    }

    #[test]
    fn chardevs_and_peripherals_are_reported_as_registered() {
        register_chardev("charserial0", "pty:/dev/pts/7");
        register_chardev("charserial0", "pty:/dev/pts/8");
        let c = call("query-chardev", json!({})).unwrap();
        let serial: Vec<&Value> = c.as_array().unwrap().iter().filter(|v| v["label"] == "charserial0").collect();
        assert_eq!(serial.len(), 1);
        assert_eq!(serial[0]["filename"], "pty:/dev/pts/8");
        register_peripheral("virtio-disk0", "virtio-blk-device");
        let l = call("qom-list", json!({ "path": "/machine/peripheral" })).unwrap();
        assert!(l.as_array().unwrap().iter().any(|v| v["name"] == "virtio-disk0" && v["type"] == "child<virtio-blk-device>"));
        assert!(call("qom-list", json!({ "path": "/machine/peripheral/virtio-disk0" })).is_ok());
        assert_eq!(call("qom-list", json!({ "path": "/machine/nope" })).unwrap_err().class, ErrorClass::DeviceNotFound);
        assert!(call("qom-list", json!({})).is_err());
        assert!(call("query-chardev", json!({ "x": 1 })).is_err());
        assert!(handle("query-status", &Map::new()).is_none());
    }
}
