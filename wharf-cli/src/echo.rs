//! `wharf echo`: an echo server that prints its load once a second.

use std::error::Error;
use std::time::{Duration, Instant};

use wharf::{Conn, Framing, Handler, Server, Stats};

use crate::serve::{self, ServeArgs, Stop};

/// Options of `wharf echo`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    serve: ServeArgs,
    /// Echo the byte stream as it comes instead of length-prefixed messages.
    #[arg(long)]
    raw: bool,
    /// Largest length-prefixed message accepted [default: 1048576].
    #[arg(long, value_name = "BYTES", conflicts_with = "raw")]
    max_frame: Option<usize>,
}

struct Echo;

impl Handler for Echo {
    type State = ();

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        // A peer that sends without reading fills its queue; dropping one
        // message would corrupt the echo, so close it instead.
        if let Err(e) = conn.send(msg) {
            tracing::warn!("closing {}: {e}", conn.id());
            conn.close();
        }
    }
}

pub(crate) fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let framing = if args.raw {
        Framing::raw()
    } else {
        match args.max_frame {
            Some(max) => Framing::length_prefixed().max_frame(max).into(),
            None => Framing::default(),
        }
    };
    let stop = Stop::install(args.serve.duration)?;
    let server = args
        .serve
        .bind(Server::builder().framing(framing))?
        .start(Echo)?;
    serve::announce("echo", &server);

    let handle = server.handle();
    let mut last = (Instant::now(), handle.stats());
    while !stop.wait(Duration::from_secs(1)) {
        let now = (Instant::now(), handle.stats());
        println!("{}", rates(&last, &now));
        last = now;
    }
    let total = handle.stats();
    serve::shutdown(server)?;
    println!(
        "total: {} connections, {} messages in, {} bytes in, {} bytes out",
        total.accepted, total.messages_in, total.bytes_in, total.bytes_out
    );
    Ok(())
}

/// One stats line: what changed between two samples, per second.
fn rates((t0, s0): &(Instant, Stats), (t1, s1): &(Instant, Stats)) -> String {
    let secs = t1.duration_since(*t0).as_secs_f64().max(1e-3);
    let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    format!(
        "conns {:>6} | in {:>10.0} msg/s {:>8.2} MB/s | out {:>8.2} MB/s",
        s1.connections,
        per_sec(s0.messages_in, s1.messages_in),
        per_sec(s0.bytes_in, s1.bytes_in) / 1e6,
        per_sec(s0.bytes_out, s1.bytes_out) / 1e6,
    )
}
