//! One connection's life on its loop: opened (accepted or connected),
//! receiving and sending, closing (flush, FIN, wait for the peer), and
//! freed only when no operation of it is in flight.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Core, Phase, Slot};
use crate::codec::FrameError;
use crate::conn::{Conn, ConnCtl};
use crate::error::CloseReason;
use crate::handler::{Accept, Handler};
use crate::id::{next_generation, ConnId};
use crate::mailbox::Command;
use crate::sys::{self, Driver, RecvEnd, Socket};
use crate::timer::{Entry, TICK};

impl<H: Handler> Core<H> {
    pub(super) fn accepted(&mut self, _listener: u32, socket: Socket) {
        let loops = &self.handle.shared.loops;
        if self.spread_accepts && self.shutdown.is_none() {
            let target = self.next_adopter % loops.len();
            self.next_adopter = self.next_adopter.wrapping_add(1);
            if target != self.index {
                loops[target].mailbox.post(Command::Adopt(socket));
                return;
            }
        }
        self.adopt(socket);
    }

    /// Makes an accepted connection one of this loop's.
    pub(super) fn adopt(&mut self, socket: Socket) {
        if self.shutdown.is_some() {
            self.counters.refused += 1;
            return; // dropping the socket closes it
        }
        let peer = match sys::peer_addr(&socket) {
            Ok(peer) => peer,
            Err(_) => return, // already reset by the peer
        };
        if !self.handle.shared.admit(Some(peer.ip())) {
            // Over a connection cap: closed at once, counted; the open
            // connections never notice.
            self.counters.refused += 1;
            return;
        }
        sys::prepare(&socket, &self.socket_options);
        let key = self.insert(socket, peer, Phase::Open, false);
        self.open(key);
    }

    fn insert(&mut self, socket: Socket, peer: SocketAddr, phase: Phase, outbound: bool) -> u32 {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self.generations.len() <= key {
            self.generations.resize(key + 1, 0);
        }
        let generation = next_generation(self.generations[key]);
        self.generations[key] = generation;
        entry.insert(Slot {
            state: H::State::default(),
            ctl: ConnCtl::new(self.framing.reader()),
            reader: self.framing.reader(),
            socket,
            generation,
            peer,
            phase,
            outbound,
            recv_armed: false,
            recv_cancelling: false,
            paused: false,
            congested: false,
            sending: false,
            batch: None,
            stash: Vec::new(),
            got_message: false,
            peer_done: false,
            flush: false,
            fin_sent: false,
            cancelled: false,
            opened_tick: self.now_tick,
            last_recv_tick: self.now_tick,
            last_write_tick: self.now_tick,
            timer: None,
            deadline: None,
        });
        key as u32
    }

    /// A connection became usable: run `on_open`, then start receiving.
    fn open(&mut self, key: u32) {
        self.counters.accepted += 1;
        self.counters.open += 1;
        let id = self.id_of(key);
        self.shared().live.set_open(key, id.generation());
        let handler = self.handler.clone();
        let accept = self.with_conn(key, |conn| handler.on_open(conn));
        if accept == Accept::No {
            // Refused: what on_open queued is still flushed; no on_close.
            self.shared().live.set_closed(key);
            self.counters.open -= 1;
            self.counters.closed += 1;
            self.start_closing(key, true);
            return;
        }
        self.arm_timer(key);
        self.touch(key);
    }

    fn id_of(&self, key: u32) -> ConnId {
        ConnId::new(self.index, key, self.conns[key as usize].generation)
    }

    /// Runs `f` with a `Conn` view of slot `key`.
    fn with_conn<R>(&mut self, key: u32, f: impl FnOnce(&mut Conn<'_, H::State>) -> R) -> R {
        let id = self.id_of(key);
        let slot = &mut self.conns[key as usize];
        let mut conn = Conn {
            id,
            slot: key,
            peer: slot.peer,
            outbound: slot.outbound,
            high_water: self.limits.high_water,
            state: &mut slot.state,
            ctl: &mut slot.ctl,
            touched: &mut self.touched,
            messages_out: &mut self.counters.messages_out,
            handle: &self.handle,
        };
        f(&mut conn)
    }

    pub(super) fn received(&mut self, key: u32, data: &[u8]) {
        self.counters.bytes_in += data.len() as u64;
        let slot = &mut self.conns[key as usize];
        if slot.phase != Phase::Open {
            return; // closing: the bytes are read only to be discarded
        }
        slot.last_recv_tick = self.now_tick;
        if slot.paused || !slot.stash.is_empty() || slot.ctl.unsent > self.limits.high_water {
            // Back-pressure: the queue is over its mark (reading pauses at
            // the end of this turn, or the cancel is on its way); keep what
            // still arrives for when the queue drains.
            slot.stash.extend_from_slice(data);
            return;
        }
        self.deliver(key, data);
    }

    /// Cuts `data` into messages for `on_message`, stopping (and stashing
    /// the rest) when the handler closes the connection or fills its queue.
    fn deliver(&mut self, key: u32, data: &[u8]) {
        let id = self.id_of(key);
        let high = self.limits.high_water;
        let slot = &mut self.conns[key as usize];
        let handler = &*self.handler;
        let messages = &mut self.counters.messages_in;
        let before = *messages;
        let mut conn = Conn {
            id,
            slot: key,
            peer: slot.peer,
            outbound: slot.outbound,
            high_water: high,
            state: &mut slot.state,
            ctl: &mut slot.ctl,
            touched: &mut self.touched,
            messages_out: &mut self.counters.messages_out,
            handle: &self.handle,
        };
        let on_frame = |msg: &[u8]| {
            *messages += 1;
            handler.on_message(&mut conn, msg);
            if conn.ctl.close_request.is_some() || conn.ctl.unsent > high {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        };
        let result = slot.reader.feed_until(data, on_frame, &mut slot.stash);
        slot.got_message |= *messages != before;
        if slot.ctl.close_request.is_some() {
            slot.stash = Vec::new();
        }
        if let Err(e) = result {
            let reason = match e {
                FrameError::TooLarge { len, max } => CloseReason::FrameTooLarge { len, max },
                FrameError::Invalid(why) => CloseReason::Protocol(why),
            };
            tracing::debug!(conn = %id, ?reason, "closing on a framing error");
            // Replies to the good messages before the bad one still go out;
            // the rest of the peer's bytes are never read as messages.
            self.close(key, reason, true);
        }
        self.touch(key);
    }

    pub(super) fn recv_ended(&mut self, key: u32, why: RecvEnd) {
        let slot = &mut self.conns[key as usize];
        slot.recv_armed = false;
        slot.recv_cancelling = false;
        match why {
            RecvEnd::Eof => {
                slot.peer_done = true;
                if slot.phase == Phase::Open {
                    self.close(key, CloseReason::PeerClosed, true);
                }
            }
            RecvEnd::Error(e) => {
                slot.peer_done = true;
                slot.flush = false;
                if slot.phase == Phase::Open {
                    self.close(key, CloseReason::Io(e.kind()), false);
                }
            }
            RecvEnd::NoBuffers => self.counters.recv_buffer_waits += 1,
            RecvEnd::Cancelled | RecvEnd::Rearm => {}
        }
        self.touch(key);
    }

    pub(super) fn sent(&mut self, key: u32, result: std::io::Result<usize>) {
        let slot = &mut self.conns[key as usize];
        slot.sending = false;
        let mut batch = slot.batch.take().expect("a send in flight owns a batch");
        match result {
            Ok(n) => {
                self.counters.bytes_out += n as u64;
                slot.ctl.unsent = slot.ctl.unsent.saturating_sub(n);
                if n > 0 {
                    slot.last_write_tick = self.now_tick;
                }
                batch.advance(n);
                if batch.is_empty() {
                    self.spare_batches.push(batch);
                } else {
                    slot.batch = Some(batch);
                }
                if slot.congested && slot.ctl.unsent <= self.limits.low_water {
                    slot.congested = false;
                    slot.paused = false;
                    let open = slot.phase == Phase::Open;
                    self.shared().live.set_congested(key, false);
                    if open {
                        let handler = self.handler.clone();
                        self.with_conn(key, |conn| handler.on_drain(conn));
                    }
                }
            }
            Err(e) => {
                batch.bufs.clear();
                batch.offset = 0;
                self.spare_batches.push(batch);
                slot.ctl.out.clear();
                slot.ctl.unsent = 0;
                slot.flush = false;
                if slot.phase == Phase::Open {
                    self.close(key, CloseReason::Io(e.kind()), false);
                }
            }
        }
        self.touch(key);
    }

    pub(super) fn connected(&mut self, key: u32, result: std::io::Result<()>) {
        let slot = &mut self.conns[key as usize];
        match result {
            Ok(()) if self.shutdown.is_none() => {
                sys::prepare(&slot.socket, &self.socket_options);
                slot.phase = Phase::Open;
                slot.last_recv_tick = self.now_tick;
                slot.opened_tick = self.now_tick;
                self.open(key);
            }
            other => {
                let error = other
                    .err()
                    .unwrap_or_else(|| std::io::Error::other("shutting down"));
                let peer = slot.peer;
                self.handle.shared.release(None);
                self.conns.remove(key as usize);
                self.handler.on_connect_failed(peer, error);
            }
        }
    }

    pub(super) fn connect(&mut self, driver: &mut Driver, addr: SocketAddr) {
        if self.shutdown.is_some() {
            return;
        }
        if !self.handle.shared.admit(None) {
            let e = std::io::Error::other("max_connections reached");
            return self.handler.on_connect_failed(addr, e);
        }
        let socket = match sys::stream_socket(addr) {
            Ok(s) => s,
            Err(e) => {
                self.handle.shared.release(None);
                return self.handler.on_connect_failed(addr, e);
            }
        };
        let key = self.insert(socket, addr, Phase::Connecting, true);
        let slot = &mut self.conns[key as usize];
        driver.connect(key, &slot.socket, addr);
    }

    /// Starts closing an open connection: `on_close` runs now, once.
    pub(super) fn close(&mut self, key: u32, reason: CloseReason, flush: bool) {
        if self.conns[key as usize].phase != Phase::Open {
            return;
        }
        self.shared().live.set_closed(key);
        self.counters.closed += 1;
        self.counters.open -= 1;
        self.conns[key as usize].ctl.open = false;
        let handler = self.handler.clone();
        self.with_conn(key, |conn| handler.on_close(conn, reason));
        self.start_closing(key, flush);
    }

    fn start_closing(&mut self, key: u32, flush: bool) {
        let slot = &mut self.conns[key as usize];
        slot.phase = Phase::Closing;
        slot.ctl.open = false;
        slot.paused = false;
        slot.flush = flush;
        if !flush {
            slot.ctl.out.clear();
        }
        // Flushing has no deadline of its own (a peer that stops reading is
        // cut off by the write-stall timeout), except a shutdown's.
        slot.deadline = self.shutdown;
        self.arm_timer(key);
        self.touch(key);
    }

    pub(super) fn touch(&mut self, key: u32) {
        let slot = &mut self.conns[key as usize];
        if !slot.ctl.touched {
            slot.ctl.touched = true;
            self.touched.push(key);
        }
    }

    /// Moves one connection forward: carry out a requested close, start a
    /// send, pause or re-arm receiving, or finish closing.
    pub(super) fn advance(&mut self, driver: &mut Driver, key: u32) {
        let slot = &mut self.conns[key as usize];
        if slot.phase == Phase::Open {
            if let Some(reason) = slot.ctl.close_request.take() {
                self.close(key, reason, true);
                return; // `close` touched it again
            }
        }
        match slot.phase {
            Phase::Connecting => {}
            Phase::Open => {
                let high = self.limits.high_water;
                if slot.ctl.unsent > high && !slot.congested {
                    // Over the mark: refuse further sends (here and from
                    // other threads) and stop reading, so that a handler
                    // answering every message cannot grow the queue.
                    slot.congested = true;
                    slot.paused = true;
                    self.shared().live.set_congested(key, true);
                }
                let slot = &mut self.conns[key as usize];
                if !slot.paused && !slot.stash.is_empty() {
                    // The queue drained: deliver what arrived meanwhile.
                    let stash = std::mem::take(&mut slot.stash);
                    self.deliver(key, &stash);
                    let slot = &mut self.conns[key as usize];
                    if slot.phase != Phase::Open {
                        return;
                    }
                    if let Some(reason) = slot.ctl.close_request.take() {
                        self.close(key, reason, true);
                        return;
                    }
                    // Delivering may have crossed the mark again: the next
                    // round (this slot is touched) pauses it.
                }
                self.start_send(driver, key);
                let slot = &mut self.conns[key as usize];
                if slot.paused && slot.recv_armed && !slot.recv_cancelling {
                    slot.recv_cancelling = true;
                    driver.cancel_recv(key, &slot.socket);
                } else if !slot.recv_armed && !slot.peer_done && !slot.paused {
                    driver.recv(key, &slot.socket);
                    slot.recv_armed = true;
                }
                self.arm_timer(key);
            }
            Phase::Closing => {
                if slot.flush {
                    self.start_send(driver, key);
                    let slot = &self.conns[key as usize];
                    if slot.sending || !slot.ctl.out.is_empty() || slot.batch.is_some() {
                        return; // still flushing
                    }
                }
                let slot = &mut self.conns[key as usize];
                if !slot.fin_sent && !slot.peer_done {
                    // Everything queued is with the kernel: FIN follows it.
                    // Then keep reading (and discarding) until the peer
                    // closes too, so that no unread data turns our close
                    // into a reset that could destroy what we sent.
                    sys::shutdown_write(&slot.socket);
                    slot.fin_sent = true;
                    let linger = Instant::now() + self.limits.close_linger;
                    slot.deadline = Some(slot.deadline.map_or(linger, |d| d.min(linger)));
                    self.arm_timer(key);
                }
                let slot = &mut self.conns[key as usize];
                if !slot.peer_done {
                    if !slot.recv_armed {
                        driver.recv(key, &slot.socket);
                        slot.recv_armed = true;
                    }
                    return;
                }
                if slot.recv_armed || slot.sending {
                    if !slot.cancelled {
                        slot.cancelled = true;
                        driver.cancel(key, &slot.socket);
                    }
                    return;
                }
                self.free(key);
            }
        }
    }

    fn start_send(&mut self, driver: &mut Driver, key: u32) {
        let slot = &mut self.conns[key as usize];
        if slot.sending || (slot.ctl.out.is_empty() && slot.batch.is_none()) {
            return;
        }
        if slot.batch.is_none() && slot.ctl.unsent == slot.ctl.out.len() {
            // The queue starts moving now: the stall clock starts now.
            slot.last_write_tick = self.now_tick;
        }
        let mut batch = slot
            .batch
            .take()
            .or_else(|| self.spare_batches.pop())
            .unwrap_or_default();
        slot.ctl.out.fill(&mut batch);
        driver.send(key, &slot.socket, &mut batch);
        slot.batch = Some(batch);
        slot.sending = true;
    }

    /// Releases a slot whose operations have all ended.
    fn free(&mut self, key: u32) {
        let slot = self.conns.remove(key as usize);
        debug_assert!(!slot.recv_armed && !slot.sending);
        if slot.congested {
            self.shared().live.set_congested(key, false);
        }
        // Every slot was admitted under the caps (inbound per peer IP).
        let ip = (!slot.outbound).then(|| slot.peer.ip());
        self.handle.shared.release(ip);
        if let Some(mut batch) = slot.batch {
            batch.bufs.clear();
            batch.offset = 0;
            self.spare_batches.push(batch);
        }
        // Dropping `slot.socket` closes the descriptor.
    }

    /// The tick at which this connection next needs a look, if any.
    fn due_tick(&self, slot: &Slot<H::State>) -> Option<u64> {
        let ticks = |d: std::time::Duration| d.as_nanos().div_ceil(TICK.as_nanos()) as u64;
        let l = &self.limits;
        match slot.phase {
            Phase::Connecting => None,
            Phase::Open => [
                l.idle_timeout.map(|d| slot.last_recv_tick + ticks(d)),
                l.first_message_timeout
                    .filter(|_| !slot.got_message)
                    .map(|d| slot.opened_tick + ticks(d)),
                l.write_stall_timeout
                    .filter(|_| slot.ctl.unsent > 0)
                    .map(|d| slot.last_write_tick + ticks(d)),
            ]
            .into_iter()
            .flatten()
            .min(),
            Phase::Closing if slot.flush || !slot.peer_done => [
                slot.deadline.map(|d| self.wheel.tick_of(d)),
                l.write_stall_timeout
                    .filter(|_| slot.flush && slot.ctl.unsent > 0)
                    .map(|d| slot.last_write_tick + ticks(d)),
            ]
            .into_iter()
            .flatten()
            .min(),
            Phase::Closing => None,
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
        let slot = &self.conns[key as usize];
        match self.due_tick(slot) {
            Some(due) if due <= self.now_tick => self.expire(key),
            Some(_) => self.arm_timer(key),
            None => {}
        }
    }

    /// A deadline of this connection passed.
    fn expire(&mut self, key: u32) {
        let now = self.now_tick;
        let ticks = |d: std::time::Duration| d.as_nanos().div_ceil(TICK.as_nanos()) as u64;
        let l = self.limits;
        let slot = &mut self.conns[key as usize];
        match slot.phase {
            Phase::Open => {
                self.counters.timed_out += 1;
                let stalled = l
                    .write_stall_timeout
                    .is_some_and(|d| slot.ctl.unsent > 0 && slot.last_write_tick + ticks(d) <= now);
                let first = l
                    .first_message_timeout
                    .is_some_and(|d| !slot.got_message && slot.opened_tick + ticks(d) <= now);
                let (reason, flush) = if stalled {
                    (CloseReason::WriteStalled, false)
                } else if first {
                    (CloseReason::FirstMessageTimeout, true)
                } else {
                    (CloseReason::IdleTimeout, true)
                };
                self.close(key, reason, flush);
            }
            Phase::Closing => {
                // Out of time: drop what is unsent and stop waiting for the
                // peer.
                slot.flush = false;
                slot.peer_done = true;
                slot.ctl.out.clear();
                self.touch(key);
            }
            Phase::Connecting => {}
        }
    }
}
