//! A chat room: what one connection says, every connection hears.
//!
//! Run it with `cargo run -p wharf --example chat`. Messages are
//! length-prefixed (a 4-byte big-endian length, then the bytes). Press
//! Enter to stop it.

use std::error::Error;
use std::io;
use std::time::Duration;

use wharf::{Bytes, CloseReason, Conn, Handler, Server};

struct Chat;

impl Handler for Chat {
    /// Per-connection state: how many messages this member has sent.
    type State = u64;

    fn on_message(&self, conn: &mut Conn<'_, u64>, msg: &[u8]) {
        *conn.state() += 1;
        let line = format!("{}: {}", conn.id(), String::from_utf8_lossy(msg));
        // Encoded once, shared by every connection on every loop.
        let _ = conn.handle().broadcast(Bytes::from(line));
    }

    fn on_close(&self, conn: &mut Conn<'_, u64>, reason: CloseReason) {
        let line = format!("{} left after {} messages", conn.id(), conn.state());
        println!("{line} ({reason:?})");
        let _ = conn.handle().broadcast(Bytes::from(line));
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let server = Server::builder().bind("127.0.0.1:7000")?.start(Chat)?;
    println!("chat room on {}; press Enter to stop", server.local_addr());
    io::stdin().read_line(&mut String::new())?;
    server.shutdown(Duration::from_secs(5))?;
    Ok(())
}
