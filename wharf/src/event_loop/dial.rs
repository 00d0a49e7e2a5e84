//! Outbound connections on a loop: each address of a connect tried in
//! turn, each with its timeout; failures reported with their token; and
//! reconnects after a back-off for connects that asked for them.
//!
//! Names are resolved on a thread of their own (the first time by
//! `Handle::connect`, on a reconnect by the loop starting one), which
//! posts the connect back: a loop never blocks on a resolver.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use super::guard::contain;
use super::slot::Phase;
use super::Core;
use crate::connect::{ConnectFailure, Dial};
use crate::handler::Handler;
use crate::sys::{self, Driver};
use crate::timer::deadline;

/// A connect waiting to start: the next address now, or a reconnect when
/// its back-off has passed.
pub(super) struct Redial {
    pub(super) at: Instant,
    pub(super) dial: Box<Dial>,
    /// A reconnect: `on_reconnect` runs when it starts.
    pub(super) announce: bool,
}

impl<H: Handler> Core<H> {
    /// Starts connecting to the next address of `dial`.
    pub(super) fn connect(&mut self, driver: &mut Driver, mut dial: Box<Dial>) {
        if self.shutdown.is_some() {
            let e = io::Error::other("the server is shutting down");
            let addr = dial.pending.front().copied();
            return self.dial_failed(dial, addr, e);
        }
        let Some(addr) = dial.pending.pop_front() else {
            let e = dial.last_error.take().unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")
            });
            return self.dial_failed(dial, None, e);
        };
        if self.handle.shared.admit(None).is_err() {
            let e = io::Error::other("max_connections reached");
            return self.dial_failed(dial, Some(addr), e);
        }
        let socket = match sys::stream_socket(addr) {
            Ok(s) => s,
            Err(e) => {
                self.handle.shared.release(None);
                return self.next_address(dial, addr, e);
            }
        };
        dial.deadline = Some(deadline(self.now.at, dial.request.timeout));
        dial.timed_out = false;
        let Some(key) = self.insert(socket, addr, Phase::Connecting, Some(dial)) else {
            self.handle.shared.release(None);
            return; // new_state panicked: counted, and reported as a failure
        };
        let slot = &mut self.conns[key as usize];
        driver.connect(key, &slot.socket, addr);
        self.arm_timer(key);
    }

    /// One address failed: try the next (at the end of this turn), or
    /// report the connect failed.
    pub(super) fn next_address(&mut self, mut dial: Box<Dial>, addr: SocketAddr, e: io::Error) {
        if dial.pending.is_empty() || self.shutdown.is_some() || self.shared().has_failed() {
            return self.dial_failed(dial, Some(addr), e);
        }
        tracing::debug!(%addr, error = %e, "connect failed; trying the next address");
        dial.last_error = Some(e);
        self.redials.push(Redial {
            at: self.now.at,
            dial,
            announce: false,
        });
    }

    /// Every address failed: tell the handler, and schedule a reconnect
    /// if the connect asked for one.
    pub(super) fn dial_failed(
        &mut self,
        mut dial: Box<Dial>,
        addr: Option<SocketAddr>,
        e: io::Error,
    ) {
        // Neither at shutdown nor on a loop whose driver failed (nothing
        // would run the reconnect).
        let ending = self.shutdown.is_some() || self.shared().has_failed();
        let retry = dial.request.reconnect.filter(|_| !ending);
        let retry_in = retry.map(|policy| {
            dial.attempt = dial.attempt.saturating_add(1);
            policy.delay(dial.attempt, self.random())
        });
        self.guard_connect_failed(ConnectFailure {
            token: dial.request.token,
            addr,
            error: e,
            retry_in,
        });
        if let Some(delay) = retry_in {
            self.schedule_reconnect(dial, delay);
        }
    }

    /// An outbound connection that asked for reconnects closed.
    pub(super) fn closed_outbound(&mut self, mut dial: Box<Dial>) {
        let Some(policy) = dial.request.reconnect else {
            return;
        };
        if self.shutdown.is_some() || self.shared().has_failed() {
            return;
        }
        dial.attempt = 1;
        let delay = policy.delay(1, self.random());
        self.schedule_reconnect(dial, delay);
    }

    fn schedule_reconnect(&mut self, mut dial: Box<Dial>, delay: std::time::Duration) {
        *dial = Dial {
            attempt: dial.attempt,
            ..Dial::new(dial.request.clone())
        };
        self.redials.push(Redial {
            at: deadline(self.now.at, delay),
            dial,
            announce: true,
        });
    }

    /// Starts the connects whose time has come (from `maintain`).
    pub(super) fn run_redials(&mut self, driver: &mut Driver) {
        let now = self.now.at;
        let mut i = 0;
        while i < self.redials.len() {
            if self.redials[i].at > now {
                i += 1;
                continue;
            }
            let Redial { dial, announce, .. } = self.redials.swap_remove(i);
            if announce {
                let (token, attempt) = (dial.request.token, dial.attempt);
                let handler = self.handler.clone();
                if let Err(why) = contain(|| handler.on_reconnect(token, attempt)) {
                    self.panicked("on_reconnect", &format_args!("token {token}"), &why);
                }
            }
            if dial.needs_resolving() {
                self.handle.shared.resolve_then_connect(self.index, dial);
            } else {
                self.connect(driver, dial);
            }
        }
    }

    /// When the next waiting connect is due.
    pub(super) fn next_redial(&self) -> Option<Instant> {
        self.redials.iter().map(|r| r.at).min()
    }

    /// `Handle::stop_reconnect`: no more attempts for `token`.
    pub(super) fn stop_reconnect(&mut self, token: u64) {
        self.redials.retain(|r| r.dial.request.token != token);
        for (_, slot) in self.conns.iter_mut() {
            if let Some(dial) = &mut slot.dial {
                if dial.request.token == token {
                    dial.request.reconnect = None;
                }
            }
        }
    }

    /// The connect of `key` is past its deadline: cancel it; its
    /// completion reports `TimedOut` (see `connected`).
    pub(super) fn connect_timed_out(&mut self, key: u32) {
        if let Some(dial) = &mut self.conns[key as usize].dial {
            dial.timed_out = true;
        }
        self.touch(key);
    }

    pub(super) fn advance_connecting(&mut self, driver: &mut Driver, key: u32) {
        let slot = &mut self.conns[key as usize];
        if let Some(dial) = &mut slot.dial {
            if dial.timed_out && dial.deadline.take().is_some() {
                driver.cancel(key, &slot.socket);
            }
        }
    }

    /// A cheap random number (xorshift64), for back-off jitter.
    fn random(&mut self) -> u64 {
        let x = &mut self.rng;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }
}
