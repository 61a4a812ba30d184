//! The virtio-blk I/O threads: the queue's worker hands them parsed data requests, each runs
//! one at a time to completion ([`Executor::run`], blocking I/O), and hands the outcome back
//! through a list and an eventfd the worker waits on. Threads are started on demand, up to
//! [`MAX_THREADS`], and stopped (joined) when the pool is dropped; a thread finishes the job
//! it holds first, so dropping the pool never leaves I/O running behind the device's back.
//!
//! Completion order is whatever the I/O gives; ordering rules (what may be published to the
//! used ring when) are the worker's.

use super::request::{Executor, Outcome, Request};
use crate::error::{Error, Result};
use crate::mmio::lock;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Most I/O threads per device (and so most data requests in flight).
pub const MAX_THREADS: usize = 16;

/// One request for an I/O thread.
pub(crate) struct Job {
    /// The worker's tag for it (handed back with the outcome).
    pub seq: u64,
    pub req: Request,
    /// The backend's concurrent I/O handle the thread uses for it.
    pub pio: Option<Arc<dyn qcow2::ParallelIo>>,
    /// Report how long it took.
    pub timed: bool,
}

/// A finished job.
pub(crate) struct Done {
    pub seq: u64,
    pub out: Outcome,
    /// How long executing it took, when the job asked to be timed.
    pub took: Option<std::time::Duration>,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    idle: usize,
    stop: bool,
}

struct Shared {
    jobs: Mutex<Jobs>,
    cv: Condvar,
    done: Mutex<Vec<Done>>,
    /// Written once per finished job.
    done_evt: EventFd,
}

/// The I/O threads of one device.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// What each new thread clones (its own bounce buffer, the same backend).
    template: Executor,
}

impl Pool {
    pub fn new(template: Executor) -> Result<Pool> {
        Ok(Pool {
            shared: Arc::new(Shared {
                jobs: Mutex::new(Jobs::default()),
                cv: Condvar::new(),
                done: Mutex::new(Vec::new()),
                done_evt: EventFd::new(EFD_NONBLOCK).map_err(Error::io("I/O completion eventfd"))?,
            }),
            threads: Vec::new(),
            template,
        })
    }

    /// The eventfd that becomes readable when a job finished.
    pub fn done_evt(&self) -> &EventFd {
        &self.shared.done_evt
    }

    /// Queues `job`; starts a thread if none is idle (and the limit allows). Fails only if no
    /// thread runs at all and none can be started; the job is then handed back.
    pub fn submit(&mut self, job: Job) -> std::result::Result<(), Box<Job>> {
        let need = {
            let j = lock(&self.shared.jobs);
            j.idle <= j.queue.len() && self.threads.len() < MAX_THREADS
        };
        if need {
            let shared = self.shared.clone();
            let exec = self.template.clone();
            match std::thread::Builder::new().name("virtio-blk-io".into()).spawn(move || serve(shared, exec)) {
                Ok(h) => self.threads.push(h),
                Err(e) if self.threads.is_empty() => {
                    tracing::warn!("virtio-blk: cannot start an I/O thread ({e}); running requests one at a time");
                    return Err(Box::new(job));
                }
                Err(e) => tracing::debug!("virtio-blk: no further I/O thread ({e})"),
            }
        }
        lock(&self.shared.jobs).queue.push_back(job);
        self.shared.cv.notify_one();
        Ok(())
    }

    /// Takes the finished jobs (and clears the eventfd).
    pub fn take_done(&self) -> Vec<Done> {
        let _ = self.shared.done_evt.read();
        std::mem::take(&mut *lock(&self.shared.done))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.shared.jobs).stop = true;
        self.shared.cv.notify_all();
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

fn serve(shared: Arc<Shared>, mut exec: Executor) {
    loop {
        let job = {
            let mut j = lock(&shared.jobs);
            loop {
                if let Some(job) = j.queue.pop_front() {
                    break job;
                }
                if j.stop {
                    return;
                }
                j.idle += 1;
                j = shared.cv.wait(j).unwrap_or_else(|p| p.into_inner());
                j.idle -= 1;
            }
        };
        exec.pio = job.pio;
        let started = std::time::Instant::now();
        let out = exec.run(&job.req);
        let took = job.timed.then(|| started.elapsed());
        lock(&shared.done).push(Done { seq: job.seq, out, took });
        let _ = shared.done_evt.write(1);
    }
}
