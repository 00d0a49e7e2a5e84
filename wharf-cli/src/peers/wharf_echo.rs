//! wharf itself: what `wharf echo --threads 1` serves, or in broadcast mode
//! what `wharf chat` does (every message to [`Handle::broadcast`]).
//!
//! [`Handle::broadcast`]: wharf::Handle::broadcast

use std::io;
use std::net::SocketAddr;

use wharf::{Backend, Bytes, Conn, Handler, Server};

use super::{Mode, ServerKind};

struct Peer {
    mode: Mode,
}

impl Handler for Peer {
    type State = ();

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        match self.mode {
            Mode::Echo => {
                // As `wharf echo`: a peer that does not read its replies is
                // closed rather than sent a broken echo.
                if conn.send(msg).is_err() {
                    conn.close();
                }
            }
            Mode::Broadcast => {
                let _ = conn.handle().broadcast(Bytes::copy_from_slice(msg));
            }
        }
    }
}

/// Starts one loop on the backend `kind` names.
pub(super) fn start(kind: ServerKind, addr: SocketAddr, mode: Mode) -> io::Result<Server> {
    let backend = match kind {
        ServerKind::WharfPoll => Backend::Poll,
        _ => Backend::Uring,
    };
    let server = Server::builder()
        .threads(1)
        .backend(backend)
        .bind(addr)?
        .start(Peer { mode })?;
    // WHARF_BACKEND overrides the builder: a run on another backend than
    // the one named would be reported under the wrong name.
    if server.backend() != backend {
        let got = server.backend();
        return Err(io::Error::other(format!(
            "asked for {backend:?}, runs on {got:?} (is WHARF_BACKEND set?)"
        )));
    }
    Ok(server)
}
