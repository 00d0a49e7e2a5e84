//! What a bench measured, as data: every run of every server in every
//! scenario, and per server the medians and their ratios to wharf. The
//! table, the JSON and the chart are all drawn from these types.

use serde::{Deserialize, Serialize};

use crate::peers::ServerKind;

/// A whole bench: how it ran and what each scenario measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// How the runs were made.
    pub meta: Meta,
    /// One entry per scenario, in the order they ran.
    pub scenarios: Vec<ScenarioResult>,
}

/// How the runs were made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// `quick`, `full` or `custom`.
    pub preset: String,
    /// Rounds per scenario (each server once per round, interleaved).
    pub rounds: usize,
    /// Load before each measuring window, in seconds.
    pub warmup_secs: f64,
    /// Length of each measuring window, in seconds.
    pub duration_secs: f64,
    /// Where server and load generator ran, if pinned.
    pub pinning: Option<Pinning>,
    /// CPUs the machine has.
    pub cpus: usize,
    /// `uname -r`, where known.
    pub kernel: Option<String>,
    /// Seconds since the Unix epoch when the bench started.
    pub started_unix: u64,
    /// How long the whole bench took, in seconds.
    pub elapsed_secs: f64,
    /// The servers run, in order.
    pub servers: Vec<ServerKind>,
    /// Anything a reader should know (peers that could not run, ...).
    pub notes: Vec<String>,
}

/// CPU pinning of one bench.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Pinning {
    /// The CPU every server process was pinned to.
    pub server_cpu: usize,
    /// The CPU the load generator was pinned to.
    pub load_cpu: usize,
}

/// What load a scenario offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scenario {
    /// Closed-loop echo: `connections` connections, one `size`-byte
    /// message in flight on each.
    Echo {
        /// Message size in bytes.
        size: usize,
        /// Connections, all sending.
        connections: usize,
    },
    /// `connections` silent connections held open: the server's memory per
    /// connection.
    Idle {
        /// Idle connections.
        connections: usize,
    },
    /// One `size`-byte message relayed to `connections` connections: the
    /// time until every one has it.
    Broadcast {
        /// Message size in bytes.
        size: usize,
        /// Receiving connections.
        connections: usize,
    },
    /// One `size`-byte message published to a group every one of
    /// `connections` connections is in: the time until every one has it
    /// (the peers, without groups, relay to every connection).
    Group {
        /// Message size in bytes.
        size: usize,
        /// Members.
        connections: usize,
    },
    /// Three wharf nodes and a Redis: messages published on node A reach
    /// `members` members, half on node B and half on node C, through the
    /// broker: latency per delivery and deliveries per second.
    CrossNode {
        /// Message size in bytes.
        size: usize,
        /// Members on B and C together.
        members: usize,
    },
}

impl Scenario {
    /// A short label for tables and charts ("64 B × 100").
    pub fn label(&self) -> String {
        match *self {
            Scenario::Echo { size, connections } => {
                format!("{} × {}", size_label(size), count_label(connections))
            }
            Scenario::Idle { connections } => format!("idle × {}", count_label(connections)),
            Scenario::Broadcast { size, connections } => {
                format!("bcast {} → {}", size_label(size), count_label(connections))
            }
            Scenario::Group { size, connections } => {
                format!("group {} → {}", size_label(size), count_label(connections))
            }
            Scenario::CrossNode { size, members } => {
                format!("nodes {} → {}", size_label(size), count_label(members))
            }
        }
    }

    /// Whether only wharf's servers can run it.
    pub fn wharf_only(&self) -> bool {
        matches!(self, Scenario::CrossNode { .. })
    }

    /// A sentence for the table's heading.
    pub fn describe(&self) -> String {
        match *self {
            Scenario::Echo { size, connections } => format!(
                "echo, {} messages, {} connection{}, closed loop, 1 in flight each",
                size_label(size),
                count_label(connections),
                if connections == 1 { "" } else { "s" }
            ),
            Scenario::Idle { connections } => format!(
                "{} idle connections (and 1 active): server memory per connection",
                count_label(connections)
            ),
            Scenario::Broadcast { size, connections } => format!(
                "broadcast: one {} message relayed to {} connections, time until all have it",
                size_label(size),
                count_label(connections)
            ),
            Scenario::Group { size, connections } => format!(
                "group: one {} message published to a room of {} members, time until all have it \
                 (the peers, without groups, relay to every connection)",
                size_label(size),
                count_label(connections)
            ),
            Scenario::CrossNode { size, members } => format!(
                "across nodes: {} messages published on node A to a room whose {} members are on \
                 nodes B and C, through Redis pub/sub",
                size_label(size),
                count_label(members)
            ),
        }
    }
}

/// "64 B", "1 KiB", "16 KiB".
pub fn size_label(size: usize) -> String {
    if size >= 1024 && size % 1024 == 0 {
        format!("{} KiB", size / 1024)
    } else {
        format!("{size} B")
    }
}

/// "100", "1,000", "10,000".
pub fn count_label(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The figures of one run, or (in a [`Summary`]) their medians or ratios.
/// A figure a scenario does not measure is `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Echo: replies per second in the window.
    pub messages_per_sec: Option<f64>,
    /// Echo: 99th-percentile latency in µs.
    pub p99_us: Option<f64>,
    /// Server CPU time (user + system) per message echoed (per message
    /// delivered, for broadcast), in µs.
    pub cpu_us_per_msg: Option<f64>,
    /// Server CPU use during the run, in % of one core.
    pub server_cpu_pct: Option<f64>,
    /// Load generator CPU use during the window, in % of one core.
    pub load_cpu_pct: Option<f64>,
    /// Server resident memory at the end of the run, in MiB.
    pub rss_mib: Option<f64>,
    /// Idle: server memory per idle connection, in bytes.
    pub bytes_per_conn: Option<f64>,
    /// Broadcast: median time until every connection had the message, ms.
    pub fanout_ms: Option<f64>,
    /// Across nodes: median latency per delivery in µs.
    #[serde(default)]
    pub p50_us: Option<f64>,
    /// Across nodes: deliveries per second with the publisher going flat
    /// out.
    #[serde(default)]
    pub deliveries_per_sec: Option<f64>,
    /// Across nodes: the broker's CPU time per message published, µs.
    #[serde(default)]
    pub broker_cpu_us_per_msg: Option<f64>,
}

impl Metrics {
    /// The fields, by name, in table order (for code that treats them alike).
    pub fn fields(&self) -> [(&'static str, Option<f64>); 11] {
        [
            ("messages_per_sec", self.messages_per_sec),
            ("p99_us", self.p99_us),
            ("cpu_us_per_msg", self.cpu_us_per_msg),
            ("server_cpu_pct", self.server_cpu_pct),
            ("load_cpu_pct", self.load_cpu_pct),
            ("rss_mib", self.rss_mib),
            ("bytes_per_conn", self.bytes_per_conn),
            ("fanout_ms", self.fanout_ms),
            ("p50_us", self.p50_us),
            ("deliveries_per_sec", self.deliveries_per_sec),
            ("broker_cpu_us_per_msg", self.broker_cpu_us_per_msg),
        ]
    }

    fn from_fields(f: [Option<f64>; 11]) -> Metrics {
        Metrics {
            messages_per_sec: f[0],
            p99_us: f[1],
            cpu_us_per_msg: f[2],
            server_cpu_pct: f[3],
            load_cpu_pct: f[4],
            rss_mib: f[5],
            bytes_per_conn: f[6],
            fanout_ms: f[7],
            p50_us: f[8],
            deliveries_per_sec: f[9],
            broker_cpu_us_per_msg: f[10],
        }
    }

    /// Field by field median over `runs` (fields missing in a run are
    /// left out; `None` where no run has it).
    pub fn median_of<'a>(runs: impl IntoIterator<Item = &'a Metrics> + Clone) -> Metrics {
        let mut out = [None; 11];
        for (i, slot) in out.iter_mut().enumerate() {
            let values: Vec<f64> = runs
                .clone()
                .into_iter()
                .filter_map(|m| m.fields()[i].1)
                .collect();
            *slot = median(&values);
        }
        Metrics::from_fields(out)
    }

    /// Field by field `self / base` (`None` where either is missing or the
    /// base is zero).
    pub fn ratio_to(&self, base: &Metrics) -> Metrics {
        let (a, b) = (self.fields(), base.fields());
        let mut out = [None; 11];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = match (a[i].1, b[i].1) {
                (Some(x), Some(y)) if y != 0.0 => Some(x / y),
                _ => None,
            };
        }
        Metrics::from_fields(out)
    }
}

/// The median: the middle value, or the mean of the two middle values of
/// an even count; `None` for none.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// One run of one server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The server.
    pub server: ServerKind,
    /// The round (0-based); every server runs once per round.
    pub round: usize,
    /// Why the run failed (it is then left out of the medians).
    pub error: Option<String>,
    /// What it measured.
    pub metrics: Metrics,
}

/// One server's medians in one scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The server.
    pub server: ServerKind,
    /// Runs that succeeded (the medians are over these).
    pub runs_ok: usize,
    /// Runs made.
    pub runs: usize,
    /// Medians of each figure.
    pub median: Metrics,
    /// `median / baseline's median`, figure by figure.
    pub ratio: Metrics,
    /// The first failure, if any run failed.
    pub error: Option<String>,
}

/// Everything one scenario measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The load offered.
    pub scenario: Scenario,
    /// The server ratios are taken to (wharf-uring where it ran).
    pub baseline: Option<ServerKind>,
    /// Every run, in the order made.
    pub runs: Vec<Run>,
    /// Per server, in the order of [`Meta::servers`].
    pub summary: Vec<Summary>,
}

impl ScenarioResult {
    /// Summarises `runs`: medians per server, ratios to the baseline (the
    /// first of wharf-uring, wharf-poll with a successful run).
    pub fn new(scenario: Scenario, servers: &[ServerKind], runs: Vec<Run>) -> ScenarioResult {
        let mut summary: Vec<Summary> = servers
            .iter()
            .map(|&server| {
                let mine: Vec<&Run> = runs.iter().filter(|r| r.server == server).collect();
                let ok: Vec<&Metrics> = mine
                    .iter()
                    .filter(|r| r.error.is_none())
                    .map(|r| &r.metrics)
                    .collect();
                Summary {
                    server,
                    runs_ok: ok.len(),
                    runs: mine.len(),
                    median: Metrics::median_of(ok.iter().copied()),
                    ratio: Metrics::default(),
                    error: mine.iter().find_map(|r| r.error.clone()),
                }
            })
            .collect();
        let baseline = [ServerKind::WharfUring, ServerKind::WharfPoll]
            .into_iter()
            .find(|k| summary.iter().any(|s| s.server == *k && s.runs_ok > 0));
        if let Some(base) = baseline {
            let base_median = summary
                .iter()
                .find(|s| s.server == base)
                .map(|s| s.median)
                .unwrap_or_default();
            for s in &mut summary {
                s.ratio = s.median.ratio_to(&base_median);
            }
        }
        ScenarioResult {
            scenario,
            baseline,
            runs,
            summary,
        }
    }
}
