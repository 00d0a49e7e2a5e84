//! `wharf files` (serve the files under a directory) and `wharf fetch`
//! (its client); the protocol is in `wharf_cli::files`.

use std::error::Error;
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wharf::Server;
use wharf_cli::files::{self, FileServer};

use crate::serve::{self, ServeArgs, Stop};

/// Options of `wharf files`.
#[derive(clap::Args)]
pub(crate) struct FilesArgs {
    #[command(flatten)]
    serve: ServeArgs,
    /// The directory served: requests name paths under it, and nothing
    /// outside it is ever sent.
    #[arg(long, value_name = "DIR")]
    root: PathBuf,
}

pub(crate) fn serve_files(args: FilesArgs) -> Result<(), Box<dyn Error>> {
    let handler =
        FileServer::new(&args.root).map_err(|e| format!("--root {}: {e}", args.root.display()))?;
    let refused = handler.refused.clone();
    let stop = Stop::install(args.serve.duration)?;
    let builder = Server::builder().framing(files::framing());
    let server = args.serve.bind(builder)?.start(handler)?;
    let _metrics = serve::announce("files", &server, &args.serve)?;
    let handle = server.handle();
    let mut last = (Instant::now(), handle.stats());
    while !stop.wait(Duration::from_secs(1)) {
        let now = (Instant::now(), handle.stats());
        let secs = now.0.duration_since(last.0).as_secs_f64().max(1e-3);
        let out = now.1.bytes_out.saturating_sub(last.1.bytes_out) as f64 / secs;
        let requests = now.1.messages_in.saturating_sub(last.1.messages_in) as f64 / secs;
        println!(
            "conns {:>6} | {:>8.0} requests/s | out {:>9.2} MB/s",
            now.1.connections,
            requests,
            out / 1e6
        );
        last = now;
    }
    let total = handle.stats();
    serve::shutdown(server)?;
    println!(
        "total: {} connections, {} requests ({} refused), {} bytes out",
        total.accepted,
        total.messages_in,
        refused.load(Ordering::Relaxed),
        total.bytes_out
    );
    Ok(())
}

/// Options of `wharf fetch`.
#[derive(clap::Args)]
pub(crate) struct FetchArgs {
    /// The `wharf files` server (HOST:PORT).
    addr: String,
    /// Paths to fetch, relative to the server's root.
    #[arg(required = true)]
    paths: Vec<String>,
    /// Where to write: the file, for one path; a directory (made if
    /// missing), for several, each file under its own name.
    #[arg(long, short, value_name = "PATH")]
    out: PathBuf,
    /// Connections to fetch over (each takes the next path when done).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    connections: u16,
}

pub(crate) fn fetch(args: FetchArgs) -> Result<(), Box<dyn Error>> {
    let addr: SocketAddr = args
        .addr
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", args.addr))?
        .next()
        .ok_or_else(|| format!("{}: no address", args.addr))?;
    let several = args.paths.len() > 1;
    if several {
        std::fs::create_dir_all(&args.out)
            .map_err(|e| format!("--out {}: {e}", args.out.display()))?;
    }
    let out = args.out.clone();
    let out_for = move |path: &str| -> PathBuf {
        if several {
            let name = std::path::Path::new(path)
                .file_name()
                .map_or_else(|| "file".into(), |n| n.to_owned());
            out.join(name)
        } else {
            out.clone()
        }
    };
    let progress = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let fetched = std::thread::scope(|scope| {
        if std::io::stderr().is_terminal() {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let bytes = progress.load(Ordering::Relaxed);
                    let secs = start.elapsed().as_secs_f64().max(1e-3);
                    eprint!(
                        "\r{:>10.1} MB  {:>8.1} MB/s  {:>6.1} s ",
                        bytes as f64 / 1e6,
                        bytes as f64 / 1e6 / secs,
                        secs
                    );
                }
                eprintln!();
            });
        }
        let fetched = files::fetch(
            addr,
            &args.paths,
            args.connections.into(),
            &out_for,
            &progress,
        );
        done.store(true, Ordering::Relaxed);
        fetched
    })
    .map_err(|e| e.to_string())?;
    for (path, why) in &fetched.refused {
        eprintln!("wharf fetch: {path}: refused: {why}");
    }
    let secs = fetched.elapsed.as_secs_f64().max(1e-6);
    println!(
        "fetched {} file(s), {} bytes in {:.2} s: {:.1} MB/s",
        fetched.files.len(),
        fetched.bytes(),
        secs,
        fetched.bytes() as f64 / 1e6 / secs
    );
    if fetched.refused.is_empty() {
        Ok(())
    } else {
        Err(format!("{} path(s) refused", fetched.refused.len()).into())
    }
}
