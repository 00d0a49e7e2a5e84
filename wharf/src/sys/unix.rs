//! Socket set-up shared by the Unix backends (io_uring and poll).

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Type};

/// An owned socket; dropping it closes it.
pub(crate) type Socket = socket2::Socket;
/// An owned listening socket.
pub(crate) type Listener = socket2::Socket;

/// How a listener shares its port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Share {
    /// Nobody else: one socket (the loops share it).
    Alone,
    /// The first of a group of SO_REUSEPORT listeners, one per loop.
    FirstOfGroup,
    /// Another member of the group the first one started.
    JoinGroup,
}

pub(crate) fn bind(addr: SocketAddr, backlog: i32, share: Share) -> io::Result<Listener> {
    let new = || Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP));
    let mut addr = addr;
    if share == Share::FirstOfGroup {
        // A busy port must fail here, even when its holder is another
        // SO_REUSEPORT listener of the same user, which the kernel would let
        // us join: a plain socket binds only if nobody listens on the port.
        // (For port 0 this is also how the port is picked.)
        let probe = new()?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
        addr = probe
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("no port"))?;
    }
    let socket = new()?;
    socket.set_reuse_address(true)?;
    if share != Share::Alone {
        // Each loop binds its own listener to the same address; the kernel
        // spreads new connections across them.
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket)
}

pub(crate) fn stream_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    nosigpipe(&socket);
    Ok(socket)
}

pub(crate) fn shutdown_write(socket: &Socket) {
    let _ = socket.shutdown(std::net::Shutdown::Write);
}

pub(crate) fn prepare(socket: &Socket, options: &super::SocketOptions) {
    if options.nodelay {
        let _ = socket.set_tcp_nodelay(true);
    }
    if let Some(bytes) = options.send_buffer {
        let _ = socket.set_send_buffer_size(bytes);
    }
    nosigpipe(socket);
}

/// Where MSG_NOSIGNAL does not exist, the socket itself must refuse SIGPIPE.
fn nosigpipe(socket: &Socket) {
    #[cfg(any(target_os = "macos", target_os = "ios", target_os = "freebsd"))]
    let _ = socket.set_nosigpipe(true);
    let _ = socket;
}

pub(crate) fn peer_addr(socket: &Socket) -> io::Result<SocketAddr> {
    socket
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "peer is not an IP address"))
}

/// Flags for every send: never raise SIGPIPE on a reset peer.
#[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
pub(crate) const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
pub(crate) const SEND_FLAGS: i32 = 0;

/// A spare descriptor, held so that when the process runs out (EMFILE) a
/// loop can still accept waiting clients just to close them, instead of
/// leaving them hanging in the backlog (the trick libuv uses).
pub(crate) struct Reserve(Option<std::fs::File>);

impl Reserve {
    pub(crate) fn new() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    /// Frees the spare, accepts and closes up to 64 waiting clients, and
    /// takes the spare back. Returns how many clients were turned away.
    pub(crate) fn shed(&mut self, listener: &Listener) -> usize {
        self.0 = None;
        let mut shed = 0;
        while shed < 64 {
            match listener.accept() {
                Ok((client, _)) => {
                    drop(client);
                    shed += 1;
                }
                Err(_) => break,
            }
        }
        self.0 = std::fs::File::open("/dev/null").ok();
        shed
    }
}

/// The most one `sendfile` call is asked for (Linux moves at most
/// 0x7ffff000 bytes per call anyway).
const SENDFILE_MAX: u64 = 1 << 30;

/// Sends what it can of `file` on a non-blocking `socket` without
/// copying it through user space: the bytes sent, `WouldBlock` when the
/// socket's buffer is full, `UnexpectedEof` when the file ended before
/// the range (it shrank).
pub(crate) fn send_file(
    socket: &impl std::os::fd::AsRawFd,
    file: &crate::file::FileChunk,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let count = file.len.min(SENDFILE_MAX);
    loop {
        let sent = sendfile(
            socket.as_raw_fd(),
            file.file.as_raw_fd(),
            file.offset,
            count,
        );
        match sent {
            Ok(0) if count > 0 => return Err(crate::file::shrunk()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// `sendfile(2)` takes no `MSG_NOSIGNAL`, and Linux has no
/// `SO_NOSIGPIPE`: on a socket whose peer is gone it raises SIGPIPE, which
/// kills a host that left the signal at its default. So SIGPIPE is blocked
/// on this thread for the call, and one it raised is taken before the
/// mask is restored: the caller sees `EPIPE`, as with any other send.
#[cfg(target_os = "linux")]
fn sendfile(socket: i32, file: i32, offset: u64, count: u64) -> io::Result<usize> {
    // SAFETY: `sigset_t` is plain data; the calls below initialise it.
    let mut pipe: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above: the saved mask, written by `pthread_sigmask`.
    let mut saved: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: pointers to the two local sets, for the duration of each
    // call; `pthread_sigmask` changes only this thread's mask.
    let blocked = unsafe {
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut saved) == 0
    };
    let mut offset = offset as libc::off_t;
    // SAFETY: two descriptors the caller keeps open, and a pointer to a
    // local offset that outlives the call.
    let n = unsafe { libc::sendfile(socket, file, &mut offset, count as usize) };
    let result = if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    };
    if blocked {
        let raised = matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EPIPE));
        // SAFETY: pointers to the local sets and a local zero timeout;
        // `sigtimedwait` takes a SIGPIPE pending on this thread, if any,
        // without waiting; then the saved mask is put back.
        unsafe {
            if raised && libc::sigismember(&saved, libc::SIGPIPE) == 0 {
                let now = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                libc::sigtimedwait(&pipe, std::ptr::null_mut(), &now);
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut());
        }
    }
    result
}

#[cfg(target_os = "macos")]
fn sendfile(socket: i32, file: i32, offset: u64, count: u64) -> io::Result<usize> {
    let mut len = count as libc::off_t;
    // SAFETY: two descriptors the caller keeps open; `len` is a local the
    // call reads and writes; no header or trailer vectors.
    let rc = unsafe {
        libc::sendfile(
            file,
            socket,
            offset as libc::off_t,
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    // On EAGAIN macOS still reports (in `len`) what it sent before.
    if rc == 0 || len > 0 {
        Ok(len as usize)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn sendfile(socket: i32, file: i32, offset: u64, count: u64) -> io::Result<usize> {
    // Not reached: `Driver::sends_files` is false where there is none.
    let _ = (socket, file, offset, count);
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "sendfile is not available on this platform",
    ))
}
