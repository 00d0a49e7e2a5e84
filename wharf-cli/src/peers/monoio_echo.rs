//! The monoio peer: one io_uring runtime thread, a task per connection
//! reading into an owned buffer and `write_all`-ing it back (raw echo, as
//! monoio's own echo examples do).
//!
//! Broadcast: as the tokio peer, a writer task per connection fed by an
//! unbounded channel (tokio's channels need no tokio runtime).

use std::cell::RefCell;
use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::rc::Rc;

use bytes::Bytes;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

use super::{Mode, RAW_BUFFER};

type Peers = Rc<RefCell<Vec<UnboundedSender<Bytes>>>>;

/// Serves on `listener` until the process exits.
pub(super) fn serve(
    listener: TcpListener,
    mode: Mode,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn Error>> {
    let addr = listener.local_addr()?;
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(4096)
        .build()?;
    rt.block_on(async move {
        let listener = monoio::net::TcpListener::from_std(listener)?;
        ready(addr);
        let peers = Peers::default();
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            match mode {
                Mode::Echo => monoio::spawn(echo(stream)),
                // No groups here: the group is every connection.
                Mode::Broadcast | Mode::Group => monoio::spawn(relay(stream, peers.clone())),
            };
        }
    })
}

async fn echo(mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(RAW_BUFFER);
    loop {
        let (res, b) = stream.read(buf).await;
        buf = b;
        if !matches!(res, Ok(n) if n > 0) {
            return;
        }
        let (res, b) = stream.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return;
        }
        buf.clear();
    }
}

async fn relay(stream: TcpStream, peers: Peers) {
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = unbounded_channel::<Bytes>();
    peers.borrow_mut().push(tx);
    monoio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if writer.write_all(msg).await.0.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::with_capacity(RAW_BUFFER);
    loop {
        let (res, b) = reader.read(buf).await;
        buf = b;
        if !matches!(res, Ok(n) if n > 0) {
            return;
        }
        let msg = Bytes::copy_from_slice(&buf);
        peers.borrow_mut().retain(|tx| tx.send(msg.clone()).is_ok());
        buf.clear();
    }
}
