//! `wharf load`: a load generator for echo servers, built on wharf's own
//! outbound connections.
//!
//! [`run`] opens the connections, offers load for a warm-up and then a
//! measuring window, checks every echoed byte, and returns a [`Report`].
//! Load is offered either in closed loop (each connection keeps K messages
//! in flight; a reply releases the next) or at a fixed total rate spread
//! over the connections (latency then counts from when each message was
//! due, so a stalling server cannot hide its stalls).
//!
//! ```no_run
//! use std::time::Duration;
//! use wharf_cli::load::{self, Config, Mode};
//!
//! let mut config = Config::new("127.0.0.1:7000".parse().unwrap());
//! config.connections = 10;
//! config.duration = Duration::from_secs(2);
//! config.mode = Mode::Rate { per_sec: 5000.0 };
//! let report = load::run(&config).expect("the run starts");
//! println!("{report}");
//! assert!(report.ok);
//! ```

mod args;
mod client;
mod flood;
mod pacer;
mod pattern;
mod progress;
mod report;
mod server;
mod shared;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wharf::{Handle, Server};

pub use args::{cli, Args};
pub use flood::FloodReport;
pub use report::{Latency, Report};
pub use server::ServerFigures;

use client::LoadHandler;
use progress::Progress;
use shared::Run;

/// Connects in flight at once while opening connections: enough to open
/// thousands quickly, few enough not to overflow a server's accept backlog.
const CONNECTS_IN_FLIGHT: usize = 256;

/// How load is offered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Every active connection keeps `inflight` messages outstanding.
    Closed {
        /// Messages in flight per connection (at least 1).
        inflight: usize,
    },
    /// `per_sec` messages per second over all active connections, spread
    /// evenly over them.
    Rate {
        /// Messages per second in total.
        per_sec: f64,
    },
}

/// How messages are framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// A 4-byte big-endian length, then the message (wharf's default).
    LengthPrefixed,
    /// No framing: the echoed stream is cut into messages by byte count.
    Raw,
}

/// What to run. [`Config::new`] gives the command's defaults.
#[derive(Debug, Clone)]
pub struct Config {
    /// The echo server to drive.
    pub addr: SocketAddr,
    /// Connections that send (default 100).
    pub connections: usize,
    /// Message size in bytes (default 64).
    pub size: usize,
    /// Length of the measuring window (default 10 s).
    pub duration: Duration,
    /// Load offered before the window, not measured (default 1 s).
    pub warmup: Duration,
    /// Closed loop or fixed rate (default: closed loop, 1 in flight).
    pub mode: Mode,
    /// Framing (default length-prefixed).
    pub framing: Framing,
    /// Extra connections that stay silent, to load the server's memory
    /// (default 0).
    pub idle: usize,
    /// Client event loops (default 1).
    pub threads: usize,
    /// How long opening every connection may take (default 10 s).
    pub connect_timeout: Duration,
    /// How long to wait after the window for replies still in flight
    /// before counting them lost (default 2 s).
    pub drain_timeout: Duration,
    /// Print a progress line on stderr once a second (default true).
    pub progress: bool,
    /// The server's Prometheus endpoint, scraped when the window opens
    /// and closes (its figures are reported next to the client's).
    pub metrics: Option<SocketAddr>,
    /// A connect flood during the window: so many connects a second from
    /// this source address.
    pub flood: Option<(u32, std::net::IpAddr)>,
    /// Speak TLS on every connection (default: plaintext).
    pub tls: Option<wharf::tls::ClientTls>,
}

impl Config {
    /// The defaults of `wharf load`, against `addr`.
    pub fn new(addr: SocketAddr) -> Config {
        Config {
            addr,
            connections: 100,
            size: 64,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            mode: Mode::Closed { inflight: 1 },
            framing: Framing::LengthPrefixed,
            idle: 0,
            threads: 1,
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(2),
            progress: true,
            metrics: None,
            flood: None,
            tls: None,
        }
    }

    fn validate(&self) -> Result<(), LoadError> {
        let bad = |why: &str| Err(LoadError::Config(why.to_string()));
        if self.connections == 0 {
            return bad("at least one connection is needed");
        }
        if self.size == 0 || self.size > 64 << 20 {
            return bad("the message size must be 1 byte to 64 MiB");
        }
        if self.duration.is_zero() {
            return bad("the duration must be more than zero");
        }
        if self.threads == 0 || self.threads > 256 {
            return bad("threads must be 1 to 256");
        }
        match self.mode {
            Mode::Closed { inflight } if inflight == 0 || inflight > 1 << 16 => {
                bad("messages in flight must be 1 to 65536")
            }
            Mode::Rate { per_sec } if !(per_sec > 0.0 && per_sec.is_finite()) => {
                bad("the rate must be a positive number")
            }
            _ => Ok(()),
        }
    }
}

/// Why a run could not take place. A run that took place returns a
/// [`Report`], even when the server failed it (see [`Report::ok`]).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration cannot be run.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The client's loops could not start (or a thread could not).
    #[error("cannot start the client: {0}")]
    Start(#[source] std::io::Error),
    /// Not one connection could be opened.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The server's address.
        addr: SocketAddr,
        /// The first failure seen.
        reason: String,
    },
    /// The server's metrics endpoint could not be read.
    #[error("--metrics: {0}")]
    Metrics(String),
    /// A client loop panicked (a bug in the load generator).
    #[error("a client loop panicked")]
    Panicked,
}

/// Runs one load against `config.addr` and reports what it measured.
///
/// Blocks for about `warmup + duration` (plus connecting and draining,
/// each bounded by its timeout).
pub fn run(config: &Config) -> Result<Report, LoadError> {
    config.validate()?;
    let (inflight, rate) = match config.mode {
        Mode::Closed { inflight } => (inflight, None),
        Mode::Rate { per_sec } => (0, Some(per_sec)),
    };
    let raw = config.framing == Framing::Raw;
    let run = Arc::new(Run::new(
        config.size,
        config.connections,
        inflight,
        rate,
        raw,
    ));
    let framing = if raw {
        wharf::Framing::raw()
    } else {
        wharf::Framing::length_prefixed()
            .max_frame(config.size.max(1 << 20))
            .into()
    };
    let total = config.connections + config.idle;
    let client = Server::builder()
        .threads(config.threads)
        .framing(framing)
        .max_connections(total)
        // Never refuse a send nor pause reading: a refused message would
        // look like a lost one. The queue is bounded by rate × duration.
        .send_water_marks(usize::MAX / 2, usize::MAX / 4)
        .start(LoadHandler::new(run.clone()))
        .map_err(LoadError::Start)?;
    let handle = client.handle();
    connect_all(&run, &handle, config)?;

    // The clock starts once every connection is open (closed-loop ones
    // have been busy since they opened: that is warm-up too).
    let t0 = Instant::now();
    let window_start = t0 + config.warmup;
    let window_end = window_start + config.duration;
    run.set_window(window_start, window_end);
    let pacer = match rate {
        Some(rate) => {
            run.set_schedule_start(t0);
            let plan = pacer::Plan {
                ids: shared::lock(&run.active_ids).clone(),
                start: t0,
                end: window_end,
                rate,
            };
            Some(pacer::spawn(run.clone(), handle.clone(), plan).map_err(LoadError::Start)?)
        }
        None => None,
    };

    let flood = match config.flood {
        Some((rate, source)) => Some(
            flood::spawn(source, config.addr, rate, window_start, window_end)
                .map_err(LoadError::Start)?,
        ),
        None => None,
    };
    let mut progress = Progress::new(config.progress, t0);
    let mut cpu_start = None;
    let mut scraped = None;
    let mut next_tick = t0 + Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if cpu_start.is_none() && now >= window_start {
            cpu_start = Some(report::process_cpu_secs());
            if let Some(addr) = config.metrics {
                scraped = Some(server::scrape(addr).map_err(LoadError::Metrics)?);
            }
        }
        if now >= window_end {
            break;
        }
        if now >= next_tick {
            progress.tick(&run, now >= window_start);
            next_tick += Duration::from_secs(1);
        }
        let boundary = if cpu_start.is_none() {
            window_start
        } else {
            window_end
        };
        thread::sleep(
            next_tick
                .min(boundary)
                .saturating_duration_since(Instant::now()),
        );
    }
    let cpu_end = report::process_cpu_secs();
    let server = match (config.metrics, &scraped) {
        (Some(addr), Some(before)) => {
            let after = server::scrape(addr).map_err(LoadError::Metrics)?;
            Some(ServerFigures::between(before, &after))
        }
        _ => None,
    };
    progress.finish();
    let flood = match flood {
        Some(f) => Some(f.join().map_err(|_| LoadError::Panicked)?),
        None => None,
    };

    let paced = match pacer {
        Some(p) => p.join().map_err(|_| LoadError::Panicked)?,
        None => 0,
    };
    drain(&run, paced, config.drain_timeout);
    run.stopping.store(true, Ordering::Relaxed);
    client
        .shutdown(Duration::from_millis(500))
        .map_err(|_| LoadError::Panicked)?;

    let t = run.totals(true);
    let secs = config.duration.as_secs_f64();
    let sent = t.sent + paced;
    let lost = sent.saturating_sub(t.received);
    let opened = run.opened.load(Ordering::Relaxed);
    let failed = total.saturating_sub(opened);
    let dropped = run.dropped.load(Ordering::Relaxed);
    let errors = t.corrupt + lost + t.unexpected;
    let first_failure = shared::lock(&run.first_failure).clone();
    Ok(Report {
        addr: config.addr.to_string(),
        connections: config.connections,
        idle: config.idle,
        size: config.size,
        mode: config.mode,
        framing: config.framing,
        threads: config.threads,
        warmup_secs: config.warmup.as_secs_f64(),
        duration_secs: secs,
        messages: t.window_messages,
        messages_per_sec: t.window_messages as f64 / secs,
        mb_per_sec: (t.window_messages * config.size as u64) as f64 / secs / 1e6,
        latency_us: Latency::from_nanos(&t.latency),
        sent,
        received: t.received,
        errors,
        corrupt: t.corrupt,
        lost,
        unexpected: t.unexpected,
        connections_opened: opened,
        connections_failed: failed,
        connections_dropped: dropped,
        first_failure,
        client_cpu_secs: match (cpu_start.flatten(), cpu_end) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        server,
        flood,
        ok: errors == 0 && failed == 0 && dropped == 0,
    })
}

/// Opens every connection, a bounded number at a time, and waits until
/// each has opened or failed (or the connect timeout has passed).
fn connect_all(run: &Run, handle: &Handle, config: &Config) -> Result<(), LoadError> {
    let total = config.connections + config.idle;
    let deadline = Instant::now() + config.connect_timeout;
    let mut posted = 0;
    loop {
        let done = run.opened.load(Ordering::Relaxed) + run.failed.load(Ordering::Relaxed);
        while posted < total && posted - done.min(posted) < CONNECTS_IN_FLIGHT {
            let mut connect = wharf::Connect::from(config.addr);
            if let Some(tls) = &config.tls {
                connect = connect.tls(tls.clone());
            }
            handle.connect(connect).map_err(LoadError::Start)?;
            posted += 1;
        }
        if done >= total {
            break;
        }
        if Instant::now() >= deadline {
            run.note_failure(format!(
                "{} of {total} connections still not open after {:?}",
                total - done,
                config.connect_timeout
            ));
            break;
        }
        thread::sleep(Duration::from_millis(1));
    }
    if run.opened.load(Ordering::Relaxed) == 0 {
        let reason = shared::lock(&run.first_failure)
            .clone()
            .unwrap_or_else(|| "no connection opened".into());
        return Err(LoadError::Connect {
            addr: config.addr,
            reason,
        });
    }
    Ok(())
}

/// Waits (up to `timeout`) for replies to every message sent.
fn drain(run: &Run, paced: u64, timeout: Duration) {
    let until = Instant::now() + timeout;
    loop {
        let (sent, received) = run.sent_received();
        let open = run.opened.load(Ordering::Relaxed) > run.dropped.load(Ordering::Relaxed);
        if received >= sent + paced || !open || Instant::now() >= until {
            return;
        }
        thread::sleep(Duration::from_millis(2));
    }
}
