//! The errors and reasons a user of wharf can act on.

use std::any::Any;
use std::io;

use crate::codec::FrameError;

/// Why a send was refused. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed (or closing): the id is stale.
    #[error("connection closed")]
    Closed,
    /// The connection's send queue is above its high-water mark; wait for
    /// the peer to read (or close it).
    #[error("send queue full (back-pressure)")]
    Backpressure,
    /// The message is larger than the framing can carry.
    #[error("message of {len} bytes exceeds the maximum frame of {max}")]
    TooLarge {
        /// The message's length.
        len: usize,
        /// The framing's maximum.
        max: usize,
    },
    /// The server is shutting down or gone.
    #[error("server stopped")]
    Stopped,
    /// The connection's event loop failed (its driver returned an error)
    /// and closed every connection it had.
    #[error("the connection's event loop failed")]
    LoopFailed,
    /// The framing's codec could not encode the message; nothing of it was
    /// queued.
    #[error("the codec refused the message: {0}")]
    Encode(String),
}

/// Why a connection closed; given once to `Handler::on_close`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer closed its side of the connection.
    PeerClosed,
    /// The handler called [`Conn::close`](crate::Conn::close).
    Local,
    /// [`Handle::disconnect`](crate::Handle::disconnect) was called.
    Disconnected,
    /// The peer announced a frame larger than the maximum.
    FrameTooLarge {
        /// The length the peer announced.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The peer's bytes could not be framed.
    Protocol(String),
    /// The connection failed (reset, aborted, timed out).
    Io(io::ErrorKind),
    /// The server is shutting down.
    Shutdown,
    /// Nothing arrived for `Builder::idle_timeout`.
    IdleTimeout,
    /// No whole message arrived within `Builder::first_message_timeout`.
    FirstMessageTimeout,
    /// The send queue did not move for `Builder::write_stall_timeout`: the
    /// peer stopped reading.
    WriteStalled,
    /// The peer was over its high-water mark when a broadcast came, and the
    /// server closes such peers (`Builder::close_slow_broadcast_peers`).
    SlowPeer,
    /// A handler callback panicked for this connection. The panic was
    /// contained: the loop and its other connections go on.
    HandlerPanic,
    /// The connection's event loop failed (its driver returned an error).
    LoopFailed,
    /// The peer's address was banned ([`Conn::ban_peer`](crate::Conn::ban_peer),
    /// [`Handle::ban`](crate::Handle::ban)).
    Banned,
    /// TLS failed after the handshake: a record that did not decrypt, a
    /// fatal alert from the peer, a peer that closed in the middle of a
    /// record. (A connection whose handshake fails never opens, and is
    /// counted in `Stats::tls_handshake_failures`.)
    Tls(TlsError),
}

/// What went wrong in TLS, for [`CloseReason::Tls`] and the logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The peer's bytes are not TLS at all: a plaintext client on a TLS
    /// port, or garbage.
    #[error("the peer does not speak TLS")]
    NotTls,
    /// The handshake did not finish within `Builder::tls_handshake_timeout`.
    #[error("the TLS handshake timed out")]
    HandshakeTimeout,
    /// The peer closed the connection in the middle of the handshake or of
    /// a record.
    #[error("the peer closed in the middle of a TLS record")]
    Truncated,
    /// A record failed to decrypt or authenticate.
    #[error("a TLS record failed to decrypt")]
    Decrypt,
    /// The peer's certificate was refused, or missing where one is required.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The peer sent a fatal alert.
    #[error("the peer sent the alert {0}")]
    Alert(String),
    /// Any other violation of the protocol.
    #[error("{0}")]
    Protocol(String),
}

/// The metrics' names of the kinds of close, by [`CloseReason::kind`];
/// the last is a connection `Handler::on_open` refused (it gets no
/// `on_close`).
pub(crate) const CLOSE_KINDS: [&str; 16] = [
    "peer_closed",
    "local",
    "disconnected",
    "frame_too_large",
    "protocol",
    "io",
    "shutdown",
    "idle_timeout",
    "first_message_timeout",
    "write_stalled",
    "slow_peer",
    "handler_panic",
    "loop_failed",
    "banned",
    "tls",
    "rejected",
];

/// Where a refusal by `on_open` is counted in the close kinds.
pub(crate) const REJECTED: usize = 15;

impl CloseReason {
    /// The kind of reason as a short name, its data left out
    /// (`"peer_closed"`, `"io"`, `"idle_timeout"`, …): the `reason` label
    /// of the `wharf_connections_closed` metric.
    pub fn label(&self) -> &'static str {
        CLOSE_KINDS[self.kind()]
    }

    pub(crate) fn kind(&self) -> usize {
        match self {
            CloseReason::PeerClosed => 0,
            CloseReason::Local => 1,
            CloseReason::Disconnected => 2,
            CloseReason::FrameTooLarge { .. } => 3,
            CloseReason::Protocol(_) => 4,
            CloseReason::Io(_) => 5,
            CloseReason::Shutdown => 6,
            CloseReason::IdleTimeout => 7,
            CloseReason::FirstMessageTimeout => 8,
            CloseReason::WriteStalled => 9,
            CloseReason::SlowPeer => 10,
            CloseReason::HandlerPanic => 11,
            CloseReason::LoopFailed => 12,
            CloseReason::Banned => 13,
            CloseReason::Tls(_) => 14,
        }
    }
}

/// Why [`Server::shutdown`](crate::Server::shutdown) could not finish cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// A loop thread panicked (in a handler callback, most likely).
    #[error("an event-loop thread panicked")]
    Panicked,
}

impl From<FrameError> for SendError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { len, max } => SendError::TooLarge { len, max },
            FrameError::Invalid(why) => SendError::Encode(why),
        }
    }
}

/// The message of a panic's payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_owned()
    }
}
