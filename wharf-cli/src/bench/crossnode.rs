//! The cross-node scenario: a `redis-server` and three wharf nodes (`wharf
//! peer wharf-uring --group --cluster URL`), each its own process. One
//! control connection publishes on node A; the members are on nodes B and
//! C, half each, so every message crosses the broker. Measured: the
//! latency from the publish to each member's receipt (paced messages, one
//! at a time), and deliveries per second with A publishing as fast as the
//! members take it (a window of messages in flight); the
//! CPU time of B and C per delivery and of Redis per message.
//!
//! Every message carries its number and the time it was sent (ns since the
//! client's epoch), so the client, the only clock, measures everything.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use wharf::{Bytes, CloseReason, Conn, ConnId, Framing, Handle, Handler, Server};

use super::child;
use crate::peers::ServerKind;

/// Paced messages for the latency figures.
const PACED: u64 = 200;
/// Deliveries aimed at in the flat-out phase.
const FLAT_OUT_DELIVERIES: u64 = 1_000_000;
/// Bytes per member on their way at once in the flat-out phase: under
/// the nodes' 64 KiB high-water mark.
const WINDOW_BYTES: usize = 32 * 1024;
/// How long one paced message may take to reach every member.
const ROUND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the warm-up may take to see every member in its node's group.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// The group every connection of the nodes is in.
const CHANNEL: &str = "wharf-bench:g:room";

/// What a cross-node run measured.
pub(crate) struct Outcome {
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) deliveries_per_sec: f64,
    /// CPU µs of nodes B and C per delivery, in the flat-out phase.
    pub(crate) node_cpu_us_per_delivery: Option<f64>,
    /// CPU µs of the broker per message published, in the flat-out phase.
    pub(crate) broker_cpu_us_per_msg: Option<f64>,
}

/// A `redis-server` on a free loopback port, stopped when dropped.
struct Broker {
    child: Child,
    addr: SocketAddr,
}

impl Broker {
    fn start() -> Result<Broker, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server ({e}): bash scripts/need-redis.sh installs it")
            })?;
        let broker = Broker {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let until = Instant::now() + Duration::from_secs(10);
        while broker.query(&["PING"]).as_deref() != Ok("+PONG") {
            if Instant::now() >= until {
                return Err("redis-server did not answer".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(broker)
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// One command in RESP; the reply's bytes as text.
    fn query(&self, args: &[&str]) -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        // A short reply, or a bulk string ($LEN) read to its end.
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&reply);
            let complete = match text.strip_prefix('$') {
                Some(rest) => rest
                    .split_once("\r\n")
                    .and_then(|(len, body)| Some(body.len() >= len.parse::<usize>().ok()? + 2))
                    .unwrap_or(false),
                None => text.ends_with("\r\n"),
            };
            if complete {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&reply).trim_end().to_string())
    }

    /// Nodes subscribed to the room.
    fn subscribers(&self) -> usize {
        let reply = self
            .query(&["PUBSUB", "NUMSUB", CHANNEL])
            .unwrap_or_default();
        // *2 $len channel :N
        reply
            .rsplit(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The broker's CPU seconds so far, as Redis reports them (`INFO
    /// cpu`, to the microsecond: /proc's 10 ms ticks are too coarse for
    /// the little a broker spends per message).
    fn cpu_secs(&self) -> Option<f64> {
        let info = self.query(&["INFO", "cpu"]).ok()?;
        let field = |name: &str| -> Option<f64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        Some(field("used_cpu_sys:")? + field("used_cpu_user:")?)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client's shared state.
struct Members {
    epoch: Instant,
    size: usize,
    members: usize,
    opened: AtomicUsize,
    failed: AtomicUsize,
    dropped: AtomicUsize,
    corrupt: AtomicU64,
    stopping: AtomicBool,
    control: Mutex<Option<ConnId>>,
    /// The paced message being waited for, and how many members have it.
    round: AtomicU64,
    got: AtomicUsize,
    /// Every delivery to a member (both phases).
    deliveries: AtomicU64,
    latencies: Mutex<Histogram<u64>>,
    measuring: AtomicBool,
}

impl Members {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn message(&self, seq: u64) -> Bytes {
        let mut m = vec![0x5a; self.size.max(16)];
        m[..8].copy_from_slice(&seq.to_le_bytes());
        m[8..16].copy_from_slice(&self.now_ns().to_le_bytes());
        Bytes::from(m)
    }
}

struct Client(Arc<Members>);

#[derive(Default)]
struct State {
    control: bool,
}

impl Handler for Client {
    type State = State;

    fn new_state(&self, opening: &wharf::Opening) -> State {
        State {
            control: opening.token == Some(0),
        }
    }

    fn on_open(&self, conn: &mut Conn<'_, State>) -> wharf::Accept {
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        if conn.state().control {
            *self.0.control.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.id());
        }
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, State>, msg: &[u8]) {
        let m = &self.0;
        if conn.state().control {
            return; // A's own copy, straight from its loop
        }
        if msg.len() != m.size.max(16) {
            m.corrupt.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let seq = u64::from_le_bytes(msg[..8].try_into().unwrap_or_default());
        let sent = u64::from_le_bytes(msg[8..16].try_into().unwrap_or_default());
        m.deliveries.fetch_add(1, Ordering::Relaxed);
        if seq == m.round.load(Ordering::Relaxed) {
            m.got.fetch_add(1, Ordering::Relaxed);
            if m.measuring.load(Ordering::Relaxed) {
                let us = m.now_ns().saturating_sub(sent) / 1000;
                let _ = m
                    .latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(us.max(1));
            }
        }
    }

    fn on_close(&self, _conn: &mut Conn<'_, State>, reason: CloseReason) {
        if reason != CloseReason::Shutdown && !self.0.stopping.load(Ordering::Relaxed) {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_connect_failed(&self, _failure: wharf::ConnectFailure) {
        self.0.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs the scenario with nodes of `kind`, pinned to `cpu` if given.
pub(crate) fn run(
    exe: &std::path::Path,
    kind: ServerKind,
    cpu: Option<usize>,
    size: usize,
    members: usize,
) -> Result<Outcome, String> {
    let broker = Broker::start()?;
    let extra = ["--group".to_string(), "--cluster".into(), broker.url()];
    let nodes: Vec<child::Server> = (0..3)
        .map(|_| child::Server::start(exe, kind, cpu, &extra))
        .collect::<Result<_, _>>()?;
    let m = Arc::new(Members {
        epoch: Instant::now(),
        size,
        members,
        opened: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        corrupt: AtomicU64::new(0),
        stopping: AtomicBool::new(false),
        control: Mutex::new(None),
        round: AtomicU64::new(u64::MAX),
        got: AtomicUsize::new(0),
        deliveries: AtomicU64::new(0),
        latencies: Mutex::new(Histogram::new(3).map_err(|e| e.to_string())?),
        measuring: AtomicBool::new(false),
    });
    let client = Server::builder()
        .threads(1)
        .framing(Framing::length_prefixed().max_frame(size.max(1 << 20)))
        .max_connections(members + 1)
        .send_water_marks(64 << 20, 32 << 20)
        .start(Client(m.clone()))
        .map_err(|e| format!("cannot start the client: {e}"))?;
    let result = measure(&m, &client.handle(), &broker, &nodes);
    m.stopping.store(true, Ordering::Relaxed);
    let _ = client.shutdown(Duration::from_millis(500));
    for n in nodes {
        n.stop();
    }
    result
}

fn measure(
    m: &Members,
    handle: &Handle,
    broker: &Broker,
    nodes: &[child::Server],
) -> Result<Outcome, String> {
    // The control connection on A (token 0), the members on B and C.
    handle
        .connect(wharf::Connect::from(nodes[0].addr).token(0))
        .map_err(|e| e.to_string())?;
    for i in 0..m.members {
        handle
            .connect(wharf::Connect::from(nodes[1 + i % 2].addr).token(1))
            .map_err(|e| e.to_string())?;
        // At most 256 connects in flight (the control connection and
        // members 0..=i have been posted).
        let posted = i + 2;
        let answered = || m.opened.load(Ordering::Relaxed) + m.failed.load(Ordering::Relaxed);
        while posted.saturating_sub(answered()) > 256 {
            thread::sleep(Duration::from_millis(1));
        }
    }
    let until = Instant::now() + Duration::from_secs(30);
    while m.opened.load(Ordering::Relaxed) + m.failed.load(Ordering::Relaxed) < m.members + 1 {
        if Instant::now() >= until {
            return Err("not every connection opened".into());
        }
        thread::sleep(Duration::from_millis(5));
    }
    if m.failed.load(Ordering::Relaxed) > 0 {
        return Err(format!(
            "{} connections failed",
            m.failed.load(Ordering::Relaxed)
        ));
    }
    let until = Instant::now() + Duration::from_secs(10);
    while broker.subscribers() < 3 {
        if Instant::now() >= until {
            return Err("the nodes did not all subscribe".into());
        }
        thread::sleep(Duration::from_millis(10));
    }
    let control = m
        .control
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or("no control connection")?;
    let send = |seq: u64| -> Result<(), String> {
        loop {
            match handle.send(control, m.message(seq)) {
                Ok(()) => return Ok(()),
                Err(wharf::SendError::Backpressure) => {
                    let _ = handle.wait_writable(control, Duration::from_millis(100));
                }
                Err(e) => return Err(format!("control send: {e}")),
            }
        }
    };
    // One paced message: sent, then waited for until every member has it
    // or `timeout` passes. Returns how many members got it.
    let paced = |seq: u64, timeout: Duration| -> Result<usize, String> {
        m.got.store(0, Ordering::Relaxed);
        m.round.store(seq, Ordering::Relaxed);
        send(seq)?;
        let until = Instant::now() + timeout;
        while m.got.load(Ordering::Relaxed) < m.members && Instant::now() < until {
            thread::sleep(Duration::from_micros(200));
        }
        Ok(m.got.load(Ordering::Relaxed))
    };
    // Warm-up. A member is in its node's group once the node has accepted
    // it (`on_open` joins it), which can come a little after this client
    // saw its connect complete: a message published before that never
    // reaches it, as a group promises. So warm-up messages may miss
    // members; five in a row that reach every one end the warm-up, and
    // from then on every member must get every message.
    let mut seq = 0;
    let warm_until = Instant::now() + WARM_UP_TIMEOUT;
    let mut whole = 0;
    while whole < 5 {
        let got = paced(seq, Duration::from_millis(100))?;
        whole = if got == m.members { whole + 1 } else { 0 };
        if whole < 5 && Instant::now() >= warm_until {
            return Err(format!(
                "warm-up: message {seq} reached {got} of {} members after {WARM_UP_TIMEOUT:?}",
                m.members
            ));
        }
        seq += 1;
        thread::sleep(Duration::from_millis(2));
    }
    // Paced, measured: one message at a time, until every member has it.
    m.measuring.store(true, Ordering::Relaxed);
    for _ in 0..PACED {
        let got = paced(seq, ROUND_TIMEOUT)?;
        if got < m.members {
            return Err(format!(
                "message {seq} reached {got} of {} members",
                m.members
            ));
        }
        seq += 1;
        thread::sleep(Duration::from_millis(2));
    }
    m.measuring.store(false, Ordering::Relaxed);
    m.round.store(u64::MAX, Ordering::Relaxed);
    // Flat out: A publishes back to back; until every member has every one.
    let count = (FLAT_OUT_DELIVERIES / m.members as u64).max(100);
    let before = m.deliveries.load(Ordering::Relaxed);
    let cpu0: Option<f64> = nodes[1]
        .cpu_secs()
        .zip(nodes[2].cpu_secs())
        .map(|(b, c)| b + c);
    let broker0 = broker.cpu_secs();
    let started = Instant::now();
    let per = m.members as u64;
    let window = (WINDOW_BYTES / m.size.max(16)).max(1) as u64;
    let mut stalled = (m.deliveries.load(Ordering::Relaxed), Instant::now());
    for i in 0..count {
        // At most `window` messages on their way to any member, so that no
        // member's queue passes its high-water mark (where a group member
        // misses messages rather than queueing without bound).
        while m.deliveries.load(Ordering::Relaxed) - before + window * per < (i + 1) * per {
            let now = m.deliveries.load(Ordering::Relaxed);
            if now != stalled.0 {
                stalled = (now, Instant::now());
            } else if stalled.1.elapsed() > Duration::from_secs(3) {
                return Err(format!(
                    "{} of {} deliveries arrived (members missed messages)",
                    now - before,
                    i * per
                ));
            }
            std::hint::spin_loop();
        }
        send(seq)?;
        seq += 1;
    }
    let want = before + count * m.members as u64;
    let until = Instant::now() + Duration::from_secs(60);
    let mut last = (m.deliveries.load(Ordering::Relaxed), Instant::now());
    while m.deliveries.load(Ordering::Relaxed) < want {
        let now = m.deliveries.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) || Instant::now() >= until {
            // At most once across nodes: a loss shows here, and fails the run.
            return Err(format!(
                "{} of {} deliveries arrived (the nodes' Redis links dropped some)",
                now - before,
                want - before
            ));
        }
        thread::sleep(Duration::from_millis(1));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu1: Option<f64> = nodes[1]
        .cpu_secs()
        .zip(nodes[2].cpu_secs())
        .map(|(b, c)| b + c);
    let broker1 = broker.cpu_secs();
    let dropped = m.dropped.load(Ordering::Relaxed);
    let corrupt = m.corrupt.load(Ordering::Relaxed);
    if dropped > 0 || corrupt > 0 {
        return Err(format!(
            "{dropped} connections dropped, {corrupt} corrupt messages"
        ));
    }
    let deliveries = (want - before) as f64;
    let h = m.latencies.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Outcome {
        p50_us: h.value_at_quantile(0.5) as f64,
        p99_us: h.value_at_quantile(0.99) as f64,
        deliveries_per_sec: deliveries / elapsed,
        node_cpu_us_per_delivery: cpu0.zip(cpu1).map(|(a, b)| (b - a) * 1e6 / deliveries),
        broker_cpu_us_per_msg: broker0
            .zip(broker1)
            .map(|(a, b)| (b - a) * 1e6 / count as f64),
    })
}
