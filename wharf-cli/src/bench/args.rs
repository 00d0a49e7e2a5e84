//! The `wharf bench` command line: options, presets, and where the
//! results are written.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{chart, run, table, Plan, Results, Scenario};
use crate::peers::ServerKind;

/// Options of `wharf bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run the whole matrix (sizes × connections, idle, broadcast, group,
    /// across nodes) instead of the quick preset.
    #[arg(long)]
    full: bool,
    /// Servers to run, comma-separated [default: all this system has].
    #[arg(long, value_enum, value_delimiter = ',')]
    servers: Vec<ServerKind>,
    /// Rounds per scenario (each server once per round, interleaved).
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
    /// Seconds of each measuring window.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Seconds of load before each window.
    #[arg(long, value_name = "SECS")]
    warmup: Option<f64>,
    /// Echo message sizes in bytes, comma-separated (replaces the preset's
    /// scenarios, with --conns).
    #[arg(long, value_delimiter = ',', value_name = "BYTES")]
    sizes: Vec<usize>,
    /// Echo connection counts, comma-separated (with --sizes).
    #[arg(long, value_delimiter = ',', value_name = "N")]
    conns: Vec<usize>,
    /// Idle connections for the memory scenario (0: none) when --sizes or
    /// --conns replace the preset.
    #[arg(long, value_name = "N", default_value_t = 0)]
    idle: usize,
    /// Receivers of the broadcast scenario (0: none) when --sizes or
    /// --conns replace the preset.
    #[arg(long, value_name = "N", default_value_t = 0)]
    broadcast: usize,
    /// Members of the group scenario (0: none): one 1 KiB message
    /// published to a room of N.
    #[arg(long, value_name = "N", default_value_t = 0)]
    group: usize,
    /// Members of the cross-node scenario (0: none): three wharf nodes
    /// and a redis-server, members on two of them (wharf's servers only).
    #[arg(long, value_name = "N", default_value_t = 0)]
    cross_node: usize,
    /// Do not pin the server and the load generator to CPUs 0 and 1.
    #[arg(long)]
    no_pin: bool,
    /// Where results.json and chart.svg go [default: target/wharf-bench].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Instead of the echo scenarios: redis-benchmark against `wharf kv`
    /// (one loop and two) and redis-server (PING_INLINE, SET, GET; 50
    /// clients; pipelines of 1 and 16), into kv.json and kv.svg.
    #[arg(long)]
    kv: bool,
    /// Instead of the echo scenarios: wharf's TLS echo against
    /// tokio-rustls (64 B and 16 KiB echo over 100 connections, and full
    /// handshakes per second), into tls.json.
    #[arg(long, conflicts_with = "kv")]
    tls: bool,
    /// Instead of the echo scenarios: one big file over loopback from
    /// wharf's file server (io_uring and poll) and a tokio copying server,
    /// next to iperf3's line rate (MB/s, sender CPU per GiB), into
    /// files.json.
    #[arg(long, conflicts_with_all = ["kv", "tls"])]
    files: bool,
    /// The size of --files's file, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024, requires = "files")]
    file_mib: u64,
}

impl Args {
    /// The plan these options ask for, serving with the executable `exe`.
    pub fn plan(&self, exe: PathBuf) -> Result<Plan, Box<dyn Error>> {
        let mut plan = if self.full {
            Plan::full(exe)
        } else {
            Plan::quick(exe)
        };
        if !self.sizes.is_empty()
            || !self.conns.is_empty()
            || self.idle > 0
            || self.broadcast > 0
            || self.group > 0
            || self.cross_node > 0
        {
            plan.preset = "custom".into();
            plan.scenarios.clear();
            let sizes = if self.sizes.is_empty() {
                vec![64]
            } else {
                self.sizes.clone()
            };
            let conns = if self.conns.is_empty() {
                vec![100]
            } else {
                self.conns.clone()
            };
            if !self.sizes.is_empty() || !self.conns.is_empty() {
                for &size in &sizes {
                    for &connections in &conns {
                        plan.scenarios.push(Scenario::Echo { size, connections });
                    }
                }
            }
            if self.idle > 0 {
                plan.scenarios.push(Scenario::Idle {
                    connections: self.idle,
                });
            }
            if self.broadcast > 0 {
                plan.scenarios.push(Scenario::Broadcast {
                    size: 1024,
                    connections: self.broadcast,
                });
            }
            if self.group > 0 {
                plan.scenarios.push(Scenario::Group {
                    size: 1024,
                    connections: self.group,
                });
            }
            if self.cross_node > 0 {
                plan.scenarios.push(Scenario::CrossNode {
                    size: 1024,
                    members: self.cross_node,
                });
            }
        }
        if !self.servers.is_empty() {
            if let Some(k) = self.servers.iter().find(|k| !k.available()) {
                return Err(format!("{} is not available on this system", k.name()).into());
            }
            plan.servers = self.servers.clone();
        }
        if let Some(n) = self.rounds {
            if n == 0 {
                return Err("--rounds must be at least 1".into());
            }
            plan.rounds = n;
            plan.idle_rounds = n;
        }
        let secs = |what: &str, s: f64| {
            Duration::try_from_secs_f64(s).map_err(|_| format!("bad --{what}: {s}"))
        };
        if let Some(d) = self.duration {
            plan.duration = secs("duration", d)?;
            if plan.duration.is_zero() {
                return Err("--duration must be more than zero".into());
            }
        }
        if let Some(w) = self.warmup {
            plan.warmup = secs("warmup", w)?;
        }
        for s in &plan.scenarios {
            let (size, n) = match *s {
                Scenario::Echo { size, connections } => (size, connections),
                Scenario::Idle { connections } => (64, connections),
                Scenario::Broadcast { size, connections } => (size, connections),
                Scenario::Group { size, connections } => (size, connections),
                Scenario::CrossNode { size, members } => (size, members),
            };
            if size == 0 || size > 1 << 20 || n == 0 {
                return Err(format!("scenario {} cannot run", s.label()).into());
            }
        }
        plan.pin = !self.no_pin;
        Ok(plan)
    }
}

/// `wharf bench`: runs the plan, prints the table, writes the JSON and the
/// chart.
pub fn cli(args: Args) -> Result<(), Box<dyn Error>> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
    let out = args.out.clone().unwrap_or_else(|| default_out(&exe));
    if args.kv {
        let rounds = args.rounds.unwrap_or(5);
        if rounds == 0 {
            return Err("--rounds must be at least 1".into());
        }
        eprintln!(
            "wharf bench --kv: {rounds} rounds; results in {}",
            out.display()
        );
        let results = super::kv::run(&exe, rounds, !args.no_pin)?;
        println!("{}", super::kv::table(&results));
        std::fs::create_dir_all(&out)
            .map_err(|e| format!("cannot create {}: {e}", out.display()))?;
        let json = serde_json::to_string_pretty(&results)? + "\n";
        for (name, text) in [("kv.json", json), ("kv.svg", super::kv::chart(&results))] {
            let path = out.join(name);
            std::fs::write(&path, text)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        println!(
            "wrote {} and {}",
            out.join("kv.json").display(),
            out.join("kv.svg").display()
        );
        return Ok(());
    }
    if args.files {
        let rounds = args.rounds.unwrap_or(5);
        if rounds == 0 {
            return Err("--rounds must be at least 1".into());
        }
        if args.file_mib == 0 {
            return Err("--file-mib must be at least 1".into());
        }
        eprintln!(
            "wharf bench --files: {rounds} rounds of a {} MiB file; results in {}",
            args.file_mib,
            out.display()
        );
        let size = args.file_mib << 20;
        let results = super::files::run(&exe, rounds, size, !args.no_pin, &out)?;
        println!("{}", super::files::table(&results));
        let path = out.join("files.json");
        std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    if args.tls {
        let rounds = args.rounds.unwrap_or(5);
        if rounds == 0 {
            return Err("--rounds must be at least 1".into());
        }
        let window = Duration::try_from_secs_f64(args.duration.unwrap_or(2.0))
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or("bad --duration")?;
        eprintln!(
            "wharf bench --tls: {rounds} rounds; results in {}",
            out.display()
        );
        let results = super::tls::run(&exe, rounds, window, !args.no_pin, &out)?;
        println!("{}", super::tls::table(&results));
        let path = out.join("tls.json");
        std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
        return Ok(());
    }
    let plan = args.plan(exe)?;
    eprintln!(
        "wharf bench ({}): {} scenarios × {} servers × {} rounds; results in {}",
        plan.preset,
        plan.scenarios.len(),
        plan.servers.len(),
        plan.rounds,
        out.display()
    );
    let results = run(&plan);
    println!("{}", table(&results));
    write(&results, &out)?;
    println!(
        "wrote {} and {}",
        out.join("results.json").display(),
        out.join("chart.svg").display()
    );
    Ok(())
}

/// Writes `results.json` and `chart.svg` into `dir` (made if missing).
pub fn write(results: &Results, dir: &Path) -> Result<(), Box<dyn Error>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(results)? + "\n";
    let put = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    put("results.json", &json)?;
    put("chart.svg", &chart::render(results))?;
    Ok(())
}

/// `wharf-bench/` in the cargo target directory this executable was built
/// into (`CARGO_TARGET_DIR`, or `target/` above `target/release/wharf`),
/// else `target/wharf-bench` under the current directory.
fn default_out(exe: &Path) -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("wharf-bench");
    }
    let target = exe
        .parent()
        .and_then(Path::parent)
        .filter(|t| t.file_name().is_some_and(|n| n == "target"));
    match target {
        Some(t) => t.join("wharf-bench"),
        None => PathBuf::from("target").join("wharf-bench"),
    }
}
