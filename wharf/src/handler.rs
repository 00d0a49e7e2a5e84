//! The callbacks a user implements.

use std::io;
use std::net::SocketAddr;

use crate::conn::Conn;
use crate::error::CloseReason;
use crate::event_loop::Tick;

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

    /// Timer `token` of this connection, armed with
    /// [`Conn::set_timer`](crate::Conn::set_timer), is due. It is disarmed
    /// now: arm it again here for a periodic one.
    fn on_timer(&self, conn: &mut Conn<'_, Self::State>, token: u64) {
        let _ = (conn, token);
    }

    /// The loop's periodic tick (`Builder::tick`), with every connection
    /// of this loop at hand through [`Tick`].
    fn on_tick(&self, tick: &mut Tick<'_, Self>)
    where
        Self: Sized,
    {
        let _ = tick;
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
