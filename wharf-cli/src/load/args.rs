//! The `wharf load` command line: options, then the table (and JSON).

use std::error::Error;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use super::{run, Config, Framing, Mode, Report};

/// Options of `wharf load`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The echo server to drive, as HOST:PORT.
    addr: String,
    /// Connections that send.
    #[arg(long, value_name = "N", default_value_t = 100)]
    connections: usize,
    /// Message size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    size: usize,
    /// Seconds of measuring, after the warm-up.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    warmup: f64,
    /// Closed loop: messages in flight per connection [default: 1].
    #[arg(long, value_name = "K", conflicts_with = "rate")]
    inflight: Option<usize>,
    /// Fixed rate: messages per second in total, spread over the
    /// connections; latency counts from when each message was due.
    #[arg(long, value_name = "MSGS_PER_SEC")]
    rate: Option<f64>,
    /// Framing: lp (4-byte length prefix) or raw (the echoed stream is
    /// cut into messages by byte count).
    #[arg(long, value_enum, default_value_t = FramingArg::Lp)]
    framing: FramingArg,
    /// Extra connections that stay silent, to load the server's memory.
    #[arg(long, value_name = "N", default_value_t = 0)]
    idle: usize,
    /// Client event-loop threads.
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// The server's Prometheus endpoint (HOST:PORT): its figures for the
    /// window (messages, closes by reason, refusals by cause, CPU) are
    /// printed next to the client's.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Also flood the server with N connects a second (each reset after
    /// 100 ms) from --flood-source during the window.
    #[arg(long, value_name = "N/s")]
    flood: Option<wharf::AcceptRate>,
    /// The source address of the flood (another loopback address than the
    /// load's own clients, so that per-address limits tell them apart).
    #[arg(long, value_name = "IP", default_value = "127.0.0.2")]
    flood_source: std::net::IpAddr,
    /// Also write the report as JSON to PATH (`-`: stdout, and the table
    /// goes to stderr).
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Speak TLS, verifying the server against the system's roots unless
    /// --tls-ca or --tls-insecure says otherwise.
    #[arg(long)]
    tls: bool,
    /// Verify the server against the CA certificates in this PEM file.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls",
        conflicts_with = "tls_insecure"
    )]
    tls_ca: Option<PathBuf>,
    /// Accept any server certificate (for self-signed test servers only).
    #[arg(long, requires = "tls")]
    tls_insecure: bool,
    /// The name to ask for (SNI) and verify [default: the host of ADDR,
    /// or its IP address].
    #[arg(long, value_name = "NAME", requires = "tls")]
    tls_sni: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum FramingArg {
    Lp,
    Raw,
}

impl Args {
    /// The run these options ask for.
    pub fn config(&self) -> Result<Config, Box<dyn Error>> {
        let addr = self
            .addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.addr))?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.addr))?;
        let secs = |what: &str, s: f64| {
            Duration::try_from_secs_f64(s).map_err(|_| format!("bad --{what}: {s}"))
        };
        let mut config = Config::new(addr);
        config.connections = self.connections;
        config.size = self.size;
        config.duration = secs("duration", self.duration)?;
        config.warmup = secs("warmup", self.warmup)?;
        config.mode = match self.rate {
            Some(per_sec) => Mode::Rate { per_sec },
            None => Mode::Closed {
                inflight: self.inflight.unwrap_or(1),
            },
        };
        config.framing = match self.framing {
            FramingArg::Lp => Framing::LengthPrefixed,
            FramingArg::Raw => Framing::Raw,
        };
        config.idle = self.idle;
        config.threads = self.threads;
        if let Some(m) = &self.metrics {
            let addr = m
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve --metrics {m}: {e}"))?
                .next()
                .ok_or_else(|| format!("--metrics {m} resolves to no address"))?;
            config.metrics = Some(addr);
        }
        if self.tls {
            let tls = if self.tls_insecure {
                wharf::tls::ClientTls::insecure()
            } else if let Some(ca) = &self.tls_ca {
                wharf::tls::ClientTls::with_ca_pem_file(ca).map_err(|e| format!("--tls-ca: {e}"))?
            } else {
                wharf::tls::ClientTls::with_native_roots().map_err(|e| format!("--tls: {e}"))?
            };
            let host = self
                .addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']));
            let name = self
                .tls_sni
                .as_deref()
                .or(host.filter(|h| h.parse::<std::net::IpAddr>().is_err()));
            config.tls = Some(match name {
                Some(name) => tls
                    .server_name(name)
                    .map_err(|e| format!("--tls-sni: {e}"))?,
                None => tls,
            });
        }
        config.flood = self
            .flood
            .map(|r| (r.rate().round().max(1.0) as u32, self.flood_source));
        Ok(config)
    }
}

/// `wharf load`: runs, prints the table, writes the JSON, and fails (so the
/// exit status is non-zero) when the report is not ok.
pub fn cli(args: Args) -> Result<(), Box<dyn Error>> {
    let report = run(&args.config()?)?;
    match &args.json {
        Some(path) if path.as_os_str() == "-" => {
            eprintln!("{report}");
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Some(path) => {
            println!("{report}");
            let json = serde_json::to_string_pretty(&report)? + "\n";
            std::fs::write(path, json)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        None => println!("{report}"),
    }
    if report.ok {
        Ok(())
    } else {
        Err(failure(&report).into())
    }
}

fn failure(r: &Report) -> String {
    format!(
        "load failed: {} errors, {} connections failed, {} dropped",
        r.errors, r.connections_failed, r.connections_dropped
    )
}
