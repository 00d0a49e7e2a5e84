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

pub(crate) fn bind(addr: SocketAddr, backlog: i32) -> io::Result<Listener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Each loop binds its own listener to the same address. Windows has no
    // SO_REUSEPORT: SO_REUSEADDR lets the second bind succeed, but which of
    // the listeners gets a new connection is up to the system (it does not
    // spread them). Every listener is served all the same.
    socket.set_reuse_address(true)?;
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

pub(crate) fn prepare(socket: &Socket, nodelay: bool) {
    // Windows raises no signal on a reset peer: only Nagle to turn off.
    if nodelay {
        let _ = socket.set_tcp_nodelay(true);
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
