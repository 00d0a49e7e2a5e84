//! The load generator against small echo servers on loopback: a correct one
//! passes, a corrupting or dropping one is caught, and a fixed rate is kept.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use wharf::{Conn, ConnId, Framing, Handler, Server};
use wharf_cli::load::{self, Config, LoadError, Mode, Report};

/// An echo server that can misbehave once.
struct Echo {
    /// Messages seen (over all connections).
    seen: AtomicU64,
    fault: Fault,
    /// `Fault::Swap`: the message held back, and its connection.
    held: Mutex<Option<(ConnId, Vec<u8>)>>,
}

#[derive(Clone, Copy)]
enum Fault {
    None,
    /// Flip one bit of the n-th message echoed.
    CorruptMessage(u64),
    /// Close the connection that receives the n-th message.
    DropAt(u64),
    /// Answer the n-th message after the next one of its connection.
    Swap(u64),
    /// Answer every message from a job on the worker pool that sleeps a
    /// varying time (the replies must still come back in order).
    Jobs,
}

impl Handler for Echo {
    type State = ();

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        match self.fault {
            Fault::CorruptMessage(at) if n == at => {
                let mut bad = msg.to_vec();
                let middle = bad.len() / 2;
                bad[middle] ^= 0x20;
                let _ = conn.send(&bad);
            }
            Fault::DropAt(at) if n == at => conn.close(),
            Fault::Swap(at) if n == at => {
                *self.held.lock().unwrap() = Some((conn.id(), msg.to_vec()));
            }
            Fault::Swap(_) => {
                let _ = conn.send(msg);
                let mut held = self.held.lock().unwrap();
                if held.as_ref().is_some_and(|(id, _)| *id == conn.id()) {
                    let _ = conn.send(&held.take().unwrap().1);
                }
            }
            Fault::Jobs => {
                let msg = msg.to_vec();
                let us = (n * 7919) % 300;
                conn.submit(move || {
                    std::thread::sleep(Duration::from_micros(us));
                    move |conn: &mut Conn<'_, ()>| {
                        let _ = conn.send(&msg);
                    }
                })
                .expect("the pool takes the job");
            }
            _ => {
                let _ = conn.send(msg);
            }
        }
    }
}

fn serve(framing: Framing, fault: Fault) -> Server {
    Server::builder()
        .threads(1)
        .framing(framing)
        .bind("127.0.0.1:0")
        .expect("bind loopback")
        .start(Echo {
            seen: AtomicU64::new(0),
            fault,
            held: Mutex::new(None),
        })
        .expect("start the echo server")
}

/// A short closed-loop run: 4 connections, 2 in flight each.
fn short(addr: SocketAddr) -> Config {
    let mut c = Config::new(addr);
    c.connections = 4;
    c.size = 100;
    c.mode = Mode::Closed { inflight: 2 };
    c.warmup = Duration::from_millis(200);
    c.duration = Duration::from_secs(1);
    c.progress = false;
    c
}

fn run(config: &Config) -> Report {
    let report = load::run(config).expect("the run takes place");
    println!("{report}");
    report
}

#[test]
fn a_correct_echo_passes() {
    let server = serve(Framing::default(), Fault::None);
    let report = run(&short(server.local_addr()));
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.errors, 0);
    assert_eq!(report.lost, 0);
    assert!(report.messages > 100, "{report:#?}");
    assert_eq!(report.sent, report.received);
    assert!(report.latency_us.p50 > 0.0 && report.latency_us.p50 <= report.latency_us.p99);
    assert!(report.latency_us.p99 <= report.latency_us.max);
    assert_eq!(report.connections_opened, 4);
    // The JSON carries the same numbers.
    let json = serde_json::to_string(&report).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (back.messages, back.errors, back.ok),
        (report.messages, 0, true)
    );
    assert!((back.latency_us.p99 - report.latency_us.p99).abs() < 1e-6);
}

#[test]
fn one_corrupted_byte_is_caught() {
    let server = serve(Framing::default(), Fault::CorruptMessage(500));
    let report = run(&short(server.local_addr()));
    assert!(!report.ok, "{report:#?}");
    assert_eq!(report.corrupt, 1, "{report:#?}");
    assert!(report.errors >= 1);
}

#[test]
fn two_replies_out_of_order_are_caught() {
    let server = serve(Framing::default(), Fault::Swap(300));
    let report = run(&short(server.local_addr()));
    assert!(!report.ok, "{report:#?}");
    assert!(report.errors >= 1, "{report:#?}");
}

#[test]
fn an_echo_through_worker_jobs_keeps_order() {
    let server = serve(Framing::default(), Fault::Jobs);
    let mut config = short(server.local_addr());
    config.connections = 16;
    config.mode = Mode::Closed { inflight: 8 };
    let report = run(&config);
    assert!(report.ok, "{report:#?}");
    assert!(report.messages > 100, "{report:#?}");
    assert_eq!(server.handle().stats().handler_panics, 0);
}

#[test]
fn a_raw_stream_is_checked_by_byte_count() {
    let server = serve(Framing::raw(), Fault::None);
    let mut config = short(server.local_addr());
    config.framing = load::Framing::Raw;
    let report = run(&config);
    assert!(report.ok, "{report:#?}");
    assert!(report.messages > 100);

    let server = serve(Framing::raw(), Fault::CorruptMessage(500));
    config.addr = server.local_addr();
    let report = run(&config);
    assert!(!report.ok, "{report:#?}");
    assert!(report.corrupt >= 1, "{report:#?}");
}

#[test]
fn a_dropped_connection_is_reported() {
    let server = serve(Framing::default(), Fault::DropAt(300));
    let mut config = short(server.local_addr());
    config.drain_timeout = Duration::from_millis(200);
    let report = run(&config);
    assert!(!report.ok, "{report:#?}");
    assert_eq!(report.connections_dropped, 1, "{report:#?}");
    assert!(report.first_failure.is_some());
}

#[test]
fn a_fixed_rate_is_kept() {
    let server = serve(Framing::default(), Fault::None);
    let mut config = short(server.local_addr());
    config.connections = 10;
    config.mode = Mode::Rate { per_sec: 2000.0 };
    config.warmup = Duration::from_millis(500);
    config.duration = Duration::from_secs(3);
    let report = run(&config);
    assert!(report.ok, "{report:#?}");
    let expected = 2000.0 * 3.0;
    let off = (report.messages as f64 - expected).abs() / expected;
    assert!(
        off < 0.05,
        "{} messages, expected {expected}",
        report.messages
    );
    let off = (report.messages_per_sec - 2000.0).abs() / 2000.0;
    assert!(off < 0.05, "{} msg/s", report.messages_per_sec);
    // Everything sent during warm-up, window and drain came back.
    assert_eq!(report.sent, report.received);
    let total = 2000.0 * 3.5;
    assert!(
        (report.sent as f64 - total).abs() / total < 0.05,
        "{report:#?}"
    );
}

#[test]
fn idle_connections_open_and_stay_silent() {
    let server = serve(Framing::default(), Fault::None);
    let mut config = short(server.local_addr());
    config.connections = 2;
    config.idle = 50;
    let report = run(&config);
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.connections_opened, 52);
    assert_eq!(server.handle().stats().accepted, 52);
}

#[test]
fn no_server_is_an_error() {
    // Bind and drop a listener to find a port nobody listens on.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = short(addr);
    config.connect_timeout = Duration::from_secs(2);
    match load::run(&config) {
        Err(LoadError::Connect { .. }) => {}
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[test]
fn a_bad_configuration_is_refused() {
    let mut config = short("127.0.0.1:9".parse().unwrap());
    config.mode = Mode::Closed { inflight: 0 };
    assert!(matches!(load::run(&config), Err(LoadError::Config(_))));
}
