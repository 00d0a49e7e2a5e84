//! The worker pool: threads for the jobs handlers hand off, so that a loop
//! never blocks on real work.
//!
//! A job is submitted from a callback (`Conn::submit`) with a sequence
//! number of its connection; a worker runs it and posts the result to the
//! connection's own loop, which applies results in sequence order (see
//! `event_loop::jobs`). The queue is bounded: a submit to a full queue
//! fails at once, and the loop never waits for the pool.
//!
//! Threads start on the first submit, so a server that never submits pays
//! nothing for them. Shutdown (after the loops have ended) drops what is
//! still queued, since its connections are gone, and waits for running
//! jobs until the deadline; a job still running then is left to finish on
//! its own thread, its result dropped.

mod queue;

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::panic_message;
use crate::handle::Shared;
use crate::id::ConnId;
use crate::mailbox::{Command, Done};

use self::queue::{Refused, WorkQueue};

struct Job {
    run: Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>,
    id: ConnId,
    seq: u32,
}

/// Why a job was not taken. Nothing of it runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The pool's queue is full (`Builder::job_queue`): every worker is
    /// busy and that many jobs wait. Answer "busy", do the work inline, or
    /// try again later.
    #[error("the worker pool's queue is full")]
    Saturated,
    /// The connection is closing: a result could never be applied.
    #[error("connection closed")]
    Closed,
    /// The server is shutting down, or its worker threads could not start.
    #[error("the worker pool is stopped")]
    Stopped,
}

pub(crate) struct Pool {
    workers: usize,
    queue: WorkQueue<Job>,
    /// The worker threads, started by the first submit.
    threads: Mutex<Option<Vec<JoinHandle<()>>>>,
    /// Set once the threads are started: a submit then skips their lock.
    started: AtomicBool,
    refused: AtomicU64,
}

impl Pool {
    pub(crate) fn new(workers: usize, limit: usize) -> Pool {
        Pool {
            workers: workers.max(1),
            queue: WorkQueue::new(limit),
            threads: Mutex::new(None),
            started: AtomicBool::new(false),
            refused: AtomicU64::new(0),
        }
    }

    /// Queues `run` for connection `id` as its job number `seq`. Called
    /// on a loop thread, which calls `wake_workers` at the end of its turn.
    pub(crate) fn submit(
        &self,
        shared: &Arc<Shared>,
        id: ConnId,
        seq: u32,
        run: Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>,
    ) -> Result<(), SubmitError> {
        self.start(shared)?;
        match self.queue.push(Job { run, id, seq }) {
            Ok(()) => Ok(()),
            Err((Refused::Full, _)) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::Saturated)
            }
            Err((Refused::Stopped, _)) => Err(SubmitError::Stopped),
        }
    }

    /// Starts the worker threads if this is the first submit.
    fn start(&self, shared: &Arc<Shared>) -> Result<(), SubmitError> {
        if self.started.load(Ordering::Acquire) {
            return Ok(()); // and a stopped queue refuses the push
        }
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = &*threads {
            return if running.is_empty() {
                Err(SubmitError::Stopped)
            } else {
                Ok(())
            };
        }
        let started: Vec<JoinHandle<()>> = (0..self.workers)
            .filter_map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("wharf-worker-{i}"))
                    .spawn(move || work(&shared))
                    .map_err(|e| tracing::error!(error = %e, "a worker thread could not start"))
                    .ok()
            })
            .collect();
        let ok = !started.is_empty();
        *threads = Some(started);
        if ok {
            self.started.store(true, Ordering::Release);
            Ok(())
        } else {
            Err(SubmitError::Stopped)
        }
    }

    /// Once per loop turn: wakes the idle workers that this turn's jobs
    /// need.
    pub(crate) fn wake_workers(&self) {
        self.queue.wake();
    }

    /// Submits refused so far because the queue was full.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Jobs queued and not yet running.
    pub(crate) fn queued(&self) -> usize {
        self.queue.queued()
    }

    /// Ends the pool once the loops have ended: what is queued is dropped,
    /// running jobs are waited for until `until`.
    pub(crate) fn stop(&self, until: Instant) {
        drop(self.queue.stop(until));
        let threads = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(Vec::new())
            .unwrap_or_default();
        for join in threads {
            // An idle worker ends as soon as it sees the queue stopped;
            // past the deadline a busy one is left to end on its own.
            join_by(join, until);
        }
    }
}

/// Joins `join` if it ends by `until`; otherwise lets it run on.
fn join_by(join: JoinHandle<()>, until: Instant) {
    while !join.is_finished() {
        if Instant::now() >= until {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = join.join();
}

/// Results a worker keeps before posting them: on a busy machine, posting
/// each at once would wake (and switch to) a loop per job.
const BATCH: usize = 64;
/// How long a finished result may wait for others to join it.
const BATCH_WAIT: Duration = Duration::from_micros(100);

/// A worker: runs jobs until the pool stops, posting results to their
/// connections' loops (a loop that has ended drops them). Results are
/// posted in batches while more jobs wait, for at most `BATCH_WAIT`; the
/// last job in the queue posts at once.
fn work(shared: &Shared) {
    let queue = &shared.pool.queue;
    let mut batch: Vec<Vec<Command>> = (0..shared.loops.len()).map(|_| Vec::new()).collect();
    let mut held = 0usize;
    let mut since = Instant::now();
    loop {
        let job = if held > 0 {
            match queue.try_next() {
                Some(job) => job,
                None => {
                    post(shared, &mut batch);
                    held = 0;
                    continue;
                }
            }
        } else {
            match queue.next() {
                Some(job) => job,
                None => return,
            }
        };
        let Job { run, id, seq } = job;
        let output = catch_unwind(AssertUnwindSafe(run)).map_err(|p| panic_message(&*p));
        if let Some(b) = batch.get_mut(id.loop_index()) {
            if held == 0 {
                since = Instant::now();
            }
            b.push(Command::JobDone(Done { id, seq, output }));
            held += 1;
        }
        if held >= BATCH || since.elapsed() >= BATCH_WAIT {
            post(shared, &mut batch);
            held = 0;
        }
        queue.done();
    }
}

fn post(shared: &Shared, batch: &mut [Vec<Command>]) {
    for (l, commands) in shared.loops.iter().zip(batch) {
        if !commands.is_empty() {
            l.mailbox.post_all(commands);
        }
    }
}
