//! What the whole run shares: its settings and measuring window, the
//! counters that change once per connection, and one [`Shard`] of tallies
//! per loop thread.
//!
//! A shard is locked by its own loop once per reply; only the progress line
//! (once a second) and the end of the run lock it from elsewhere, so the
//! lock is uncontended. Nothing else is written per message.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, ThreadId};
use std::time::Instant;

use hdrhistogram::Histogram;
use wharf::ConnId;

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
    pub(super) inflight: usize,
    /// Rate mode: messages per second over all connections.
    pub(super) rate: Option<f64>,
    pub(super) raw: bool,
    /// The origin of every time below (stored as nanoseconds since it).
    epoch: Instant,
    /// Rate mode: when message 0 was due; message k is due k / rate later.
    schedule_start: AtomicU64,
    pub(super) window_start: AtomicU64,
    pub(super) window_end: AtomicU64,
    /// Set before the client shuts down: closes from then on are ours.
    pub(crate) stopping: AtomicBool,
    pub(super) next_index: AtomicUsize,
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

    pub(super) fn now(&self) -> u64 {
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
    pub(super) fn due(&self, index: u32, seq: u64, rate: f64) -> u64 {
        let k = seq as f64 * self.connections as f64 + f64::from(index);
        self.schedule_start.load(Ordering::Relaxed) + (k / rate * 1e9) as u64
    }

    /// Every shard so far (one per loop thread that opened a connection).
    pub(crate) fn shards(&self) -> Vec<Arc<Shard>> {
        lock(&self.shards).iter().map(|(_, s)| s.clone()).collect()
    }

    /// The calling loop thread's shard, made on its first connection.
    pub(super) fn shard_here(&self) -> Arc<Shard> {
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
    pub(super) scratch: Vec<u8>,
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

/// Locks, ignoring poisoning: a panicking loop ends the run anyway, and
/// its tallies are still worth reporting.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
