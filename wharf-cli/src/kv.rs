//! `wharf kv`: a Redis-protocol key-value server (RESP2; the commands
//! `redis-cli` and `redis-benchmark` use), the same code as the library's
//! `kv` example (`wharf/examples/kv/`).

#[path = "../../wharf/examples/kv/resp.rs"]
mod resp;
#[path = "../../wharf/examples/kv/server.rs"]
mod server;
#[path = "../../wharf/examples/kv/store.rs"]
mod store;

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use wharf::{Framing, Server};

use crate::serve::{self, ServeArgs, Stop};

/// Options of `wharf kv`.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    serve: ServeArgs,
    /// Largest request (and so value) accepted, in bytes; a longer one
    /// gets a protocol error and a close.
    #[arg(long, value_name = "BYTES", default_value_t = server::MAX_REQUEST)]
    max_request: usize,
}

pub(crate) fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let stop = Stop::install(args.serve.duration)?;
    let store = Arc::new(store::Store::default());
    let max = args.max_request;
    let builder = Server::builder()
        .framing(Framing::custom(move || resp::RespCodec::new(max)))
        .tick(server::EXPIRE_EVERY);
    let kv = server::Kv {
        store: store.clone(),
        max_request: max,
    };
    let server = args.serve.bind(builder)?.start(kv)?;
    let _metrics = serve::announce("kv", &server, &args.serve)?;
    while !stop.wait(Duration::from_secs(1)) {}
    let keys = store.len();
    let stats = server.handle().stats();
    serve::shutdown(server)?;
    println!(
        "total: {} connections, {} requests, {keys} keys at the end",
        stats.accepted, stats.messages_in
    );
    Ok(())
}
