//! `wharf echo`: an echo server that prints its load once a second.

use std::collections::hash_map::DefaultHasher;
use std::error::Error;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use wharf::{Bytes, Conn, Framing, Handler, Server, Stats};

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
    /// Handle every message with a job on the worker pool that keeps a CPU
    /// busy for a random time in this range (microseconds), then echoes
    /// it: replies stay in order per connection.
    #[arg(long, value_name = "MIN-MAX", value_parser = parse_range)]
    work_us: Option<(u64, u64)>,
    /// Worker threads for `--work-us` [default: one per CPU].
    #[arg(long, value_name = "N", requires = "work_us", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("expected MIN-MAX, got {s:?}"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map_err(|e| format!("{v:?} is not a number of microseconds: {e}"))
    };
    let (lo, hi) = (num(lo)?, num(hi)?);
    if lo > hi {
        return Err(format!("MIN {lo} is larger than MAX {hi}"));
    }
    Ok((lo, hi))
}

struct Echo {
    work_us: Option<(u64, u64)>,
}

impl Handler for Echo {
    /// The connection's random state, for `--work-us`.
    type State = u64;

    fn on_open(&self, conn: &mut Conn<'_, u64>) -> wharf::Accept {
        let mut h = DefaultHasher::new();
        conn.id().hash(&mut h);
        *conn.state() = h.finish() | 1;
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, u64>, msg: &[u8]) {
        let Some((lo, hi)) = self.work_us else {
            return echo(conn, msg);
        };
        let rng = conn.state();
        // xorshift64: a cheap spread of job lengths, per connection.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let spin = Duration::from_micros(lo + *rng % (hi - lo + 1));
        let msg = Bytes::copy_from_slice(msg);
        let submitted = conn.submit(move || {
            let end = Instant::now() + spin;
            while Instant::now() < end {
                std::hint::spin_loop();
            }
            move |conn: &mut Conn<'_, u64>| echo(conn, &msg)
        });
        if let Err(e) = submitted {
            // Answering inline would overtake the replies still with the
            // pool, and dropping the message would corrupt the echo.
            tracing::warn!("closing {}: {e}", conn.id());
            conn.close();
        }
    }
}

fn echo(conn: &mut Conn<'_, u64>, msg: &[u8]) {
    // A peer that sends without reading fills its queue; dropping one
    // message would corrupt the echo, so close it instead.
    if let Err(e) = conn.send(msg) {
        tracing::warn!("closing {}: {e}", conn.id());
        conn.close();
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
    let mut builder = Server::builder().framing(framing);
    if let Some(n) = args.workers {
        builder = builder.workers(n.into());
    }
    let server = args.serve.bind(builder)?.start(Echo {
        work_us: args.work_us,
    })?;
    let _metrics = serve::announce("echo", &server, &args.serve)?;

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
        "total: {} connections, {} messages in, {} bytes in, {} bytes out, {} refused by --allow/--deny, {} over --accept-rate, {} over caps",
        total.accepted, total.messages_in, total.bytes_in, total.bytes_out, total.denied, total.rate_limited, total.refused
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
