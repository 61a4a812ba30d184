//! The QMP front end: a per-connection [`QmpSession`] implementing QEMU's protocol rules —
//! greeting, capabilities negotiation (commands before it answer `CommandNotFound`), the
//! request envelope checks (`execute`, `arguments`, `id` echoed), dispatch to the shared
//! [`Monitor`], and error replies `{"error": {"class": .., "desc": ..}}`. Transports feed it
//! [`JsonItem`]s from a [`JsonStreamer`] and subscribe the client to events once
//! [`QmpSession::is_negotiated`] turns true.

pub mod commands;
pub mod stream;

pub use stream::{JsonItem, JsonStreamer};

use crate::error::{CommandError, ErrorClass};
use crate::hmp::HmpSession;
use crate::monitor::Monitor;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Capabilities the greeting advertises. Out-of-band execution is not offered (no Godwit
/// command needs it), so `qemu.qmp` negotiates without `oob`.
pub const CAPABILITIES: &[&str] = &[];

/// One QMP conversation.
pub struct QmpSession {
    monitor: Arc<Monitor>,
    negotiated: bool,
}

fn error_reply(e: &CommandError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert(
        "error".into(),
        json!({ "class": e.class.as_str(), "desc": e.desc }),
    );
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

fn return_reply(v: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), v);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

impl QmpSession {
    pub fn new(monitor: Arc<Monitor>) -> Self {
        QmpSession {
            monitor,
            negotiated: false,
        }
    }

    /// `{"QMP": {"version": {"qemu": {...}, "package": "godwit X"}, "capabilities": []}}`
    pub fn greeting(&self) -> Value {
        json!({ "QMP": { "version": self.monitor.backend().version(), "capabilities": CAPABILITIES } })
    }

    /// True once `qmp_capabilities` succeeded: the client is in command mode and gets events.
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one item of the input stream and returns the reply to send.
    pub fn handle(&mut self, item: JsonItem) -> Value {
        match item {
            JsonItem::Error(desc) => error_reply(&CommandError::generic(desc), None),
            JsonItem::Value(v) => self.handle_value(v),
        }
    }

    fn handle_value(&mut self, v: Value) -> Value {
        let Value::Object(obj) = v else {
            return error_reply(
                &CommandError::generic("QMP input must be a JSON object"),
                None,
            );
        };
        let id = obj.get("id").cloned();
        match self.dispatch(&obj) {
            Ok(ret) => return_reply(ret, id),
            Err(e) => error_reply(&e, id),
        }
    }

    fn dispatch(&mut self, obj: &Map<String, Value>) -> Result<Value, CommandError> {
        if let Some(k) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "exec-oob" | "arguments" | "id"))
        {
            return Err(CommandError::generic(format!(
                "QMP input member '{k}' is unexpected"
            )));
        }
        let (name, oob) = match (obj.get("execute"), obj.get("exec-oob")) {
            (Some(_), Some(_)) => {
                return Err(CommandError::generic(
                    "QMP input must not contain both 'execute' and 'exec-oob'",
                ))
            }
            (None, None) => return Err(CommandError::generic("QMP input lacks member 'execute'")),
            (Some(Value::String(s)), None) => (s.as_str(), false),
            (None, Some(Value::String(s))) => (s.as_str(), true),
            (Some(_), None) => {
                return Err(CommandError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            (None, Some(_)) => {
                return Err(CommandError::generic(
                    "QMP input member 'exec-oob' must be a string",
                ))
            }
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(a)) => a,
            Some(_) => {
                return Err(CommandError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
        };
        if !self.negotiated && name != "qmp_capabilities" {
            return Err(CommandError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        if oob {
            return Err(CommandError::generic(format!(
                "The command {name} does not support OOB"
            )));
        }
        match name {
            "qmp_capabilities" => self.qmp_capabilities(args),
            "query-commands" => {
                commands::Args::new(args).finish()?;
                Ok(Value::Array(crate::probe::all_commands().map(|c| json!({ "name": c })).collect()))
            }
            "human-monitor-command" => self.human_monitor_command(args),
            _ if crate::hostinfo::COMMANDS.contains(&name) => crate::hostinfo::handle(name, args)
                .unwrap_or_else(|| Err(CommandError::command_not_found(name))),
            _ if crate::probe::PROBE_COMMANDS.contains(&name) => crate::probe::handle(name, args)
                .unwrap_or_else(|| Err(CommandError::command_not_found(name))),
            _ => match commands::parse_vm_command(name, args)? {
                Some(cmd) => self.monitor.execute(cmd).map(|r| r.to_json()),
                None => Err(CommandError::command_not_found(name)),
            },
        }
    }

    fn qmp_capabilities(&mut self, args: &Map<String, Value>) -> Result<Value, CommandError> {
        if self.negotiated {
            return Err(CommandError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        let mut a = commands::Args::new(args);
        let enable = a.opt_str_list("enable")?.unwrap_or_default();
        a.finish()?;
        for cap in &enable {
            if !CAPABILITIES.contains(&cap.as_str()) {
                return Err(CommandError::generic(format!(
                    "Capability '{cap}' not available"
                )));
            }
        }
        self.negotiated = true;
        Ok(json!({}))
    }

    fn human_monitor_command(&mut self, args: &Map<String, Value>) -> Result<Value, CommandError> {
        let mut a = commands::Args::new(args);
        let line = a.str("command-line")?;
        let cpu = a.opt_u64("cpu-index")?;
        a.finish()?;
        let mut hmp = HmpSession::new(self.monitor.clone(), false);
        if let Some(cpu) = cpu {
            let cpu = u32::try_from(cpu).map_err(|_| CommandError::generic("Invalid CPU index"))?;
            hmp.set_cpu(cpu);
        }
        let mut out = Vec::new();
        hmp.execute_line(&line, &mut out)
            .map_err(|e| CommandError::generic(format!("human-monitor-command failed: {e}")))?;
        Ok(Value::String(String::from_utf8_lossy(&out).into_owned()))
    }
}
