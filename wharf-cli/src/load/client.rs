//! The handler every outbound connection of a run runs, and its
//! per-connection state.
//!
//! Hot-path rules: a reply costs one clock read, one check of its bytes
//! against the pattern, one uncontended lock of the loop's own
//! [`Shard`](super::shared::Shard), and, in closed loop, one send.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use wharf::{Accept, CloseReason, Conn, Handler};

use super::shared::{lock, Run, Shard, Tally};

/// What a connection does in the run: the first `connections` to open
/// send; the rest (`--idle`) stay silent.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Role {
    #[default]
    Unopened,
    Active,
    Idle,
}

/// Per-connection state, on the connection's loop.
#[derive(Default)]
pub(crate) struct ConnState {
    role: Role,
    /// The connection's number in the pattern (0.. in order of opening).
    index: u32,
    /// This loop's shard (taken out while a callback uses it).
    shard: Option<Arc<Shard>>,
    /// Closed loop: the sequence number of the next message to send.
    next_send: u64,
    /// The sequence number of the reply being received.
    next_recv: u64,
    /// Raw framing: bytes of that reply received so far.
    recv_offset: usize,
    /// Raw framing: some of those bytes were wrong.
    recv_bad: bool,
    /// Closed loop: when each message in flight was sent, by `seq % inflight`.
    sent_at: Box<[u64]>,
}

/// The handler of every connection of a run.
pub(crate) struct LoadHandler {
    run: Arc<Run>,
}

impl LoadHandler {
    pub(crate) fn new(run: Arc<Run>) -> LoadHandler {
        LoadHandler { run }
    }

    /// Closed loop: sends the next message of this connection.
    fn send_next(&self, conn: &mut Conn<'_, ConnState>, tally: &mut Tally, now: u64) {
        let st = conn.state();
        let seq = st.next_send;
        let index = st.index;
        st.next_send += 1;
        let slot = (seq % st.sent_at.len() as u64) as usize;
        st.sent_at[slot] = now;
        tally.scratch.clear();
        self.run.pattern.fill(index, seq, &mut tally.scratch);
        // The client's high-water mark is out of reach, so this fails only
        // on a closing connection, whose losses `on_close` has counted.
        if conn.send(&tally.scratch).is_ok() {
            tally.sent += 1;
        }
    }

    /// One whole reply arrived (checked: `ok`).
    fn replied(&self, conn: &mut Conn<'_, ConnState>, tally: &mut Tally, ok: bool, now: u64) {
        let run = &*self.run;
        let st = conn.state();
        let seq = st.next_recv;
        st.next_recv += 1;
        st.recv_offset = 0;
        st.recv_bad = false;
        tally.received += 1;
        let closed_loop = run.inflight > 0;
        // A reply to nothing we sent is wrong, and has no send time.
        let sent = match run.rate {
            Some(rate) => Some(run.due(st.index, seq, rate)),
            None if seq < st.next_send => {
                Some(st.sent_at[(seq % st.sent_at.len() as u64) as usize])
            }
            None => None,
        };
        if !ok || sent.is_none() {
            tally.corrupt += 1;
        }
        if let Some(sent) = sent {
            let latency = now.saturating_sub(sent);
            let start = run.window_start.load(Ordering::Relaxed);
            let end = run.window_end.load(Ordering::Relaxed);
            if now >= start && now < end {
                tally.window.saturating_record(latency);
                tally.window_messages += 1;
            } else if now < start {
                tally.warmup.saturating_record(latency);
            }
        }
        if closed_loop && now < run.window_end.load(Ordering::Relaxed) {
            self.send_next(conn, tally, now);
        }
    }

    /// Raw framing: `data` is the next piece of the stream, cut into
    /// messages by byte count.
    fn received_raw(
        &self,
        conn: &mut Conn<'_, ConnState>,
        tally: &mut Tally,
        data: &[u8],
        now: u64,
    ) {
        let size = self.run.pattern.size();
        let mut rest = data;
        while !rest.is_empty() {
            let st = conn.state();
            let n = rest.len().min(size - st.recv_offset);
            if !self
                .run
                .pattern
                .check(st.index, st.next_recv, st.recv_offset, &rest[..n])
            {
                st.recv_bad = true;
            }
            st.recv_offset += n;
            rest = &rest[n..];
            if st.recv_offset == size {
                let ok = !st.recv_bad;
                self.replied(conn, tally, ok, now);
            }
        }
    }
}

impl Handler for LoadHandler {
    type State = ConnState;

    fn on_open(&self, conn: &mut Conn<'_, ConnState>) -> Accept {
        let run = &*self.run;
        let index = run.next_index.fetch_add(1, Ordering::Relaxed);
        run.opened.fetch_add(1, Ordering::Relaxed);
        let shard = run.shard_here();
        let id = conn.id();
        let st = conn.state();
        st.index = index as u32;
        if index >= run.connections {
            st.role = Role::Idle;
            st.shard = Some(shard);
            return Accept::Yes;
        }
        st.role = Role::Active;
        lock(&run.active_ids)[index] = Some(id);
        if run.inflight > 0 {
            st.sent_at = vec![0; run.inflight].into_boxed_slice();
            let mut tally = shard.lock();
            let now = run.now();
            for _ in 0..run.inflight {
                self.send_next(conn, &mut tally, now);
            }
        }
        conn.state().shard = Some(shard);
        Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, ConnState>, msg: &[u8]) {
        let now = self.run.now();
        let st = conn.state();
        let Some(shard) = st.shard.take() else {
            return;
        };
        let mut tally = shard.lock();
        if st.role == Role::Idle {
            tally.unexpected += 1;
        } else if self.run.raw {
            self.received_raw(conn, &mut tally, msg, now);
        } else {
            let ok = {
                let st = conn.state();
                msg.len() == self.run.pattern.size()
                    && self.run.pattern.check(st.index, st.next_recv, 0, msg)
            };
            self.replied(conn, &mut tally, ok, now);
        }
        drop(tally);
        conn.state().shard = Some(shard);
    }

    fn on_close(&self, conn: &mut Conn<'_, ConnState>, reason: CloseReason) {
        let run = &*self.run;
        let st = conn.state();
        if st.role == Role::Unopened || reason == CloseReason::Shutdown {
            return;
        }
        if !run.stopping.load(Ordering::Relaxed) {
            run.dropped.fetch_add(1, Ordering::Relaxed);
            let what = format!("connection {} dropped: {reason:?}", st.index);
            run.note_failure(what);
        }
    }

    fn on_connect_failed(&self, failure: wharf::ConnectFailure) {
        self.run.failed.fetch_add(1, Ordering::Relaxed);
        let addr = failure.addr.map_or("?".to_owned(), |a| a.to_string());
        self.run
            .note_failure(format!("connect to {addr} failed: {}", failure.error));
    }
}
