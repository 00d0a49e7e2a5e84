//! One connection's open life on its loop: opened (accepted or connected),
//! receiving and delivering, sending, back-pressure. Its end is in
//! `closing.rs`.

use std::net::SocketAddr;
use std::ops::ControlFlow;

use super::guard::contain;
use super::slot::{Io, Open, Phase, Recv, Slot};
use super::Core;
use crate::access::Refused;
use crate::codec::FrameError;
use crate::conn::{Conn, ConnCtl};
use crate::connect::{Dial, Opening};
use crate::error::CloseReason;
use crate::handler::{Accept, Handler};
use crate::id::{next_generation, ConnId};
use crate::limits::Cap;
use crate::mailbox::Command;
use crate::sys::{self, Driver, Flow, RecvEnd, SendBatch, Socket};

/// Most plaintext encrypted for one send.
const TLS_BATCH: usize = 256 * 1024;

/// The span a connection's callbacks run in (entered for a whole batch of
/// messages, not per message): what the handler logs there carries the
/// connection's id, and a subscriber can follow one connection. While the
/// span is disabled this is one check of a cached interest.
fn conn_span(id: ConnId) -> tracing::span::EnteredSpan {
    tracing::debug_span!("conn", conn = %id).entered()
}

impl<H: Handler> Core<H> {
    pub(super) fn accepted(&mut self, _listener: u32, socket: Socket, peer: Option<SocketAddr>) {
        let peer = match peer.map_or_else(|| sys::peer_addr(&socket), Ok) {
            Ok(peer) => peer,
            Err(_) => return, // already reset by the peer
        };
        let access = &self.handle.shared.access;
        if let Err(refused) = access.check(&mut self.rules, peer.ip(), self.now) {
            // Closed at once, before any callback or slot, with a reset.
            match refused {
                Refused::Denied => self.counters.denied += 1,
                Refused::Banned => self.counters.banned += 1,
                Refused::RateLimited(_) => self.counters.rate_limited += 1,
            }
            tracing::trace!(%peer, cause = refused.cause(), "connection refused at accept");
            let _ = socket.set_linger(Some(std::time::Duration::ZERO));
            return;
        }
        let peer = Some(peer);
        let loops = &self.handle.shared.loops;
        if self.spread_accepts && self.shutdown.is_none() {
            let target = self.next_adopter % loops.len();
            self.next_adopter = self.next_adopter.wrapping_add(1);
            if target != self.index {
                // A loop that has ended gives the socket back: keep it.
                match loops[target].mailbox.post(Command::Adopt(socket, peer)) {
                    Ok(()) => return,
                    Err(Command::Adopt(socket, peer)) => return self.adopt(socket, peer),
                    Err(_) => unreachable!("a refused post hands its command back"),
                }
            }
        }
        self.adopt(socket, peer);
    }

    /// Makes an accepted connection one of this loop's.
    pub(super) fn adopt(&mut self, socket: Socket, peer: Option<SocketAddr>) {
        if self.shutdown.is_some() {
            self.counters.refused_shutdown += 1;
            return; // dropping the socket closes it
        }
        let peer = match peer.map_or_else(|| sys::peer_addr(&socket), Ok) {
            Ok(peer) => peer,
            Err(_) => return, // already reset by the peer
        };
        if self
            .handle
            .shared
            .access
            .bans
            .is_banned(peer.ip(), self.now)
        {
            // Banned while it was on its way from the loop that accepted
            // it: the ban's Kick may have reached this loop before it did.
            self.counters.banned += 1;
            let _ = socket.set_linger(Some(std::time::Duration::ZERO));
            return;
        }
        if let Err(cap) = self.handle.shared.admit(Some(peer.ip())) {
            // Over a connection cap: closed at once, counted; the open
            // connections never notice.
            match cap {
                Cap::Global => self.counters.refused_cap += 1,
                Cap::PerIp => self.counters.refused_per_ip += 1,
            }
            tracing::trace!(%peer, ?cap, "connection refused over a cap");
            return;
        }
        sys::prepare(&socket, &self.socket_options);
        let Some(key) = self.insert(socket, peer, Phase::Open(Open::default()), None) else {
            self.handle.shared.release(Some(peer.ip()));
            return;
        };
        match self.tls.as_ref().map(|tls| tls.session()) {
            None => self.open(key),
            Some(Ok(session)) => self.start_handshake(key, session),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "could not start a TLS session");
                self.counters.tls_failed += 1;
                self.start_closing(key, false, false);
            }
        }
    }

    /// A TLS connection's handshake begins (its first flight, if it is the
    /// client); `open` follows when it completes.
    pub(super) fn start_handshake(&mut self, key: u32, session: crate::tls::Session) {
        let slot = &mut self.conns[key as usize];
        slot.tls = Some(Box::new(session));
        // No sends and no broadcasts until it opens.
        slot.ctl.open = false;
        if let Phase::Open(open) = &mut slot.phase {
            open.handshaking = true;
        }
        self.arm_timer(key);
        self.touch(key);
    }

    /// Gives a new connection a slot and its state (`Handler::new_state`);
    /// `None` if that panicked (counted; an outbound connect is reported
    /// failed), and the socket is closed.
    pub(super) fn insert(
        &mut self,
        socket: Socket,
        peer: SocketAddr,
        phase: Phase,
        dial: Option<Box<Dial>>,
    ) -> Option<u32> {
        let token = dial.as_ref().map(|d| d.request.token);
        let handler = self.handler.clone();
        let opening = Opening { peer, token };
        let state = match contain(|| handler.new_state(&opening)) {
            Ok(state) => state,
            Err(why) => {
                self.panicked("new_state", &peer, &why);
                if let Some(dial) = dial {
                    let e = std::io::Error::other("Handler::new_state panicked");
                    self.dial_failed(dial, Some(peer), e);
                }
                return None;
            }
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self.generations.len() <= key {
            self.generations.resize(key + 1, 0);
        }
        let generation = next_generation(self.generations[key]);
        self.generations[key] = generation;
        entry.insert(Slot {
            state,
            ctl: ConnCtl::new(self.framing.reader()),
            reader: self.framing.reader(),
            socket,
            generation,
            peer,
            outbound: dial.is_some(),
            dial,
            io: Io::default(),
            tls: None,
            phase,
            opened_tick: self.stamp_tick,
            last_recv_tick: self.stamp_tick,
            last_write_tick: self.stamp_tick,
            timer: None,
        });
        Some(key as u32)
    }

    /// A connection became usable: run `on_open`, then start receiving.
    fn open(&mut self, key: u32) {
        let slot = &mut self.conns[key as usize];
        if let Phase::Open(open) = &mut slot.phase {
            if open.handshaking {
                open.handshaking = false;
                slot.ctl.open = true;
                self.counters.tls_handshakes += 1;
                // The first-message timeout counts from here: the
                // handshake had its own.
                slot.opened_tick = self.stamp_tick;
            }
        }
        if let Some(dial) = &mut slot.dial {
            // Open: a failure from now on is a close, and the next
            // reconnect starts from the first delay.
            dial.attempt = 0;
            dial.pending.clear();
        }
        self.counters.accepted += 1;
        self.counters.open += 1;
        let id = self.id_of(key);
        let slot = &self.conns[key as usize];
        tracing::debug!(conn = %id, peer = %slot.peer, outbound = slot.outbound, "connection opened");
        self.shared().live.set_open(key, id.generation());
        let handler = self.handler.clone();
        let accept = match self.with_conn(key, |conn| contain(|| handler.on_open(conn))) {
            Ok(accept) => accept,
            Err(why) => {
                // Not kept, as if refused, but what on_open queued is dropped.
                self.panicked("on_open", &id, &why);
                self.shared().live.set_closed(key);
                self.counters.count_close(CloseReason::HandlerPanic.kind());
                self.start_closing(key, false, false);
                return;
            }
        };
        if accept == Accept::No {
            // Refused: what on_open queued is still flushed; no on_close.
            self.shared().live.set_closed(key);
            self.counters.count_rejected();
            tracing::debug!(conn = %id, "connection refused by on_open");
            self.start_closing(key, true, false);
            return;
        }
        self.arm_timer(key);
        self.touch(key);
    }

    pub(super) fn id_of(&self, key: u32) -> ConnId {
        let tag = self.handle.shared.tag;
        ConnId::new(tag, self.index, key, self.conns[key as usize].generation)
    }

    /// Runs `f` with a `Conn` view of slot `key`.
    pub(super) fn with_conn<R>(
        &mut self,
        key: u32,
        f: impl FnOnce(&mut Conn<'_, H::State>) -> R,
    ) -> R {
        let id = self.id_of(key);
        let _span = conn_span(id);
        let slot = &mut self.conns[key as usize];
        let mut conn = Conn {
            id,
            slot: key,
            peer: slot.peer,
            outbound: slot.outbound,
            token: slot.dial.as_ref().map(|d| d.request.token),
            high_water: self.limits.high_water,
            state: &mut slot.state,
            ctl: &mut slot.ctl,
            touched: &mut self.touched,
            counters: &mut self.counters,
            groups: &mut self.groups,
            handle: &self.handle,
            now: self.now,
            socket: &slot.socket,
            tls: slot.tls.as_deref(),
        };
        f(&mut conn)
    }

    pub(super) fn received(&mut self, key: u32, data: &[u8]) -> Flow {
        self.counters.bytes_in += data.len() as u64;
        if self.conns[key as usize].tls.is_some() {
            return self.received_tls(key, data);
        }
        self.received_plain(key, data)
    }

    /// Ciphertext arrived: decrypt it, open the connection if that
    /// completed the handshake, and take the plaintext on as if it had
    /// come from the socket.
    fn received_tls(&mut self, key: u32, data: &[u8]) -> Flow {
        let slot = &mut self.conns[key as usize];
        let (Phase::Open(open), Some(tls)) = (&slot.phase, slot.tls.as_deref_mut()) else {
            return Flow::Continue; // closing: read only to be discarded
        };
        if slot.ctl.close_request.is_some() || open.eof {
            return Flow::Continue;
        }
        slot.last_recv_tick = self.stamp_tick;
        let was_handshaking = open.handshaking;
        let mut plain = std::mem::take(&mut self.plain);
        plain.clear();
        let result = tls.decrypt(data, &mut plain);
        let done = !tls.is_handshaking();
        let peer_closed = tls.peer_closed();
        // The session may have something to send: handshake, alert, ticket.
        self.touch(key);
        let mut flow = Flow::Continue;
        // A handshake that completed opens even if a record after it then
        // failed: what decrypted before the failure is delivered, and the
        // connection closes with the failure as its reason.
        if was_handshaking && done {
            self.open(key);
        }
        let still_open = matches!(
            &self.conns[key as usize].phase,
            Phase::Open(o) if !o.handshaking
        );
        if still_open && !plain.is_empty() {
            flow = self.received_plain(key, &plain);
        }
        if let Err(e) = result {
            self.tls_failed(key, e);
        } else if peer_closed {
            // close_notify: the same as EOF.
            if let Phase::Open(open) = &mut self.conns[key as usize].phase {
                open.eof = true;
            }
        }
        if plain.capacity() <= 64 * 1024 {
            self.plain = plain;
        }
        flow
    }

    /// TLS failed on this connection: before it opened, it is closed
    /// without a callback (counted); after, with `CloseReason::Tls`. What
    /// was queued is dropped (it can no longer be encrypted), and the
    /// alert rustls has for the peer is sent before the FIN.
    pub(super) fn tls_failed(&mut self, key: u32, e: crate::TlsError) {
        let id = self.id_of(key);
        let slot = &mut self.conns[key as usize];
        // The plaintext waiting to be encrypted is lost; ciphertext in
        // flight or left by a short send still goes out (it is whole
        // records), and `unsent` keeps counting it, so the write-stall
        // timeout still applies to it.
        let plain = slot.ctl.out.len();
        slot.ctl.out.clear();
        slot.ctl.unsent -= plain;
        self.counters.bytes_dropped += plain as u64;
        let handshaking = matches!(&slot.phase, Phase::Open(o) if o.handshaking);
        tracing::debug!(conn = %id, peer = %slot.peer, error = %e, handshaking, "TLS failed");
        if !handshaking {
            return self.close(key, CloseReason::Tls(e), true);
        }
        self.counters.tls_failed += 1;
        if let Some(dial) = slot.dial.take() {
            // A client connection whose handshake failed: a failed connect
            // to this address; the next one is tried, or the connect fails
            // and is retried as its policy says.
            let peer = slot.peer;
            let error = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
            self.next_address(dial, peer, error);
        }
        let peer_done = matches!(&self.conns[key as usize].phase, Phase::Open(o) if o.eof);
        self.start_closing(key, true, peer_done);
    }

    fn received_plain(&mut self, key: u32, data: &[u8]) -> Flow {
        let high = self.limits.high_water;
        let slot = &mut self.conns[key as usize];
        let Phase::Open(open) = &mut slot.phase else {
            return Flow::Continue; // closing: read only to be discarded
        };
        if slot.ctl.close_request.is_some() {
            // Closing at the end of this turn (the handler asked, or it
            // panicked): the rest of the stream is never read as messages.
            // What was held after the last message is dropped with the
            // close, so these bytes could not be framed anyway.
            return Flow::Continue;
        }
        slot.last_recv_tick = self.stamp_tick;
        let jobs_full = slot.ctl.jobs.in_flight() >= self.limits.jobs_per_connection;
        let held_back = open.congested || slot.ctl.read_paused || jobs_full;
        if held_back || !open.held.is_empty() || slot.ctl.unsent > high {
            // Back-pressure: keep what arrives until the queue drains (or
            // the connection's jobs come back). The
            // receive is being paused: poll and IOCP read nothing more this
            // turn; io_uring may still report what its receive had queued.
            open.held.extend_from_slice(data);
            return Flow::Pause;
        }
        self.deliver(key, data);
        match &self.conns[key as usize].phase {
            Phase::Open(open) if open.held.is_empty() => Flow::Continue,
            _ => Flow::Pause,
        }
    }

    /// Cuts `data` into messages for `on_message`, stopping (and holding
    /// the rest) when the handler closes the connection, fills its queue,
    /// has as many jobs in flight as a connection may, or panics.
    pub(super) fn deliver(&mut self, key: u32, data: &[u8]) {
        let id = self.id_of(key);
        let high = self.limits.high_water;
        let jobs_limit = self.limits.jobs_per_connection;
        let mut data = data;
        let slot = &mut self.conns[key as usize];
        if slot.ctl.sink.is_some() {
            if let Phase::Open(open) = &mut slot.phase {
                // A receive into a file asked for outside `on_message` (a
                // timer, a job's result) while the reader held the start
                // of a frame: those bytes are the first of the file's.
                // Held first, before `data`, and delivered in order.
                let pending = slot.reader.take_pending();
                if !pending.is_empty() {
                    debug_assert!(open.held.is_empty(), "held input empties the reader");
                    open.held = pending;
                    open.held.extend_from_slice(data);
                    self.touch(key);
                    return;
                }
            }
        }
        // Bytes a receive into a file asked for go there first.
        while let Some(sink) = self.conns[key as usize].ctl.sink.as_deref_mut() {
            let n = sink.take(data);
            data = &data[n..];
            if sink.left > 0 {
                return; // every byte went to the file
            }
            self.finish_sink(key, None);
            let slot = &mut self.conns[key as usize];
            let Phase::Open(open) = &mut slot.phase else {
                return;
            };
            if slot.ctl.close_request.is_some() {
                return; // what follows is never read as messages
            }
            let jobs_full = slot.ctl.jobs.in_flight() >= jobs_limit;
            if open.congested || slot.ctl.read_paused || slot.ctl.unsent > high || jobs_full {
                // The callback filled the queue or paused: hold the rest.
                open.held.extend_from_slice(data);
                return;
            }
        }
        if data.is_empty() {
            return;
        }
        let slot = &mut self.conns[key as usize];
        let Phase::Open(open) = &mut slot.phase else {
            return;
        };
        let handler = &*self.handler;
        let _span = conn_span(id);
        let mut messages = 0u64;
        let mut panic = None;
        let mut conn = Conn {
            id,
            slot: key,
            peer: slot.peer,
            outbound: slot.outbound,
            token: slot.dial.as_ref().map(|d| d.request.token),
            high_water: high,
            state: &mut slot.state,
            ctl: &mut slot.ctl,
            touched: &mut self.touched,
            counters: &mut self.counters,
            groups: &mut self.groups,
            handle: &self.handle,
            now: self.now,
            socket: &slot.socket,
            tls: slot.tls.as_deref(),
        };
        let on_frame = |msg: &[u8]| {
            messages += 1;
            if let Err(why) = contain(|| handler.on_message(&mut conn, msg)) {
                panic = Some(why);
                conn.ctl.close_request = Some(CloseReason::HandlerPanic);
                return ControlFlow::Break(());
            }
            if conn.ctl.close_request.is_some()
                || conn.ctl.read_paused
                || conn.ctl.unsent > high
                || conn.ctl.jobs.in_flight() >= jobs_limit
                || conn.ctl.sink.is_some()
            {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let result = slot.reader.feed_until(data, on_frame, &mut open.held);
        open.got_message |= messages != 0;
        self.counters.messages_in += messages;
        if slot.ctl.close_request.is_some() {
            open.held = Vec::new();
        }
        if let Some(why) = panic {
            self.panicked("on_message", &id, &why);
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

    /// A receive into a file ended: all its bytes came (`ended` is
    /// `None`), or the stream ended or the connection closed first.
    /// `on_file_received` hears of it.
    pub(super) fn finish_sink(&mut self, key: u32, ended: Option<std::io::Error>) {
        let Some(sink) = self.conns[key as usize].ctl.sink.take() else {
            return;
        };
        let result = sink.result(ended);
        let id = self.id_of(key);
        let handler = self.handler.clone();
        if let Err(why) = self.with_conn(key, |conn| {
            contain(|| handler.on_file_received(conn, result))
        }) {
            self.panicked("on_file_received", &id, &why);
            self.conns[key as usize].ctl.close_request = Some(CloseReason::HandlerPanic);
        }
        self.touch(key);
    }

    pub(super) fn recv_ended(&mut self, key: u32, why: RecvEnd) {
        let slot = &mut self.conns[key as usize];
        slot.io.recv = Recv::Idle;
        match why {
            RecvEnd::Eof => self.peer_finished(key, None),
            RecvEnd::Error(e) => self.peer_finished(key, Some(e)),
            RecvEnd::NoBuffers => self.counters.recv_buffer_waits += 1,
            RecvEnd::Cancelled | RecvEnd::Rearm => {}
        }
        self.touch(key);
    }

    /// The peer finished sending: EOF (`None`) or a failure.
    fn peer_finished(&mut self, key: u32, error: Option<std::io::Error>) {
        let slot = &mut self.conns[key as usize];
        match (&mut slot.phase, error) {
            // Every request received is still delivered and answered
            // (`advance` closes once nothing is held).
            (Phase::Open(open), None) => {
                open.eof = true;
                if let Some(Err(e)) = slot.tls.as_deref_mut().map(|tls| tls.eof()) {
                    self.tls_failed(key, e);
                }
            }
            (Phase::Open(_), Some(e)) => self.close_failed(key, e),
            (Phase::Closing(_), error) => self.closing_peer_done(key, error.is_some()),
            (Phase::Connecting, _) => {}
        }
    }

    pub(super) fn sent(
        &mut self,
        key: u32,
        mut batch: Box<SendBatch>,
        result: std::io::Result<usize>,
    ) {
        let slot = &mut self.conns[key as usize];
        slot.io.sending = false;
        match result {
            Ok(n) => {
                self.counters.bytes_out += n as u64;
                // Bytes of a batch that was in flight when the queue was
                // dropped (an abortive close) were counted as dropped then;
                // those the kernel still wrote are sent, not dropped.
                let already_dropped = n.saturating_sub(slot.ctl.unsent);
                self.counters.bytes_dropped -= already_dropped as u64;
                slot.ctl.unsent -= n - already_dropped;
                if n > 0 {
                    slot.last_write_tick = self.stamp_tick;
                }
                batch.advance(n);
                if batch.is_empty() {
                    self.spare_batches.push(batch);
                } else {
                    slot.io.leftover = Some(batch);
                }
                if slot.io.leftover.is_none() && slot.ctl.out.is_empty() {
                    // Quiet: give back what a big message made the queue grow.
                    slot.ctl.out.shrink_idle();
                }
                let drained = slot.ctl.unsent <= self.limits.low_water;
                if let Phase::Open(open) = &mut slot.phase {
                    if open.congested && drained {
                        open.congested = false;
                        // Reading resumes now: the idle clock starts again
                        // (it does not run while wharf itself paused reading).
                        slot.last_recv_tick = self.stamp_tick;
                        self.shared().live.set_congested(key, false);
                        let id = self.id_of(key);
                        let handler = self.handler.clone();
                        if let Err(why) =
                            self.with_conn(key, |conn| contain(|| handler.on_drain(conn)))
                        {
                            self.panicked("on_drain", &id, &why);
                            self.conns[key as usize].ctl.close_request =
                                Some(CloseReason::HandlerPanic);
                        }
                    }
                }
            }
            Err(e) => {
                batch.clear();
                self.spare_batches.push(batch);
                self.send_failed(key, e);
            }
        }
        self.touch(key);
    }

    pub(super) fn connected(&mut self, key: u32, result: std::io::Result<()>) {
        let slot = &mut self.conns[key as usize];
        match result {
            Ok(()) if self.shutdown.is_none() => {
                sys::prepare(&slot.socket, &self.socket_options);
                slot.phase = Phase::Open(Open::default());
                slot.last_recv_tick = self.stamp_tick;
                slot.opened_tick = self.stamp_tick;
                if let Some(dial) = &mut slot.dial {
                    // Connected: the connect timeout is over (a TLS
                    // handshake has its own). The back-off and the
                    // addresses left are kept until the connection opens.
                    dial.deadline = None;
                }
                let tls = slot.dial.as_ref().and_then(|d| {
                    let host = d.request.host();
                    let peer = slot.peer;
                    d.request.tls.as_ref().map(|tls| tls.session(host, peer))
                });
                match tls {
                    None => self.open(key),
                    Some(Ok(session)) => self.start_handshake(key, session),
                    Some(Err(e)) => {
                        // Closed as a handshake that failed at once: a
                        // connect failure, retried as its policy says.
                        let slot = &mut self.conns[key as usize];
                        slot.ctl.open = false;
                        if let Phase::Open(open) = &mut slot.phase {
                            open.handshaking = true;
                        }
                        self.tls_failed(key, crate::TlsError::Protocol(e.to_string()));
                    }
                }
            }
            other => {
                let peer = slot.peer;
                self.handle.shared.release(None);
                let slot = self.conns.remove(key as usize);
                let dial = slot.dial.expect("an outbound connection has its dial");
                let error = match other {
                    _ if dial.timed_out => std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect timed out after {:?}", dial.request.timeout),
                    ),
                    Err(e) => e,
                    Ok(()) => std::io::Error::other("the server is shutting down"),
                };
                self.next_address(dial, peer, error);
            }
        }
    }

    pub(super) fn touch(&mut self, key: u32) {
        let slot = &mut self.conns[key as usize];
        if !slot.ctl.touched {
            slot.ctl.touched = true;
            self.touched.push(key);
        }
    }

    /// Moves one connection forward: carry out a requested close, deliver
    /// what was held, start a send, pause or re-arm receiving, or take the
    /// next closing step.
    pub(super) fn advance(&mut self, driver: &mut Driver, key: u32) {
        match self.conns[key as usize].phase {
            Phase::Connecting => self.advance_connecting(driver, key),
            Phase::Open(_) => self.advance_open(driver, key),
            Phase::Closing(_) => self.advance_closing(driver, key),
        }
    }

    fn advance_open(&mut self, driver: &mut Driver, key: u32) {
        let high = self.limits.high_water;
        let slot = &mut self.conns[key as usize];
        if let Some(reason) = slot.ctl.close_request.take() {
            return self.close_as_asked(key, reason);
        }
        let Phase::Open(open) = &mut slot.phase else {
            return;
        };
        if slot.ctl.unsent > high && !open.congested {
            // Over the mark: refuse further sends (here and from other
            // threads) and stop reading, so that a handler answering every
            // message cannot grow the queue.
            open.congested = true;
            self.counters.backpressure_pauses += 1;
            self.shared().live.set_congested(key, true);
        }
        let slot = &mut self.conns[key as usize];
        let Phase::Open(open) = &mut slot.phase else {
            return;
        };
        let jobs = slot.ctl.jobs.in_flight();
        let jobs_full = jobs >= self.limits.jobs_per_connection;
        let held_back = open.congested || slot.ctl.read_paused || jobs_full;
        if slot.ctl.sink.is_some() && open.held.is_empty() {
            // As in `deliver`: a partial frame the reader held belongs to
            // the file asked for since.
            open.held = slot.reader.take_pending();
        }
        if !held_back && !open.held.is_empty() {
            // The queue drained (and jobs came back): deliver what arrived
            // meanwhile. Crossing the mark again holds the rest; this slot
            // is touched, so the next round pauses it.
            let held = std::mem::take(&mut open.held);
            self.deliver(key, &held);
            let slot = &mut self.conns[key as usize];
            if let Some(reason) = slot.ctl.close_request.take() {
                return self.close_as_asked(key, reason);
            }
            if !matches!(slot.phase, Phase::Open(_)) {
                return;
            }
        }
        let slot = &self.conns[key as usize];
        if let (Some(sink), Phase::Open(open)) = (&slot.ctl.sink, &slot.phase) {
            // Asked for nothing, or the stream ended short of it.
            let short = open.eof && open.held.is_empty();
            if sink.left == 0 || short {
                let e = short.then(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the stream ended before the bytes asked for",
                    )
                });
                self.finish_sink(key, e);
                if let Some(reason) = self.conns[key as usize].ctl.close_request.take() {
                    return self.close_as_asked(key, reason);
                }
            }
        }
        let slot = &mut self.conns[key as usize];
        let Phase::Open(open) = &mut slot.phase else {
            return;
        };
        let jobs = slot.ctl.jobs.in_flight();
        let jobs_full = jobs >= self.limits.jobs_per_connection;
        if open.eof && open.held.is_empty() && jobs == 0 {
            // Every request the peer sent has been delivered and its jobs
            // answered: close, and flush the replies.
            return self.close(key, CloseReason::PeerClosed, true);
        }
        if self.shutdown.is_some() && jobs == 0 {
            // Left open at shutdown until its jobs came back: they have.
            return self.close(key, CloseReason::Shutdown, true);
        }
        // Reading pauses over the send queue's mark, while the connection
        // has as many jobs in flight as it may, and during a shutdown.
        let paused = open.congested || slot.ctl.read_paused || jobs_full || self.shutdown.is_some();
        let eof = open.eof;
        self.start_send(driver, key);
        if !matches!(self.conns[key as usize].phase, Phase::Open(_)) {
            return; // the send failed at once (a file could not be read)
        }
        let slot = &mut self.conns[key as usize];
        let flushed = !slot.io.sending && slot.ctl.out.is_empty() && slot.io.leftover.is_none();
        if slot.ctl.shut_write && !slot.ctl.write_shut && flushed {
            // Half-closed by the handler: the FIN follows what was queued.
            slot.ctl.write_shut = true;
            sys::shutdown_write(&slot.socket);
        }
        match slot.io.recv {
            Recv::Armed if paused => {
                slot.io.recv = Recv::Cancelling;
                driver.cancel_recv(key, &slot.socket);
            }
            Recv::Idle if !paused && !eof => {
                slot.io.recv = Recv::Armed;
                driver.recv(key, &slot.socket);
            }
            _ => {}
        }
        self.arm_timer(key);
    }

    pub(super) fn start_send(&mut self, driver: &mut Driver, key: u32) {
        let slot = &mut self.conns[key as usize];
        // A TLS session may have something of its own to send (handshake,
        // close_notify): `fill_tls` finds out.
        let idle = slot.ctl.out.is_empty() && slot.io.leftover.is_none() && slot.tls.is_none();
        if slot.io.sending || idle {
            return;
        }
        if slot.io.leftover.is_none() && slot.ctl.unsent == slot.ctl.out.len() {
            // The queue starts moving now: the stall clock starts now.
            slot.last_write_tick = self.stamp_tick;
        }
        let mut batch = slot
            .io
            .leftover
            .take()
            .or_else(|| self.spare_batches.pop())
            .unwrap_or_default();
        let filled = if slot.tls.is_some() {
            self.fill_tls(key, &mut batch)
        } else {
            let zero_copy = self
                .limits
                .zero_copy_files
                .unwrap_or_else(|| !slot.peer.ip().to_canonical().is_loopback());
            slot.ctl
                .out
                .fill(&mut batch, zero_copy && driver.sends_files())
        };
        if let Err(e) = filled {
            // A file being sent could not be read (it shrank, or the read
            // failed): the message it began cannot be completed, so the
            // connection fails as on a send error.
            tracing::debug!(conn = %self.id_of(key), error = %e, "reading a file to send failed");
            batch.clear();
            self.spare_batches.push(batch);
            return self.send_failed(key, e);
        }
        let slot = &mut self.conns[key as usize];
        if batch.is_empty() {
            // Handshaking, with plaintext waiting for it to finish.
            self.spare_batches.push(batch);
            return;
        }
        slot.io.sending = true;
        driver.send(key, &slot.socket, batch);
    }

    /// Encrypts what is queued (up to `TLS_BATCH` of plaintext at a time,
    /// so that rustls never holds more than one send's worth), closes the
    /// TLS stream once the queue is empty on a connection that is ending
    /// its sending, and adds the ciphertext to `batch`. `unsent` and the
    /// queued-bytes counter count what goes on the wire: the plaintext
    /// taken out is replaced by its ciphertext.
    fn fill_tls(&mut self, key: u32, batch: &mut SendBatch) -> std::io::Result<()> {
        let slot = &mut self.conns[key as usize];
        let Some(tls) = slot.tls.as_deref_mut() else {
            return Ok(());
        };
        let mut taken = 0;
        if tls.can_encrypt() {
            let chunks = &mut self.tls_chunks;
            while taken < TLS_BATCH && chunks.len() < 64 {
                let popped = slot.ctl.out.pop_upto(TLS_BATCH - taken);
                // The list is the loop's: on a failed file read nothing of
                // this connection may stay in it for the next one.
                let popped = popped.inspect_err(|_| chunks.clear())?;
                match popped {
                    Some(chunk) => {
                        taken += chunk.len();
                        chunks.push(chunk);
                    }
                    None => break,
                }
            }
            if !chunks.is_empty() {
                let slices: Vec<std::io::IoSlice<'_>> =
                    chunks.iter().map(|c| std::io::IoSlice::new(c)).collect();
                tls.encrypt(&slices);
                drop(slices);
                chunks.clear();
            }
            let ending = !slot.ctl.open || slot.ctl.shut_write;
            if ending && slot.ctl.out.is_empty() && !tls.notified() {
                let handshaking = matches!(&slot.phase, Phase::Open(o) if o.handshaking);
                if !handshaking {
                    tls.close_notify();
                }
            }
        }
        if let Some(wire) = tls.take_output() {
            self.counters.bytes_queued += wire.len() as u64;
            self.counters.bytes_queued -= taken as u64;
            slot.ctl.unsent = slot.ctl.unsent + wire.len() - taken;
            batch.bufs.push(wire);
        } else if taken > 0 {
            // The session failed while encrypting: the plaintext is lost.
            slot.ctl.unsent -= taken;
            self.counters.bytes_dropped += taken as u64;
        }
        Ok(())
    }
}
