//! Everything that talks to the operating system.
//!
//! # The backend contract
//!
//! Each backend is one module (`uring`, `poll`, `iocp`) with the same
//! item names and signatures. Where a platform has more than one, the choice
//! is made at start (`choose`) and `Driver` and `Waker` below are enums whose
//! methods `match` once and call the backend's own: no trait object, and the
//! event loop above is written once and knows no backend.
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
//!     idle connection holds no receive buffer. The loop answers a
//!     `Received` with [`Flow::Pause`] when it wants no more data for now
//!     (the connection crossed its high-water mark): the driver then reads
//!     nothing more for that slot in this turn (io_uring, whose multishot
//!     receive reads on its own, still reports what it had queued by
//!     then; the loop holds it), and usually the loop
//!     cancels the receive. If it does not (the queue drained in the same
//!     turn), receiving goes on in the next turn as if never paused, even
//!     if the peer sends nothing new. Receiving ends with exactly one [`Event::RecvEnded`]; with
//!     [`RecvEnd::Rearm`] the loop calls `recv` again if it still wants data.
//!   - `send(slot, &Socket, Box<SendBatch>)`: write the batch's buffers, as
//!     many as fit, in one gathered write. The batch is moved into the
//!     driver, which owns it while the kernel may read it, and comes back
//!     with the one [`Event::Sent`] that ends the send. At most one send
//!     per slot is in flight. A driver that is dropped with sends in flight
//!     leaks their batches rather than free memory the kernel may read.
//!   - `connect(slot, &Socket, SocketAddr)`: ends with one
//!     [`Event::Connected`].
//!   - `cancel(slot, &Socket)`: ask every operation in flight on the socket to
//!     end soon; each still reports its own ending event.
//!   - `cancel_recv(slot, &Socket)`: the same for the receive alone (reading
//!     pauses while a peer's send queue is over its high-water mark).
//!   - `poll(timeout, f)`: submit what was queued, wait up to `timeout` for
//!     at least one event, and call `f` for every event ready.
//!   - `waker() -> Waker`: a handle to wake `poll` from another thread;
//!     wake-ups show as [`Event::Woken`].
//! * `Waker`: `Send + Sync + Clone`, with `wake(&self)`.
//!   - `in_flight() -> usize`: operations whose final completion has not
//!     come yet. It also counts what a driver starts on its own (io_uring's
//!     watch beside a multishot receive), which ends within a turn or two of
//!     the event the loop last waited for; a loop that ends waits for 0.
//! * `Socket`, `Listener`: owned OS sockets; dropping them closes them. A
//!   socket is dropped only after every operation the loop started on it
//!   has ended. (A driver's own operations, such as io_uring's watch, use
//!   no memory of the loop's, and the kernel keeps the socket open for them
//!   until they end.)
//! * `probe() -> io::Result<()>`: whether the backend can run here.
//! * `SendScratch`: per-send memory the backend needs kept in place while
//!   a send is in flight (io_uring: the iovecs and message header).
//!
//! The rule that keeps memory safe: a connection's slot (and its socket and
//! send batch) is released only after its receive, send and connect have all
//! reported their ending events. Nothing else frees memory the kernel may
//! still write.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::Backend;

#[cfg(all(unix, any(test, fuzzing)))]
pub(crate) mod fake;
#[cfg(windows)]
mod iocp;
#[cfg(unix)]
mod poll;
#[cfg(unix)]
mod unix;
#[cfg(target_os = "linux")]
mod uring;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
use unix as os;
#[cfg(windows)]
use windows as os;

pub(crate) use os::{Listener, Reserve, Share, Socket};

#[cfg(target_os = "linux")]
type SendScratch = uring::SendScratch;
#[cfg(windows)]
type SendScratch = iocp::SendScratch;
#[cfg(not(any(target_os = "linux", windows)))]
type SendScratch = ();

/// Sizes a driver is created with (some only matter to io_uring).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) struct DriverConfig {
    /// Number of pooled receive buffers per loop (a power of two).
    pub(crate) recv_buffers: u16,
    /// Size of each receive buffer in bytes.
    pub(crate) recv_buffer_size: u32,
    /// Completion-queue entries to size the ring for.
    pub(crate) queue_depth: u32,
    /// The backend to run (never `Auto`: chosen before).
    pub(crate) backend: Backend,
}

/// The loop's answer to an event (only `Received` looks at it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Go on.
    Continue,
    /// Read nothing more for this slot in this turn: the loop is about to
    /// pause its receive (back-pressure).
    Pause,
}

/// What a driver reports to its loop.
pub(crate) enum Event<'a> {
    /// A listener accepted a connection; `peer` is its address where the
    /// accept reported it (otherwise the loop asks the socket).
    Accepted {
        listener: u32,
        socket: Socket,
        peer: Option<SocketAddr>,
    },
    /// A listener stopped accepting (`None`: cancelled or needs a re-arm).
    AcceptEnded {
        listener: u32,
        error: Option<io::Error>,
    },
    /// Bytes arrived on a connection; valid only for this call.
    Received { slot: u32, data: &'a [u8] },
    /// Receiving ended on a connection.
    RecvEnded { slot: u32, why: RecvEnd },
    /// A send finished: bytes written or the error. The batch comes back.
    Sent {
        slot: u32,
        batch: Box<SendBatch>,
        result: io::Result<usize>,
    },
    /// An outbound connect finished.
    Connected { slot: u32, result: io::Result<()> },
    /// Another thread called `Waker::wake`.
    Woken,
}

/// Why receiving ended (`Rearm` and `NoBuffers` come from io_uring only).
#[derive(Debug)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) enum RecvEnd {
    /// The peer closed its side (end of stream).
    Eof,
    /// The receive was cancelled on request.
    Cancelled,
    /// The backend stopped for its own reasons (a full completion queue):
    /// call `recv` again to go on.
    Rearm,
    /// Every pooled receive buffer was in use: call `recv` again (buffers
    /// are returned as soon as their events have been handled). A receive
    /// that found only io_uring's window of the pool used up (see
    /// `uring::bufring`) ends with `Rearm` instead: the window grows, and
    /// the pool is not too small.
    NoBuffers,
    /// The connection failed.
    Error(io::Error),
}

/// The buffers of one gathered send, owned by the connection while it is in
/// flight.
#[derive(Default)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) struct SendBatch {
    /// Buffers to write, in order.
    pub(crate) bufs: Vec<bytes::Bytes>,
    /// Bytes of `bufs[0]` already written.
    pub(crate) offset: usize,
    /// A range of a file to send instead of buffers (`bufs` is then
    /// empty), on a backend that sends files itself
    /// ([`Driver::sends_files`]); what is left of it.
    pub(crate) file: Option<crate::file::FileChunk>,
    /// Backend scratch space (iovecs, message header) that must live as long
    /// as the send.
    pub(crate) os: SendScratch,
}

impl SendBatch {
    /// Drops `n` written bytes from the front.
    pub(crate) fn advance(&mut self, mut n: usize) {
        if let Some(file) = &mut self.file {
            debug_assert!(self.bufs.is_empty(), "a file is sent alone");
            file.advance(n as u64);
            if file.len == 0 {
                self.file = None;
            }
            return;
        }
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

    /// Drops what is left (a failed or cancelled send), file and all,
    /// for the batch to be reused.
    pub(crate) fn clear(&mut self) {
        self.bufs.clear();
        self.offset = 0;
        self.file = None;
    }

    /// Whether every byte has been written.
    pub(crate) fn is_empty(&self) -> bool {
        self.bufs.is_empty() && self.file.is_none()
    }
}

/// A loop's driver: one backend, chosen when the server starts.
///
/// The `match` in each method is the whole cost of the choice: no trait
/// object, and each arm is the backend's own inlined code. There is one per
/// loop thread, so the variants' size difference costs nothing worth an
/// indirection on every call.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Driver {
    #[cfg(target_os = "linux")]
    Uring(uring::Driver),
    #[cfg(unix)]
    Poll(poll::Driver),
    #[cfg(windows)]
    Iocp(iocp::Driver),
    #[cfg(all(unix, any(test, fuzzing)))]
    Fake(fake::Driver),
}

/// Wakes a loop's driver from another thread.
#[derive(Clone, Debug)]
pub(crate) enum Waker {
    #[cfg(target_os = "linux")]
    Uring(uring::Waker),
    #[cfg(unix)]
    Poll(poll::Waker),
    #[cfg(windows)]
    Iocp(iocp::Waker),
    #[cfg(all(unix, any(test, fuzzing)))]
    Fake(fake::Waker),
}

impl Waker {
    pub(crate) fn wake(&self) {
        match self {
            #[cfg(target_os = "linux")]
            Waker::Uring(w) => w.wake(),
            #[cfg(unix)]
            Waker::Poll(w) => w.wake(),
            #[cfg(windows)]
            Waker::Iocp(w) => w.wake(),
            #[cfg(all(unix, any(test, fuzzing)))]
            Waker::Fake(w) => w.wake(),
        }
    }
}

impl Driver {
    pub(crate) fn new(config: &DriverConfig) -> io::Result<Driver> {
        match config.backend {
            #[cfg(target_os = "linux")]
            Backend::Uring => uring::Driver::new(config).map(Driver::Uring),
            #[cfg(unix)]
            Backend::Poll => poll::Driver::new(config).map(Driver::Poll),
            #[cfg(windows)]
            Backend::Iocp => iocp::Driver::new(config).map(Driver::Iocp),
            other => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("backend {other:?} is not available on this platform"),
            )),
        }
    }

    pub(crate) fn waker(&self) -> Waker {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => Waker::Uring(d.waker()),
            #[cfg(unix)]
            Driver::Poll(d) => Waker::Poll(d.waker()),
            #[cfg(windows)]
            Driver::Iocp(d) => Waker::Iocp(d.waker()),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => Waker::Fake(d.waker()),
        }
    }

    pub(crate) fn listen(&mut self, listener: u32, socket: &Listener) {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.listen(listener, socket),
            #[cfg(unix)]
            Driver::Poll(d) => d.listen(listener, socket),
            #[cfg(windows)]
            Driver::Iocp(d) => d.listen(listener, socket),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.listen(listener, socket),
        }
    }

    pub(crate) fn unlisten(&mut self, listener: u32, socket: &Listener) {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.unlisten(listener, socket),
            #[cfg(unix)]
            Driver::Poll(d) => d.unlisten(listener, socket),
            #[cfg(windows)]
            Driver::Iocp(d) => d.unlisten(listener, socket),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.unlisten(listener, socket),
        }
    }

    pub(crate) fn recv(&mut self, slot: u32, socket: &Socket) {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.recv(slot, socket),
            #[cfg(unix)]
            Driver::Poll(d) => d.recv(slot, socket),
            #[cfg(windows)]
            Driver::Iocp(d) => d.recv(slot, socket),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.recv(slot, socket),
        }
    }

    /// Whether `send` takes a batch holding a file (sent without copying
    /// it through user space); otherwise the loop reads files and sends
    /// their bytes.
    pub(crate) fn sends_files(&self) -> bool {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(_) => true,
            #[cfg(unix)]
            Driver::Poll(_) => cfg!(any(target_os = "linux", target_os = "macos")),
            #[cfg(windows)]
            Driver::Iocp(_) => true,
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(_) => false,
        }
    }

    pub(crate) fn send(&mut self, slot: u32, socket: &Socket, batch: Box<SendBatch>) {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.send(slot, socket, batch),
            #[cfg(unix)]
            Driver::Poll(d) => d.send(slot, socket, batch),
            #[cfg(windows)]
            Driver::Iocp(d) => d.send(slot, socket, batch),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.send(slot, socket, batch),
        }
    }

    pub(crate) fn connect(&mut self, slot: u32, socket: &Socket, addr: SocketAddr) {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.connect(slot, socket, addr),
            #[cfg(unix)]
            Driver::Poll(d) => d.connect(slot, socket, addr),
            #[cfg(windows)]
            Driver::Iocp(d) => d.connect(slot, socket, addr),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.connect(slot, socket, addr),
        }
    }

    pub(crate) fn cancel(&mut self, slot: u32, socket: &Socket) {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.cancel(slot, socket),
            #[cfg(unix)]
            Driver::Poll(d) => d.cancel(slot, socket),
            #[cfg(windows)]
            Driver::Iocp(d) => d.cancel(slot, socket),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.cancel(slot, socket),
        }
    }

    pub(crate) fn cancel_recv(&mut self, slot: u32, socket: &Socket) {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.cancel_recv(slot, socket),
            #[cfg(unix)]
            Driver::Poll(d) => d.cancel_recv(slot, socket),
            #[cfg(windows)]
            Driver::Iocp(d) => d.cancel_recv(slot, socket),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.cancel_recv(slot, socket),
        }
    }

    pub(crate) fn poll(
        &mut self,
        timeout: Option<Duration>,
        f: impl FnMut(Event<'_>) -> Flow,
    ) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.poll(timeout, f),
            #[cfg(unix)]
            Driver::Poll(d) => d.poll(timeout, f),
            #[cfg(windows)]
            Driver::Iocp(d) => d.poll(timeout, f),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.poll(timeout, f),
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        match self {
            #[cfg(target_os = "linux")]
            Driver::Uring(d) => d.in_flight(),
            #[cfg(unix)]
            Driver::Poll(d) => d.in_flight(),
            #[cfg(windows)]
            Driver::Iocp(d) => d.in_flight(),
            #[cfg(all(unix, any(test, fuzzing)))]
            Driver::Fake(d) => d.in_flight(),
        }
    }
}

/// Whether `backend` can run here; for `Auto`, the best one that can.
pub(crate) fn choose(backend: Backend) -> io::Result<Backend> {
    match backend {
        #[cfg(target_os = "linux")]
        Backend::Uring => uring::probe().map(|()| Backend::Uring),
        #[cfg(unix)]
        Backend::Poll => poll::probe().map(|()| Backend::Poll),
        #[cfg(windows)]
        Backend::Iocp => iocp::probe().map(|()| Backend::Iocp),
        #[cfg(target_os = "linux")]
        Backend::Auto => match uring::probe() {
            Ok(()) => Ok(Backend::Uring),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring is not available; using the poll backend");
                Ok(Backend::Poll)
            }
        },
        #[cfg(windows)]
        Backend::Auto => iocp::probe().map(|()| Backend::Iocp),
        #[cfg(not(any(target_os = "linux", windows)))]
        Backend::Auto => Ok(Backend::Poll),
        #[allow(unreachable_patterns)]
        other => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("backend {other:?} is not available on this platform"),
        )),
    }
}

/// Creates a non-blocking listener bound to `addr`, alone or as a member
/// of a group of listeners sharing the port (one per loop).
pub(crate) fn bind(addr: SocketAddr, backlog: i32, share: Share) -> io::Result<Listener> {
    os::bind(addr, backlog, share)
}

/// Creates an unconnected stream socket for `addr`'s family.
pub(crate) fn stream_socket(addr: SocketAddr) -> io::Result<Socket> {
    os::stream_socket(addr)
}

/// Half-closes the write side (sends FIN after queued data).
pub(crate) fn shutdown_write(socket: &Socket) {
    os::shutdown_write(socket)
}

/// Whether the kernel spreads new connections across a group of listeners
/// sharing a port (SO_REUSEPORT on Unix). On Windows a "group" is one
/// socket whose accepts complete on one loop's port.
pub(crate) const KERNEL_SPREADS_GROUPS: bool = cfg!(unix);

/// Options applied to every accepted or connected socket.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SocketOptions {
    /// Disable Nagle's algorithm.
    pub(crate) nodelay: bool,
    /// The kernel send buffer (SO_SNDBUF), if not the system's default.
    pub(crate) send_buffer: Option<usize>,
}

/// Prepares an accepted or connected socket with `options`, and refuses
/// SIGPIPE where the platform needs a socket option for that.
pub(crate) fn prepare(socket: &Socket, options: &SocketOptions) {
    os::prepare(socket, options)
}

/// The peer's address of a connected socket.
pub(crate) fn peer_addr(socket: &Socket) -> io::Result<SocketAddr> {
    os::peer_addr(socket)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod batch_tests {
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
