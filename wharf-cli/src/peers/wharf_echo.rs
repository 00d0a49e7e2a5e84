//! wharf itself: what `wharf echo --threads 1` serves; in broadcast mode
//! every message goes to [`Handle::broadcast`]; in group mode every
//! connection joins one group and every message is published to it, as a
//! chat room does (through Redis with a cluster).
//!
//! [`Handle::broadcast`]: wharf::Handle::broadcast

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use wharf::{Backend, Bytes, Conn, Handler, Server};

use super::{Mode, ServerKind};

struct Peer {
    mode: Mode,
}

/// The one group of group mode.
const ROOM: &str = "room";

impl Handler for Peer {
    type State = ();

    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        if self.mode == Mode::Group {
            conn.join(ROOM);
        }
        wharf::Accept::Yes
    }

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
            Mode::Group => {
                let _ = conn.publish(ROOM, msg);
            }
        }
    }
}

/// Starts one loop on the backend `kind` names.
pub(super) fn start(
    kind: ServerKind,
    addr: SocketAddr,
    mode: Mode,
    cluster: Option<&str>,
) -> io::Result<Server> {
    let backend = match kind {
        ServerKind::WharfPoll => Backend::Poll,
        _ => Backend::Uring,
    };
    let mut builder = Server::builder().threads(1).backend(backend);
    if let Some(url) = cluster {
        let redis = wharf::cluster::Redis::new(url)
            .map_err(|e| io::Error::other(format!("--cluster {url}: {e}")))?
            .namespace("wharf-bench");
        builder = builder.backplane(Arc::new(redis));
    }
    let server = builder.bind(addr)?.start(Peer { mode })?;
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
