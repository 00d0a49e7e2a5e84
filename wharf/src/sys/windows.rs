//! Socket set-up for the Windows backend (I/O completion ports): the
//! counterpart of `unix.rs`, with the same names.

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};

use socket2::{Domain, Protocol, Type};

/// An owned socket; dropping it closes it. socket2 creates every socket
/// with `WSA_FLAG_OVERLAPPED`, which completion-port I/O needs.
pub(crate) type Socket = socket2::Socket;

/// A listening socket, shared by the loops it was cloned for: one socket,
/// one handle, closed when the last loop lets go.
///
/// Windows cannot spread a port's connections over several listening
/// sockets (it has no SO_REUSEPORT; with SO_REUSEADDR which socket gets a
/// connection is undefined, and Wine refuses the second bind), and a
/// socket's completions go to one completion port only. So every loop gets
/// the same listening socket, and the first loop to associate it with its
/// port is the one that accepts (see `iocp/accept.rs`); the others hold it
/// without posting.
#[derive(Debug)]
pub(crate) struct Listener(Arc<Socket>);

impl Listener {
    /// Another handle on the same listening socket (no new OS handle).
    pub(crate) fn try_clone(&self) -> io::Result<Listener> {
        Ok(Listener(self.0.clone()))
    }
}

impl Deref for Listener {
    type Target = Socket;
    fn deref(&self) -> &Socket {
        &self.0
    }
}

/// How a listener shares its port. On Windows a group is one socket too:
/// its first member is registered by address, and the others are handles
/// on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Share {
    /// Nobody else: one socket (the loops share it).
    Alone,
    /// The first of a group of listeners, one per loop.
    FirstOfGroup,
    /// Another member of the group the first one started.
    JoinGroup,
}

/// The first members of groups, by address, for the others to join.
static GROUPS: Mutex<Vec<(SocketAddr, Weak<Socket>)>> = Mutex::new(Vec::new());

pub(crate) fn bind(addr: SocketAddr, backlog: i32, share: Share) -> io::Result<Listener> {
    if share == Share::JoinGroup {
        let groups = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        return groups
            .iter()
            .rev()
            .find(|(a, _)| *a == addr)
            .and_then(|(_, first)| first.upgrade())
            .map(Listener)
            .ok_or_else(|| io::Error::other(format!("no listener on {addr} to join")));
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // No SO_REUSEADDR: on Windows it would let this bind succeed on a port
    // that another socket with it holds. A busy port fails here.
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Non-blocking, so that nothing ever waits in a plain `accept`; the
    // backend accepts with pre-posted AcceptEx calls, which this does not
    // affect.
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    let socket = Arc::new(socket);
    if share == Share::FirstOfGroup {
        let local = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("no port"))?;
        let mut groups = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        groups.retain(|(_, first)| first.strong_count() > 0);
        groups.push((local, Arc::downgrade(&socket)));
    }
    Ok(Listener(socket))
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
