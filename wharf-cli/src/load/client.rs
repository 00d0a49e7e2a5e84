//! The client side of a run: the handler every outbound connection runs,
//! its per-connection state, and the per-loop tallies it writes.
//!
//! Hot-path rules: a reply costs one clock read, one check of its bytes
//! against the pattern, one uncontended lock of the loop's own [`Shard`]
//! (only the progress line and the end of the run touch it from elsewhere),
//! and, in closed loop, one send. Nothing else is shared per message.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, ThreadId};
use std::time::Instant;

use hdrhistogram::Histogram;
use wharf::{Accept, CloseReason, Conn, ConnId, Handler};

use super::pattern::Pattern;

/// Latencies above this are recorded as this (100 s, in nanoseconds).
const MAX_LATENCY_NS: u64 = 100_000_000_000;

/// A time that has not been set yet: nothing is measured, nothing stops.
const NEVER: u64 = u64::MAX;

/// What the whole run shares: settings, the measuring window, counters that
/// change once per connection, and the shards.
pub(crate) struct Run {
    pub(crate) pattern: Pattern,
    /// Active connections (the first ones to open; the rest stay idle).
    pub(crate) connections: usize,
    /// Closed loop: messages kept in flight per connection; 0 in rate mode.
    inflight: usize,
    /// Rate mode: messages per second over all connections.
    rate: Option<f64>,
    raw: bool,
    /// The origin of every time below (stored as nanoseconds since it).
    epoch: Instant,
    /// Rate mode: when message 0 was due; message k is due k / rate later.
    schedule_start: AtomicU64,
    window_start: AtomicU64,
    window_end: AtomicU64,
    /// Set before the client shuts down: closes from then on are ours.
    pub(crate) stopping: AtomicBool,
    next_index: AtomicUsize,
    pub(crate) opened: AtomicUsize,
    pub(crate) failed: AtomicUsize,
    pub(crate) dropped: AtomicUsize,
    /// The first connect error or drop, for the report.
    pub(crate) first_failure: Mutex<Option<String>>,
    /// Active connections by index, for the rate-mode pacer.
    pub(crate) active_ids: Mutex<Vec<Option<ConnId>>>,
    shards: Mutex<Vec<(ThreadId, Arc<Shard>)>>,
}

impl Run {
    pub(crate) fn new(
        size: usize,
        connections: usize,
        inflight: usize,
        rate: Option<f64>,
        raw: bool,
    ) -> Run {
        Run {
            pattern: Pattern::new(size),
            connections,
            inflight: if rate.is_some() { 0 } else { inflight },
            rate,
            raw,
            epoch: Instant::now(),
            schedule_start: AtomicU64::new(0),
            window_start: AtomicU64::new(NEVER),
            window_end: AtomicU64::new(NEVER),
            stopping: AtomicBool::new(false),
            next_index: AtomicUsize::new(0),
            opened: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            first_failure: Mutex::new(None),
            active_ids: Mutex::new(vec![None; connections]),
            shards: Mutex::new(Vec::new()),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn now(&self) -> u64 {
        self.nanos(Instant::now())
    }

    /// Sets the window in which replies are measured. Closed-loop
    /// connections send nothing new once it has ended.
    pub(crate) fn set_window(&self, start: Instant, end: Instant) {
        self.window_start
            .store(self.nanos(start), Ordering::Relaxed);
        self.window_end.store(self.nanos(end), Ordering::Relaxed);
    }

    /// Rate mode: when message 0 (of connection 0) is due.
    pub(crate) fn set_schedule_start(&self, t: Instant) {
        self.schedule_start.store(self.nanos(t), Ordering::Relaxed);
    }

    /// Rate mode: when message `seq` of connection `index` was due.
    fn due(&self, index: u32, seq: u64, rate: f64) -> u64 {
        let k = seq as f64 * self.connections as f64 + f64::from(index);
        self.schedule_start.load(Ordering::Relaxed) + (k / rate * 1e9) as u64
    }

    /// Every shard so far (one per loop thread that opened a connection).
    pub(crate) fn shards(&self) -> Vec<Arc<Shard>> {
        lock(&self.shards).iter().map(|(_, s)| s.clone()).collect()
    }

    /// The calling loop thread's shard, made on its first connection.
    fn shard_here(&self) -> Arc<Shard> {
        let me = thread::current().id();
        let mut shards = lock(&self.shards);
        if let Some((_, s)) = shards.iter().find(|(t, _)| *t == me) {
            return s.clone();
        }
        let s = Arc::new(Shard::default());
        shards.push((me, s.clone()));
        s
    }

    /// The tallies of every loop, summed; `window` picks which latencies.
    pub(crate) fn totals(&self, window: bool) -> Totals {
        let mut t = Totals {
            sent: 0,
            received: 0,
            window_messages: 0,
            corrupt: 0,
            unexpected: 0,
            latency: new_histogram(),
        };
        for shard in self.shards() {
            let tally = shard.lock();
            t.sent += tally.sent;
            t.received += tally.received;
            t.window_messages += tally.window_messages;
            t.corrupt += tally.corrupt;
            t.unexpected += tally.unexpected;
            let h = if window { &tally.window } else { &tally.warmup };
            // Same bounds on both sides, so adding cannot fail.
            let _ = t.latency.add(h);
        }
        t
    }

    /// Messages sent by the loops and replies received, summed (cheaper
    /// than `totals`: no histograms).
    pub(crate) fn sent_received(&self) -> (u64, u64) {
        self.shards().iter().fold((0, 0), |(s, r), shard| {
            let t = shard.lock();
            (s + t.sent, r + t.received)
        })
    }

    pub(crate) fn note_failure(&self, what: String) {
        lock(&self.first_failure).get_or_insert(what);
    }
}

/// Every loop's tallies summed.
pub(crate) struct Totals {
    pub(crate) sent: u64,
    pub(crate) received: u64,
    pub(crate) window_messages: u64,
    pub(crate) corrupt: u64,
    pub(crate) unexpected: u64,
    pub(crate) latency: Histogram<u64>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// One loop's tallies. Only its loop writes it during the run.
#[derive(Default)]
pub(crate) struct Shard(Mutex<Tally>);

impl Shard {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Tally> {
        lock(&self.0)
    }
}

/// What one loop counted.
pub(crate) struct Tally {
    /// Latencies of replies received inside the window (ns).
    pub(crate) window: Histogram<u64>,
    /// Latencies of replies received before it (warm-up), for progress.
    pub(crate) warmup: Histogram<u64>,
    /// Messages sent (closed loop; the pacer counts its own).
    pub(crate) sent: u64,
    /// Replies received whole, right or wrong, at any time.
    pub(crate) received: u64,
    /// Replies received inside the window.
    pub(crate) window_messages: u64,
    /// Replies whose bytes were not the ones sent.
    pub(crate) corrupt: u64,
    /// Messages that arrived on idle connections, which sent nothing.
    pub(crate) unexpected: u64,
    /// Where outgoing messages are built.
    scratch: Vec<u8>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            window: new_histogram(),
            warmup: new_histogram(),
            sent: 0,
            received: 0,
            window_messages: 0,
            corrupt: 0,
            unexpected: 0,
            scratch: Vec::new(),
        }
    }
}

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

    fn on_connect_failed(&self, addr: SocketAddr, error: io::Error) {
        self.run.failed.fetch_add(1, Ordering::Relaxed);
        self.run
            .note_failure(format!("connect to {addr} failed: {error}"));
    }
}

/// Locks, ignoring poisoning: a panicking loop ends the run anyway, and
/// its tallies are still worth reporting.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
