//! The callbacks a user implements.

use crate::conn::Conn;
use crate::connect::{ConnectFailure, Opening};
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
    /// Per-connection state, made by [`new_state`](Self::new_state)
    /// before `on_open` (by `Default` unless that is overridden).
    type State: Default + 'static;

    /// Makes the state of a connection about to open, from its peer and,
    /// for an outbound one, its connect's token.
    fn new_state(&self, opening: &Opening) -> Self::State {
        let _ = opening;
        Self::State::default()
    }

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

    /// The bytes [`Conn::receive_to_file`](crate::Conn::receive_to_file)
    /// asked for have all been written (their count), or the receive
    /// failed: a write failed, or the stream ended (or the connection
    /// closed) first. Framing has resumed after them.
    fn on_file_received(&self, conn: &mut Conn<'_, Self::State>, result: std::io::Result<u64>) {
        let _ = (conn, result);
    }

    /// The connection closed; called once for every connection `on_open`
    /// kept. Sends from here fail with `Closed`.
    fn on_close(&self, conn: &mut Conn<'_, Self::State>, reason: CloseReason) {
        let _ = (conn, reason);
    }

    /// An outbound connect (from [`Handle::connect`](crate::Handle::connect))
    /// failed: every address was tried, or the server is stopping. No
    /// other callback runs for it; with a reconnect policy,
    /// `failure.retry_in` says when the next attempt starts.
    fn on_connect_failed(&self, failure: ConnectFailure) {
        let _ = failure;
    }

    /// Reconnect attempt `attempt` (1 for the first) of the connect with
    /// `token` starts now (`Connect::reconnect`).
    fn on_reconnect(&self, token: u64, attempt: u32) {
        let _ = (token, attempt);
    }
}
