//! What a connection receives: decrypted when it is TLS, framed, delivered
//! to `on_message` (or written to a file), held under back-pressure, and
//! the end of its input (EOF, reset, a failed read).

use std::ops::ControlFlow;

use super::guard::contain;
use super::opening::conn_span;
use super::slot::{Phase, Recv};
use super::Core;
use crate::codec::FrameError;
use crate::conn::Conn;
use crate::error::CloseReason;
use crate::handler::Handler;
use crate::sys::{Flow, RecvEnd};

/// Spare reassembly buffers a loop keeps (`Core::spare_reassembly`), and
/// the largest it keeps: at most 4 MiB in all.
const SPARE_REASSEMBLY: usize = 16;
const SPARE_REASSEMBLY_SIZE: usize = 256 * 1024;

impl<H: Handler> Core<H> {
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
        slot.last_recv_tick = self.now.ceil;
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
        slot.last_recv_tick = self.now.ceil;
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
        if !slot.reader.has_buffer() {
            if let Some(spare) = self.spare_reassembly.pop() {
                slot.reader.lend(spare);
            }
        }
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
            now: self.now.at,
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
        if let Some(spare) = slot.reader.take_spare() {
            if spare.capacity() <= SPARE_REASSEMBLY_SIZE
                && self.spare_reassembly.len() < SPARE_REASSEMBLY
            {
                self.spare_reassembly.push(spare);
            }
        }
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
}
