//! `Conn`: what a callback sees of its connection.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::codec::{FrameError, FrameReader};
use crate::error::{CloseReason, SendError};
use crate::handle::Handle;
use crate::id::ConnId;
use crate::sendq::OutQueue;

/// The part of a connection's slot that sending and closing touch; the loop
/// owns it, a `Conn` borrows it during a callback.
pub(crate) struct ConnCtl {
    pub(crate) writer: FrameReader,
    pub(crate) out: OutQueue,
    /// Bytes queued or in flight, for the high-water mark.
    pub(crate) unsent: usize,
    /// Sends are accepted (false once the connection starts closing).
    pub(crate) open: bool,
    /// A close asked for during a callback, carried out after it returns.
    pub(crate) close_request: Option<CloseReason>,
    /// Already on the loop's list of slots to look at after this turn.
    pub(crate) touched: bool,
}

impl ConnCtl {
    pub(crate) fn new(writer: FrameReader) -> ConnCtl {
        ConnCtl {
            writer,
            out: OutQueue::default(),
            unsent: 0,
            open: true,
            close_request: None,
            touched: false,
        }
    }

    /// Queues `msg` (copied) unless refused.
    pub(crate) fn send_copy(&mut self, msg: &[u8], high_water: usize) -> Result<(), SendError> {
        self.admit(high_water)?;
        self.unsent += self
            .out
            .push_copy(&mut self.writer, msg)
            .map_err(too_large)?;
        Ok(())
    }

    /// Queues `msg` (shared, not copied) unless refused.
    pub(crate) fn send_shared(&mut self, msg: Bytes, high_water: usize) -> Result<(), SendError> {
        self.admit(high_water)?;
        self.unsent += self
            .out
            .push_shared(&mut self.writer, msg)
            .map_err(too_large)?;
        Ok(())
    }

    /// Queues bytes already in wire form.
    pub(crate) fn send_encoded(&mut self, wire: Bytes) {
        self.unsent += wire.len();
        self.out.push_encoded(wire);
    }

    fn admit(&self, high_water: usize) -> Result<(), SendError> {
        if !self.open {
            Err(SendError::Closed)
        } else if self.unsent > high_water {
            Err(SendError::Backpressure)
        } else {
            Ok(())
        }
    }
}

fn too_large(e: FrameError) -> SendError {
    match e {
        FrameError::TooLarge { len, max } => SendError::TooLarge { len, max },
        FrameError::Invalid(why) => SendError::Encode(why),
    }
}

/// One connection, as seen from inside a [`Handler`](crate::Handler)
/// callback. Sending from here needs no lock and no cross-thread hop.
pub struct Conn<'a, S> {
    pub(crate) id: ConnId,
    pub(crate) slot: u32,
    pub(crate) peer: SocketAddr,
    pub(crate) outbound: bool,
    pub(crate) high_water: usize,
    pub(crate) state: &'a mut S,
    pub(crate) ctl: &'a mut ConnCtl,
    pub(crate) touched: &'a mut Vec<u32>,
    pub(crate) messages_out: &'a mut u64,
    pub(crate) handle: &'a Handle,
}

impl<S> Conn<'_, S> {
    /// This connection's id, valid from any thread through [`Handle`].
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The remote address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Whether this connection was opened by [`Handle::connect`].
    pub fn is_outbound(&self) -> bool {
        self.outbound
    }

    /// The per-connection state.
    pub fn state(&mut self) -> &mut S {
        self.state
    }

    /// Sends one message (copied into the connection's send buffer).
    ///
    /// Messages queued during one loop turn go out in one gathered write.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), SendError> {
        self.ctl.send_copy(msg, self.high_water)?;
        *self.messages_out += 1;
        self.touch();
        Ok(())
    }

    /// Sends one message without copying its body.
    pub fn send_bytes(&mut self, msg: Bytes) -> Result<(), SendError> {
        self.ctl.send_shared(msg, self.high_water)?;
        *self.messages_out += 1;
        self.touch();
        Ok(())
    }

    /// Bytes queued for this connection and not yet written to the socket.
    pub fn queued_bytes(&self) -> usize {
        self.ctl.unsent
    }

    /// Closes the connection once what is queued has been sent. No
    /// `on_message` follows; `on_close` runs with [`CloseReason::Local`].
    pub fn close(&mut self) {
        if self.ctl.close_request.is_none() {
            self.ctl.close_request = Some(CloseReason::Local);
        }
        self.touch();
    }

    /// The server's handle: broadcast, reach other connections, connect.
    pub fn handle(&self) -> &Handle {
        self.handle
    }

    fn touch(&mut self) {
        if !self.ctl.touched {
            self.ctl.touched = true;
            self.touched.push(self.slot);
        }
    }
}
