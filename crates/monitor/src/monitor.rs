//! [`Monitor`]: the one command layer both front ends share. It owns the backend handle, the
//! event bus and the job registry, and turns a [`Command`] into backend calls and a [`Reply`].

use crate::backend::Backend;
use crate::command::{Command, Reply, SnapshotOp, SnapshotRequest, MAX_MEMORY_DUMP};
use crate::error::CommandError;
use crate::events::EventBus;
use crate::jobs::JobRegistry;
use crate::types::{JobType, ShutdownCause, StatusInfo};
use crate::util::local_time;
use std::sync::Arc;

/// The command layer. Create one per VM with [`Monitor::new`] and hand clones of the `Arc` to
/// every server / front end.
pub struct Monitor {
    backend: Arc<dyn Backend>,
    events: EventBus,
    jobs: JobRegistry,
}

impl Monitor {
    /// `events` is the bus the VMM emits on; QMP clients subscribe to it.
    pub fn new(backend: Arc<dyn Backend>, events: EventBus) -> Arc<Monitor> {
        Arc::new(Monitor {
            backend,
            jobs: JobRegistry::new(events.clone()),
            events,
        })
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Runs one command against the VM.
    pub fn execute(&self, cmd: Command) -> Result<Reply, CommandError> {
        let b = &self.backend;
        let empty = |r: Result<(), CommandError>| r.map(|()| Reply::Empty);
        match cmd {
            Command::QueryStatus => Ok(Reply::Status(StatusInfo::from(b.run_state()))),
            Command::QueryVersion => Ok(Reply::Version(b.version())),
            Command::QueryCpus => b.query_cpus().map(Reply::Cpus),
            Command::Stop => empty(b.stop()),
            Command::Cont => empty(b.cont()),
            Command::SystemReset => empty(b.system_reset()),
            Command::SystemPowerdown => empty(b.system_powerdown()),
            Command::Quit => empty(b.quit(ShutdownCause::HostQmpQuit)),
            Command::ReadMemory { space, addr, len } => {
                if len > MAX_MEMORY_DUMP {
                    return Err(CommandError::generic(format!(
                        "cannot dump more than {MAX_MEMORY_DUMP} bytes at once"
                    )));
                }
                let mut buf = vec![0u8; len as usize];
                b.read_memory(space, addr, &mut buf)?;
                Ok(Reply::Memory(buf))
            }
            Command::SnapshotSave(req) => empty(b.snapshot_save(&with_auto_tag(req))),
            Command::SnapshotLoad(req) => {
                check_tag(&req)?;
                empty(b.snapshot_load(&req))
            }
            Command::SnapshotDelete(req) => {
                check_tag(&req)?;
                empty(b.snapshot_delete(&req))
            }
            Command::QuerySnapshots => b.query_snapshots().map(Reply::Snapshots),
            Command::SnapshotJob {
                job_id,
                op,
                request,
            } => {
                let job_type = match op {
                    SnapshotOp::Save => JobType::SnapshotSave,
                    SnapshotOp::Load => JobType::SnapshotLoad,
                    SnapshotOp::Delete => JobType::SnapshotDelete,
                };
                check_tag(&request)?;
                let backend = b.clone();
                self.jobs
                    .start(&job_id, job_type, move || match op {
                        SnapshotOp::Save => backend.snapshot_save(&request),
                        SnapshotOp::Load => backend.snapshot_load(&request),
                        SnapshotOp::Delete => backend.snapshot_delete(&request),
                    })
                    .map(|()| Reply::Empty)
            }
            Command::QueryJobs => Ok(Reply::Jobs(self.jobs.list())),
            Command::JobDismiss { id } => empty(self.jobs.dismiss(&id)),
            Command::Migrate(args) => {
                if args.uri.is_empty() {
                    return Err(CommandError::generic("Parameter 'uri' is missing"));
                }
                empty(b.migrate(&args))
            }
            Command::MigrateCancel => empty(b.migrate_cancel()),
            Command::MigrateIncoming { uri } => empty(b.migrate_incoming(&uri)),
            Command::QueryMigrate => b.query_migrate().map(Reply::Migration),
            Command::MigrateSetParameters(p) => empty(b.migrate_set_parameters(&p)),
            Command::QueryMigrateParameters => {
                b.query_migrate_parameters().map(Reply::MigrationParameters)
            }
            Command::MigrateSetCapabilities(caps) => empty(b.migrate_set_capabilities(&caps)),
            Command::QueryMigrateCapabilities => b
                .query_migrate_capabilities()
                .map(Reply::MigrationCapabilities),
            Command::MigrateStartPostcopy => empty(b.migrate_start_postcopy()),
            Command::MigrateContinue { state } => empty(b.migrate_continue(&state)),
            Command::MigrateRecover { uri } => empty(b.migrate_recover(&uri)),
            Command::QueryMigrateForecast => b.query_migrate_forecast().map(Reply::Forecast),
            Command::AnnounceSelf(a) => empty(b.announce_self(&a)),
            Command::QueryNetwork => b.query_network().map(Reply::Network),
            Command::Block(c) => self.block(c),
        }
    }
}

impl Monitor {
    /// A block command: mirror jobs and their verbs through the job registry, the rest to the
    /// backend; HMP text rendered from the QMP answer.
    fn block(&self, c: crate::block::BlockCommand) -> Result<Reply, CommandError> {
        use crate::block::BlockCommand as B;
        let json = match &c {
            B::Mirror(args) => {
                let id = args.id();
                let driver = self.backend.start_mirror(args)?;
                self.jobs.start_block(&id, JobType::Mirror, driver, args.auto_finalize, args.auto_dismiss)?;
                serde_json::json!({})
            }
            B::QueryBlockJobs => serde_json::Value::Array(self.jobs.block_jobs()),
            B::BlockJobCancel { device, force } => self.jobs.block_cancel(device, *force).map(|()| serde_json::json!({}))?,
            B::BlockJobComplete { device } => self.jobs.block_complete(device).map(|()| serde_json::json!({}))?,
            B::BlockJobSetSpeed { device, speed } => self.jobs.block_set_speed(device, *speed).map(|()| serde_json::json!({}))?,
            other => self.backend.block(other)?,
        };
        let text = crate::block::render_hmp(&c, &json);
        Ok(Reply::Block { json, text })
    }
}

fn check_tag(req: &SnapshotRequest) -> Result<(), CommandError> {
    if req.tag.is_empty() {
        Err(CommandError::generic("Parameter 'tag' is missing"))
    } else {
        Ok(())
    }
}

/// `savevm` without a name: QEMU's `vm-YYYYMMDDHHMMSS` in local time.
fn with_auto_tag(mut req: SnapshotRequest) -> SnapshotRequest {
    if req.tag.is_empty() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let t = local_time(now);
        req.tag = format!(
            "vm-{:04}{:02}{:02}{:02}{:02}{:02}",
            t.year, t.month, t.day, t.hour, t.minute, t.second
        );
    }
    req
}
