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

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::event_loop::panic_message;
use crate::handle::Shared;
use crate::id::ConnId;
use crate::mailbox::Command;

/// What a job hands back to its loop: the connection's `Apply<S>`, erased
/// (the pool knows no handler's state type), or the panic's message.
pub(crate) type Output = Result<Box<dyn Any + Send>, String>;

/// A job's result on its way to the connection's loop.
pub(crate) struct Done {
    pub(crate) id: ConnId,
    pub(crate) seq: u32,
    pub(crate) output: Output,
}

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
    limit: usize,
    state: Mutex<State>,
    /// Signalled when a job is queued or the pool stops.
    work: Condvar,
    /// Signalled when a running job ends.
    idle: Condvar,
    refused: AtomicU64,
    /// Jobs were queued while workers waited, and they were not woken yet.
    unwoken: AtomicBool,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    running: usize,
    /// Workers waiting for a job: a submit wakes one only if there is one
    /// (a busy worker takes the next job without a wake-up).
    waiting: usize,
    started: bool,
    stopping: bool,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    pub(crate) fn new(workers: usize, limit: usize) -> Pool {
        Pool {
            workers: workers.max(1),
            limit: limit.max(1),
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            idle: Condvar::new(),
            refused: AtomicU64::new(0),
            unwoken: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Jobs run outside the lock, so a poisoned lock only means a
        // worker's bookkeeping panicked, which it does not: go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `run` for connection `id` as its job number `seq`.
    pub(crate) fn submit(
        &self,
        shared: &Arc<Shared>,
        id: ConnId,
        seq: u32,
        run: Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>,
    ) -> Result<(), SubmitError> {
        let mut state = self.lock();
        if state.stopping {
            return Err(SubmitError::Stopped);
        }
        if state.queue.len() >= self.limit {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::Saturated);
        }
        if !state.started {
            state.started = true;
            for i in 0..self.workers {
                let shared = shared.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("wharf-worker-{i}"))
                    .spawn(move || work(&shared));
                match spawned {
                    Ok(join) => state.threads.push(join),
                    Err(e) => tracing::error!(error = %e, "a worker thread could not start"),
                }
            }
            if state.threads.is_empty() {
                state.stopping = true;
                return Err(SubmitError::Stopped);
            }
        }
        state.queue.push_back(Job { run, id, seq });
        if state.waiting > 0 {
            // Woken at the end of the loop's turn (`wake_workers`), once
            // for the turn's jobs: waking one now would, on a busy CPU,
            // switch to it for every job.
            self.unwoken.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Once per loop turn: wakes the idle workers that jobs submitted
    /// during the turn need. One atomic load when there are none.
    pub(crate) fn wake_workers(&self) {
        if !self.unwoken.swap(false, Ordering::AcqRel) {
            return;
        }
        let state = self.lock();
        let n = state.waiting.min(state.queue.len());
        drop(state);
        for _ in 0..n {
            self.work.notify_one();
        }
    }

    /// Submits refused so far because the queue was full.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Jobs queued and not yet running.
    pub(crate) fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// Ends the pool once the loops have ended: what is queued is dropped,
    /// running jobs are waited for until `until`.
    pub(crate) fn stop(&self, until: Instant) {
        let mut state = self.lock();
        state.stopping = true;
        state.queue.clear();
        self.work.notify_all();
        while state.running > 0 {
            let now = Instant::now();
            if now >= until {
                break;
            }
            state = self
                .idle
                .wait_timeout(state, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let threads = std::mem::take(&mut state.threads);
        drop(state);
        for join in threads {
            if join.is_finished() || Instant::now() < until {
                // An idle worker exits as soon as it sees `stopping`.
                let _ = join_by(join, until);
            }
            // Past the deadline a busy worker is left to end on its own.
        }
    }
}

/// Joins `join` if it ends by `until`; otherwise lets it run on.
fn join_by(join: JoinHandle<()>, until: Instant) -> bool {
    while !join.is_finished() {
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = join.join();
    true
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
    let pool = &shared.pool;
    let mut batch: Vec<Vec<Command>> = (0..shared.loops.len()).map(|_| Vec::new()).collect();
    let mut held = 0usize;
    let mut since = Instant::now();
    let mut state = pool.lock();
    loop {
        let Some(job) = state.queue.pop_front() else {
            if held > 0 {
                drop(state);
                post(shared, &mut batch);
                held = 0;
                state = pool.lock();
                continue;
            }
            if state.stopping {
                return;
            }
            state.waiting += 1;
            state = pool.work.wait(state).unwrap_or_else(|p| p.into_inner());
            state.waiting -= 1;
            continue;
        };
        state.running += 1;
        drop(state);
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
        state = pool.lock();
        state.running -= 1;
        if state.stopping {
            // Only `stop` waits on this (a notify is a system call).
            pool.idle.notify_all();
        }
    }
}

fn post(shared: &Shared, batch: &mut [Vec<Command>]) {
    for (l, commands) in shared.loops.iter().zip(batch) {
        if !commands.is_empty() {
            l.mailbox.post_all(commands);
        }
    }
}
