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
    tls: Option<Arc<wharf::tls::rustls::ServerConfig>>,
) -> io::Result<Server> {
    let backend = match kind {
        ServerKind::WharfPoll => Backend::Poll,
        _ => Backend::Uring,
    };
    let loops = if kind == ServerKind::WharfUring2 {
        2
    } else {
        1
    };
    let mut builder = Server::builder().threads(loops).backend(backend);
    if let Some(url) = cluster {
        let redis = wharf::cluster::Redis::new(url)
            .map_err(|e| io::Error::other(format!("--cluster {url}: {e}")))?
            .namespace("wharf-bench");
        builder = builder.backplane(Arc::new(redis));
    }
    if let Some(config) = tls {
        builder = builder.tls(wharf::tls::ServerTls::new(Arc::unwrap_or_clone(config)));
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

/// Starts `server`'s Prometheus endpoint on a free loopback port and a
/// thread that scrapes it once a second (reading the whole answer), as a
/// Prometheus server would, but more often than most do.
pub(super) fn scraped_endpoint(server: &Server) -> io::Result<wharf::metrics::Endpoint> {
    use std::io::{Read, Write};
    let endpoint = wharf::metrics::Endpoint::start(server.handle(), "127.0.0.1:0")?;
    let addr = endpoint.local_addr();
    std::thread::spawn(move || loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n");
            let _ = s.read_to_end(&mut Vec::new());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    });
    Ok(endpoint)
}

/// wharf's file server (`wharf files`) on one loop of `kind`'s backend.
pub(super) fn start_files(
    kind: ServerKind,
    addr: SocketAddr,
    root: &std::path::Path,
    force_sendfile: bool,
) -> io::Result<Server> {
    let backend = match kind {
        ServerKind::WharfPoll => Backend::Poll,
        _ => Backend::Uring,
    };
    let handler = crate::files::FileServer::new(root)?;
    let mut builder = Server::builder();
    if force_sendfile {
        builder = builder.zero_copy_files(true);
    }
    let server = builder
        .threads(1)
        .workers(1)
        .backend(backend)
        .framing(crate::files::framing())
        .bind(addr)?
        .start(handler)?;
    if server.backend() != backend {
        let got = server.backend();
        return Err(io::Error::other(format!(
            "asked for {backend:?}, runs on {got:?} (is WHARF_BACKEND set?)"
        )));
    }
    Ok(server)
}
