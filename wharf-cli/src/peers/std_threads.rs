//! The std peer: a blocking thread per connection, reading length-prefixed
//! messages with `read_exact` and writing each back with one `write_all`.
//!
//! Broadcast: every connection's stream (a `try_clone`) sits in one shared
//! list, and a message is written to each in turn under its lock.

use std::error::Error;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use super::Mode;

/// Largest message accepted, as wharf's default.
const MAX_FRAME: usize = 1 << 20;

type Peers = Arc<Mutex<Vec<TcpStream>>>;

/// Serves on `listener` until the process exits.
pub(super) fn serve(
    listener: TcpListener,
    mode: Mode,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn Error>> {
    ready(listener.local_addr()?);
    let peers = Peers::default();
    loop {
        let (stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        if mode != Mode::Echo {
            let clone = stream.try_clone()?;
            peers.lock().unwrap_or_else(|p| p.into_inner()).push(clone);
        }
        let peers = peers.clone();
        // A thread that cannot start costs its connection, not the server.
        let _ = thread::Builder::new().spawn(move || {
            let _ = connection(stream, mode, &peers);
        });
    }
}

fn connection(mut stream: TcpStream, mode: Mode, peers: &Peers) -> io::Result<()> {
    // One buffer per connection: the header, then the body, sent as one.
    let mut frame = Vec::new();
    loop {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header)?;
        let len = u32::from_be_bytes(header) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        frame.clear();
        frame.extend_from_slice(&header);
        frame.resize(4 + len, 0);
        stream.read_exact(&mut frame[4..])?;
        match mode {
            Mode::Echo => stream.write_all(&frame)?,
            // No groups here: the group is every connection.
            Mode::Broadcast | Mode::Group => {
                let mut peers = peers.lock().unwrap_or_else(|p| p.into_inner());
                peers.retain_mut(|peer| peer.write_all(&frame).is_ok());
            }
        }
    }
}
