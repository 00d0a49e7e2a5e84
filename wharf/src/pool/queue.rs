//! The worker pool's queue: bounded, and woken once per loop turn.
//!
//! A loop pushes jobs during its turn without waking anyone; at the end of
//! the turn `wake` notifies as many idle workers as there are jobs (a
//! notify is a system call, and on a busy CPU waking a worker for each job
//! would switch to it for each job). The rule that rules out a lost
//! wake-up: a push made while a worker waits sets `unwoken` under the
//! lock the worker waits with, and the same loop calls `wake` before it
//! next sleeps; a worker that is not waiting looks at the queue, under the
//! lock, before it waits. `tests::loom_*` check this under every
//! interleaving (`RUSTFLAGS="--cfg loom" cargo test --release -p wharf
//! --lib loom`).

use std::collections::VecDeque;
use std::time::Instant;

#[cfg(loom)]
use loom::sync::{
    atomic::{AtomicBool, Ordering},
    Condvar, Mutex, MutexGuard,
};
#[cfg(not(loom))]
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Condvar, Mutex, MutexGuard,
};

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    Full,
    Stopped,
}

pub(crate) struct WorkQueue<T> {
    limit: usize,
    state: Mutex<State<T>>,
    /// Signalled when jobs are queued (by `wake`) or the queue stops.
    work: Condvar,
    /// Signalled when a running job ends while `stop` waits.
    idle: Condvar,
    /// Jobs were pushed while workers waited, and none was woken yet.
    unwoken: AtomicBool,
}

struct State<T> {
    jobs: VecDeque<T>,
    running: usize,
    waiting: usize,
    stopping: bool,
}

impl<T> WorkQueue<T> {
    pub(crate) fn new(limit: usize) -> Self {
        WorkQueue {
            limit: limit.max(1),
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                running: 0,
                waiting: 0,
                stopping: false,
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
            unwoken: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Jobs run outside the lock, so a poisoned lock only means a
        // panic in this module's bookkeeping, which has none: go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`; the caller calls [`wake`](Self::wake) before it
    /// next sleeps.
    pub(crate) fn push(&self, job: T) -> Result<(), (Refused, T)> {
        let mut state = self.lock();
        if state.stopping {
            return Err((Refused::Stopped, job));
        }
        if state.jobs.len() >= self.limit {
            return Err((Refused::Full, job));
        }
        state.jobs.push_back(job);
        if state.waiting > 0 {
            // A swap, not a store: loom 0.7 lets a later swap miss a plain
            // store here (its model then reports a lost wake-up that
            // coherence rules out); with the swap, what it checks is what
            // runs.
            self.unwoken.swap(true, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Wakes the idle workers that the jobs pushed since the last call
    /// need. One atomic operation when there are none.
    pub(crate) fn wake(&self) {
        if !self.unwoken.swap(false, Ordering::AcqRel) {
            return;
        }
        let state = self.lock();
        let n = state.waiting.min(state.jobs.len());
        drop(state);
        for _ in 0..n {
            self.work.notify_one();
        }
    }

    /// A worker's next job, waiting for one; `None` once the queue has
    /// stopped and is empty. The job counts as running until `done`.
    pub(crate) fn next(&self) -> Option<T> {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                state.running += 1;
                return Some(job);
            }
            if state.stopping {
                return None;
            }
            state.waiting += 1;
            state = self.work.wait(state).unwrap_or_else(|p| p.into_inner());
            state.waiting -= 1;
        }
    }

    /// A worker's next job if one is queued now.
    pub(crate) fn try_next(&self) -> Option<T> {
        let mut state = self.lock();
        let job = state.jobs.pop_front()?;
        state.running += 1;
        Some(job)
    }

    /// A job taken with `next` or `try_next` has ended.
    pub(crate) fn done(&self) {
        let mut state = self.lock();
        state.running -= 1;
        if state.stopping {
            self.idle.notify_all();
        }
    }

    /// Jobs queued and not yet taken.
    pub(crate) fn queued(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Refuses further pushes, drops what is queued (returned, to be
    /// dropped outside the lock), wakes every worker so that idle ones
    /// end, and waits until the running jobs are done or `until`.
    pub(crate) fn stop(&self, until: Instant) -> VecDeque<T> {
        let mut state = self.lock();
        state.stopping = true;
        let dropped = std::mem::take(&mut state.jobs);
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
        dropped
    }
}

#[cfg(all(test, loom))]
mod tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    #[test]
    fn loom_a_job_pushed_while_a_worker_waits_is_run() {
        loom::model(|| {
            let q = Arc::new(WorkQueue::<u32>::new(4));
            let worker = {
                let q = q.clone();
                thread::spawn(move || {
                    let job = q.next();
                    if job.is_some() {
                        q.done();
                    }
                    job
                })
            };
            // A loop turn: push, then wake before sleeping.
            q.push(7).unwrap();
            q.wake();
            // loom reports a deadlock if the worker could wait forever.
            assert_eq!(worker.join().unwrap(), Some(7));
        });
    }

    #[test]
    fn loom_two_loops_and_two_workers_lose_no_job() {
        // Four threads: exhaustive exploration takes far too long, so the
        // schedules are bounded to four preemptions (where bugs of this
        // kind show, as the one this test found did in its first).
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(4);
        model.check(|| {
            let q = Arc::new(WorkQueue::<u32>::new(4));
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let q = q.clone();
                    thread::spawn(move || {
                        let job = q.next();
                        q.done();
                        job.unwrap()
                    })
                })
                .collect();
            let other = {
                let q = q.clone();
                thread::spawn(move || {
                    q.push(2).unwrap();
                    q.wake();
                })
            };
            q.push(1).unwrap();
            q.wake();
            other.join().unwrap();
            let mut got: Vec<u32> = workers.into_iter().map(|w| w.join().unwrap()).collect();
            got.sort();
            assert_eq!(got, vec![1, 2]);
        });
    }

    #[test]
    fn loom_stop_ends_idle_workers_and_refuses_pushes() {
        loom::model(|| {
            let q = Arc::new(WorkQueue::<u32>::new(4));
            let worker = {
                let q = q.clone();
                thread::spawn(move || q.next())
            };
            let dropped = q.stop(Instant::now());
            assert!(dropped.is_empty());
            assert_eq!(q.push(1), Err((Refused::Stopped, 1)));
            assert_eq!(worker.join().unwrap(), None);
        });
    }
}
