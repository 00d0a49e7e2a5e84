//! `wharf bench --kv`: `redis-benchmark` against `wharf kv` (one loop, and
//! two) and against `redis-server` itself, in one run.
//!
//! Each server is its own process, started once and kept for the whole
//! run: `wharf kv --threads 1` and `redis-server` pinned to CPU 0,
//! `wharf kv --threads 2` to CPUs 0 and 1 (on two cores it shares CPU 1
//! with the load), and `redis-benchmark` pinned to CPU 1 (with `taskset`).
//! Every cell (PING_INLINE, SET, GET × pipeline depths 1 and 16, 50
//! clients) runs in rounds, each server once per round, interleaved (each
//! round starting one server further down the list); a cell is the median
//! over the rounds of the requests per second
//! redis-benchmark reports and of the server's CPU time per request (from
//! `/proc`, over that invocation).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::os;

/// The servers, in the order of each round.
const SERVERS: [&str; 3] = ["wharf-kv", "wharf-kv-2", "redis-server"];
/// The tests, as redis-benchmark names them (`-t`).
const TESTS: [&str; 3] = ["ping_inline", "set", "get"];
const PIPELINES: [u32; 2] = [1, 16];
const CLIENTS: u32 = 50;

/// One invocation of redis-benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvRun {
    /// The server.
    pub server: String,
    /// The test.
    pub test: String,
    /// Requests per pipeline.
    pub pipeline: u32,
    /// Requests per second, as redis-benchmark reports them.
    pub rps: f64,
    /// Median latency, in milliseconds.
    pub p50_ms: f64,
    /// The server's CPU time per request, in microseconds.
    pub cpu_us_per_op: Option<f64>,
}

/// The medians of one cell of one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvCell {
    /// The server.
    pub server: String,
    /// The test.
    pub test: String,
    /// Requests per pipeline.
    pub pipeline: u32,
    /// Median requests per second.
    pub rps: f64,
    /// Median CPU µs per request.
    pub cpu_us_per_op: Option<f64>,
    /// rps over redis-server's.
    pub rps_ratio: Option<f64>,
    /// CPU per request over redis-server's.
    pub cpu_ratio: Option<f64>,
}

/// What `wharf bench --kv` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvResults {
    /// How the run was set up, for the table.
    pub setup: String,
    /// Every invocation.
    pub runs: Vec<KvRun>,
    /// The medians.
    pub cells: Vec<KvCell>,
}

/// A server under test, stopped when dropped.
struct Target {
    name: &'static str,
    child: Child,
    port: u16,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `taskset -c CPUS PROGRAM` where pinning is asked for and possible.
fn command(program: &str, cpus: Option<&str>) -> Command {
    match cpus {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c, program]);
            cmd
        }
        None => Command::new(program),
    }
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

fn start(name: &'static str, exe: &Path, pin: bool) -> Result<Target, String> {
    let cpus = |c: &'static str| pin.then_some(c);
    if name == "redis-server" {
        let port = free_port()?;
        let child = command("redis-server", cpus("0"))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        let t = Target { name, child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("redis-server did not start".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        return Ok(t);
    }
    let threads = if name == "wharf-kv-2" { "2" } else { "1" };
    let mut child = command(
        &exe.to_string_lossy(),
        cpus(if threads == "2" { "0,1" } else { "0" }),
    )
    .args([
        "kv",
        "--addr",
        "127.0.0.1:0",
        "--threads",
        threads,
        "--backend",
        "uring",
    ])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .spawn()
    .map_err(|e| format!("cannot start wharf kv: {e}"))?;
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut first)
        .map_err(|e| e.to_string())?;
    let port = first
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("wharf kv printed {first:?}"))?;
    Ok(Target { name, child, port })
}

/// One redis-benchmark invocation against `t`.
fn bench(t: &Target, test: &str, pipeline: u32, pin: bool) -> Result<KvRun, String> {
    let requests = if pipeline == 1 { 100_000 } else { 1_000_000 };
    let before = os::cpu_secs(t.child.id());
    let out = command("redis-benchmark", pin.then_some("1"))
        .args(["-h", "127.0.0.1", "-p", &t.port.to_string()])
        .args(["-c", &CLIENTS.to_string(), "-n", &requests.to_string()])
        .args(["-P", &pipeline.to_string(), "-t", test, "--csv"])
        .output()
        .map_err(|e| format!("cannot run redis-benchmark: {e}"))?;
    let after = os::cpu_secs(t.child.id());
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    let row = text
        .lines()
        .find(|l| !l.starts_with("\"test\""))
        .ok_or_else(|| format!("redis-benchmark printed nothing against {}: {text}", t.name))?;
    let fields: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    let rps = fields.first().copied().unwrap_or(f64::NAN);
    if rps.is_nan() || rps <= 0.0 {
        return Err(format!("redis-benchmark against {}: {row}", t.name));
    }
    Ok(KvRun {
        server: t.name.into(),
        test: test.to_uppercase(),
        pipeline,
        rps,
        p50_ms: fields.get(3).copied().unwrap_or(f64::NAN),
        cpu_us_per_op: match (before, after) {
            (Some(a), Some(b)) => Some((b - a) * 1e6 / requests as f64),
            _ => None,
        },
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the whole comparison.
pub fn run(exe: &Path, rounds: usize, pin: bool) -> Result<KvResults, String> {
    for tool in ["redis-server", "redis-benchmark"] {
        if !have(tool) {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/need-redis.sh");
            eprintln!("{tool} is missing: installing it with {script}");
            let ok = Command::new("bash")
                .arg(script)
                .status()
                .is_ok_and(|s| s.success());
            if !ok || !have(tool) {
                return Err(format!(
                    "{tool} is missing and {script} could not install it"
                ));
            }
        }
    }
    let pin = pin && os::cpu_count() >= 2 && have("taskset");
    let targets: Vec<Target> = SERVERS
        .iter()
        .map(|name| start(name, exe, pin))
        .collect::<Result<_, _>>()?;
    let mut runs = Vec::new();
    let total = rounds * TESTS.len() * PIPELINES.len() * targets.len();
    let started = Instant::now();
    for round in 0..rounds {
        for test in TESTS {
            for pipeline in PIPELINES {
                for t in super::in_turn(&targets, round) {
                    let r = bench(t, test, pipeline, pin)?;
                    eprintln!(
                        "[{:>3}/{total} {:>4.0}s] {:<11} P{:<2} round {}/{rounds}  {:<12} {:>10.0} ops/s  {:>6} µs/op",
                        runs.len() + 1,
                        started.elapsed().as_secs_f64(),
                        r.test,
                        pipeline,
                        round + 1,
                        t.name,
                        r.rps,
                        r.cpu_us_per_op.map_or("-".into(), |c| format!("{c:.2}")),
                    );
                    runs.push(r);
                }
            }
        }
    }
    let mut cells = Vec::new();
    for test in TESTS {
        let test = test.to_uppercase();
        for pipeline in PIPELINES {
            let of = |server: &str| {
                let mine: Vec<&KvRun> = runs
                    .iter()
                    .filter(|r| r.server == server && r.test == test && r.pipeline == pipeline)
                    .collect();
                let rps = median(mine.iter().map(|r| r.rps).collect());
                let cpu: Vec<f64> = mine.iter().filter_map(|r| r.cpu_us_per_op).collect();
                let cpu = (!cpu.is_empty()).then(|| median(cpu));
                (rps, cpu)
            };
            let (redis_rps, redis_cpu) = of("redis-server");
            for server in SERVERS {
                let (rps, cpu) = of(server);
                cells.push(KvCell {
                    server: server.into(),
                    test: test.clone(),
                    pipeline,
                    rps,
                    cpu_us_per_op: cpu,
                    rps_ratio: Some(rps / redis_rps),
                    cpu_ratio: cpu.zip(redis_cpu).map(|(a, b)| a / b),
                });
            }
        }
    }
    let setup = if pin {
        "wharf-kv and redis-server pinned to CPU 0, wharf-kv-2 to CPUs 0-1, redis-benchmark to CPU 1"
    } else {
        "not pinned"
    };
    Ok(KvResults {
        setup: format!(
            "redis-benchmark -c {CLIENTS} (-n 100,000 at P1, 1,000,000 at P16), median of {rounds} interleaved rounds; {setup}"
        ),
        runs,
        cells,
    })
}

/// The table.
pub fn table(r: &KvResults) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "wharf bench --kv: {}", r.setup);
    let _ = writeln!(
        out,
        "×redis: over redis-server's median (ops/s: higher is better; CPU/op: lower is better)\n"
    );
    let _ = writeln!(
        out,
        "  {:<12} {:>3} {:<13} {:>12} {:>7} {:>10} {:>7}",
        "test", "P", "server", "ops/s", "×redis", "CPU µs/op", "×redis"
    );
    for c in &r.cells {
        let _ = writeln!(
            out,
            "  {:<12} {:>3} {:<13} {:>12.0} {:>7} {:>10} {:>7}",
            c.test,
            c.pipeline,
            c.server,
            c.rps,
            c.rps_ratio.map_or("-".into(), |x| format!("{x:.2}")),
            c.cpu_us_per_op.map_or("-".into(), |x| format!("{x:.3}")),
            c.cpu_ratio.map_or("-".into(), |x| format!("{x:.2}")),
        );
    }
    out
}

/// The chart: ops/s per cell, a bar per server.
pub fn chart(r: &KvResults) -> String {
    use std::fmt::Write;
    let colours = ["#1f4e9c", "#6f9fe0", "#b03a48"];
    let groups: Vec<(String, u32)> = TESTS
        .iter()
        .flat_map(|t| PIPELINES.iter().map(move |p| (t.to_uppercase(), *p)))
        .collect();
    let (w, h, left, top, bottom) = (760.0, 360.0, 70.0, 40.0, 60.0);
    let max = r.cells.iter().map(|c| c.rps).fold(1.0, f64::max) * 1.1;
    let gw = (w - left - 20.0) / groups.len() as f64;
    let bw = gw / (SERVERS.len() as f64 + 1.0);
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / max);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<text x="{left}" y="20" font-size="13">redis-benchmark ops/s, 50 clients (median of the rounds)</text>"#
    );
    for (gi, (test, p)) in groups.iter().enumerate() {
        let gx = left + gi as f64 * gw;
        for (si, server) in SERVERS.iter().enumerate() {
            if let Some(c) = r
                .cells
                .iter()
                .find(|c| &c.test == test && c.pipeline == *p && c.server == *server)
            {
                let x = gx + bw * (si as f64 + 0.5);
                let _ = write!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{server}: {:.0} ops/s</title></rect>"#,
                    y(c.rps),
                    bw * 0.9,
                    y(0.0) - y(c.rps),
                    colours[si],
                    c.rps
                );
            }
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{test} P{p}</text>"#,
            gx + gw / 2.0,
            h - bottom + 16.0
        );
    }
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}k</text>"#,
            left - 6.0,
            y(v) + 4.0,
            v / 1000.0
        );
        let _ = write!(
            s,
            r##"<line x1="{left}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            w - 20.0,
            y(v),
            y(v)
        );
    }
    for (si, server) in SERVERS.iter().enumerate() {
        let x = left + si as f64 * 140.0;
        let _ = write!(
            s,
            r#"<rect x="{x}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{:.1}">{server}</text>"#,
            h - 22.0,
            colours[si],
            x + 14.0,
            h - 13.0
        );
    }
    s.push_str("</svg>\n");
    s
}
