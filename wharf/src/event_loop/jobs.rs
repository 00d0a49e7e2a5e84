//! Results of a connection's jobs, coming back from the worker pool: put
//! in submission order and applied on this loop with the connection at
//! hand, or dropped if it has closed.

use super::guard::contain;
use super::slot::Phase;
use super::Core;
use crate::conn::Apply;
use crate::error::CloseReason;
use crate::handler::Handler;
use crate::mailbox::{Done, Output};

impl<H: Handler> Core<H> {
    pub(super) fn job_done(&mut self, done: Done) {
        let Some(key) = self.lookup(done.id) else {
            // Closed meanwhile (the slot may hold a newer connection, which
            // `lookup` tells apart by generation).
            self.counters.jobs_discarded += 1;
            return;
        };
        let slot = &mut self.conns[key as usize];
        if done.seq != slot.ctl.jobs.applied || slot.ctl.close_request.is_some() {
            // An earlier job is still running (or the connection is about
            // to close, which drops what waits here).
            self.early_results.insert((key, done.seq), done.output);
            return;
        }
        let mut output = done.output;
        loop {
            self.apply(key, output);
            let slot = &mut self.conns[key as usize];
            let jobs = &mut slot.ctl.jobs;
            jobs.applied = jobs.applied.wrapping_add(1);
            if !matches!(slot.phase, Phase::Open(_)) || slot.ctl.close_request.is_some() {
                break;
            }
            let next = jobs.applied;
            match self.early_results.remove(&(key, next)) {
                Some(early) => output = early,
                None => break,
            }
        }
        self.touch(key);
    }

    /// Runs one result's function on its connection; a job or a function
    /// that panicked closes the connection, as a panicking callback does.
    fn apply(&mut self, key: u32, output: Output) {
        self.counters.jobs_done += 1;
        let id = self.id_of(key);
        let stamp = self.now.ceil;
        // Work came back: the connection is not idle.
        self.conns[key as usize].last_recv_tick = stamp;
        let outcome = output.and_then(|any| match any.downcast::<Apply<H::State>>() {
            Ok(apply) => self.with_conn(key, |conn| contain(|| (*apply)(conn))),
            Err(_) => Err("a job result of another server's type".to_owned()),
        });
        if let Err(why) = outcome {
            self.panicked("a worker job", &id, &why);
            self.conns[key as usize].ctl.close_request = Some(CloseReason::HandlerPanic);
        }
    }

    /// The connection closed: results still waiting for an earlier job's
    /// are dropped (those still running are dropped when they arrive).
    pub(super) fn drop_job_results(&mut self, key: u32) {
        if self.early_results.is_empty() {
            return;
        }
        let jobs = &self.conns[key as usize].ctl.jobs;
        let mut seq = jobs.applied;
        while seq != jobs.next {
            if self.early_results.remove(&(key, seq)).is_some() {
                self.counters.jobs_discarded += 1;
            }
            seq = seq.wrapping_add(1);
        }
    }
}
