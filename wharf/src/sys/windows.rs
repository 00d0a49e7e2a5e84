//! Socket set-up for the Windows backend (I/O completion ports): the
//! counterpart of `unix.rs`, with the same names.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Type};

/// An owned socket; dropping it closes it. socket2 creates every socket
/// with `WSA_FLAG_OVERLAPPED`, which completion-port I/O needs.
pub(crate) type Socket = socket2::Socket;
/// An owned listening socket.
pub(crate) type Listener = socket2::Socket;

/// How a listener shares its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Share {
    /// Nobody else: one socket. (The loops are given clones of it; only the
    /// first loop to post `AcceptEx` on it can: a socket's completions go to
    /// one port.)
    Alone,
    /// The first of a group of listeners on one port, one per loop.
    FirstOfGroup,
    /// Another member of the group the first one started.
    JoinGroup,
}

pub(crate) fn bind(addr: SocketAddr, backlog: i32, share: Share) -> io::Result<Listener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Windows has no SO_REUSEPORT. Its SO_REUSEADDR lets a socket bind to a
    // port that another socket holds, even a listening one, so the first
    // listener binds without it (a busy port fails here) and only the
    // group's other members set it, to join the port the first one took.
    // Which member the system gives a new connection to is up to it.
    if share == Share::JoinGroup {
        socket.set_reuse_address(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Non-blocking, so that nothing ever waits in a plain `accept`; the
    // backend accepts with pre-posted AcceptEx calls, which this does not
    // affect.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
}

pub(crate) fn stream_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
}

pub(crate) fn shutdown_write(socket: &Socket) {
    let _ = socket.shutdown(std::net::Shutdown::Write);
}

pub(crate) fn prepare(socket: &Socket, options: &super::SocketOptions) {
    // Windows raises no signal on a reset peer: nothing else to set.
    if options.nodelay {
        let _ = socket.set_tcp_nodelay(true);
    }
    if let Some(bytes) = options.send_buffer {
        let _ = socket.set_send_buffer_size(bytes);
    }
}

pub(crate) fn peer_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "peer is not an IP address"))
}

/// Flags for every send: Windows has no SIGPIPE to suppress.
pub(crate) const SEND_FLAGS: u32 = 0;

/// The spare-descriptor trick of the Unix backends, which Windows does not
/// need: running out of sockets shows as an `AcceptEx` that cannot be
/// posted, not as clients stuck in the backlog behind a spinning `accept`,
/// and a plain `accept` here would take clients from under the posted
/// `AcceptEx` calls. Shedding does nothing.
pub(crate) struct Reserve;

impl Reserve {
    pub(crate) fn new() -> Reserve {
        Reserve
    }

    /// Turns nobody away (see the type); returns 0.
    pub(crate) fn shed(&mut self, listener: &Listener) -> usize {
        let _ = listener;
        0
    }
}
