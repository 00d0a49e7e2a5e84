//! What every server subcommand shares: the listening options, and waiting
//! for Ctrl-C (or SIGTERM) or the end of `--duration`.

use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use wharf::{Backend, Builder, Server};

/// How long a stopping server may take to flush what it has queued.
pub(crate) const DRAIN: Duration = Duration::from_secs(5);

/// Options of every server subcommand.
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:7000")]
    pub(crate) addr: String,
    /// Event-loop threads [default: one per CPU].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) threads: Option<u16>,
    /// Stop after this many seconds instead of waiting for Ctrl-C.
    #[arg(long, value_name = "SECS")]
    pub(crate) duration: Option<u64>,
    /// Completion engine (the WHARF_BACKEND variable overrides it).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub(crate) backend: BackendArg,
    /// Let only peers in this network connect (ADDRESS/PREFIX or an
    /// address; repeat for more). Default: everyone.
    #[arg(long, value_name = "CIDR")]
    pub(crate) allow: Vec<String>,
    /// Refuse peers in this network (repeat for more); wins over --allow.
    #[arg(long, value_name = "CIDR")]
    pub(crate) deny: Vec<String>,
    /// Accept at most N connections a second in all (N/s or N/min; the
    /// burst is a second's worth); the rest are reset at accept.
    #[arg(long, value_name = "N/s")]
    pub(crate) accept_rate: Option<wharf::AcceptRate>,
    /// Accept at most N connections a second from one address (IPv6 by
    /// /64).
    #[arg(long, value_name = "N/s")]
    pub(crate) accept_rate_per_ip: Option<wharf::AcceptRate>,
    /// Most connections open at once from one address (IPv6 by /64).
    #[arg(long, value_name = "N")]
    pub(crate) max_per_ip: Option<usize>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<String>,
    /// Serve TLS with this certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<std::path::PathBuf>,
    /// Require client certificates that chain to a CA in this PEM file.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_client_ca: Option<std::path::PathBuf>,
    /// Offer these application protocols by ALPN (comma-separated, most
    /// preferred first).
    #[arg(
        long,
        value_name = "PROTOS",
        requires = "tls_cert",
        value_delimiter = ','
    )]
    pub(crate) tls_alpn: Vec<String>,
}

/// `--backend` values.
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum BackendArg {
    /// io_uring where it works, else poll.
    Auto,
    /// io_uring (Linux).
    Uring,
    /// Readiness polling (epoll, kqueue).
    Poll,
    /// I/O completion ports (Windows).
    Iocp,
}

impl ServeArgs {
    /// A builder with `--threads` and `--backend` applied and `--addr` bound.
    pub(crate) fn bind(&self, builder: Builder) -> Result<Builder, Box<dyn Error>> {
        let builder = builder.backend(match self.backend {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Uring => Backend::Uring,
            BackendArg::Poll => Backend::Poll,
            BackendArg::Iocp => Backend::Iocp,
        });
        let builder = match self.threads {
            Some(n) => builder.threads(n.into()),
            None => builder,
        };
        let mut rules = wharf::IpRules::default();
        for net in &self.allow {
            rules = rules.allow(net).map_err(|e| format!("--allow: {e}"))?;
        }
        for net in &self.deny {
            rules = rules.deny(net).map_err(|e| format!("--deny: {e}"))?;
        }
        let mut builder = builder.ip_rules(rules);
        if let Some(r) = self.accept_rate {
            builder = builder.accept_rate(r);
        }
        if let Some(r) = self.accept_rate_per_ip {
            builder = builder.accept_rate_per_ip(r);
        }
        if let Some(n) = self.max_per_ip {
            builder = builder.max_connections_per_ip(n);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let mut config = wharf::tls::ServerTlsConfig::new()
                .cert_pem_files(cert, key)
                .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?
                .alpn(self.tls_alpn.iter().map(|p| p.as_bytes().to_vec()));
            if let Some(ca) = &self.tls_client_ca {
                config = config
                    .client_auth_pem_file(ca, true)
                    .map_err(|e| format!("--tls-client-ca: {e}"))?;
            }
            let config = config.build().map_err(|e| format!("TLS: {e}"))?;
            builder = builder.tls(wharf::tls::ServerTls::new(config));
        }
        builder
            .bind(self.addr.as_str())
            .map_err(|e| format!("cannot listen on {}: {e}", self.addr).into())
    }
}

/// Tells the main thread when to stop: on the first Ctrl-C or SIGTERM, or
/// once the deadline has passed. A second Ctrl-C exits at once, for a
/// shutdown that is taking too long.
pub(crate) struct Stop {
    signalled: Receiver<()>,
    deadline: Option<Instant>,
}

impl Stop {
    /// Installs the signal handler (once per process).
    pub(crate) fn install(duration: Option<u64>) -> Result<Stop, Box<dyn Error>> {
        let (tx, signalled) = mpsc::channel();
        let seen = AtomicBool::new(false);
        ctrlc::set_handler(move || {
            if seen.swap(true, Ordering::Relaxed) {
                eprintln!("wharf: second interrupt, exiting without draining");
                std::process::exit(130);
            }
            let _ = tx.send(());
        })?;
        Ok(Stop {
            signalled,
            deadline: duration.map(|secs| Instant::now() + Duration::from_secs(secs)),
        })
    }

    /// Waits up to `tick`; true when it is time to stop.
    pub(crate) fn wait(&self, tick: Duration) -> bool {
        let timeout = match self.deadline {
            Some(d) => tick.min(d.saturating_duration_since(Instant::now())),
            None => tick,
        };
        match self.signalled.recv_timeout(timeout) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                tracing::info!("interrupted, stopping");
                true
            }
            Err(RecvTimeoutError::Timeout) => {
                let over = self.deadline.is_some_and(|d| Instant::now() >= d);
                if over {
                    tracing::info!("--duration is over, stopping");
                }
                over
            }
        }
    }
}

/// Prints where `server` listens, for people and for scripts, and starts
/// its metrics endpoint if `--metrics` asks (it serves until dropped).
pub(crate) fn announce(
    what: &str,
    server: &Server,
    args: &ServeArgs,
) -> Result<Option<wharf::metrics::Endpoint>, Box<dyn Error>> {
    println!(
        "{what} server listening on {} ({:?} backend{})",
        server.local_addr(),
        server.backend(),
        if args.tls_cert.is_some() { ", TLS" } else { "" }
    );
    let Some(addr) = &args.metrics else {
        return Ok(None);
    };
    let endpoint = wharf::metrics::Endpoint::start(server.handle(), addr.as_str())
        .map_err(|e| format!("--metrics: cannot listen on {addr}: {e}"))?;
    println!("metrics at http://{}/metrics", endpoint.local_addr());
    Ok(Some(endpoint))
}

/// Drains and stops `server`, saying how long it took.
pub(crate) fn shutdown(server: Server) -> Result<(), Box<dyn Error>> {
    let started = Instant::now();
    server.shutdown(DRAIN)?;
    tracing::info!("stopped in {:.0?}", started.elapsed());
    Ok(())
}
