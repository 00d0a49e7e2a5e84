//! A server's counters: each loop counts in plain integers (`Counters`)
//! and publishes a copy once per turn (`LoopStats`), so that counting costs
//! no atomic per message; `Handle::stats` sums the copies into `Stats`.

use std::sync::Mutex;

use crate::error::{CLOSE_KINDS, REJECTED};

macro_rules! counters {
    ($($field:ident),* $(,)?) => {
        /// One loop's counters (the loop's own; see `LoopStats`).
        #[derive(Clone, Copy, Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $field: u64,)*
            /// Closes by `CloseReason::kind` (and `on_open` refusals).
            pub(crate) closed_by: [u64; CLOSE_KINDS.len()],
        }

        impl Counters {
            fn add(&mut self, other: &Counters) {
                $(self.$field += other.$field;)*
                for (mine, theirs) in self.closed_by.iter_mut().zip(other.closed_by) {
                    *mine += theirs;
                }
            }
        }
    };
}

counters! {
    open,
    accepted,
    refused_cap,
    refused_per_ip,
    refused_shutdown,
    shed,
    denied,
    banned,
    rate_limited,
    closed,
    messages_in,
    messages_out,
    bytes_in,
    bytes_out,
    bytes_queued,
    bytes_dropped,
    recv_buffer_waits,
    backpressure_pauses,
    timed_out,
    broadcast_skipped,
    accept_pauses,
    handler_panics,
    jobs_done,
    jobs_discarded,
    tls_handshakes,
    tls_failed,
}

/// What one loop last published: written by that loop once per turn, read
/// by `Handle::stats` (a copy under an uncontended lock: cheaper than one
/// atomic store per counter, and the reader sees one turn's figures whole).
#[derive(Default)]
pub(crate) struct LoopStats(Mutex<Counters>);

impl LoopStats {
    pub(crate) fn publish(&self, c: &Counters) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = *c;
    }

    pub(crate) fn read(&self) -> Counters {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Live counters of a server, summed over its loops (each publishes its
/// own once per turn, so they lag by at most one turn).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Connections open now.
    pub connections: u64,
    /// Connections opened so far (accepted or connected).
    pub accepted: u64,
    /// Connections refused by a cap or a shutdown (the sum of
    /// `refused_cap`, `refused_per_ip`, `refused_shutdown` and `shed`).
    pub refused: u64,
    /// Connections refused over `Builder::max_connections`.
    pub refused_cap: u64,
    /// Connections refused over `Builder::max_connections_per_ip`.
    pub refused_per_ip: u64,
    /// Connections refused because the server was shutting down.
    pub refused_shutdown: u64,
    /// Connections accepted and closed at once because the process had run
    /// out of descriptors (EMFILE): the client hears a close, rather than
    /// waiting in the backlog.
    pub shed: u64,
    /// Connections refused at accept by the IP rules
    /// ([`Builder::ip_rules`](crate::Builder::ip_rules)), before any
    /// callback.
    pub denied: u64,
    /// Connections refused at accept because their address was banned
    /// ([`Handle::ban`](crate::Handle::ban)).
    pub banned: u64,
    /// Connections refused at accept over an accept rate
    /// ([`Builder::accept_rate`](crate::Builder::accept_rate),
    /// [`Builder::accept_rate_per_ip`](crate::Builder::accept_rate_per_ip)).
    pub rate_limited: u64,
    /// Connections closed so far (including those `on_open` refused).
    pub closed: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Messages queued for sending.
    pub messages_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Bytes queued for sending and not yet written, now.
    pub queued_bytes: u64,
    /// Times a receive paused because every pooled receive buffer was in
    /// use (often: raise `Builder::recv_buffers`). On io_uring, a receive
    /// that used up only the part of the pool the kernel is offered (see
    /// `Builder::recv_buffers`) is not counted: that part grows instead.
    pub recv_buffer_waits: u64,
    /// Times a connection's reading paused because its send queue went over
    /// the high-water mark (back-pressure).
    pub backpressure_pauses: u64,
    /// Connections closed by a timeout (idle, first message, write stall).
    pub timed_out: u64,
    /// Broadcast and group messages not queued to a peer over its
    /// high-water mark.
    pub broadcast_skipped: u64,
    /// Times accepting paused on an error such as running out of
    /// descriptors (EMFILE).
    pub accept_pauses: u64,
    /// Handler callbacks that panicked (each closed its connection with
    /// [`CloseReason::HandlerPanic`](crate::CloseReason::HandlerPanic)).
    pub handler_panics: u64,
    /// Event loops that failed (their driver returned an error) and closed
    /// their connections with
    /// [`CloseReason::LoopFailed`](crate::CloseReason::LoopFailed).
    pub failed_loops: u64,
    /// Job results applied to their connections.
    pub jobs_done: u64,
    /// Job results dropped because their connection had closed.
    pub jobs_discarded: u64,
    /// Jobs waiting for a worker now.
    pub jobs_queued: u64,
    /// Submits refused because the pool's queue was full.
    pub jobs_refused: u64,
    /// TLS handshakes completed (each connection then opened).
    pub tls_handshakes: u64,
    /// TLS connections closed before their handshake completed: not TLS,
    /// a refused certificate, a timeout, a peer that left. They never
    /// opened, so no callback saw them.
    pub tls_handshake_failures: u64,
    closed_by: [u64; CLOSE_KINDS.len()],
}

impl Stats {
    /// Sums what the loops published.
    pub(crate) fn of_loops(loops: impl Iterator<Item = Counters>) -> Stats {
        let mut c = Counters::default();
        for l in loops {
            // Every byte queued is written, dropped or still queued.
            debug_assert!(
                l.bytes_out + l.bytes_dropped <= l.bytes_queued,
                "{} written and {} dropped of {} queued",
                l.bytes_out,
                l.bytes_dropped,
                l.bytes_queued
            );
            c.add(&l);
        }
        Stats {
            connections: c.open,
            accepted: c.accepted,
            refused: c.refused_cap + c.refused_per_ip + c.refused_shutdown + c.shed,
            refused_cap: c.refused_cap,
            refused_per_ip: c.refused_per_ip,
            refused_shutdown: c.refused_shutdown,
            shed: c.shed,
            denied: c.denied,
            banned: c.banned,
            rate_limited: c.rate_limited,
            closed: c.closed,
            messages_in: c.messages_in,
            messages_out: c.messages_out,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            queued_bytes: c.bytes_queued.saturating_sub(c.bytes_out + c.bytes_dropped),
            recv_buffer_waits: c.recv_buffer_waits,
            backpressure_pauses: c.backpressure_pauses,
            timed_out: c.timed_out,
            broadcast_skipped: c.broadcast_skipped,
            accept_pauses: c.accept_pauses,
            handler_panics: c.handler_panics,
            failed_loops: 0,
            jobs_done: c.jobs_done,
            jobs_discarded: c.jobs_discarded,
            jobs_queued: 0,
            jobs_refused: 0,
            tls_handshakes: c.tls_handshakes,
            tls_handshake_failures: c.tls_failed,
            closed_by: c.closed_by,
        }
    }

    /// Connections closed so far by each kind of reason
    /// ([`CloseReason::label`](crate::CloseReason::label)), and `"rejected"`
    /// for those `Handler::on_open` refused; every kind is listed, with 0
    /// where none closed so.
    pub fn closed_by(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        CLOSE_KINDS.iter().copied().zip(self.closed_by)
    }

    /// Connections closed so far with reasons labelled `label` (as in
    /// [`closed_by`](Self::closed_by)); 0 for a label that is not one.
    pub fn closed_with(&self, label: &str) -> u64 {
        self.closed_by()
            .find(|(l, _)| *l == label)
            .map_or(0, |(_, n)| n)
    }
}

impl Counters {
    /// Counts a close of kind `kind` (`CloseReason::kind`, or `REJECTED`).
    pub(crate) fn count_close(&mut self, kind: usize) {
        self.closed += 1;
        self.open -= 1;
        self.closed_by[kind] += 1;
    }

    /// Counts a message of `bytes` (in wire form) queued for sending.
    pub(crate) fn sent(&mut self, bytes: usize) {
        self.messages_out += 1;
        self.bytes_queued += bytes as u64;
    }

    /// Counts a refusal by `on_open` (it is a close without `on_close`).
    pub(crate) fn count_rejected(&mut self) {
        self.count_close(REJECTED);
    }
}
