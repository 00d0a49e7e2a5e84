//! `wharf bench --tls`: wharf's TLS echo next to tokio-rustls, in one run.
//!
//! Both servers run as `wharf peer` children, one thread each, pinned to
//! CPU 0: `wharf-tls` is wharf on io_uring with `Builder::tls`, and
//! `tokio-rustls` is the framed tokio echo behind a `TlsAcceptor` (a
//! current-thread runtime). The load runs in this process, pinned to CPU 1:
//! `wharf load` over TLS for the echo cells (64 B and 16 KiB, 100
//! connections, closed loop), and blocking rustls clients for the
//! handshake cell (each connects, does a full handshake with resumption
//! off, echoes 64 bytes and closes, over and over). Both servers use the
//! same certificate (ECDSA P-256, made for the run by rcgen, signed by a
//! CA of the run's own) and the same rustls provider (ring). Every cell
//! runs in rounds, each server once per round, interleaved; a cell is the
//! median over the rounds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wharf::tls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};

use super::child::Server;
use super::os;
use crate::load::{self, Config};
use crate::peers::ServerKind;

/// The servers, in the order of each round, with the names of the table.
const SERVERS: [(ServerKind, &str); 2] = [
    (ServerKind::WharfUring, "wharf-tls"),
    (ServerKind::TokioFramed, "tokio-rustls"),
];

/// The cells: echo of a size over 100 connections, or handshakes.
const CELLS: [Cell; 3] = [
    Cell::Echo { size: 64 },
    Cell::Echo { size: 16 * 1024 },
    Cell::Handshakes,
];

const CONNECTIONS: usize = 100;
/// Client threads of the handshake cell.
const HANDSHAKE_CLIENTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Cell {
    Echo { size: usize },
    Handshakes,
}

impl Cell {
    fn label(self) -> String {
        match self {
            Cell::Echo { size } => format!("echo {} × {CONNECTIONS}", super::size_label(size)),
            Cell::Handshakes => "handshakes".into(),
        }
    }
}

/// One run of one cell against one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsRun {
    /// The server.
    pub server: String,
    /// The cell.
    pub cell: String,
    /// Messages (echo) or handshakes a second.
    pub per_sec: f64,
    /// The server's CPU time per message or handshake, in microseconds.
    pub cpu_us: Option<f64>,
}

/// The medians of one cell of one server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsCell {
    /// The server.
    pub server: String,
    /// The cell.
    pub cell: String,
    /// Median messages or handshakes a second.
    pub per_sec: f64,
    /// Median server CPU µs per message or handshake.
    pub cpu_us: Option<f64>,
    /// `per_sec` over tokio-rustls's.
    pub rate_ratio: Option<f64>,
    /// `cpu_us` over tokio-rustls's.
    pub cpu_ratio: Option<f64>,
}

/// What `wharf bench --tls` measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsResults {
    /// How the run was set up.
    pub setup: String,
    /// Every run.
    pub runs: Vec<TlsRun>,
    /// The medians.
    pub cells: Vec<TlsCell>,
}

/// The run's certificates: a CA, and a leaf for `localhost` it signed.
struct Certs {
    dir: PathBuf,
    roots: RootCertStore,
}

impl Certs {
    fn make(dir: &Path) -> Result<Certs, String> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let e = |e: rcgen::Error| e.to_string();
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().map_err(e)?;
        let ca_cert = ca.self_signed(&ca_key).map_err(e)?;
        let leaf = CertificateParams::new(vec!["localhost".to_string()]).map_err(e)?;
        let leaf_key = KeyPair::generate().map_err(e)?;
        let leaf_cert = leaf
            .signed_by(&leaf_key, &Issuer::from_params(&ca, &ca_key))
            .map_err(e)?;
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("cert.pem"), leaf_cert.pem()).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).map_err(|e| e.to_string())?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca_cert.der().clone())
            .map_err(|e| e.to_string())?;
        Ok(Certs {
            dir: dir.to_owned(),
            roots,
        })
    }

    fn server_args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.dir.join("cert.pem").display().to_string(),
            "--tls-key".into(),
            self.dir.join("key.pem").display().to_string(),
        ]
    }
}

fn median(v: Vec<f64>) -> f64 {
    super::results::median(&v).unwrap_or(f64::NAN)
}

fn echo(
    server: &Server,
    certs: &Certs,
    size: usize,
    window: Duration,
) -> Result<(f64, Option<f64>), String> {
    let mut config = Config::new(server.addr);
    config.connections = CONNECTIONS;
    config.size = size;
    config.warmup = Duration::from_millis(500);
    config.duration = window;
    config.progress = false;
    config.tls = Some(
        wharf::tls::ClientTls::with_roots(certs.roots.clone())
            .server_name("localhost")
            .map_err(|e| e.to_string())?,
    );
    let cpu0 = server.cpu_secs();
    let report = load::run(&config).map_err(|e| e.to_string())?;
    let cpu = server.cpu_secs().zip(cpu0).map(|(b, a)| b - a);
    if !report.ok {
        return Err(format!(
            "{} errors, {} connections failed{}",
            report.errors,
            report.connections_failed,
            report
                .first_failure
                .map(|f| format!(" ({f})"))
                .unwrap_or_default()
        ));
    }
    // CPU over the whole run (connects and warm-up too), shared over every
    // reply of it.
    let per_msg = cpu
        .filter(|_| report.received > 0)
        .map(|c| c * 1e6 / report.received as f64);
    Ok((report.messages_per_sec, per_msg))
}

/// One full handshake, a 64-byte echo, a close.
fn one_handshake(addr: SocketAddr, config: &Arc<ClientConfig>) -> std::io::Result<()> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = ServerName::try_from("localhost").expect("a valid name");
    let conn =
        rustls::ClientConnection::new(config.clone(), name).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut msg = [0u8; 68];
    msg[..4].copy_from_slice(&64u32.to_be_bytes());
    s.write_all(&msg)?;
    let mut back = [0u8; 68];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("the echo differs"));
    }
    s.conn.send_close_notify();
    s.flush()?;
    Ok(())
}

fn handshakes(
    server: &Server,
    certs: &Certs,
    window: Duration,
) -> Result<(f64, Option<f64>), String> {
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(certs.roots.clone())
            .with_no_client_auth();
    // Every handshake a full one.
    config.resumption = rustls::client::Resumption::disabled();
    let config = Arc::new(config);
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..HANDSHAKE_CLIENTS)
        .map(|_| {
            let (config, stop, counting, done, errors) = (
                config.clone(),
                stop.clone(),
                counting.clone(),
                done.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match one_handshake(addr, &config) {
                        Ok(()) if counting.load(Ordering::Relaxed) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(()) => {}
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = server.cpu_secs();
    let started = Instant::now();
    counting.store(true, Ordering::Relaxed);
    std::thread::sleep(window);
    counting.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = server.cpu_secs().zip(cpu0).map(|(b, a)| b - a);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let n = done.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    if errors > 0 || n == 0 {
        return Err(format!("{errors} handshakes failed, {n} completed"));
    }
    // The CPU read around the counted window; the clients in flight at its
    // edges make it a little high or low, alike for both servers.
    Ok((n as f64 / elapsed, cpu.map(|c| c * 1e6 / n as f64)))
}

/// Runs the whole comparison; the certificates go into `out`.
pub fn run(
    exe: &Path,
    rounds: usize,
    window: Duration,
    pin: bool,
    out: &Path,
) -> Result<TlsResults, String> {
    let certs = Certs::make(&out.join("tls-certs"))?;
    let mut pinned = pin && os::cpu_count() >= 2;
    if pinned {
        if let Err(e) = os::pin_to_cpu(1) {
            eprintln!("not pinned: {e}");
            pinned = false;
        }
    }
    let cpu = pinned.then_some(0);
    let mut runs = Vec::new();
    let total = rounds * CELLS.len() * SERVERS.len();
    let started = Instant::now();
    for round in 0..rounds {
        for cell in CELLS {
            for &(kind, name) in super::in_turn(&SERVERS, round) {
                let server = Server::start(exe, kind, cpu, &certs.server_args())?;
                let measured = match cell {
                    Cell::Echo { size } => echo(&server, &certs, size, window),
                    Cell::Handshakes => handshakes(&server, &certs, window),
                };
                server.stop();
                let (per_sec, cpu_us) =
                    measured.map_err(|e| format!("{name}, {}: {e}", cell.label()))?;
                eprintln!(
                    "[{:>3}/{total} {:>4.0}s] {:<16} round {}/{rounds}  {:<13} {:>10.0}/s  {:>8} µs CPU each",
                    runs.len() + 1,
                    started.elapsed().as_secs_f64(),
                    cell.label(),
                    round + 1,
                    name,
                    per_sec,
                    cpu_us.map_or("-".into(), |c| format!("{c:.2}")),
                );
                runs.push(TlsRun {
                    server: name.into(),
                    cell: cell.label(),
                    per_sec,
                    cpu_us,
                });
            }
        }
    }
    let mut cells = Vec::new();
    for cell in CELLS {
        let label = cell.label();
        let of = |server: &str| {
            let mine: Vec<&TlsRun> = runs
                .iter()
                .filter(|r| r.server == server && r.cell == label)
                .collect();
            let rate = median(mine.iter().map(|r| r.per_sec).collect());
            let cpu: Vec<f64> = mine.iter().filter_map(|r| r.cpu_us).collect();
            (rate, (!cpu.is_empty()).then(|| median(cpu)))
        };
        let (base_rate, base_cpu) = of("tokio-rustls");
        for (_, name) in SERVERS {
            let (rate, cpu) = of(name);
            cells.push(TlsCell {
                server: name.into(),
                cell: label.clone(),
                per_sec: rate,
                cpu_us: cpu,
                rate_ratio: Some(rate / base_rate),
                cpu_ratio: cpu.zip(base_cpu).map(|(a, b)| a / b),
            });
        }
    }
    let setup = if pinned {
        "servers pinned to CPU 0 (one thread each), the load to CPU 1"
    } else {
        "not pinned"
    };
    Ok(TlsResults {
        setup: format!(
            "TLS 1.3, ECDSA P-256, ring; echo: wharf load, {CONNECTIONS} connections, closed loop; handshakes: {HANDSHAKE_CLIENTS} blocking rustls clients, full handshakes; {:.1} s windows, median of {rounds} interleaved rounds; {setup}",
            window.as_secs_f64()
        ),
        runs,
        cells,
    })
}

/// The table.
pub fn table(r: &TlsResults) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "wharf bench --tls: {}", r.setup);
    let _ = writeln!(
        out,
        "×tokio: over tokio-rustls's median (rate: higher is better; CPU: lower is better)\n"
    );
    let _ = writeln!(
        out,
        "  {:<18} {:<13} {:>12} {:>7} {:>12} {:>7}",
        "cell", "server", "per second", "×tokio", "CPU µs each", "×tokio"
    );
    for c in &r.cells {
        let _ = writeln!(
            out,
            "  {:<18} {:<13} {:>12.0} {:>7} {:>12} {:>7}",
            c.cell,
            c.server,
            c.per_sec,
            c.rate_ratio.map_or("-".into(), |x| format!("{x:.2}")),
            c.cpu_us.map_or("-".into(), |x| format!("{x:.2}")),
            c.cpu_ratio.map_or("-".into(), |x| format!("{x:.2}")),
        );
    }
    out
}
