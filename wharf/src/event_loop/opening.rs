//! A connection's start on its loop: accepted (checked against the access
//! rules and caps, then handed to a loop), adopted, connected, its TLS
//! handshake begun, and opened (`on_open`, then receiving). Also the
//! `Conn` view every callback of a connection is given.

use std::net::SocketAddr;

use super::guard::contain;
use super::slot::{Io, Open, Phase, Slot};
use super::Core;
use crate::access::Refused;
use crate::conn::{Conn, ConnCtl};
use crate::connect::{Dial, Opening};
use crate::error::CloseReason;
use crate::handler::{Accept, Handler};
use crate::id::{next_generation, ConnId};
use crate::limits::Cap;
use crate::mailbox::Command;
use crate::sys::{self, Socket};

/// The span a connection's callbacks run in (entered for a whole batch of
/// messages, not per message): what the handler logs there carries the
/// connection's id, and a subscriber can follow one connection. While the
/// span is disabled this is one check of a cached interest.
pub(super) fn conn_span(id: ConnId) -> tracing::span::EnteredSpan {
    tracing::debug_span!("conn", conn = %id).entered()
}

impl<H: Handler> Core<H> {
    pub(super) fn accepted(&mut self, _listener: u32, socket: Socket, peer: Option<SocketAddr>) {
        let peer = match peer.map_or_else(|| sys::peer_addr(&socket), Ok) {
            Ok(peer) => peer,
            Err(_) => return, // already reset by the peer
        };
        let access = &self.handle.shared.access;
        if let Err(refused) = access.check(&mut self.rules, peer.ip(), self.now.at) {
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
            .is_banned(peer.ip(), self.now.at)
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
            ctl: ConnCtl::new(self.framing.writer()),
            reader: self.framing.reader(),
            socket,
            generation,
            peer,
            outbound: dial.is_some(),
            dial,
            io: Io::default(),
            tls: None,
            phase,
            opened_tick: self.now.ceil,
            last_recv_tick: self.now.ceil,
            last_write_tick: self.now.ceil,
            timer: None,
        });
        Some(key as u32)
    }

    /// A connection became usable: run `on_open`, then start receiving.
    pub(super) fn open(&mut self, key: u32) {
        let slot = &mut self.conns[key as usize];
        if let Phase::Open(open) = &mut slot.phase {
            if open.handshaking {
                open.handshaking = false;
                slot.ctl.open = true;
                self.counters.tls_handshakes += 1;
                // The first-message timeout counts from here: the
                // handshake had its own.
                slot.opened_tick = self.now.ceil;
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
            now: self.now.at,
            socket: &slot.socket,
            tls: slot.tls.as_deref(),
        };
        f(&mut conn)
    }

    pub(super) fn connected(&mut self, key: u32, result: std::io::Result<()>) {
        let slot = &mut self.conns[key as usize];
        match result {
            Ok(()) if self.shutdown.is_none() => {
                sys::prepare(&slot.socket, &self.socket_options);
                slot.phase = Phase::Open(Open::default());
                slot.last_recv_tick = self.now.ceil;
                slot.opened_tick = self.now.ceil;
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
}
