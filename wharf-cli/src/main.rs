//! The `wharf` command: servers built on the wharf library, for trying it
//! out and for scripts. One module per subcommand.

mod chat;
mod echo;
mod kv;
mod serve;
mod serve_files;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Completion-based TCP servers on the wharf library.
#[derive(Parser)]
#[command(name = "wharf", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve an echo: every message goes back to its sender.
    Echo(echo::Args),
    /// Serve a chat with rooms (for nc and telnet with `--framing lines`,
    /// across nodes with `--cluster`), or be its client (`--connect`).
    Chat(chat::Args),
    /// Serve a Redis-protocol key-value store (RESP2: redis-cli and
    /// redis-benchmark talk to it).
    Kv(kv::Args),
    /// Serve the files under a directory (a request names a path under
    /// it; the answer is the file).
    Files(serve_files::FilesArgs),
    /// Fetch files from a `wharf files` server.
    Fetch(serve_files::FetchArgs),
    /// Drive an echo server with load and check every echoed byte.
    Load(wharf_cli::load::Args),
    /// Benchmark wharf against peer servers (tokio, std, monoio, raw
    /// io_uring) and print the table; results go to target/wharf-bench/.
    Bench(wharf_cli::bench::Args),
    /// Serve as one of the servers `wharf bench` measures.
    #[command(hide = true)]
    Peer(wharf_cli::peers::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Echo(args) => echo::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Kv(args) => kv::run(args),
        Command::Files(args) => serve_files::serve_files(args),
        Command::Fetch(args) => serve_files::fetch(args),
        Command::Load(args) => wharf_cli::load::cli(args),
        Command::Bench(args) => wharf_cli::bench::cli(args),
        Command::Peer(args) => wharf_cli::peers::cli(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wharf: {e}");
            ExitCode::FAILURE
        }
    }
}
