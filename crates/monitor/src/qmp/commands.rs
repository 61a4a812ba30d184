//! QMP command names and argument checking: turns `execute` + `arguments` into a typed
//! [`Command`], with QEMU's error wording for missing, mistyped and unexpected members.

use crate::command::{Command, MigrateArgs, SnapshotOp, SnapshotRequest};
use crate::error::CommandError;
use crate::migration::{CapabilityStatus, MigrationParameters};
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Every command the QMP front end knows, in `query-commands` order.
pub const QMP_COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-status",
    "query-version",
    "query-cpus-fast",
    "stop",
    "cont",
    "system_reset",
    "system_powerdown",
    "quit",
    "human-monitor-command",
    "snapshot-save",
    "snapshot-load",
    "snapshot-delete",
    "query-jobs",
    "job-dismiss",
    "migrate",
    "migrate_cancel",
    "migrate-incoming",
    "query-migrate",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-start-postcopy",
    "migrate-continue",
    "migrate-recover",
    "query-migrate-forecast",
    "announce-self",
];

/// Typed access to an `arguments` object that remembers which members were used.
pub struct Args<'a> {
    map: &'a Map<String, Value>,
    used: Vec<&'static str>,
}

fn type_error(name: &str, expected: &str) -> CommandError {
    CommandError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn missing(name: &str) -> CommandError {
    CommandError::generic(format!("Parameter '{name}' is missing"))
}

impl<'a> Args<'a> {
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Args {
            map,
            used: Vec::new(),
        }
    }

    fn get(&mut self, name: &'static str) -> Option<&'a Value> {
        self.used.push(name);
        self.map.get(name)
    }

    pub fn opt_str(&mut self, name: &'static str) -> Result<Option<String>, CommandError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(type_error(name, "string")),
        }
    }

    pub fn str(&mut self, name: &'static str) -> Result<String, CommandError> {
        self.opt_str(name)?.ok_or_else(|| missing(name))
    }

    pub fn opt_bool(&mut self, name: &'static str) -> Result<Option<bool>, CommandError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(type_error(name, "boolean")),
        }
    }

    pub fn opt_u64(&mut self, name: &'static str) -> Result<Option<u64>, CommandError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| type_error(name, "integer")),
        }
    }

    pub fn str_list(&mut self, name: &'static str) -> Result<Vec<String>, CommandError> {
        self.opt_str_list(name)?.ok_or_else(|| missing(name))
    }

    pub fn opt_str_list(
        &mut self,
        name: &'static str,
    ) -> Result<Option<Vec<String>>, CommandError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(String::from)
                        .ok_or_else(|| type_error(name, "array of strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(type_error(name, "array")),
        }
    }

    pub fn array(&mut self, name: &'static str) -> Result<&'a Vec<Value>, CommandError> {
        match self.get(name) {
            None => Err(missing(name)),
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(type_error(name, "array")),
        }
    }

    /// Fails on any member that was not asked for.
    pub fn finish(self) -> Result<(), CommandError> {
        match self.map.keys().find(|k| !self.used.contains(&k.as_str())) {
            Some(k) => Err(CommandError::generic(format!(
                "Parameter '{k}' is unexpected"
            ))),
            None => Ok(()),
        }
    }
}

fn snapshot_request(a: &mut Args<'_>, with_vmstate: bool) -> Result<SnapshotRequest, CommandError> {
    let tag = a.str("tag")?;
    let vmstate = if with_vmstate {
        Some(a.str("vmstate")?)
    } else {
        None
    };
    let devices = Some(a.str_list("devices")?);
    Ok(SnapshotRequest {
        tag,
        vmstate,
        devices,
    })
}

/// Parses a VM command (everything but `qmp_capabilities`, `query-commands` and
/// `human-monitor-command`, which the session handles). `Ok(None)`: unknown command.
pub fn parse_vm_command(
    name: &str,
    args: &Map<String, Value>,
) -> Result<Option<Command>, CommandError> {
    let mut a = Args::new(args);
    let cmd = match name {
        "query-status" => Command::QueryStatus,
        "query-version" => Command::QueryVersion,
        "query-cpus-fast" => Command::QueryCpus,
        "stop" => Command::Stop,
        "cont" => Command::Cont,
        "system_reset" => Command::SystemReset,
        "system_powerdown" => Command::SystemPowerdown,
        "quit" => Command::Quit,
        "snapshot-save" | "snapshot-load" | "snapshot-delete" => {
            let job_id = a.str("job-id")?;
            let op = match name {
                "snapshot-save" => SnapshotOp::Save,
                "snapshot-load" => SnapshotOp::Load,
                _ => SnapshotOp::Delete,
            };
            let request = snapshot_request(&mut a, op != SnapshotOp::Delete)?;
            Command::SnapshotJob {
                job_id,
                op,
                request,
            }
        }
        "query-jobs" => Command::QueryJobs,
        "job-dismiss" => Command::JobDismiss { id: a.str("id")? },
        "migrate" => {
            let uri = a.str("uri")?;
            let blk = a.opt_bool("blk")?.unwrap_or(false);
            let inc = a.opt_bool("inc")?.unwrap_or(false);
            let detach = a.opt_bool("detach")?.unwrap_or(true);
            let resume = a.opt_bool("resume")?.unwrap_or(false);
            let report_file = a.opt_str("x-report-file")?.map(PathBuf::from);
            if blk || inc {
                a.finish()?;
                return Err(CommandError::generic(
                    "Block migration is not supported; Godwit migrates with shared storage",
                ));
            }
            Command::Migrate(MigrateArgs {
                uri,
                detach,
                resume,
                report_file,
            })
        }
        "migrate_cancel" => Command::MigrateCancel,
        "migrate-incoming" => Command::MigrateIncoming { uri: a.str("uri")? },
        "query-migrate" => Command::QueryMigrate,
        "migrate-set-parameters" => {
            let p = MigrationParameters::from_qmp(args).map_err(CommandError::generic)?;
            return Ok(Some(Command::MigrateSetParameters(p)));
        }
        "query-migrate-parameters" => Command::QueryMigrateParameters,
        "migrate-set-capabilities" => {
            let mut caps = Vec::new();
            for item in a.array("capabilities")? {
                let obj = item
                    .as_object()
                    .ok_or_else(|| type_error("capabilities", "array of objects"))?;
                let mut ca = Args::new(obj);
                let cap_name = ca.str("capability")?;
                let state = ca.opt_bool("state")?.ok_or_else(|| missing("state"))?;
                ca.finish()?;
                let capability = cap_name.parse().map_err(|_| {
                    CommandError::generic(format!(
                        "Parameter 'capability' does not accept value '{cap_name}'"
                    ))
                })?;
                caps.push(CapabilityStatus { capability, state });
            }
            Command::MigrateSetCapabilities(caps)
        }
        "query-migrate-capabilities" => Command::QueryMigrateCapabilities,
        "migrate-start-postcopy" => Command::MigrateStartPostcopy,
        "migrate-continue" => Command::MigrateContinue { state: a.str("state")? },
        "migrate-recover" => Command::MigrateRecover { uri: a.str("uri")? },
        "query-migrate-forecast" => Command::QueryMigrateForecast,
        "announce-self" => {
            let args = crate::command::AnnounceArgs {
                initial: a.opt_u64("initial")?,
                max: a.opt_u64("max")?,
                rounds: a.opt_u64("rounds")?,
                step: a.opt_u64("step")?,
            };
            let _ = a.opt_str_list("interfaces")?;
            let _ = a.opt_str("id")?;
            Command::AnnounceSelf(args)
        }
        _ => return crate::block::parse_qmp(name, args).map(|c| c.map(Command::Block)),
    };
    a.finish()?;
    Ok(Some(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(name: &str, args: Value) -> Result<Option<Command>, CommandError> {
        parse_vm_command(name, args.as_object().unwrap())
    }

    #[test]
    fn announce_self_takes_optional_parameters() {
        use crate::command::AnnounceArgs;
        assert_eq!(parse("announce-self", json!({})), Ok(Some(Command::AnnounceSelf(AnnounceArgs::default()))));
        assert_eq!(
            parse("announce-self", json!({"initial": 50, "max": 550, "rounds": 5, "step": 100, "interfaces": ["n0"], "id": "a"})),
            Ok(Some(Command::AnnounceSelf(AnnounceArgs { initial: Some(50), max: Some(550), rounds: Some(5), step: Some(100) })))
        );
        assert!(parse("announce-self", json!({"rounds": "x"})).is_err());
        assert!(parse("announce-self", json!({"bogus": 1})).is_err());
    }

    #[test]
    fn arguments_are_checked_like_qemu() {
        assert_eq!(parse("stop", json!({})), Ok(Some(Command::Stop)));
        assert_eq!(
            parse("stop", json!({"now": true})).unwrap_err().desc,
            "Parameter 'now' is unexpected"
        );
        assert_eq!(
            parse("migrate", json!({})).unwrap_err().desc,
            "Parameter 'uri' is missing"
        );
        assert_eq!(
            parse("migrate", json!({"uri": 5})).unwrap_err().desc,
            "Invalid parameter type for 'uri', expected: string"
        );
        assert_eq!(parse("frobnicate", json!({})), Ok(None));
        assert!(matches!(
            parse(
                "snapshot-save",
                json!({"job-id": "j", "tag": "t", "vmstate": "d", "devices": ["d"]})
            ),
            Ok(Some(Command::SnapshotJob {
                op: SnapshotOp::Save,
                ..
            }))
        ));
        assert!(parse(
            "snapshot-save",
            json!({"job-id": "j", "tag": "t", "vmstate": "d", "devices": [1]})
        )
        .is_err());
        assert!(matches!(
            parse("migrate-set-capabilities", json!({"capabilities": [{"capability": "auto-converge", "state": true}]})),
            Ok(Some(Command::MigrateSetCapabilities(c))) if c.len() == 1 && c[0].state
        ));
        assert!(parse(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "warp", "state": true}]})
        )
        .is_err());
    }
}
