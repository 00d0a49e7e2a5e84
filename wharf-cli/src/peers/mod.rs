//! The servers `wharf bench` measures, wharf's and its peers', each run as
//! its own process by the hidden `wharf peer KIND` subcommand.
//!
//! Every server speaks the same protocol: an echo of length-prefixed
//! messages (4-byte big-endian length, then the body). The raw echoes
//! (`tokio-raw`, `monoio`, `uring-raw`) send back the bytes as they come,
//! which is byte for byte the same thing. With `--broadcast`, a server
//! instead relays every message it receives to every connection it has
//! (the sender too): wharf through [`wharf::Handle::broadcast`], the others
//! with the obvious loop over their list of connections. With `--group`,
//! wharf's connections all join one group and every message is published
//! to it (the peers relay as with `--broadcast`: the same connections);
//! `--cluster redis://...` spans that group across processes.
//!
//! The process prints the address it listens on as its first line of
//! standard output, then serves until its standard input closes (the bench
//! closes it, and so does the bench's death), so a stray server never
//! outlives the run that started it.

mod std_threads;
mod tokio_echo;
mod wharf_echo;

#[cfg(target_os = "linux")]
mod monoio_echo;
#[cfg(target_os = "linux")]
mod uring_best;
#[cfg(target_os = "linux")]
mod uring_echo;

use std::error::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use serde::{Deserialize, Serialize};

/// Receive buffer of the raw echoes, per connection: the size of one of
/// wharf's pooled receive buffers.
pub(crate) const RAW_BUFFER: usize = 16 * 1024;

/// Accept backlog of the peers' listening sockets: deep enough that
/// thousands of connects in a burst do not overflow it (std's is 128).
const BACKLOG: i32 = 4096;

/// A server `wharf bench` can run.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum ServerKind {
    /// wharf on io_uring, one loop (`wharf echo --backend uring --threads 1`).
    WharfUring,
    /// wharf on readiness polling (epoll), one loop.
    WharfPoll,
    /// wharf-uring with its Prometheus endpoint on, scraped once a second
    /// from inside its process (so that the scrapes' cost is its own): the
    /// cost of metrics. Run only when named (`--servers`).
    WharfUringMetrics,
    /// wharf-uring with every optional io_uring feature turned off
    /// (`WHARF_URING_DISABLE`, as on a kernel without them): what those
    /// features gain, measured in the same run. Run only when named.
    WharfUringBasic,
    /// tokio, current-thread runtime, tokio-util's `LengthDelimitedCodec`
    /// through `Framed` (the baseline most Rust users would write).
    TokioFramed,
    /// tokio, current-thread runtime, read into a buffer and `write_all` it
    /// back.
    TokioRaw,
    /// std, one blocking thread per connection, length-prefixed.
    StdThreads,
    /// monoio (io_uring, thread-per-core), one thread, raw echo.
    Monoio,
    /// A minimal io_uring echo on the io-uring crate alone: one thread,
    /// multishot accept, one recv/send at a time per connection into a
    /// fixed buffer: the echo most would write first.
    UringRaw,
    /// The best echo io_uring does here, as the limit: one thread,
    /// multishot accept into direct descriptors, multishot receives from
    /// provided buffers sent back without a copy.
    UringBest,
    /// wharf-uring with two loops, not pinned (the load generator keeps
    /// its CPU, so it shares one with a loop): how wharf scales with
    /// loops. Run only when named.
    #[value(name = "wharf-uring-2")]
    #[serde(rename = "wharf-uring-2")]
    WharfUring2,
}

impl ServerKind {
    /// Every server this build can run, wharf's first.
    pub fn all() -> Vec<ServerKind> {
        let mut all = vec![
            ServerKind::WharfUring,
            ServerKind::WharfPoll,
            ServerKind::TokioFramed,
            ServerKind::TokioRaw,
            ServerKind::StdThreads,
            ServerKind::Monoio,
            ServerKind::UringRaw,
            ServerKind::UringBest,
        ];
        all.retain(|k| k.available());
        all
    }

    /// Whether this build (this OS) has the server.
    pub fn available(self) -> bool {
        match self {
            ServerKind::WharfUring
            | ServerKind::WharfUringMetrics
            | ServerKind::WharfUringBasic
            | ServerKind::WharfUring2
            | ServerKind::Monoio
            | ServerKind::UringRaw
            | ServerKind::UringBest => cfg!(target_os = "linux"),
            ServerKind::WharfPoll => cfg!(unix),
            ServerKind::TokioFramed | ServerKind::TokioRaw | ServerKind::StdThreads => true,
        }
    }

    /// The name on the command line, in tables and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            ServerKind::WharfUring => "wharf-uring",
            ServerKind::WharfPoll => "wharf-poll",
            ServerKind::WharfUringMetrics => "wharf-uring-metrics",
            ServerKind::WharfUringBasic => "wharf-uring-basic",
            ServerKind::TokioFramed => "tokio-framed",
            ServerKind::TokioRaw => "tokio-raw",
            ServerKind::StdThreads => "std-threads",
            ServerKind::Monoio => "monoio",
            ServerKind::UringRaw => "uring-raw",
            ServerKind::UringBest => "uring-best",
            ServerKind::WharfUring2 => "wharf-uring-2",
        }
    }

    /// Whether it is one of wharf's own.
    pub fn is_wharf(self) -> bool {
        matches!(
            self,
            ServerKind::WharfUring
                | ServerKind::WharfPoll
                | ServerKind::WharfUringMetrics
                | ServerKind::WharfUringBasic
                | ServerKind::WharfUring2
        )
    }

    /// How it reads its input: framed (cuts messages) or raw (echoes bytes).
    pub fn framing(self) -> &'static str {
        match self {
            ServerKind::WharfUring
            | ServerKind::WharfPoll
            | ServerKind::WharfUringMetrics
            | ServerKind::WharfUringBasic
            | ServerKind::WharfUring2
            | ServerKind::TokioFramed
            | ServerKind::StdThreads => "framed",
            ServerKind::TokioRaw
            | ServerKind::Monoio
            | ServerKind::UringRaw
            | ServerKind::UringBest => "raw",
        }
    }
}

/// Options of the hidden `wharf peer` subcommand.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which server.
    #[arg(value_enum)]
    kind: ServerKind,
    /// Address to listen on (port 0 picks one; it is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Pin the whole process to this CPU (Linux).
    #[arg(long)]
    cpu: Option<usize>,
    /// Relay every message to every connection instead of echoing it.
    #[arg(long)]
    broadcast: bool,
    /// Every connection joins one group, and every message is published
    /// to it (wharf's groups; the peers, which have none, relay to every
    /// connection as with --broadcast, which is the same set).
    #[arg(long, conflicts_with = "broadcast")]
    group: bool,
    /// With --group, span the group across every process given the same
    /// Redis (`redis://HOST:PORT`; wharf only).
    #[arg(long, value_name = "URL", requires = "group")]
    cluster: Option<String>,
    /// Serve TLS with this certificate chain (PEM); wharf's servers and
    /// tokio-framed (which then runs tokio-rustls) only.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Serve the files under this directory (the protocol of `wharf
    /// files`) instead of echoing: wharf's servers with `send_file`,
    /// tokio-framed by reading and writing with a buffer.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["broadcast", "group", "tls_cert"])]
    files_root: Option<std::path::PathBuf>,
    /// With --files-root, wharf always sends files with `sendfile`
    /// (`Builder::zero_copy_files(true)`), even to a loopback peer, which
    /// by default gets copies.
    #[arg(long, requires = "files_root")]
    files_sendfile: bool,
}

/// What a server does with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Echo,
    Broadcast,
    /// Publish to the group every connection is in (the peers, which have
    /// no groups, relay to every connection: the same set).
    Group,
}

/// `wharf peer`: serves until standard input closes.
pub fn cli(args: Args) -> Result<(), Box<dyn Error>> {
    if let Some(cpu) = args.cpu {
        // Before any thread starts, so that every thread inherits it.
        crate::bench::os::pin_to_cpu(cpu).map_err(|e| format!("cannot pin to CPU {cpu}: {e}"))?;
    }
    if !args.kind.available() {
        return Err(format!("{} is not available on this system", args.kind.name()).into());
    }
    let mode = if args.broadcast {
        Mode::Broadcast
    } else if args.group {
        Mode::Group
    } else {
        Mode::Echo
    };
    if args.cluster.is_some() && !args.kind.is_wharf() {
        return Err(format!("{} has no --cluster", args.kind.name()).into());
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            if !args.kind.is_wharf() && args.kind != ServerKind::TokioFramed {
                return Err(format!("{} has no --tls-cert", args.kind.name()).into());
            }
            let config = wharf::tls::ServerTlsConfig::new()
                .cert_pem_files(cert, key)
                .and_then(|c| c.build())
                .map_err(|e| format!("--tls-cert: {e}"))?;
            Some(std::sync::Arc::new(config))
        }
        _ => None,
    };
    let ready = |addr: SocketAddr| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{addr}");
        let _ = out.flush();
        std::thread::spawn(exit_when_stdin_closes);
    };
    if let Some(root) = &args.files_root {
        return match args.kind {
            ServerKind::WharfUring | ServerKind::WharfPoll => {
                let server =
                    wharf_echo::start_files(args.kind, args.addr, root, args.files_sendfile)?;
                ready(server.local_addr());
                exit_when_stdin_closes();
                Ok(())
            }
            ServerKind::TokioFramed => tokio_echo::serve_files(listen(args.addr)?, root, ready),
            other => Err(format!("{} has no --files-root", other.name()).into()),
        };
    }
    match args.kind {
        ServerKind::WharfUring
        | ServerKind::WharfPoll
        | ServerKind::WharfUringMetrics
        | ServerKind::WharfUringBasic
        | ServerKind::WharfUring2 => {
            let server =
                wharf_echo::start(args.kind, args.addr, mode, args.cluster.as_deref(), tls)?;
            let _metrics = match args.kind {
                ServerKind::WharfUringMetrics => Some(wharf_echo::scraped_endpoint(&server)?),
                _ => None,
            };
            ready(server.local_addr());
            exit_when_stdin_closes();
            Ok(())
        }
        ServerKind::TokioFramed if tls.is_some() => {
            tokio_echo::serve_tls(listen(args.addr)?, tls.expect("checked"), ready)
        }
        ServerKind::TokioFramed => tokio_echo::serve(listen(args.addr)?, mode, true, ready),
        ServerKind::TokioRaw => tokio_echo::serve(listen(args.addr)?, mode, false, ready),
        ServerKind::StdThreads => std_threads::serve(listen(args.addr)?, mode, ready),
        #[cfg(target_os = "linux")]
        ServerKind::Monoio => monoio_echo::serve(listen(args.addr)?, mode, ready),
        #[cfg(target_os = "linux")]
        ServerKind::UringRaw => uring_echo::serve(listen(args.addr)?, mode, ready),
        #[cfg(target_os = "linux")]
        ServerKind::UringBest => uring_best::serve(listen(args.addr)?, mode, ready),
        #[cfg(not(target_os = "linux"))]
        ServerKind::Monoio | ServerKind::UringRaw | ServerKind::UringBest => {
            unreachable!("checked by available()")
        }
    }
}

/// Queues `entry` on `ring`, submitting what is queued first while the
/// queue is full (the io_uring peers' one way to submit).
///
/// # Safety
/// As for `SubmissionQueue::push`: whatever `entry` points at must stay
/// valid, and untouched, until its completion has been handled.
#[cfg(target_os = "linux")]
unsafe fn push_entry(
    ring: &mut io_uring::IoUring,
    entry: &io_uring::squeue::Entry,
) -> std::io::Result<()> {
    loop {
        // SAFETY: the caller's contract.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Blocks until standard input reaches its end, then exits the process.
fn exit_when_stdin_closes() {
    let mut sink = [0u8; 64];
    let mut stdin = std::io::stdin().lock();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    std::process::exit(0);
}

/// A listening socket on `addr` with a deep backlog.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // Listening again on a listening socket only changes its backlog.
        // SAFETY: the descriptor is open (owned by `listener`) for the call.
        if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = BACKLOG;
    Ok(listener)
}
