//! Everything that talks to the operating system.
//!
//! # The backend contract
//!
//! Each backend is one module chosen by `cfg` and re-exported here under the
//! same names, so the event loop above is written once and knows no backend.
//! There is no trait object: the loop calls these items directly.
//!
//! Required types:
//!
//! * `Driver`: one per event-loop thread, owning that thread's completion
//!   queue and its receive buffers. It is created on the loop thread and
//!   never leaves it.
//!   - `Driver::new(&DriverConfig) -> io::Result<Driver>`.
//!   - `listen(listener, &Listener)`: start accepting; every accepted socket
//!     is reported as [`Event::Accepted`]. If accepting stops (an error such
//!     as `EMFILE`, or a cancel), [`Event::AcceptEnded`] is reported once and
//!     the loop decides whether to call `listen` again.
//!   - `unlisten(listener, &Listener)`: stop accepting; ends with
//!     `AcceptEnded`.
//!   - `recv(slot, &Socket)`: start receiving continuously. Data arrives as
//!     [`Event::Received`], whose bytes are valid only during that event: an
//!     idle connection holds no receive buffer. Receiving ends with exactly
//!     one [`Event::RecvEnded`]; with [`RecvEnd::Rearm`] the loop calls
//!     `recv` again if it still wants data.
//!   - `send(slot, &Socket, &mut SendBatch)`: write the batch's buffers, as
//!     many as fit, in one gathered write. Ends with one [`Event::Sent`].
//!     The batch is not touched, moved or dropped until then: the kernel may
//!     be reading it. At most one send per slot is in flight.
//!   - `connect(slot, &Socket, SocketAddr)`: ends with one
//!     [`Event::Connected`].
//!   - `cancel(slot, &Socket)`: ask every operation in flight on the socket to
//!     end soon; each still reports its own ending event.
//!   - `poll(timeout, f)`: submit what was queued, wait up to `timeout` for
//!     at least one event, and call `f` for every event ready.
//!   - `waker() -> Waker`: a handle to wake `poll` from another thread;
//!     wake-ups show as [`Event::Woken`].
//! * `Waker`: `Send + Sync + Clone`, with `wake(&self)`.
//! * `Socket`, `Listener`: owned OS sockets; dropping them closes them. A
//!   socket is dropped only after every operation on it has ended.
//! * `probe() -> io::Result<()>`: whether the backend can run here.
//!
//! The rule that keeps memory safe: a connection's slot (and its socket and
//! send batch) is released only after its receive, send and connect have all
//! reported their ending events. Nothing else frees memory the kernel may
//! still write.

use std::io;
use std::net::SocketAddr;

#[cfg(target_os = "linux")]
#[path = "uring/mod.rs"]
mod imp;

pub(crate) use imp::{Driver, Listener, Socket, Waker};

/// Sizes a driver is created with.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DriverConfig {
    /// Number of pooled receive buffers per loop (a power of two).
    pub(crate) recv_buffers: u16,
    /// Size of each receive buffer in bytes.
    pub(crate) recv_buffer_size: u32,
    /// Completion-queue entries to size the ring for.
    pub(crate) queue_depth: u32,
}

/// What a driver reports to its loop.
#[derive(Debug)]
pub(crate) enum Event<'a> {
    /// A listener accepted a connection.
    Accepted { listener: u32, socket: Socket },
    /// A listener stopped accepting (`None`: cancelled or needs a re-arm).
    AcceptEnded {
        listener: u32,
        error: Option<io::Error>,
    },
    /// Bytes arrived on a connection; valid only for this call.
    Received { slot: u32, data: &'a [u8] },
    /// Receiving ended on a connection.
    RecvEnded { slot: u32, why: RecvEnd },
    /// A send finished: bytes written or the error.
    Sent {
        slot: u32,
        result: io::Result<usize>,
    },
    /// An outbound connect finished.
    Connected { slot: u32, result: io::Result<()> },
    /// Another thread called `Waker::wake`.
    Woken,
}

/// Why receiving ended.
#[derive(Debug)]
pub(crate) enum RecvEnd {
    /// The peer closed its side (end of stream).
    Eof,
    /// The receive was cancelled on request.
    Cancelled,
    /// The backend stopped for its own reasons (a full completion queue):
    /// call `recv` again to go on.
    Rearm,
    /// Every pooled receive buffer was in use: call `recv` again (buffers
    /// are returned as soon as their events have been handled).
    NoBuffers,
    /// The connection failed.
    Error(io::Error),
}

/// The buffers of one gathered send, owned by the connection while it is in
/// flight.
#[derive(Default)]
pub(crate) struct SendBatch {
    /// Buffers to write, in order.
    pub(crate) bufs: Vec<bytes::Bytes>,
    /// Bytes of `bufs[0]` already written.
    pub(crate) offset: usize,
    /// Backend scratch space (iovecs, message header) that must live as long
    /// as the send.
    pub(crate) os: imp::SendScratch,
}

impl SendBatch {
    /// Drops `n` written bytes from the front.
    pub(crate) fn advance(&mut self, mut n: usize) {
        let mut done = 0;
        for buf in &self.bufs {
            let left = buf.len() - self.offset;
            if n < left {
                self.offset += n;
                break;
            }
            n -= left;
            self.offset = 0;
            done += 1;
        }
        self.bufs.drain(..done);
    }

    /// Whether every byte has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }
}

/// Whether this platform's default backend works here.
pub(crate) fn probe() -> io::Result<()> {
    imp::probe()
}

/// Creates a non-blocking listener bound to `addr`, which other listeners
/// of the same process may share (one per loop).
pub(crate) fn bind(addr: SocketAddr, backlog: i32) -> io::Result<Listener> {
    imp::bind(addr, backlog)
}

/// Creates an unconnected stream socket for `addr`'s family.
pub(crate) fn stream_socket(addr: SocketAddr) -> io::Result<Socket> {
    imp::stream_socket(addr)
}

/// Half-closes the write side (sends FIN after queued data).
pub(crate) fn shutdown_write(socket: &Socket) {
    imp::shutdown_write(socket)
}

/// Prepares an accepted or connected socket: no Nagle delay if `nodelay`.
pub(crate) fn prepare(socket: &Socket, nodelay: bool) {
    imp::prepare(socket, nodelay)
}

/// The peer's address of a connected socket.
pub(crate) fn peer_addr(socket: &Socket) -> io::Result<SocketAddr> {
    imp::peer_addr(socket)
}

#[cfg(test)]
mod tests {
    use super::SendBatch;
    use bytes::Bytes;

    #[test]
    fn advance_drops_written_buffers_and_keeps_offset() {
        let mut b = SendBatch {
            bufs: vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defg")],
            ..SendBatch::default()
        };
        b.advance(2);
        assert_eq!((b.bufs.len(), b.offset), (2, 2));
        b.advance(1);
        assert_eq!((b.bufs.len(), b.offset), (1, 0));
        b.advance(3);
        assert_eq!((b.bufs.len(), b.offset), (1, 3));
        b.advance(1);
        assert!(b.is_empty());
    }
}
