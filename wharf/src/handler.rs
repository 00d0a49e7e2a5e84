//! The callbacks a user implements.

use std::io;
use std::net::SocketAddr;

use crate::conn::Conn;
use crate::error::CloseReason;

/// Whether to keep a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Keep it: messages and `on_close` follow.
    Yes,
    /// Close it at once; no other callback runs for it.
    No,
}

/// What a server (or client) does with its connections.
///
/// One handler serves every loop thread, so it is `Sync`; per-connection
/// data lives in [`Handler::State`], which stays on the connection's loop.
/// All callbacks of one connection run on its loop thread, in order, never
/// at the same time.
pub trait Handler: Send + Sync + 'static {
    /// Per-connection state, created with `Default` before `on_open`.
    type State: Default + 'static;

    /// A connection opened (accepted, or an outbound connect succeeded).
    fn on_open(&self, conn: &mut Conn<'_, Self::State>) -> Accept {
        let _ = conn;
        Accept::Yes
    }

    /// A whole message arrived. `msg` is valid only during the call.
    fn on_message(&self, conn: &mut Conn<'_, Self::State>, msg: &[u8]);

    /// The connection's send queue, which went over its high-water mark
    /// (sends failed with `Backpressure`, reading paused), has drained below
    /// the low-water mark: sending works again.
    fn on_drain(&self, conn: &mut Conn<'_, Self::State>) {
        let _ = conn;
    }

    /// The connection closed; called once for every connection `on_open`
    /// kept. Sends from here fail with `Closed`.
    fn on_close(&self, conn: &mut Conn<'_, Self::State>, reason: CloseReason) {
        let _ = (conn, reason);
    }

    /// An outbound connect (from [`Handle::connect`](crate::Handle::connect))
    /// failed; no other callback runs for it.
    fn on_connect_failed(&self, addr: SocketAddr, error: io::Error) {
        let _ = (addr, error);
    }
}
