//! QMP jobs: `snapshot-save`/`-load`/`-delete` answer at once and run on a thread of their own;
//! their progress is visible through `query-jobs` and `JOB_STATUS_CHANGE` events, and a
//! concluded job stays listed until `job-dismiss` (QEMU's manual-dismiss jobs). The VMM only
//! implements the synchronous operation; this registry does the job bookkeeping.
//!
//! Block jobs (the mirror) use the same registry through [`JobRegistry::start_block`]: the
//! VMM supplies a [`BlockJobDriver`], and the registry walks QEMU's statuses (`created →
//! running → ready → waiting → pending → concluded → null`), emits `JOB_STATUS_CHANGE` and the
//! `BLOCK_JOB_READY`/`_COMPLETED`/`_CANCELLED`/`_ERROR` events, and serves the verbs
//! (`block-job-cancel`, `-complete`, `-set-speed`, `query-block-jobs`).

use crate::error::CommandError;
use crate::events::{Event, EventBus};
use crate::types::{JobInfo, JobStatus, JobType};
use std::sync::{Arc, Mutex};

/// Most jobs kept at once (running or concluded but not dismissed).
pub const MAX_JOBS: usize = 64;

/// The registry of jobs, shared by every monitor client.
pub struct JobRegistry {
    jobs: Arc<Mutex<Vec<JobInfo>>>,
    events: EventBus,
    block: Arc<Mutex<Vec<BlockEntry>>>,
}

/// The engine of a block job (the VMM's mirror).
pub trait BlockJobDriver: Send + Sync {
    /// Runs the job to its end on the calling thread; calls `on_ready` once, when ready.
    fn run(&self, on_ready: &mut dyn FnMut()) -> BlockJobEnd;
    /// `block-job-cancel` (`force`: abandon a ready job instead of completing it).
    fn cancel(&self, force: bool);
    /// `block-job-complete` (only called on a ready job).
    fn complete(&self) -> Result<(), CommandError>;
    /// `block-job-set-speed`, bytes per second (0 = unlimited).
    fn set_speed(&self, bps: u64);
    fn progress(&self) -> BlockJobProgress;
}

/// How a block job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockJobEnd {
    /// Done (a ready mirror cancelled: target consistent; or completed).
    Completed,
    /// Cancelled before it was ready, or force-cancelled.
    Cancelled,
    Failed(String),
}

/// `query-block-jobs` progress of a block job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockJobProgress {
    pub offset: u64,
    pub len: u64,
    pub speed: u64,
    pub ready: bool,
    pub busy: bool,
}

struct BlockEntry {
    id: String,
    driver: Arc<dyn BlockJobDriver>,
    auto_finalize: bool,
    auto_dismiss: bool,
}

/// QEMU's rule for IDs: a letter, then letters, digits, `-`, `.`, `_`.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        && id.len() <= 128
}

impl JobRegistry {
    pub fn new(events: EventBus) -> Self {
        JobRegistry {
            jobs: Arc::new(Mutex::new(Vec::new())),
            events,
            block: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Registers job `id` and runs `work` on a new thread. The job goes through QEMU's statuses
    /// `created → running → waiting → pending → concluded` (or `running → aborting → concluded`
    /// with `error` set), emitting `JOB_STATUS_CHANGE` for each.
    pub fn start(
        &self,
        id: &str,
        job_type: JobType,
        work: impl FnOnce() -> Result<(), CommandError> + Send + 'static,
    ) -> Result<(), CommandError> {
        if !id_wellformed(id) {
            return Err(CommandError::generic(format!("Invalid job ID '{id}'")));
        }
        {
            let mut jobs = lock(&self.jobs);
            if jobs.iter().any(|j| j.id == id) {
                return Err(CommandError::generic(format!(
                    "Job ID '{id}' already in use"
                )));
            }
            if jobs.len() >= MAX_JOBS {
                return Err(CommandError::generic(
                    "Too many jobs; dismiss concluded ones with job-dismiss",
                ));
            }
            jobs.push(JobInfo {
                id: id.to_string(),
                job_type,
                status: JobStatus::Created,
                current_progress: 0,
                total_progress: 1,
                error: None,
            });
        }
        self.set_status(id, JobStatus::Created, None);
        let reg = self.clone_handle();
        let id_owned = id.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                reg.set_status(&id_owned, JobStatus::Running, None);
                match work() {
                    Ok(()) => {
                        reg.set_status(&id_owned, JobStatus::Waiting, None);
                        reg.set_status(&id_owned, JobStatus::Pending, None);
                        reg.finish(&id_owned, None);
                    }
                    Err(e) => {
                        reg.set_status(&id_owned, JobStatus::Aborting, None);
                        reg.finish(&id_owned, Some(e.desc));
                    }
                }
            });
        if let Err(e) = spawned {
            self.finish(id, Some(format!("cannot start job thread: {e}")));
        }
        Ok(())
    }

    fn clone_handle(&self) -> JobRegistry {
        JobRegistry { jobs: self.jobs.clone(), events: self.events.clone(), block: self.block.clone() }
    }

    /// Registers block job `id` and runs `driver` on a new thread (see the module doc).
    pub fn start_block(
        &self,
        id: &str,
        job_type: JobType,
        driver: Arc<dyn BlockJobDriver>,
        auto_finalize: bool,
        auto_dismiss: bool,
    ) -> Result<(), CommandError> {
        if !id_wellformed(id) {
            return Err(CommandError::generic(format!("Invalid job ID '{id}'")));
        }
        {
            let mut jobs = lock(&self.jobs);
            if jobs.iter().any(|j| j.id == id) {
                return Err(CommandError::generic(format!("Job ID '{id}' already in use")));
            }
            if jobs.len() >= MAX_JOBS {
                return Err(CommandError::generic("Too many jobs; dismiss concluded ones with job-dismiss"));
            }
            jobs.push(JobInfo {
                id: id.to_string(),
                job_type,
                status: JobStatus::Created,
                current_progress: 0,
                total_progress: 0,
                error: None,
            });
            lock(&self.block).push(BlockEntry { id: id.to_string(), driver: driver.clone(), auto_finalize, auto_dismiss });
        }
        self.set_status(id, JobStatus::Created, None);
        let reg = self.clone_handle();
        let id_owned = id.to_string();
        let spawned = std::thread::Builder::new().name(format!("job-{id}")).spawn(move || {
            let id = id_owned.as_str();
            reg.set_status(id, JobStatus::Running, None);
            let end = driver.run(&mut || {
                reg.set_status(id, JobStatus::Ready, None);
                reg.block_event("BLOCK_JOB_READY", id, &driver.progress(), None);
            });
            let p = driver.progress();
            match end {
                BlockJobEnd::Completed => {
                    reg.set_status(id, JobStatus::Waiting, None);
                    reg.set_status(id, JobStatus::Pending, None);
                    reg.block_event("BLOCK_JOB_COMPLETED", id, &p, None);
                    reg.finish(id, None);
                }
                BlockJobEnd::Cancelled => {
                    reg.set_status(id, JobStatus::Aborting, None);
                    reg.block_event("BLOCK_JOB_CANCELLED", id, &p, None);
                    reg.finish(id, None);
                }
                BlockJobEnd::Failed(e) => {
                    reg.events.emit(Event::Other {
                        name: "BLOCK_JOB_ERROR".into(),
                        data: Some(serde_json::json!({"device": id, "operation": "write", "action": "report"})),
                    });
                    reg.set_status(id, JobStatus::Aborting, None);
                    reg.block_event("BLOCK_JOB_COMPLETED", id, &p, Some(&e));
                    reg.finish(id, Some(e));
                }
            }
            if auto_dismiss {
                let _ = reg.dismiss(id);
            }
        });
        if let Err(e) = spawned {
            self.finish(id, Some(format!("cannot start job thread: {e}")));
        }
        Ok(())
    }

    fn block_event(&self, name: &str, id: &str, p: &BlockJobProgress, error: Option<&str>) {
        let mut data = serde_json::json!({"type": "mirror", "device": id, "len": p.len, "offset": p.offset, "speed": p.speed});
        if let Some(e) = error {
            data["error"] = serde_json::json!(e);
        }
        self.events.emit(Event::Other { name: name.into(), data: Some(data) });
    }

    fn block_job(&self, id: &str, verb: &str, allowed: &[JobStatus]) -> Result<Arc<dyn BlockJobDriver>, CommandError> {
        let driver = lock(&self.block).iter().find(|b| b.id == id).map(|b| b.driver.clone());
        let status = lock(&self.jobs).iter().find(|j| j.id == id).map(|j| j.status);
        match (driver, status) {
            (Some(d), Some(s)) if allowed.contains(&s) => Ok(d),
            (Some(_), Some(s)) => Err(CommandError::generic(format!(
                "Job '{id}' in state '{}' cannot accept command verb '{verb}'",
                s.as_str()
            ))),
            _ => Err(CommandError::new(
                crate::error::ErrorClass::DeviceNotActive,
                format!("Block job '{id}' not found"),
            )),
        }
    }

    /// `block-job-cancel`.
    pub fn block_cancel(&self, id: &str, force: bool) -> Result<(), CommandError> {
        use JobStatus::*;
        self.block_job(id, "cancel", &[Created, Running, Ready, Paused, Standby])?.cancel(force);
        Ok(())
    }

    /// `block-job-complete`.
    pub fn block_complete(&self, id: &str) -> Result<(), CommandError> {
        self.block_job(id, "complete", &[JobStatus::Ready])?.complete()
    }

    /// `block-job-set-speed`.
    pub fn block_set_speed(&self, id: &str, speed: u64) -> Result<(), CommandError> {
        use JobStatus::*;
        self.block_job(id, "set-speed", &[Created, Running, Ready, Paused, Standby])?.set_speed(speed);
        Ok(())
    }

    /// `query-block-jobs`: the block jobs not dismissed yet.
    pub fn block_jobs(&self) -> Vec<serde_json::Value> {
        let jobs = lock(&self.jobs).clone();
        lock(&self.block)
            .iter()
            .filter_map(|b| {
                let j = jobs.iter().find(|j| j.id == b.id)?;
                let p = b.driver.progress();
                Some(crate::block::block_job_info(&b.id, j.status.as_str(), &p, b.auto_finalize, b.auto_dismiss, j.error.as_deref()))
            })
            .collect()
    }

    fn set_status(&self, id: &str, status: JobStatus, error: Option<String>) {
        {
            let mut jobs = lock(&self.jobs);
            if let Some(j) = jobs.iter_mut().find(|j| j.id == id) {
                j.status = status;
                if error.is_some() {
                    j.error = error;
                }
            }
        }
        self.events.emit(Event::JobStatusChange {
            id: id.to_string(),
            status,
        });
    }

    fn finish(&self, id: &str, error: Option<String>) {
        if let Some(j) = lock(&self.jobs).iter_mut().find(|j| j.id == id) {
            j.current_progress = j.total_progress;
        }
        self.set_status(id, JobStatus::Concluded, error);
    }

    /// `query-jobs`.
    pub fn list(&self) -> Vec<JobInfo> {
        let mut jobs = lock(&self.jobs).clone();
        for b in lock(&self.block).iter() {
            if let Some(j) = jobs.iter_mut().find(|j| j.id == b.id) {
                let p = b.driver.progress();
                j.current_progress = p.offset;
                j.total_progress = p.len;
            }
        }
        jobs
    }

    /// `job-dismiss`: forget a concluded job (emits its `null` status).
    pub fn dismiss(&self, id: &str) -> Result<(), CommandError> {
        {
            let mut jobs = lock(&self.jobs);
            let Some(pos) = jobs.iter().position(|j| j.id == id) else {
                return Err(CommandError::generic("Job not found"));
            };
            if jobs[pos].status != JobStatus::Concluded {
                return Err(CommandError::generic(format!(
                    "Job '{id}' in state '{}' cannot accept command verb 'dismiss'",
                    jobs[pos].status.as_str()
                )));
            }
            jobs.remove(pos);
            lock(&self.block).retain(|b| b.id != id);
        }
        self.events.emit(Event::JobStatusChange {
            id: id.to_string(),
            status: JobStatus::Null,
        });
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn statuses(
        rx: &std::sync::mpsc::Receiver<Arc<crate::events::EventRecord>>,
        n: usize,
    ) -> Vec<JobStatus> {
        (0..n)
            .map(|_| {
                match &rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("event")
                    .event
                {
                    Event::JobStatusChange { status, .. } => *status,
                    other => panic!("unexpected {other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn successful_job_walks_qemu_statuses_and_is_dismissed() {
        let bus = EventBus::new();
        let rx = bus.subscribe(64);
        let reg = JobRegistry::new(bus);
        reg.start("save0", JobType::SnapshotSave, || Ok(()))
            .unwrap();
        assert!(reg
            .start("save0", JobType::SnapshotSave, || Ok(()))
            .unwrap_err()
            .desc
            .contains("already in use"));
        use JobStatus::*;
        assert_eq!(
            statuses(&rx, 5),
            [Created, Running, Waiting, Pending, Concluded]
        );
        let list = reg.list();
        assert_eq!(list[0].current_progress, 1);
        assert_eq!(list[0].error, None);
        reg.dismiss("save0").unwrap();
        assert_eq!(statuses(&rx, 1), [Null]);
        assert!(reg.list().is_empty());
        assert!(reg.dismiss("save0").is_err());
    }

    #[test]
    fn failed_job_reports_its_error() {
        let bus = EventBus::new();
        let rx = bus.subscribe(64);
        let reg = JobRegistry::new(bus);
        reg.start("load0", JobType::SnapshotLoad, || {
            Err(CommandError::generic("no such snapshot"))
        })
        .unwrap();
        use JobStatus::*;
        assert_eq!(statuses(&rx, 4), [Created, Running, Aborting, Concluded]);
        assert_eq!(reg.list()[0].error.as_deref(), Some("no such snapshot"));
        assert!(reg.start("0bad", JobType::SnapshotLoad, || Ok(())).is_err());
    }

    /// A fake mirror: ready at once, then waits for cancel/complete; or fails.
    struct Fake {
        fail: bool,
        stop: Mutex<Option<bool>>,
        cv: std::sync::Condvar,
    }

    impl BlockJobDriver for Fake {
        fn run(&self, on_ready: &mut dyn FnMut()) -> BlockJobEnd {
            if self.fail {
                return BlockJobEnd::Failed("target went away".into());
            }
            on_ready();
            let mut g = self.stop.lock().unwrap();
            while g.is_none() {
                g = self.cv.wait(g).unwrap();
            }
            if g.unwrap() { BlockJobEnd::Cancelled } else { BlockJobEnd::Completed }
        }
        fn cancel(&self, force: bool) {
            *self.stop.lock().unwrap() = Some(force);
            self.cv.notify_all();
        }
        fn complete(&self) -> Result<(), CommandError> {
            self.cancel(false);
            Ok(())
        }
        fn set_speed(&self, _bps: u64) {}
        fn progress(&self) -> BlockJobProgress {
            BlockJobProgress { offset: 10, len: 10, speed: 0, ready: true, busy: false }
        }
    }

    fn names(rx: &std::sync::mpsc::Receiver<Arc<crate::events::EventRecord>>, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let r = rx.recv_timeout(Duration::from_secs(10)).expect("event");
                match &r.event {
                    Event::JobStatusChange { status, .. } => status.as_str().to_string(),
                    other => other.name().to_string(),
                }
            })
            .collect()
    }

    #[test]
    fn block_job_ready_cancel_is_completed_and_failure_reported() {
        let bus = EventBus::new();
        let rx = bus.subscribe(64);
        let reg = JobRegistry::new(bus);
        let fake = Arc::new(Fake { fail: false, stop: Mutex::new(None), cv: Default::default() });
        reg.start_block("m0", JobType::Mirror, fake, true, false).unwrap();
        assert_eq!(names(&rx, 4), ["created", "running", "ready", "BLOCK_JOB_READY"]);
        assert!(reg.block_cancel("nope", false).is_err());
        assert_eq!(reg.block_jobs()[0]["ready"], true);
        reg.block_cancel("m0", false).unwrap();
        assert_eq!(names(&rx, 4), ["waiting", "pending", "BLOCK_JOB_COMPLETED", "concluded"]);
        assert!(reg.block_complete("m0").unwrap_err().desc.contains("'concluded' cannot accept command verb 'complete'"));
        assert_eq!(reg.list()[0].error, None);
        reg.dismiss("m0").unwrap();
        assert_eq!(names(&rx, 1), ["null"]);
        assert!(reg.block_jobs().is_empty());

        let bad = Arc::new(Fake { fail: true, stop: Mutex::new(None), cv: Default::default() });
        reg.start_block("m1", JobType::Mirror, bad, true, true).unwrap();
        assert_eq!(
            names(&rx, 7),
            ["created", "running", "BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]
        );
        assert!(reg.list().is_empty(), "auto-dismissed");
    }
}
