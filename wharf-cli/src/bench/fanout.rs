//! The broadcast scenario's client: `receivers` silent connections and one
//! control connection to a server in broadcast mode. The control sends one
//! message; the time from that send until the last receiver has the whole
//! message is one measurement. Built on wharf's outbound connections, as
//! the load generator is.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use wharf::{Bytes, CloseReason, Conn, ConnId, Framing, Handle, Handler, Server};

use super::child;

/// Connects in flight at once, as the load generator.
const CONNECTS_IN_FLIGHT: usize = 256;
/// How long one broadcast may take before it counts as lost.
const ROUND_TIMEOUT: Duration = Duration::from_secs(3);
/// Warm-up broadcasts tried until one reaches every receiver.
const WARMUP_TRIES: u64 = 5;

/// What a broadcast run measured.
pub(crate) struct Outcome {
    /// Milliseconds until every receiver had it, one per broadcast.
    pub(crate) times_ms: Vec<f64>,
    /// Server CPU seconds over the measured broadcasts.
    pub(crate) server_cpu_secs: Option<f64>,
    /// Messages the server delivered over them (every connection's copy).
    pub(crate) deliveries: u64,
}

struct Fanout {
    epoch: Instant,
    receivers: usize,
    size: usize,
    opened: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
    corrupt: AtomicU64,
    stopping: AtomicBool,
    control: Mutex<Option<ConnId>>,
    /// The broadcast being timed, and when it was sent (ns since `epoch`).
    round: AtomicU64,
    sent_at: AtomicU64,
    /// Receivers that have the current round's message.
    got: AtomicUsize,
    /// Told (round, ns from send to the last receipt) when a round completes.
    done: Mutex<Sender<(u64, u64)>>,
}

#[derive(Default)]
struct State {
    control: bool,
}

impl Fanout {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Broadcast `round`'s message: its number, then a fixed filler.
    fn message(&self, round: u64) -> Vec<u8> {
        let mut m: Vec<u8> = (0..self.size).map(|i| (i * 7 + 3) as u8).collect();
        let n = self.size.min(8);
        m[..n].copy_from_slice(&round.to_le_bytes()[..n]);
        m
    }
}

/// The handler: the shared state, which the bench thread also reads.
struct Client(Arc<Fanout>);

impl std::ops::Deref for Client {
    type Target = Fanout;
    fn deref(&self) -> &Fanout {
        &self.0
    }
}

impl Handler for Client {
    type State = State;

    fn on_open(&self, conn: &mut Conn<'_, State>) -> wharf::Accept {
        if self.opened.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.id());
            conn.state().control = true;
        }
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, State>, msg: &[u8]) {
        if conn.state().control {
            return;
        }
        let round = self.round.load(Ordering::Relaxed);
        if msg != self.message(round).as_slice() {
            // A late copy of an earlier (timed-out) round is not corrupt.
            let mut old = [0u8; 8];
            let n = msg.len().min(8);
            old[..n].copy_from_slice(&msg[..n]);
            if msg.len() != self.size || u64::from_le_bytes(old) >= round {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        if self.got.fetch_add(1, Ordering::Relaxed) + 1 == self.receivers {
            let took = self
                .now()
                .saturating_sub(self.sent_at.load(Ordering::Relaxed));
            let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            let _ = done.send((round, took));
        }
    }

    fn on_close(&self, _conn: &mut Conn<'_, State>, reason: CloseReason) {
        if reason != CloseReason::Shutdown && !self.stopping.load(Ordering::Relaxed) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_connect_failed(&self, _failure: wharf::ConnectFailure) {
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens `receivers + 1` connections to `server` (in broadcast mode),
/// warms up, then times `rounds` broadcasts of `size` bytes, one at a time.
pub(crate) fn run(
    server: &child::Server,
    size: usize,
    receivers: usize,
    rounds: usize,
) -> Result<Outcome, String> {
    let (tx, rx) = mpsc::channel();
    let fanout = Arc::new(Fanout {
        epoch: Instant::now(),
        receivers,
        size,
        opened: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        corrupt: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        control: Mutex::new(None),
        round: AtomicU64::new(u64::MAX),
        sent_at: AtomicU64::new(0),
        got: AtomicUsize::new(0),
        done: Mutex::new(tx),
    });
    let client = Server::builder()
        .threads(1)
        .framing(Framing::length_prefixed().max_frame(size.max(1 << 20)))
        .max_connections(receivers + 1)
        .send_water_marks(usize::MAX / 2, usize::MAX / 4)
        .start(Client(fanout.clone()))
        .map_err(|e| format!("cannot start the client: {e}"))?;
    let result = measure(&fanout, &client.handle(), server, &rx, rounds);
    fanout.stopping.store(true, Ordering::Relaxed);
    let _ = client.shutdown(Duration::from_millis(500));
    result
}

fn measure(
    f: &Fanout,
    handle: &Handle,
    server: &child::Server,
    rx: &Receiver<(u64, u64)>,
    rounds: usize,
) -> Result<Outcome, String> {
    let fds_before = server.open_fds();
    // The control connection first, so it is the first to open.
    connect(f, handle, server, 1)?;
    connect(f, handle, server, f.receivers + 1)?;
    if !server.wait_for_fds(fds_before, f.receivers + 1, Duration::from_secs(10)) {
        return Err("the server did not accept every connection".into());
    }
    let control = f
        .control
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or("no control connection")?;
    let broadcast = |round: u64| -> Result<Option<u64>, String> {
        f.got.store(0, Ordering::Relaxed);
        f.round.store(round, Ordering::Relaxed);
        f.sent_at.store(f.now(), Ordering::Relaxed);
        handle
            .send(control, Bytes::from(f.message(round)))
            .map_err(|e| format!("control send failed: {e}"))?;
        let until = Instant::now() + ROUND_TIMEOUT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((r, ns)) if r == round => return Ok(Some(ns)),
                Ok(_) => continue,
                Err(_) => return Ok(None),
            }
        }
    };
    // Warm up until one broadcast reaches everyone: every connection is
    // then known to the server.
    let mut round = 0;
    loop {
        let reached = broadcast(round)?.is_some();
        round += 1;
        if reached {
            break;
        }
        if round >= WARMUP_TRIES {
            let got = f.got.load(Ordering::Relaxed);
            return Err(format!(
                "broadcast reached {got} of {} connections",
                f.receivers
            ));
        }
    }
    let cpu0 = server.cpu_secs();
    let mut times_ms = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        // A short pause, so that one broadcast's tail does not overlap the next.
        thread::sleep(Duration::from_millis(2));
        match broadcast(round)? {
            Some(ns) => times_ms.push(ns as f64 / 1e6),
            None => {
                let got = f.got.load(Ordering::Relaxed);
                return Err(format!(
                    "broadcast {round} reached {got} of {} connections in {ROUND_TIMEOUT:?}",
                    f.receivers
                ));
            }
        }
        round += 1;
    }
    let cpu1 = server.cpu_secs();
    let dropped = f.dropped.load(Ordering::Relaxed);
    let corrupt = f.corrupt.load(Ordering::Relaxed);
    if dropped > 0 || corrupt > 0 {
        return Err(format!(
            "{dropped} connections dropped, {corrupt} corrupt messages"
        ));
    }
    Ok(Outcome {
        times_ms,
        server_cpu_secs: cpu0.zip(cpu1).map(|(a, b)| b - a),
        deliveries: rounds as u64 * (f.receivers as u64 + 1),
    })
}

/// Opens connections until `total` have opened, a bounded number at a time.
fn connect(
    f: &Fanout,
    handle: &Handle,
    server: &child::Server,
    total: usize,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut posted = f.opened.load(Ordering::Relaxed) + f.failed.load(Ordering::Relaxed);
    loop {
        let done = f.opened.load(Ordering::Relaxed) + f.failed.load(Ordering::Relaxed);
        while posted < total && posted - done.min(posted) < CONNECTS_IN_FLIGHT {
            handle
                .connect(server.addr)
                .map_err(|e| format!("connect: {e}"))?;
            posted += 1;
        }
        if done >= total {
            break;
        }
        if Instant::now() >= deadline {
            return Err(format!("{} of {total} connections opened", done));
        }
        thread::sleep(Duration::from_millis(1));
    }
    match f.failed.load(Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(format!("{n} connections failed to open")),
    }
}
