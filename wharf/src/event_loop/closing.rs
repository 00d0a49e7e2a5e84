//! A connection's end: `on_close` once, then flushing, the FIN, lingering
//! for the peer, and freeing the slot only when no operation of it is in
//! flight; and the timeouts that cut each step short.

use std::time::{Duration, Instant};

use super::guard::contain;
use super::slot::{Closing, Phase, Recv, Slot};
use super::Core;
use crate::error::CloseReason;
use crate::handler::Handler;
use crate::sys::{self, Driver};
use crate::timer::{ticks, Entry};

impl<H: Handler> Core<H> {
    /// Starts closing an open connection: `on_close` runs now, once.
    pub(super) fn close(&mut self, key: u32, reason: CloseReason, flush: bool) {
        let Phase::Open(open) = &self.conns[key as usize].phase else {
            return;
        };
        let peer_done = open.eof;
        if open.handshaking {
            // Never opened (its TLS handshake was under way): no callback
            // saw it, so none hears of its end.
            tracing::debug!(
                reason = reason.label(),
                "closing a connection before its TLS handshake completed"
            );
            if reason != CloseReason::Shutdown {
                self.counters.tls_failed += 1;
            }
            if let Some(dial) = self.conns[key as usize].dial.take() {
                let peer = self.conns[key as usize].peer;
                let e = std::io::Error::other(format!(
                    "closed during the TLS handshake: {}",
                    reason.label()
                ));
                self.next_address(dial, peer, e);
            }
            return self.start_closing(key, flush, peer_done);
        }
        if self.conns[key as usize].ctl.sink.is_some() {
            // Closed for sends first: nothing the callback does (another
            // receive into a file, a send) outlives the close.
            self.conns[key as usize].ctl.open = false;
            let e = std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the connection closed ({}) before the bytes asked for came",
                    reason.label()
                ),
            );
            self.finish_sink(key, Some(e));
        }
        self.shared().live.set_closed(key);
        self.counters.count_close(reason.kind());
        self.conns[key as usize].ctl.open = false;
        self.drop_job_results(key);
        self.conns[key as usize].ctl.timers.clear();
        let id = self.id_of(key);
        let handler = self.handler.clone();
        let shutdown = reason == CloseReason::Shutdown;
        tracing::debug!(conn = %id, reason = reason.label(), detail = ?reason, "connection closed");
        if let Err(why) = self.with_conn(key, |conn| contain(|| handler.on_close(conn, reason))) {
            self.panicked("on_close", &id, &why);
        }
        if let Some(dial) = self.conns[key as usize].dial.take() {
            if !shutdown {
                self.closed_outbound(dial);
            }
        }
        self.start_closing(key, flush, peer_done);
    }

    /// Carries out a close the handler asked for: orderly (what is queued
    /// is flushed, then the FIN), or abortive (`Conn::abort`: a reset).
    pub(super) fn close_as_asked(&mut self, key: u32, reason: CloseReason) {
        let slot = &mut self.conns[key as usize];
        if !slot.ctl.abort {
            return self.close(key, reason, true);
        }
        // A zero linger makes closing the socket send a reset; no FIN is
        // sent first (as for a failed connection) and nothing lingers.
        if let Err(e) = slot.socket.set_linger(Some(Duration::ZERO)) {
            tracing::debug!(error = %e, "SO_LINGER 0 for an abortive close failed");
        }
        if let Phase::Open(open) = &mut slot.phase {
            open.eof = true;
        }
        self.close(key, reason, false);
        self.start_draining(key);
    }

    /// An open connection failed (reset, or a send error): close at once,
    /// nothing more can be sent or read.
    pub(super) fn close_failed(&mut self, key: u32, e: std::io::Error) {
        if let Phase::Open(open) = &mut self.conns[key as usize].phase {
            open.eof = true;
        }
        self.close(key, CloseReason::Io(e.kind()), false);
        self.start_draining(key);
    }

    /// A send failed: the connection is broken both ways.
    pub(super) fn send_failed(&mut self, key: u32, e: std::io::Error) {
        let slot = &mut self.conns[key as usize];
        slot.ctl.out.clear();
        self.counters.bytes_dropped += slot.ctl.unsent as u64;
        slot.ctl.unsent = 0;
        match slot.phase {
            Phase::Open(_) => self.close_failed(key, e),
            Phase::Closing(_) => self.start_draining(key),
            Phase::Connecting => {}
        }
    }

    /// The peer finished while we were closing: stop waiting for it.
    pub(super) fn closing_peer_done(&mut self, key: u32, failed: bool) {
        let slot = &mut self.conns[key as usize];
        match &mut slot.phase {
            Phase::Closing(Closing::Flushing { peer_done, .. }) if !failed => *peer_done = true,
            Phase::Closing(Closing::Draining { .. }) => {}
            Phase::Closing(_) => self.start_draining(key),
            _ => {}
        }
    }

    /// Leaves the open phase. With `flush`, what is queued goes out first;
    /// without, it is dropped. Held input is dropped either way: no message
    /// is delivered after `on_close`. The connection leaves its groups
    /// (after `on_close`, which may still publish to them; or after an
    /// `on_open` that joined and then refused).
    pub(super) fn start_closing(&mut self, key: u32, flush: bool, peer_done: bool) {
        let slot = &mut self.conns[key as usize];
        slot.ctl.open = false;
        let registry = &self.handle.shared.groups;
        self.groups
            .remove_all(key, &mut slot.ctl.groups, registry, self.index);
        if flush {
            slot.phase = Phase::Closing(Closing::Flushing {
                // No deadline of its own (a peer that stops reading is cut
                // off by the write-stall timeout), except a shutdown's.
                deadline: self.shutdown,
                peer_done,
            });
            self.arm_timer(key);
            self.touch(key);
        } else {
            // Nothing more goes out, not even a send stuck in flight: the
            // FIN now, and linger (or cancel) as after a flush.
            self.drop_queued(key);
            self.finish_writing(key, self.shutdown, peer_done);
        }
    }

    /// Everything that will be sent is with the kernel: send the FIN and
    /// linger for the peer, or, if it has finished already, end.
    fn finish_writing(&mut self, key: u32, deadline: Option<Instant>, peer_done: bool) {
        if peer_done {
            return self.start_draining(key);
        }
        let slot = &mut self.conns[key as usize];
        sys::shutdown_write(&slot.socket);
        let linger = crate::timer::deadline(self.now.at, self.limits.close_linger);
        let deadline = deadline.map_or(linger, |d| d.min(linger));
        slot.phase = Phase::Closing(Closing::Lingering { deadline });
        self.arm_timer(key);
        self.touch(key);
    }

    fn drop_queued(&mut self, key: u32) {
        let slot = &mut self.conns[key as usize];
        slot.ctl.out.clear();
        self.counters.bytes_dropped += slot.ctl.unsent as u64;
        slot.ctl.unsent = 0;
        if let Some(mut batch) = slot.io.leftover.take() {
            batch.clear();
            self.spare_batches.push(batch);
        }
    }

    fn start_draining(&mut self, key: u32) {
        self.drop_queued(key);
        let slot = &mut self.conns[key as usize];
        if !matches!(slot.phase, Phase::Closing(Closing::Draining { .. })) {
            slot.phase = Phase::Closing(Closing::Draining { cancelled: false });
        }
        self.touch(key);
    }

    pub(super) fn advance_closing(&mut self, driver: &mut Driver, key: u32) {
        let slot = &mut self.conns[key as usize];
        let Phase::Closing(closing) = &mut slot.phase else {
            return;
        };
        match *closing {
            Closing::Flushing {
                deadline,
                peer_done,
            } => {
                self.start_send(driver, key);
                if !matches!(
                    self.conns[key as usize].phase,
                    Phase::Closing(Closing::Flushing { .. })
                ) {
                    return; // the send failed at once (a file could not be read)
                }
                let slot = &mut self.conns[key as usize];
                let flushed =
                    !slot.io.sending && slot.ctl.out.is_empty() && slot.io.leftover.is_none();
                if !flushed {
                    // What the send added (a TLS alert or close_notify)
                    // is under the write-stall timeout too.
                    self.arm_timer(key);
                    let slot = &mut self.conns[key as usize];
                    if !peer_done && slot.io.recv == Recv::Idle {
                        // Keep reading (and discarding) so the peer's
                        // window stays open and its FIN or reset is seen.
                        slot.io.recv = Recv::Armed;
                        driver.recv(key, &slot.socket);
                    }
                    return;
                }
                self.finish_writing(key, deadline, peer_done);
            }
            Closing::Lingering { .. } => {
                if slot.io.recv == Recv::Idle {
                    slot.io.recv = Recv::Armed;
                    driver.recv(key, &slot.socket);
                }
            }
            Closing::Draining { cancelled } => {
                if slot.io.busy() {
                    if !cancelled {
                        *closing = Closing::Draining { cancelled: true };
                        driver.cancel(key, &slot.socket);
                    }
                    return;
                }
                self.free(key);
            }
        }
    }

    /// Releases a slot whose operations have all ended.
    fn free(&mut self, key: u32) {
        let slot = self.conns.remove(key as usize);
        debug_assert!(!slot.io.busy());
        self.counters.bytes_dropped += slot.ctl.unsent as u64;
        // Every slot was admitted under the caps (inbound per peer IP).
        let ip = (!slot.outbound).then(|| slot.peer.ip());
        self.handle.shared.release(ip);
        if let Some(mut batch) = slot.io.leftover {
            batch.clear();
            self.spare_batches.push(batch);
        }
        // Dropping `slot.socket` closes the descriptor.
    }

    /// The tick at which this connection next needs a look, if any.
    /// (Asked after every step a connection takes, so a chain of `sooner`
    /// rather than an iterator over an array of options.)
    fn due_tick(&self, slot: &Slot<H::State>) -> Option<u64> {
        let l = &self.limits;
        let stall = l
            .write_stall_timeout
            .filter(|_| slot.ctl.unsent > 0)
            .map(|d| slot.last_write_tick + ticks(d));
        let at = |d: Instant| self.wheel.tick_of(d);
        match &slot.phase {
            Phase::Connecting => slot.dial.as_ref().and_then(|d| d.deadline).map(at),
            Phase::Open(open) if open.handshaking => sooner(
                Some(slot.opened_tick + ticks(l.tls_handshake_timeout)),
                self.shutdown.map(at),
            ),
            Phase::Open(open) => {
                // Idle time does not run while wharf itself paused reading
                // or the connection waits for its jobs: a peer that is
                // sending is not idle (the write-stall timeout covers a
                // peer that stopped reading).
                let idle = l
                    .idle_timeout
                    .filter(|_| {
                        !open.congested && !slot.ctl.read_paused && slot.ctl.jobs.in_flight() == 0
                    })
                    .map(|d| slot.last_recv_tick + ticks(d));
                let first = l
                    .first_message_timeout
                    .filter(|_| !open.got_message)
                    .map(|d| slot.opened_tick + ticks(d));
                // Left open at shutdown for its jobs' results.
                let shutdown = self.shutdown.map(at);
                let timers = slot.ctl.timers.earliest().map(at);
                sooner(sooner(idle, first), sooner(stall, sooner(shutdown, timers)))
            }
            Phase::Closing(Closing::Flushing { deadline, .. }) => sooner(deadline.map(at), stall),
            Phase::Closing(Closing::Lingering { deadline }) => Some(at(*deadline)),
            Phase::Closing(Closing::Draining { .. }) => None,
        }
    }

    /// Makes sure the wheel looks at this slot no later than it is due.
    pub(super) fn arm_timer(&mut self, key: u32) {
        let slot = &self.conns[key as usize];
        let Some(due) = self.due_tick(slot) else {
            return;
        };
        if slot.timer.is_some_and(|t| t <= due) {
            return;
        }
        let generation = slot.generation;
        let tick = self.wheel.schedule_tick(key, generation, due);
        self.conns[key as usize].timer = Some(tick);
    }

    pub(super) fn timer_fired(&mut self, entry: Entry) {
        let Some(slot) = self.conns.get_mut(entry.slot as usize) else {
            return;
        };
        if slot.generation != entry.generation || slot.timer != Some(entry.tick) {
            return; // a stale entry: a newer one stands for this slot
        }
        slot.timer = None;
        let key = entry.slot;
        self.fire_user_timers(key);
        let Some(slot) = self.conns.get(key as usize) else {
            return;
        };
        match self.due_tick(slot) {
            Some(due) if due <= self.now.floor => self.expire(key),
            Some(_) => self.arm_timer(key),
            None => {}
        }
    }

    /// Runs `on_timer` for each of the handler's timers of `key` that is
    /// due, earliest first; a panic closes the connection and the rest
    /// are dropped with it.
    fn fire_user_timers(&mut self, key: u32) {
        let slot = &mut self.conns[key as usize];
        if !matches!(slot.phase, Phase::Open(_)) || slot.ctl.close_request.is_some() {
            return;
        }
        let mut due = std::mem::take(&mut self.due_timers);
        slot.ctl.timers.take_due(self.now.at, &mut due);
        let id = self.id_of(key);
        let handler = self.handler.clone();
        for (_, token) in due.drain(..) {
            if self.conns[key as usize].ctl.close_request.is_some() {
                break; // closed by an earlier one: none fires after on_close
            }
            if let Err(why) = self.with_conn(key, |conn| contain(|| handler.on_timer(conn, token)))
            {
                self.panicked("on_timer", &id, &why);
                self.conns[key as usize].ctl.close_request = Some(CloseReason::HandlerPanic);
            }
        }
        self.due_timers = due;
        self.touch(key);
    }

    /// A deadline of this connection passed.
    fn expire(&mut self, key: u32) {
        let now = self.now.floor;
        let l = self.limits;
        let slot = &self.conns[key as usize];
        match &slot.phase {
            Phase::Open(_) if self.shutdown.is_some_and(|d| self.wheel.tick_of(d) <= now) => {
                // The shutdown's deadline passed before its jobs came back.
                self.close(key, CloseReason::Shutdown, true);
            }
            Phase::Open(open) if open.handshaking => {
                self.counters.timed_out += 1;
                self.tls_failed(key, crate::TlsError::HandshakeTimeout);
            }
            Phase::Open(open) => {
                self.counters.timed_out += 1;
                let stalled = l
                    .write_stall_timeout
                    .is_some_and(|d| slot.ctl.unsent > 0 && slot.last_write_tick + ticks(d) <= now);
                let first = l
                    .first_message_timeout
                    .is_some_and(|d| !open.got_message && slot.opened_tick + ticks(d) <= now);
                let (reason, flush) = if stalled {
                    (CloseReason::WriteStalled, false)
                } else if first {
                    (CloseReason::FirstMessageTimeout, true)
                } else {
                    (CloseReason::IdleTimeout, true)
                };
                self.close(key, reason, flush);
            }
            // Out of time: drop what is unsent and stop waiting for the peer.
            Phase::Closing(_) => self.start_draining(key),
            Phase::Connecting => self.connect_timed_out(key),
        }
    }
}

/// The earlier of two ticks, either of which may be absent.
#[inline]
fn sooner(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}
