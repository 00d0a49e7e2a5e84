//! The tokio peers, on a current-thread runtime: the framed echo most Rust
//! users would write (`Framed` with `LengthDelimitedCodec`, `next` then
//! `send`), and a raw one (read into a buffer, `write_all` it back).
//!
//! Broadcast is tokio's own chat example: each connection gets a writer
//! task fed by an unbounded channel, and a message is cloned into every
//! connection's channel.

use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio_util::codec::{Framed, FramedRead, FramedWrite, LengthDelimitedCodec};

use super::{Mode, RAW_BUFFER};

/// Every connection's channel to its writer task, for broadcast.
type Peers = Arc<Mutex<Vec<UnboundedSender<Bytes>>>>;

/// Serves on `listener` until the process exits.
pub(super) fn serve(
    listener: TcpListener,
    mode: Mode,
    framed: bool,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        ready(addr);
        let peers = Peers::default();
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            match (mode, framed) {
                (Mode::Echo, true) => tokio::spawn(echo_framed(stream)),
                (Mode::Echo, false) => tokio::spawn(echo_raw(stream)),
                // No groups here: the group is every connection.
                (Mode::Broadcast | Mode::Group, _) => {
                    tokio::spawn(relay(stream, framed, peers.clone()))
                }
            };
        }
    })
}

/// tokio-rustls: the framed echo over a TLS stream, the way a tokio user
/// adds TLS (a `TlsAcceptor` in front of the same `Framed` codec).
pub(super) fn serve_tls(
    listener: TcpListener,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        ready(addr);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // The same bound on a handshake as wharf's default.
                let handshake = tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    acceptor.accept(stream),
                );
                let Ok(Ok(tls)) = handshake.await else {
                    return;
                };
                let mut framed = Framed::new(tls, LengthDelimitedCodec::new());
                while let Some(Ok(frame)) = framed.next().await {
                    if framed.send(frame.freeze()).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

async fn echo_framed(stream: TcpStream) {
    let mut framed = Framed::new(stream, LengthDelimitedCodec::new());
    while let Some(Ok(frame)) = framed.next().await {
        if framed.send(frame.freeze()).await.is_err() {
            return;
        }
    }
}

async fn echo_raw(mut stream: TcpStream) {
    let mut buf = vec![0u8; RAW_BUFFER];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Broadcast: reads messages (framed) or chunks (raw) and hands each to
/// every connection's writer.
async fn relay(stream: TcpStream, framed: bool, peers: Peers) {
    let (reader, writer) = stream.into_split();
    let (tx, mut rx) = unbounded_channel::<Bytes>();
    peers.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
    if framed {
        tokio::spawn(async move {
            let mut out = FramedWrite::new(writer, LengthDelimitedCodec::new());
            while let Some(msg) = rx.recv().await {
                if out.send(msg).await.is_err() {
                    return;
                }
            }
        });
        let mut input = FramedRead::new(reader, LengthDelimitedCodec::new());
        while let Some(Ok(msg)) = input.next().await {
            fan_out(&peers, msg.freeze());
        }
    } else {
        tokio::spawn(async move {
            let mut writer = writer;
            while let Some(msg) = rx.recv().await {
                if writer.write_all(&msg).await.is_err() {
                    return;
                }
            }
        });
        let mut reader = reader;
        let mut buf = BytesMut::with_capacity(RAW_BUFFER);
        loop {
            buf.reserve(RAW_BUFFER);
            match reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => fan_out(&peers, buf.split().freeze()),
            }
        }
    }
}

/// The obvious loop: one clone per connection, dropping the closed ones.
fn fan_out(peers: &Peers, msg: Bytes) {
    let mut peers = peers.lock().unwrap_or_else(|p| p.into_inner());
    peers.retain(|tx| tx.send(msg.clone()).is_ok());
}

/// The tokio peer of `wharf files`: the same protocol and the same checks
/// of the path, the file read with `tokio::fs` into a 256 KiB buffer and
/// written to the socket (a current-thread runtime; `tokio::fs` reads on
/// its blocking pool, as any tokio program's file reads do).
pub(super) fn serve_files(
    listener: TcpListener,
    root: &std::path::Path,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn Error>> {
    let root = std::sync::Arc::new(root.canonicalize()?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .max_blocking_threads(1)
        .build()?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        ready(addr);
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(serve_files_on(stream, root.clone()));
        }
    })
}

async fn serve_files_on(mut s: tokio::net::TcpStream, root: std::sync::Arc<std::path::PathBuf>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut header = [0u8; 4];
        if s.read_exact(&mut header).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(header) as usize;
        if len > crate::files::MAX_REQUEST {
            return;
        }
        let mut request = vec![0u8; len];
        if s.read_exact(&mut request).await.is_err() {
            return;
        }
        let found = match crate::files::resolve(&root, &request) {
            Ok(path) => tokio::fs::File::open(&path)
                .await
                .map_err(|e| e.to_string()),
            Err(why) => Err(why.to_string()),
        };
        let sent = match found {
            Ok(mut file) => {
                let size = match file.metadata().await {
                    Ok(m) => m.len(),
                    Err(_) => return,
                };
                let mut head = ((size + 1) as u32).to_be_bytes().to_vec();
                head.push(crate::files::FOUND);
                let mut result = s.write_all(&head).await;
                let mut left = size;
                while result.is_ok() && left > 0 {
                    match file.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            left = left.saturating_sub(n as u64);
                            result = s.write_all(&buf[..n]).await;
                        }
                    }
                }
                result
            }
            Err(why) => {
                let mut msg = ((why.len() + 1) as u32).to_be_bytes().to_vec();
                msg.push(crate::files::REFUSED);
                msg.extend_from_slice(why.as_bytes());
                s.write_all(&msg).await
            }
        };
        if sent.is_err() {
            return;
        }
    }
}
