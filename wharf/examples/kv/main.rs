//! A Redis-protocol key-value server: RESP2 requests framed by a custom
//! `Codec`, pipelined requests answered in order, one store shared by every
//! loop. `redis-cli -p 6380` and `redis-benchmark -p 6380` talk to it.
//!
//! Run it with `cargo run -p wharf --release --example kv`; press Enter to
//! stop. (`wharf kv` is the same server, with the usual options.)

mod resp;
mod server;
mod store;

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use wharf::{Framing, Server};

fn main() -> Result<(), Box<dyn Error>> {
    let kv = server::Kv {
        store: Arc::new(store::Store::default()),
        max_request: server::MAX_REQUEST,
    };
    let server = Server::builder()
        .framing(Framing::custom(|| {
            resp::RespCodec::new(server::MAX_REQUEST)
        }))
        .tick(server::EXPIRE_EVERY)
        .bind("127.0.0.1:6380")?
        .start(kv)?;
    println!(
        "kv server listening on {}; press Enter to stop",
        server.local_addr()
    );
    std::io::stdin().read_line(&mut String::new())?;
    server.shutdown(Duration::from_secs(5))?;
    Ok(())
}
