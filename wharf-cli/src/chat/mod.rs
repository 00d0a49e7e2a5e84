//! `wharf chat`: a chat server with rooms that people use from `nc` or
//! telnet (`--framing lines`), spanning several nodes through Redis
//! (`--cluster`), and a terminal client for it (`--connect`).
//!
//! The protocol, one line per message (a length-prefixed message without
//! `--framing lines`): `/nick NAME`, `/join ROOM`, `/leave`, `/rooms`,
//! `/who`, `/help`, `/quit`; any other line is said in the current room,
//! and every member of that room, on every node, gets it as
//! `[ROOM] NICK: TEXT`. Notices from the server start with `* `. A new
//! connection is `guest-N` (`guest-N@NODE` in a cluster), in room `lobby`.

mod client;
mod room;

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use wharf::{Framing, Server};

use crate::serve::{self, ServeArgs, Stop};

use room::Chat;

/// Options of `wharf chat`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    serve: ServeArgs,
    /// How messages are cut: `lines` (LF or CRLF, for nc and telnet) or
    /// `length` (a 4-byte big-endian length, then the bytes).
    #[arg(long, value_enum, default_value_t = FramingArg::Length)]
    framing: FramingArg,
    /// Span rooms across every node given the same broker:
    /// `redis://HOST:PORT`.
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// Be the terminal client of a chat server at ADDR instead: lines from
    /// standard input are sent, what arrives is printed.
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum FramingArg {
    Lines,
    Length,
}

impl FramingArg {
    pub(crate) fn framing(self) -> Framing {
        match self {
            // Longer lines than a chat line may be: those get a notice,
            // and only a line past this closes the connection.
            FramingArg::Lines => Framing::from(Framing::lines().max_line(64 * 1024).crlf(true)),
            FramingArg::Length => Framing::default(),
        }
    }
}

pub(crate) fn run(args: Args) -> Result<(), Box<dyn Error>> {
    if let Some(addr) = &args.connect {
        return client::run(addr, args.framing);
    }
    let stop = Stop::install(args.serve.duration)?;
    let mut builder = Server::builder().framing(args.framing.framing());
    let mut cluster = None;
    if let Some(url) = &args.cluster {
        let redis = Arc::new(
            wharf::cluster::Redis::new(url)
                .map_err(|e| format!("--cluster {url}: {e}"))?
                .namespace("wharf-chat"),
        );
        builder = builder.backplane(redis.clone());
        cluster = Some(redis);
    }
    let tag = cluster
        .as_ref()
        .map_or(String::new(), |c| format!("@{:04x}", c.node() >> 48));
    let server = args
        .serve
        .bind(builder)?
        .start(Chat::new(tag, cluster.clone()))?;
    let _metrics = serve::announce("chat", &server, &args.serve)?;
    if let Some(c) = &cluster {
        if c.wait_linked(Duration::from_secs(5)) {
            tracing::info!(
                node = format_args!("{:016x}", c.node()),
                "linked to the cluster broker"
            );
        } else {
            tracing::warn!(
                "the cluster broker is not answering yet; serving this node's members meanwhile"
            );
        }
    }
    let mut last = cluster.as_ref().map(|c| c.stats());
    while !stop.wait(Duration::from_secs(1)) {
        if let (Some(c), Some(before)) = (&cluster, &mut last) {
            let now = c.stats();
            if now.linked != before.linked
                || now.publish_lost != before.publish_lost
                || now.gaps != before.gaps
            {
                tracing::info!(
                    linked = now.linked,
                    lost = now.publish_lost,
                    gaps = now.gaps,
                    reconnects = now.reconnects,
                    "cluster link"
                );
            }
            *before = now;
        }
    }
    serve::shutdown(server)
}
