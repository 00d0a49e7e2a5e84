//! An echo server: every length-prefixed message goes back to its sender.
//!
//! Run it with `cargo run -p wharf --example echo`, then send it frames of
//! a 4-byte big-endian length followed by that many bytes. Press Enter to
//! stop it.

use std::error::Error;
use std::io;
use std::time::Duration;

use wharf::{Conn, Handler, Server};

struct Echo;

impl Handler for Echo {
    type State = ();

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        // Queued on this connection's loop: no lock, no thread hop.
        if conn.send(msg).is_err() {
            conn.close(); // the peer is not reading what it asked for
        }
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let server = Server::builder().bind("127.0.0.1:7000")?.start(Echo)?;
    println!("echo on {}; press Enter to stop", server.local_addr());
    io::stdin().read_line(&mut String::new())?;
    // Let queued replies go out (up to 5 s), then close and join the loops.
    server.shutdown(Duration::from_secs(5))?;
    Ok(())
}
