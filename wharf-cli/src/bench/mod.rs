//! `wharf bench`: wharf next to its peers, in one run.
//!
//! Each server under test runs as its own child process (`wharf peer KIND`,
//! see [`crate::peers`]), so that the CPU time and memory read from `/proc`
//! are its own. The load generator ([`crate::load::run`]) runs in this
//! process: the bench does nothing else while it runs, so nothing competes
//! with it, and its report comes back as a value. By default the server is
//! pinned to CPU 0 and this process to CPU 1.
//!
//! Every scenario runs in rounds, each server once per round, one after the
//! other (wharf, peer, wharf, peer, ...), so that a drift of the machine
//! touches every server alike; a cell is the median over the rounds. Each
//! round starts one server further down the list (the first round in the
//! order given, the second from the second server, and so on), so that no
//! server always runs first, or always right after the same one.
//! Results go to `results.json` and `chart.svg` in the output directory
//! (`target/wharf-bench/`), and the table to standard output.

mod args;
mod chart;
mod child;
mod crossnode;
mod fanout;
pub mod files;
pub mod kv;
pub(crate) mod os;
mod results;
mod runs;
mod table;
pub mod tls;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use args::{cli, write, Args};
pub use chart::render as chart_svg;
pub use results::{
    count_label, median, size_label, Meta, Metrics, Pinning, Results, Run, Scenario,
    ScenarioResult, Summary,
};
pub use table::render as table;

use crate::peers::ServerKind;

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `quick`, `full` or `custom`, for the table.
    pub preset: String,
    /// The scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// The servers, in order (the order within each round).
    pub servers: Vec<ServerKind>,
    /// Rounds of each scenario.
    pub rounds: usize,
    /// Rounds of the idle scenario (memory hardly varies between runs).
    pub idle_rounds: usize,
    /// Load before each measuring window.
    pub warmup: Duration,
    /// Each measuring window.
    pub duration: Duration,
    /// Pin the server to CPU 0 and the load generator to CPU 1.
    pub pin: bool,
    /// The `wharf` executable that serves (`wharf peer`).
    pub exe: PathBuf,
    /// Print a line per run on standard error.
    pub progress: bool,
}

/// The CPUs of [`Plan::pin`].
const PINNING: Pinning = Pinning {
    server_cpu: 0,
    load_cpu: 1,
};

impl Plan {
    /// The quick preset: 64 B × 100 and 1 KiB × 1 connection, 1.5 s
    /// windows after 0.3 s of warm-up, 5 rounds, and 1,000 idle
    /// connections once; under 3 minutes on two cores.
    pub fn quick(exe: PathBuf) -> Plan {
        Plan {
            preset: "quick".into(),
            scenarios: vec![
                Scenario::Echo {
                    size: 64,
                    connections: 100,
                },
                Scenario::Echo {
                    size: 1024,
                    connections: 1,
                },
                Scenario::Idle { connections: 1000 },
            ],
            servers: ServerKind::all(),
            rounds: 5,
            idle_rounds: 1,
            warmup: Duration::from_millis(300),
            duration: Duration::from_millis(1500),
            pin: true,
            exe,
            progress: true,
        }
    }

    /// The whole matrix: 64 B, 1 KiB and 16 KiB × 1, 100 and 1,000
    /// connections, 64 B × 10,000, 10,000 idle connections, a 1 KiB broadcast to 5,000,
    /// a 1 KiB publish to a room of 5,000, and 1 KiB across three nodes to
    /// 1,000 members through Redis; 5 rounds of 2 s windows.
    pub fn full(exe: PathBuf) -> Plan {
        let mut scenarios = Vec::new();
        for size in [64, 1024, 16 * 1024] {
            for connections in [1, 100, 1000] {
                scenarios.push(Scenario::Echo { size, connections });
            }
        }
        // How the cost grows with the connections, to where most servers
        // live.
        scenarios.push(Scenario::Echo {
            size: 64,
            connections: 10_000,
        });
        scenarios.push(Scenario::Idle {
            connections: 10_000,
        });
        scenarios.push(Scenario::Broadcast {
            size: 1024,
            connections: 5000,
        });
        scenarios.push(Scenario::Group {
            size: 1024,
            connections: 5000,
        });
        scenarios.push(Scenario::CrossNode {
            size: 1024,
            members: 1000,
        });
        Plan {
            preset: "full".into(),
            scenarios,
            rounds: 5,
            idle_rounds: 5,
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs(2),
            ..Plan::quick(exe)
        }
    }

    /// Where server `kind` is pinned, if it is: not at all when it has
    /// more than one loop.
    fn server_cpu(&self, kind: ServerKind) -> Option<usize> {
        (self.pin && kind != ServerKind::WharfUring2).then_some(PINNING.server_cpu)
    }
}

/// Runs every scenario of `plan`, round by round.
pub fn run(plan: &Plan) -> Results {
    let started = Instant::now();
    let mut plan = plan.clone();
    let mut notes = Vec::new();
    // Before pinning, which leaves this process one CPU.
    let cpus = os::cpu_count();
    if plan.pin {
        if cpus < 2 {
            notes.push("fewer than 2 CPUs: not pinned".to_string());
            plan.pin = false;
        } else if let Err(e) = os::pin_to_cpu(PINNING.load_cpu) {
            notes.push(format!("not pinned: {e}"));
            plan.pin = false;
        }
    }
    for kind in [
        ServerKind::Monoio,
        ServerKind::UringRaw,
        ServerKind::UringBest,
        ServerKind::WharfUring,
    ] {
        if !kind.available() {
            notes.push(format!("{} is not available on this system", kind.name()));
        }
    }
    let total_runs: usize = plan
        .scenarios
        .iter()
        .map(|s| rounds_of(&plan, s) * servers_of(&plan, s).len())
        .sum();
    let mut done = 0;
    let mut scenarios = Vec::new();
    for &scenario in &plan.scenarios {
        let rounds = rounds_of(&plan, &scenario);
        let servers = servers_of(&plan, &scenario);
        let mut runs = Vec::new();
        for round in 0..rounds {
            for &kind in in_turn(&servers, round) {
                let run = runs::one(&plan, scenario, kind, round);
                done += 1;
                if plan.progress {
                    progress(done, total_runs, started, &scenario, round, rounds, &run);
                }
                runs.push(run);
            }
        }
        scenarios.push(ScenarioResult::new(scenario, &servers, runs));
    }
    Results {
        meta: Meta {
            preset: plan.preset.clone(),
            rounds: plan.rounds,
            warmup_secs: plan.warmup.as_secs_f64(),
            duration_secs: plan.duration.as_secs_f64(),
            pinning: plan.pin.then_some(PINNING),
            cpus,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .ok()
                .map(|s| s.trim().to_string()),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .saturating_sub(started.elapsed().as_secs()),
            elapsed_secs: started.elapsed().as_secs_f64(),
            servers: plan.servers.clone(),
            notes,
        },
        scenarios,
    }
}

/// The servers that run `scenario`: all, or wharf's for what only wharf
/// has (groups across nodes).
fn servers_of(plan: &Plan, scenario: &Scenario) -> Vec<ServerKind> {
    let mut servers = plan.servers.clone();
    if scenario.wharf_only() {
        servers.retain(|k| k.is_wharf());
    }
    servers
}

/// `servers` in round `round`'s order: the list rotated by the round.
/// Every bench of several servers takes them in this order.
pub(super) fn in_turn<T>(servers: &[T], round: usize) -> impl Iterator<Item = &T> {
    let start = round % servers.len().max(1);
    servers[start..].iter().chain(&servers[..start])
}

fn rounds_of(plan: &Plan, scenario: &Scenario) -> usize {
    match scenario {
        Scenario::Idle { .. } => plan.idle_rounds,
        _ => plan.rounds,
    }
}

/// One line per run on standard error.
fn progress(
    done: usize,
    total: usize,
    started: Instant,
    scenario: &Scenario,
    round: usize,
    rounds: usize,
    run: &Run,
) {
    let t = started.elapsed().as_secs();
    let m = &run.metrics;
    let figures = match scenario {
        Scenario::Echo { .. } => format!(
            "{:>10} msg/s  p99 {:>8} µs  {:>6} µs/msg",
            m.messages_per_sec
                .map_or("-".into(), |v| count_label(v as usize)),
            m.p99_us.map_or("-".into(), |v| format!("{v:.1}")),
            m.cpu_us_per_msg.map_or("-".into(), |v| format!("{v:.2}")),
        ),
        Scenario::Idle { .. } => format!(
            "{:>8} B/conn",
            m.bytes_per_conn.map_or("-".into(), |v| format!("{v:.0}"))
        ),
        Scenario::CrossNode { .. } => format!(
            "p50 {:>6} µs  p99 {:>6} µs  {:>9} deliveries/s",
            m.p50_us.map_or("-".into(), |v| format!("{v:.0}")),
            m.p99_us.map_or("-".into(), |v| format!("{v:.0}")),
            m.deliveries_per_sec
                .map_or("-".into(), |v| count_label(v as usize)),
        ),
        Scenario::Broadcast { .. } | Scenario::Group { .. } => format!(
            "{:>8} ms to all  {:>6} µs/delivery",
            m.fanout_ms.map_or("-".into(), |v| format!("{v:.2}")),
            m.cpu_us_per_msg.map_or("-".into(), |v| format!("{v:.3}")),
        ),
    };
    let error = run
        .error
        .as_deref()
        .map(|e| format!("  FAILED: {e}"))
        .unwrap_or_default();
    eprintln!(
        "[{done:>3}/{total} {:>2}:{:02}] {:<16} round {}/{rounds}  {:<13} {figures}{error}",
        t / 60,
        t % 60,
        scenario.label(),
        round + 1,
        run.server.name(),
    );
}

#[cfg(test)]
mod tests {
    use super::in_turn;
    use crate::peers::ServerKind::{self, *};

    /// Over as many rounds as there are servers, each server runs once in
    /// every position, and the order within a round is the list's, rotated.
    #[test]
    fn every_server_takes_every_place_in_turn() {
        let servers = [WharfUring, WharfPoll, TokioFramed];
        let orders: Vec<Vec<ServerKind>> = (0..3)
            .map(|r| in_turn(&servers, r).copied().collect())
            .collect();
        assert_eq!(orders[0], [WharfUring, WharfPoll, TokioFramed]);
        assert_eq!(orders[1], [WharfPoll, TokioFramed, WharfUring]);
        assert_eq!(orders[2], [TokioFramed, WharfUring, WharfPoll]);
        assert_eq!(in_turn(&servers, 3).copied().collect::<Vec<_>>(), orders[0]);
        assert_eq!(in_turn::<ServerKind>(&[], 4).count(), 0);
    }
}
