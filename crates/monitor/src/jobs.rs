//! QMP jobs: `snapshot-save`/`-load`/`-delete` answer at once and run on a thread of their own;
//! their progress is visible through `query-jobs` and `JOB_STATUS_CHANGE` events, and a
//! concluded job stays listed until `job-dismiss` (QEMU's manual-dismiss jobs). The VMM only
//! implements the synchronous operation; this registry does the job bookkeeping.

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
        let jobs = self.jobs.clone();
        let events = self.events.clone();
        let id_owned = id.to_string();
        let spawned = std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                let reg = JobRegistry { jobs, events };
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
        lock(&self.jobs).clone()
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
}
