//! Chat rooms: what one member of a room says, every member hears.
//!
//! Run it with `cargo run -p wharf --example chat`, then connect with
//! `nc 127.0.0.1 7000` (lines, LF or CRLF). Everyone starts in `lobby`;
//! `/join ROOM` moves to another room. Press Enter to stop the server.
//! (`wharf chat --framing lines` is the full version, with nicks and more
//! commands, and rooms across hosts with `--cluster`.)

use std::error::Error;
use std::io;
use std::time::Duration;

use wharf::{CloseReason, Conn, Framing, Handler, Server};

struct Chat;

impl Handler for Chat {
    /// Per-connection state: the room this member is in.
    type State = String;

    fn on_open(&self, conn: &mut Conn<'_, String>) -> wharf::Accept {
        conn.join("lobby");
        *conn.state() = "lobby".into();
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, String>, msg: &[u8]) {
        let text = String::from_utf8_lossy(msg);
        if let Some(room) = text.strip_prefix("/join ") {
            let old = std::mem::replace(conn.state(), room.trim().to_string());
            conn.leave(&old);
            let new = conn.state().clone();
            conn.join(&new);
            let _ = conn.send(format!("* you are in {new}").as_bytes());
            return;
        }
        let room = conn.state().clone();
        let line = format!("[{room}] {}: {text}", conn.id());
        // Encoded once, shared by every member on every loop.
        let _ = conn.publish(&room, line.as_bytes());
    }

    fn on_close(&self, conn: &mut Conn<'_, String>, reason: CloseReason) {
        // The connection is still in its room here; it leaves after this.
        let room = conn.state().clone();
        let line = format!("* {} left ({reason:?})", conn.id());
        let _ = conn.publish(&room, line.as_bytes());
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let server = Server::builder()
        .framing(Framing::lines())
        .bind("127.0.0.1:7000")?
        .start(Chat)?;
    println!("chat rooms on {}; press Enter to stop", server.local_addr());
    io::stdin().read_line(&mut String::new())?;
    server.shutdown(Duration::from_secs(5))?;
    Ok(())
}
