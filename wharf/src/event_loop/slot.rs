//! One connection slot of a loop, and the phases of a connection's life.
//!
//! Each phase keeps its own data, so that states which lose data cannot be
//! written: only an `Open` connection holds received bytes not yet
//! delivered, so "closing, but input still kept" does not exist; and a
//! `Closing` connection has no input at all, so nothing is delivered once
//! `on_close` has run.

use std::net::SocketAddr;
use std::time::Instant;

use crate::codec::FrameReader;
use crate::conn::ConnCtl;
use crate::connect::Dial;
use crate::sys::{SendBatch, Socket};

pub(super) struct Slot<S> {
    pub(super) state: S,
    pub(super) ctl: ConnCtl,
    pub(super) reader: FrameReader,
    pub(super) socket: Socket,
    pub(super) generation: u64,
    pub(super) peer: SocketAddr,
    pub(super) outbound: bool,
    /// An outbound connection's connect: its token, the addresses left to
    /// try, and its reconnect policy.
    pub(super) dial: Option<Box<Dial>>,
    pub(super) io: Io,
    /// The connection's TLS, if it has any.
    pub(super) tls: Option<Box<crate::tls::Session>>,
    pub(super) phase: Phase,
    /// Ticks (of the timer wheel, rounded up) of the last activity.
    pub(super) opened_tick: u64,
    pub(super) last_recv_tick: u64,
    pub(super) last_write_tick: u64,
    /// The tick of this slot's live wheel entry (older entries are stale).
    pub(super) timer: Option<u64>,
}

/// What of a connection's operations is with the driver. The slot is freed
/// only when nothing is.
#[derive(Default)]
pub(super) struct Io {
    pub(super) recv: Recv,
    /// A send is in flight: its batch is with the driver.
    pub(super) sending: bool,
    /// What a short send left, to go out before anything queued after it.
    pub(super) leftover: Option<Box<SendBatch>>,
}

impl Io {
    pub(super) fn busy(&self) -> bool {
        self.sending || self.recv != Recv::Idle
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(super) enum Recv {
    /// No receive in flight.
    #[default]
    Idle,
    /// A receive is in flight.
    Armed,
    /// A receive is in flight and has been asked to stop (pausing).
    Cancelling,
}

pub(super) enum Phase {
    /// An outbound connect is in flight.
    Connecting,
    /// Callbacks run; sends are accepted.
    Open(Open),
    /// `on_close` has run (or `on_open` refused): no input is delivered.
    Closing(Closing),
}

#[derive(Default)]
pub(super) struct Open {
    /// Bytes received and not yet delivered: they came while the send queue
    /// was over its high-water mark (or the handler filled it part-way
    /// through a read), and go to `on_message` as soon as it drains.
    pub(super) held: Vec<u8>,
    /// The peer finished sending (EOF). What is held is still delivered and
    /// answered; then the connection closes with `PeerClosed`.
    pub(super) eof: bool,
    /// Over the high-water mark since the last drain: reading is paused,
    /// sends are refused, and `on_drain` is owed.
    pub(super) congested: bool,
    /// At least one whole message has arrived.
    pub(super) got_message: bool,
    /// The TLS handshake is under way: `on_open` has not run, and runs
    /// when it completes. Nothing is delivered or accepted for sending
    /// before, and a close before it calls no callback.
    pub(super) handshaking: bool,
}

pub(super) enum Closing {
    /// Sending what is queued; the FIN follows it.
    Flushing {
        /// When to give up (a shutdown's deadline).
        deadline: Option<Instant>,
        /// The peer already finished: no lingering after the FIN.
        peer_done: bool,
    },
    /// The FIN is sent: reading (and discarding) until the peer closes too,
    /// so that unread data cannot turn our close into a reset that destroys
    /// what we sent.
    Lingering { deadline: Instant },
    /// Done on the wire: waiting for in-flight operations to end.
    Draining {
        /// They have been asked to end.
        cancelled: bool,
    },
}

#[cfg(test)]
mod tests {
    /// Most of what an idle connection costs is its slot, inline in the
    /// loop's slab (about 460 B per idle connection in `wharf bench`'s idle
    /// cell with a 400-byte slot, under issue 15's 512). What only some
    /// connections use goes behind a pointer (`dial`, `tls`, the file
    /// sink); this bound says when a new field should too.
    /// (Measured on 64-bit Linux; other systems' sockets differ in size.)
    #[test]
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    fn a_slot_stays_small() {
        let size = std::mem::size_of::<super::Slot<()>>();
        assert!(size <= 400, "a connection slot takes {size} bytes");
    }
}
