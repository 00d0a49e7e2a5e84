//! `wharf bench --files`: one big file over loopback, from wharf's file
//! server (`send_file`, on io_uring and on poll: by default, to a
//! loopback peer, read 256 KiB at a time and sent as bytes; as
//! `-sendfile`, made to use `sendfile`) and from a tokio server that reads
//! the file into a buffer and writes it out, next to `iperf3` as the line
//! rate of one TCP stream on this machine.
//!
//! The servers run as `wharf peer KIND --files-root DIR` children pinned
//! to CPU 0 (one loop each); the client runs in this process pinned to
//! CPU 1: one connection, one request, the answer read into a 1 MiB
//! buffer and dropped (written nowhere, as iperf3's is). iperf3's server
//! is pinned to CPU 0 and its client to CPU 1 too, and sends the same
//! number of bytes. The file is made once and read once before the runs,
//! so that every run reads it from the page cache. Every server runs
//! once per round, interleaved; a cell is the median over the rounds.

use std::io::{self, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::child::Server;
use super::os;
use crate::peers::ServerKind;

/// The servers that send the file, with the names of the table, and
/// whether wharf is made to use `sendfile` (`Builder::zero_copy_files`):
/// by default a loopback peer, as here, gets copies.
const SERVERS: [(ServerKind, &str, bool); 5] = [
    (ServerKind::WharfUring, "wharf-uring", false),
    (ServerKind::WharfPoll, "wharf-poll", false),
    (ServerKind::WharfUring, "wharf-uring-sendfile", true),
    (ServerKind::WharfPoll, "wharf-poll-sendfile", true),
    (ServerKind::TokioFramed, "tokio-copy", false),
];

/// The line rate's name in the table.
const IPERF: &str = "iperf3";

/// One transfer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileRun {
    /// The sender.
    pub server: String,
    /// Megabytes (10^6) a second.
    pub mb_per_sec: f64,
    /// The sender's CPU seconds per GiB sent (not for iperf3).
    pub cpu_per_gib: Option<f64>,
}

/// The medians of one sender.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileCell {
    /// The sender.
    pub server: String,
    /// Median MB/s.
    pub mb_per_sec: f64,
    /// `mb_per_sec` over iperf3's.
    pub of_line_rate: f64,
    /// Median CPU seconds per GiB.
    pub cpu_per_gib: Option<f64>,
    /// `cpu_per_gib` over tokio-copy's.
    pub cpu_ratio: Option<f64>,
}

/// What `wharf bench --files` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileResults {
    /// How the run was set up.
    pub setup: String,
    /// Every run.
    pub runs: Vec<FileRun>,
    /// The medians.
    pub cells: Vec<FileCell>,
}

fn median(v: Vec<f64>) -> f64 {
    super::results::median(&v).unwrap_or(f64::NAN)
}

/// Makes (once) the file of `size` bytes under `dir`, and reads it, so
/// that it is in the page cache.
fn make_file(dir: &Path, size: u64) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join("big.bin");
    let fresh = std::fs::metadata(&path).is_ok_and(|m| m.len() == size);
    if !fresh {
        let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut block = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            for b in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            let n = left.min(block.len() as u64) as usize;
            f.write_all(&block[..n]).map_err(|e| e.to_string())?;
            left -= n as u64;
        }
    }
    std::io::copy(
        &mut std::fs::File::open(&path).map_err(|e| e.to_string())?,
        &mut io::sink(),
    )
    .map_err(|e| e.to_string())?;
    Ok(path)
}

/// Fetches the file from `server`: MB/s, and the server's CPU seconds
/// per GiB.
fn fetch(server: &Server, size: u64) -> Result<(f64, Option<f64>), String> {
    let mut s = TcpStream::connect(server.addr).map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| e.to_string())?;
    let progress = AtomicU64::new(0);
    let cpu0 = server.cpu_secs();
    let started = Instant::now();
    let answer = crate::files::fetch_one(&mut s, "big.bin", &mut io::sink(), &progress)
        .map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    let cpu = server.cpu_secs().zip(cpu0).map(|(b, a)| b - a);
    match answer {
        crate::files::Answer::Found(n) if n == size => {}
        other => return Err(format!("the answer was {other:?}")),
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    Ok((size as f64 / 1e6 / secs, cpu.map(|c| c / gib)))
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// One iperf3 transfer of `size` bytes: MB/s as its receiver counted it.
fn iperf(size: u64, pin: bool) -> Result<f64, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port()
        .to_string();
    let with_cpu = |cpu: &str, args: &[&str]| {
        let mut c = if pin {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu, "iperf3"]);
            c
        } else {
            Command::new("iperf3")
        };
        c.args(args);
        c
    };
    let mut server = with_cpu("0", &["-s", "-1", "-B", "127.0.0.1", "-p", &port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start iperf3: {e}"))?;
    // No probe of its port: a one-off server takes the first connection
    // for its control connection. It listens well within this.
    std::thread::sleep(Duration::from_millis(300));
    let out = with_cpu(
        "1",
        &[
            "-c",
            "127.0.0.1",
            "-p",
            &port,
            "-n",
            &size.to_string(),
            "-J",
        ],
    )
    .output()
    .map_err(|e| format!("cannot run iperf3 -c: {e}"))?;
    let _ = server.kill();
    let _ = server.wait();
    if !out.status.success() {
        return Err(format!(
            "iperf3 -c failed: {}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3's JSON: {e}"))?;
    json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 8.0 / 1e6)
        .ok_or_else(|| "no bits_per_second in iperf3's JSON".into())
}

/// Runs the whole comparison with a file of `size` bytes made in `out`.
pub fn run(
    exe: &Path,
    rounds: usize,
    size: u64,
    pin: bool,
    out: &Path,
) -> Result<FileResults, String> {
    if !have("iperf3") {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/need-iperf3.sh");
        eprintln!("iperf3 is missing: installing it with {script}");
        let ok = Command::new("bash")
            .arg(script)
            .status()
            .is_ok_and(|s| s.success());
        if !ok || !have("iperf3") {
            return Err(format!(
                "iperf3 is missing and {script} could not install it"
            ));
        }
    }
    let root = out.join("files");
    make_file(&root, size)?;
    let mut pinned = pin && os::cpu_count() >= 2 && have("taskset");
    if pinned {
        if let Err(e) = os::pin_to_cpu(1) {
            eprintln!("not pinned: {e}");
            pinned = false;
        }
    }
    let cpu = pinned.then_some(0);
    let servers: Vec<_> = SERVERS.iter().filter(|(k, _, _)| k.available()).collect();
    let extra = vec!["--files-root".to_string(), root.display().to_string()];
    let mut runs = Vec::new();
    let total = rounds * (servers.len() + 1);
    let started = Instant::now();
    let report = |runs: &mut Vec<FileRun>, run: FileRun, round: usize| {
        eprintln!(
            "[{:>3}/{total} {:>4.0}s] round {}/{rounds}  {:<12} {:>9.1} MB/s  {:>8} CPU s/GiB",
            runs.len() + 1,
            started.elapsed().as_secs_f64(),
            round + 1,
            run.server,
            run.mb_per_sec,
            run.cpu_per_gib.map_or("-".into(), |c| format!("{c:.3}")),
        );
        runs.push(run);
    };
    for round in 0..rounds {
        for (kind, name, sendfile) in super::in_turn(&servers, round) {
            let mut extra = extra.clone();
            if *sendfile {
                extra.push("--files-sendfile".into());
            }
            let server = Server::start(exe, *kind, cpu, &extra)?;
            let measured = fetch(&server, size);
            server.stop();
            let (mb_per_sec, cpu_per_gib) = measured.map_err(|e| format!("{name}: {e}"))?;
            let run = FileRun {
                server: (*name).into(),
                mb_per_sec,
                cpu_per_gib,
            };
            report(&mut runs, run, round);
        }
        let mb_per_sec = iperf(size, pinned)?;
        let run = FileRun {
            server: IPERF.into(),
            mb_per_sec,
            cpu_per_gib: None,
        };
        report(&mut runs, run, round);
    }
    let of = |server: &str| {
        let mine: Vec<&FileRun> = runs.iter().filter(|r| r.server == server).collect();
        let rate = median(mine.iter().map(|r| r.mb_per_sec).collect());
        let cpu: Vec<f64> = mine.iter().filter_map(|r| r.cpu_per_gib).collect();
        (rate, (!cpu.is_empty()).then(|| median(cpu)))
    };
    let (line, _) = of(IPERF);
    let (_, tokio_cpu) = of("tokio-copy");
    let mut cells = Vec::new();
    for name in servers.iter().map(|(_, n, _)| *n).chain([IPERF]) {
        let (rate, cpu) = of(name);
        cells.push(FileCell {
            server: name.into(),
            mb_per_sec: rate,
            of_line_rate: rate / line,
            cpu_per_gib: cpu,
            cpu_ratio: cpu.zip(tokio_cpu).map(|(a, b)| a / b),
        });
    }
    let setup = if pinned {
        "senders pinned to CPU 0 (one loop each), receivers to CPU 1"
    } else {
        "not pinned"
    };
    Ok(FileResults {
        setup: format!(
            "a {:.0} MiB file from the page cache over one loopback connection, read into a 1 MiB buffer and dropped; iperf3 sends as many bytes; median of {rounds} interleaved rounds; {setup}",
            size as f64 / (1u64 << 20) as f64
        ),
        runs,
        cells,
    })
}

/// The table.
pub fn table(r: &FileResults) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "wharf bench --files: {}", r.setup);
    let _ = writeln!(
        out,
        "×iperf3: over iperf3's MB/s (higher is better); ×tokio: CPU over tokio-copy's (lower is better)\n"
    );
    let _ = writeln!(
        out,
        "  {:<20} {:>10} {:>8} {:>12} {:>7}",
        "sender", "MB/s", "×iperf3", "CPU s/GiB", "×tokio"
    );
    for c in &r.cells {
        let _ = writeln!(
            out,
            "  {:<20} {:>10.1} {:>8.2} {:>12} {:>7}",
            c.server,
            c.mb_per_sec,
            c.of_line_rate,
            c.cpu_per_gib.map_or("-".into(), |x| format!("{x:.3}")),
            c.cpu_ratio.map_or("-".into(), |x| format!("{x:.2}")),
        );
    }
    out
}
