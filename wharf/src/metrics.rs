//! A Prometheus endpoint (feature `prometheus`): a server's counters in the
//! OpenMetrics text format, encoded by `prometheus-client`, on a small HTTP
//! listener of its own.
//!
//! Nothing is counted for the endpoint: the loops count in plain integers
//! and publish them once per turn, as they do for [`Handle::stats`]; a
//! scrape reads what they published. The listener runs on a thread of its
//! own, so a scrape answers even while the loops are busy, and never
//! touches a loop's thread.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! # #[derive(Default)] struct Echo;
//! # impl wharf::Handler for Echo {
//! #     type State = ();
//! #     fn on_message(&self, c: &mut wharf::Conn<'_, ()>, m: &[u8]) { let _ = c.send(m); }
//! # }
//! let server = wharf::Server::builder().bind("127.0.0.1:7000")?.start(Echo)?;
//! let metrics = wharf::metrics::Endpoint::start(server.handle(), "127.0.0.1:9100")?;
//! // curl http://127.0.0.1:9100/metrics
//! # drop(metrics); Ok(()) }
//! ```
//!
//! The metrics (each counter's samples end in `_total`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `wharf_connections_opened` | counter | `loop` |
//! | `wharf_connections_closed` | counter | `reason` ([`CloseReason::label`](crate::CloseReason::label), or `rejected` by `on_open`) |
//! | `wharf_connections_refused` | counter | `cause`: `cap`, `per_ip_cap`, `shutdown`, `shed` (out of descriptors), `denied`, `banned`, `rate_limited` |
//! | `wharf_connections_open` | gauge | `loop` |
//! | `wharf_messages_received`, `wharf_messages_sent` | counter | `loop` |
//! | `wharf_received_bytes`, `wharf_sent_bytes` | counter | `loop` |
//! | `wharf_queued_bytes` | gauge | |
//! | `wharf_backpressure_pauses` | counter | |
//! | `wharf_fanout_skips` (broadcast and group messages a slow peer missed) | counter | |
//! | `wharf_handler_panics`, `wharf_timeouts`, `wharf_accept_pauses`, `wharf_recv_buffer_waits` | counter | |
//! | `wharf_jobs_done`, `wharf_jobs_discarded`, `wharf_jobs_refused` | counter | |
//! | `wharf_tls_handshakes`, `wharf_tls_handshake_failures` (connections that never opened) | counter | |
//! | `wharf_jobs_queued`, `wharf_loops`, `wharf_failed_loops`, `wharf_bans`, `wharf_groups` | gauge | |
//! | `process_cpu_seconds` (Unix) | counter | |

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::handle::Handle;
use crate::stats::Stats;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The server's metrics in the OpenMetrics text format, as the endpoint
/// serves them.
pub fn render(handle: &Handle) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Figures(handle.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// Reads a server's figures at each scrape.
struct Figures(Handle);

impl std::fmt::Debug for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Figures")
    }
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value as i64);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One counter (or gauge) with a sample per label value.
fn family(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    is_gauge: bool,
    label: &'static str,
    values: impl Iterator<Item = (String, u64)>,
) -> Result<(), std::fmt::Error> {
    let kind = if is_gauge {
        ConstGauge::new(0i64).metric_type()
    } else {
        ConstCounter::new(0u64).metric_type()
    };
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (value_of_label, n) in values {
        let labels = [(label, value_of_label)];
        let sample = m.encode_family(&labels)?;
        if is_gauge {
            ConstGauge::new(n as i64).encode(sample)?;
        } else {
            ConstCounter::new(n).encode(sample)?;
        }
    }
    Ok(())
}

impl Collector for Figures {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let handle = &self.0;
        let loops = handle.loop_stats();
        let all = handle.stats();
        let per_loop = |f: fn(&Stats) -> u64| {
            loops
                .iter()
                .enumerate()
                .map(move |(i, s)| (i.to_string(), f(s)))
                .collect::<Vec<_>>()
                .into_iter()
        };
        let e = &mut e;
        family(
            e,
            "wharf_connections_opened",
            "Connections opened (accepted or connected).",
            false,
            "loop",
            per_loop(|s| s.accepted),
        )?;
        family(
            e,
            "wharf_connections_closed",
            "Connections closed, by reason.",
            false,
            "reason",
            all.closed_by().map(|(r, n)| (r.to_owned(), n)),
        )?;
        let refused = [
            ("cap", all.refused_cap),
            ("per_ip_cap", all.refused_per_ip),
            ("shutdown", all.refused_shutdown),
            ("shed", all.shed),
            ("denied", all.denied),
            ("banned", all.banned),
            ("rate_limited", all.rate_limited),
        ];
        family(
            e,
            "wharf_connections_refused",
            "Connections refused at accept, by cause.",
            false,
            "cause",
            refused.into_iter().map(|(c, n)| (c.to_owned(), n)),
        )?;
        family(
            e,
            "wharf_connections_open",
            "Connections open now.",
            true,
            "loop",
            per_loop(|s| s.connections),
        )?;
        family(
            e,
            "wharf_messages_received",
            "Messages received.",
            false,
            "loop",
            per_loop(|s| s.messages_in),
        )?;
        family(
            e,
            "wharf_messages_sent",
            "Messages queued for sending.",
            false,
            "loop",
            per_loop(|s| s.messages_out),
        )?;
        family(
            e,
            "wharf_received_bytes",
            "Bytes received.",
            false,
            "loop",
            per_loop(|s| s.bytes_in),
        )?;
        family(
            e,
            "wharf_sent_bytes",
            "Bytes written to sockets.",
            false,
            "loop",
            per_loop(|s| s.bytes_out),
        )?;
        gauge(
            e,
            "wharf_queued_bytes",
            "Bytes queued for sending, not yet written.",
            all.queued_bytes,
        )?;
        counter(
            e,
            "wharf_backpressure_pauses",
            "Times a connection's reading paused over its send high-water mark.",
            all.backpressure_pauses,
        )?;
        counter(
            e,
            "wharf_fanout_skips",
            "Broadcast and group messages not queued to a peer over its high-water mark.",
            all.broadcast_skipped,
        )?;
        counter(
            e,
            "wharf_handler_panics",
            "Handler callbacks that panicked (contained).",
            all.handler_panics,
        )?;
        counter(
            e,
            "wharf_timeouts",
            "Connections closed by a timeout.",
            all.timed_out,
        )?;
        counter(
            e,
            "wharf_accept_pauses",
            "Times accepting paused on an error such as EMFILE.",
            all.accept_pauses,
        )?;
        counter(
            e,
            "wharf_recv_buffer_waits",
            "Receives that waited for a pooled buffer.",
            all.recv_buffer_waits,
        )?;
        counter(
            e,
            "wharf_jobs_done",
            "Worker-pool job results applied.",
            all.jobs_done,
        )?;
        counter(
            e,
            "wharf_jobs_discarded",
            "Job results dropped because their connection closed.",
            all.jobs_discarded,
        )?;
        counter(
            e,
            "wharf_jobs_refused",
            "Job submits refused, the pool's queue full.",
            all.jobs_refused,
        )?;
        counter(
            e,
            "wharf_tls_handshakes",
            "TLS handshakes completed.",
            all.tls_handshakes,
        )?;
        counter(
            e,
            "wharf_tls_handshake_failures",
            "TLS connections closed before their handshake completed.",
            all.tls_handshake_failures,
        )?;
        gauge(
            e,
            "wharf_jobs_queued",
            "Jobs waiting for a worker.",
            all.jobs_queued,
        )?;
        gauge(e, "wharf_loops", "Event loops.", loops.len() as u64)?;
        gauge(
            e,
            "wharf_failed_loops",
            "Event loops whose driver failed.",
            all.failed_loops,
        )?;
        gauge(
            e,
            "wharf_bans",
            "Bans in force.",
            handle.shared.access.bans.len(std::time::Instant::now()) as u64,
        )?;
        gauge(
            e,
            "wharf_groups",
            "Groups with members on this server.",
            handle.groups().len() as u64,
        )?;
        if let Some(secs) = process_cpu_secs() {
            let c = ConstCounter::new(secs);
            let m = e.encode_descriptor(
                "process_cpu_seconds",
                "CPU time of the whole process, user and system.",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        Ok(())
    }
}

/// The process's CPU time, user and system (Unix; `None` elsewhere).
fn process_cpu_secs() -> Option<f64> {
    #[cfg(unix)]
    {
        // SAFETY: getrusage only writes the struct it is given, which is a
        // valid, zeroed `rusage` owned by this frame.
        let usage = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            (libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0).then_some(u)
        }?;
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(secs(usage.ru_utime) + secs(usage.ru_stime))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// An HTTP listener serving [`render`] at `/metrics` (and `/`), one
/// request per connection, a few at once, each read within 2 s. Stops when
/// dropped.
#[derive(Debug)]
pub struct Endpoint {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Listens on `addr` (port 0 picks one: see [`local_addr`](Self::local_addr))
    /// and serves `handle`'s metrics.
    pub fn start(handle: Handle, addr: impl ToSocketAddrs) -> io::Result<Endpoint> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wharf-metrics".into())
            .spawn(move || {
                let busy = Arc::new(AtomicUsize::new(0));
                for stream in listener.incoming() {
                    if flag.load(Ordering::Acquire) {
                        break;
                    }
                    let s = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::warn!(error = %e, "metrics: accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    // A few requests at once, each on a thread of its own
                    // and within its deadline: a client that sends nothing
                    // holds one of them for 2 s, not the endpoint. Past
                    // that, a request is closed unanswered.
                    if busy.fetch_add(1, Ordering::AcqRel) >= MAX_REQUESTS {
                        busy.fetch_sub(1, Ordering::AcqRel);
                        tracing::debug!("metrics: too many requests at once; one closed");
                        continue;
                    }
                    let (handle, busy) = (handle.clone(), busy.clone());
                    let spawned = std::thread::Builder::new()
                        .name("wharf-metrics-request".into())
                        .spawn(move || {
                            if let Err(e) = answer(s, &handle) {
                                tracing::debug!(error = %e, "metrics: a request failed");
                            }
                            busy.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        tracing::warn!("metrics: no thread for a request; it is closed");
                    }
                }
            })?;
        Ok(Endpoint {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept; it sees the flag and ends. A listener on every
        // address (0.0.0.0, [::]) is reached on loopback: Windows refuses
        // connects to the unspecified address.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Requests answered at once.
const MAX_REQUESTS: usize = 4;

/// Reads one request (its head, at most 8 KiB, within 2 s in all) and
/// answers it.
fn answer(mut s: TcpStream, handle: &Handle) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 8192 {
            return reply(
                &mut s,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            );
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics" | "/") => reply(&mut s, "200 OK", CONTENT_TYPE, &render(handle)),
        ("HEAD", "/metrics" | "/") => reply(&mut s, "200 OK", CONTENT_TYPE, ""),
        ("GET" | "HEAD", _) => reply(
            &mut s,
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n",
        ),
        _ => reply(
            &mut s,
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n",
        ),
    }
}

fn reply(s: &mut TcpStream, status: &str, kind: &str, body: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    s.flush()
}
