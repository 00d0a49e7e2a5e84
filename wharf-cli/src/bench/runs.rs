//! One run: start a server, offer one scenario's load, read what it cost
//! the server, stop it.

use std::thread;
use std::time::{Duration, Instant};

use super::child::Server;
use super::results::{median, Metrics, Run, Scenario};
use super::Plan;
use super::{crossnode, fanout};
use crate::load::{self, Config, Report};
use crate::peers::ServerKind;

/// Broadcasts timed per broadcast run: enough deliveries (30 × 5,001) for
/// the server's CPU time, counted in 10 ms ticks, to be read within ~2 %.
const BROADCASTS_PER_RUN: usize = 30;

/// Runs `scenario` once against `kind`.
pub(crate) fn one(plan: &Plan, scenario: Scenario, kind: ServerKind, round: usize) -> Run {
    if let Scenario::CrossNode { size, members } = scenario {
        // Its own servers: three nodes and a broker.
        return finish(kind, round, cross_node(plan, kind, size, members));
    }
    let extra: Vec<String> = match scenario {
        Scenario::Broadcast { .. } => vec!["--broadcast".into()],
        Scenario::Group { .. } => vec!["--group".into()],
        _ => Vec::new(),
    };
    let measured = match Server::start(&plan.exe, kind, plan.server_cpu(kind), &extra) {
        Err(e) => Err(failed(e, Metrics::default())),
        Ok(mut server) => {
            let result = match scenario {
                Scenario::Echo { size, connections } => echo(plan, &server, size, connections),
                Scenario::Idle { connections } => idle(plan, &server, connections),
                Scenario::Broadcast { size, connections }
                | Scenario::Group { size, connections } => {
                    broadcast_run(&server, size, connections)
                }
                Scenario::CrossNode { .. } => unreachable!("run above"),
            };
            let died = !server.alive();
            server.stop();
            match result {
                Err(f) if died => Err(failed(format!("the server died: {}", f.0), f.1)),
                other => other,
            }
        }
    };
    finish(kind, round, measured)
}

fn finish(kind: ServerKind, round: usize, measured: Measured) -> Run {
    match measured {
        Ok(metrics) => Run {
            server: kind,
            round,
            error: None,
            metrics,
        },
        Err(f) => Run {
            server: kind,
            round,
            error: Some(f.0),
            metrics: f.1,
        },
    }
}

/// What a run measured, or why it failed (with what it measured anyway).
type Measured = Result<Metrics, Box<(String, Metrics)>>;

fn failed(why: String, metrics: Metrics) -> Box<(String, Metrics)> {
    Box::new((why, metrics))
}

fn echo(plan: &Plan, server: &Server, size: usize, connections: usize) -> Measured {
    let mut config = Config::new(server.addr);
    config.connections = connections;
    config.size = size;
    config.warmup = plan.warmup;
    config.duration = plan.duration;
    config.progress = false;
    let cpu0 = server.cpu_secs();
    let started = Instant::now();
    let report = load::run(&config).map_err(|e| failed(e.to_string(), Metrics::default()))?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = server.cpu_secs().zip(cpu0).map(|(b, a)| b - a);
    // CPU is read around the whole run (connect, warm-up, window, drain),
    // so it is shared over every reply of the run, not only the window's.
    let metrics = Metrics {
        messages_per_sec: Some(report.messages_per_sec),
        p99_us: Some(report.latency_us.p99),
        cpu_us_per_msg: cpu
            .filter(|_| report.received > 0)
            .map(|c| c * 1e6 / report.received as f64),
        server_cpu_pct: cpu.map(|c| 100.0 * c / wall),
        load_cpu_pct: report
            .client_cpu_secs
            .map(|c| 100.0 * c / report.duration_secs),
        rss_mib: server.rss_kib().map(|k| k as f64 / 1024.0),
        ..Metrics::default()
    };
    checked(&report, metrics)
}

fn idle(plan: &Plan, server: &Server, connections: usize) -> Measured {
    let fail = |why: String| failed(why, Metrics::default());
    // The baseline is a server that has served the one active connection
    // alone for a while: what that traffic makes resident is the server's,
    // not the idle ones'. That is the allocator's working set and the
    // io_uring receive buffers the traffic has touched. Large messages
    // touch the most of them (the ring is kept at about twice what recent
    // turns used, and small receives share a buffer), so 16 KiB messages
    // first, then the size the measuring run's active connection sends
    // (the load generator's default).
    let measured = Config::new(server.addr).size;
    for size in [16 * 1024, measured] {
        let mut warm = Config::new(server.addr);
        warm.connections = 1;
        warm.size = size;
        warm.warmup = Duration::from_millis(100);
        warm.duration = Duration::from_millis(500);
        warm.progress = false;
        load::run(&warm).map_err(|e| fail(format!("warming the server: {e}")))?;
    }
    thread::sleep(Duration::from_millis(100));
    let rss0 = server.rss_kib();
    let fds0 = server.open_fds();
    let mut config = Config::new(server.addr);
    config.connections = 1;
    config.idle = connections;
    config.warmup = Duration::from_millis(300);
    config.duration = plan.duration.max(Duration::from_secs(1));
    config.connect_timeout = Duration::from_secs(30);
    config.progress = false;
    // The load runs on its own thread (pinned like this one) while this one
    // watches the server take every connection, then reads its memory.
    let load = thread::spawn(move || load::run(&config));
    let all_in = server.wait_for_fds(fds0, connections + 1, Duration::from_secs(30));
    thread::sleep(Duration::from_millis(300));
    let rss1 = server.rss_kib();
    let report = load
        .join()
        .map_err(|_| fail("the load generator panicked".into()))?
        .map_err(|e| fail(e.to_string()))?;
    if !all_in {
        return Err(fail(format!(
            "the server held fewer than {connections} connections"
        )));
    }
    let metrics = Metrics {
        bytes_per_conn: rss0
            .zip(rss1)
            .map(|(a, b)| (b as f64 - a as f64) * 1024.0 / connections as f64),
        rss_mib: rss1.map(|k| k as f64 / 1024.0),
        ..Metrics::default()
    };
    checked(&report, metrics)
}

fn cross_node(plan: &Plan, kind: ServerKind, size: usize, members: usize) -> Measured {
    let out = crossnode::run(&plan.exe, kind, plan.server_cpu(kind), size, members)
        .map_err(|e| failed(e, Metrics::default()))?;
    Ok(Metrics {
        p50_us: Some(out.p50_us),
        p99_us: Some(out.p99_us),
        deliveries_per_sec: Some(out.deliveries_per_sec),
        cpu_us_per_msg: out.node_cpu_us_per_delivery,
        broker_cpu_us_per_msg: out.broker_cpu_us_per_msg,
        ..Metrics::default()
    })
}

fn broadcast_run(server: &Server, size: usize, connections: usize) -> Measured {
    let out = fanout::run(server, size, connections, BROADCASTS_PER_RUN)
        .map_err(|e| failed(e, Metrics::default()))?;
    Ok(Metrics {
        fanout_ms: median(&out.times_ms),
        cpu_us_per_msg: out.server_cpu_secs.map(|c| c * 1e6 / out.deliveries as f64),
        rss_mib: server.rss_kib().map(|k| k as f64 / 1024.0),
        ..Metrics::default()
    })
}

/// A failed load report fails the run (its numbers are kept for the JSON).
fn checked(report: &Report, metrics: Metrics) -> Measured {
    if report.ok {
        Ok(metrics)
    } else {
        let why = format!(
            "{} errors, {} connections failed, {} dropped{}",
            report.errors,
            report.connections_failed,
            report.connections_dropped,
            report
                .first_failure
                .as_deref()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default()
        );
        Err(failed(why, metrics))
    }
}
