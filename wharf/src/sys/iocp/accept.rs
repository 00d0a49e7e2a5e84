//! Accepting: a pool of pre-posted `AcceptEx` calls per listener.
//!
//! Each `AcceptEx` carries a socket made in advance (so a burst of clients
//! finds sockets ready, the WSAENOBUFS lesson) and receives no data with the
//! connection (so a client that connects and stays silent is accepted at
//! once). A completed accept is refilled at once. Accepting ends, with one
//! `AcceptEnded`, only when every posted `AcceptEx` has come back: until
//! then the kernel may write into their address buffers and sockets.

use std::cell::{Cell, UnsafeCell};
use std::io;

use socket2::{Domain, Protocol, Type};
use windows_sys::Win32::Foundation::{ERROR_INVALID_PARAMETER, ERROR_IO_PENDING, HANDLE};
use windows_sys::Win32::Networking::WinSock::{
    setsockopt, AcceptEx, SOCKADDR_STORAGE, SOCKET, SOL_SOCKET, SO_UPDATE_ACCEPT_CONTEXT,
    WSA_OPERATION_ABORTED,
};
use windows_sys::Win32::System::IO::{CancelIoEx, OVERLAPPED_ENTRY};

use super::op::{last_wsa_error, Kind, Op, OpBox, StartsWithOp};
use super::{raw, Done, Driver};
use crate::sys::windows::{Listener, Socket};
use crate::sys::{Event, Flow};

/// Room for one address in an `AcceptEx` buffer: the largest address plus
/// the 16 bytes the call requires.
const ADDR_LEN: usize = std::mem::size_of::<SOCKADDR_STORAGE>() + 16;

/// One posted `AcceptEx`.
#[repr(C)]
pub(super) struct AcceptOp {
    op: Op,
    /// The socket the connection is accepted into, owned here until the
    /// completion hands it to the loop.
    socket: Cell<Option<Socket>>,
    /// Local and remote address, written by the kernel while pending.
    addrs: UnsafeCell<[u8; 2 * ADDR_LEN]>,
}

// SAFETY: `AcceptOp` is `#[repr(C)]` with its `Op` first.
unsafe impl StartsWithOp for AcceptOp {
    fn op(&self) -> &Op {
        &self.op
    }
}

/// What the driver knows of one listener.
pub(super) struct ListenerIo {
    /// The listening socket (the loop keeps it open until `AcceptEnded`).
    socket: SOCKET,
    domain: Domain,
    /// New `AcceptEx` calls are wanted.
    accepting: bool,
    /// Accepting was started and its `AcceptEnded` is still owed.
    counted: bool,
    ops: Vec<OpBox<AcceptOp>>,
    /// Pool members posted and not yet completed.
    posted: usize,
    /// Why accepting stopped, reported with `AcceptEnded`.
    pub(super) error: Option<io::Error>,
}

impl Driver {
    pub(crate) fn listen(&mut self, listener: u32, socket: &Listener) {
        let i = listener as usize;
        while self.listeners.len() <= i {
            self.listeners.push(ListenerIo {
                socket: 0,
                domain: Domain::IPV4,
                accepting: false,
                counted: false,
                ops: Vec::new(),
                posted: 0,
                error: None,
            });
        }
        self.in_flight += 1;
        let l = &mut self.listeners[i];
        debug_assert!(!l.counted, "listen twice without AcceptEnded");
        l.counted = true;
        l.error = None;
        let s = raw(&**socket);
        if l.socket != s {
            let domain = socket.local_addr().map(|a| a.domain());
            let associated = domain.and_then(|d| self.waker.0.port.associate(s).map(|()| d));
            match associated {
                Ok(domain) => {
                    l.socket = s;
                    l.domain = domain;
                }
                Err(e) if e.raw_os_error() == Some(ERROR_INVALID_PARAMETER as i32) => {
                    // The listening socket is shared by the loops, and
                    // another loop's port already serves it: a socket's
                    // completions go to one port only, so that loop
                    // accepts for all (see `windows::Listener`). This one
                    // listens without posting; `unlisten` ends it.
                    tracing::debug!(listener, "listener served by another loop's port");
                    return;
                }
                Err(e) => {
                    l.error = Some(e);
                    l.counted = false;
                    self.done.push_back(Done::AcceptEnded(listener));
                    return;
                }
            }
        }
        l.accepting = true;
        self.fill(listener);
    }

    pub(crate) fn unlisten(&mut self, listener: u32, socket: &Listener) {
        let Some(l) = self.listeners.get_mut(listener as usize) else {
            return;
        };
        l.accepting = false;
        if l.posted > 0 {
            // SAFETY: cancels the operations issued on this open socket;
            // their memory stays in the pool until their completions come.
            unsafe { CancelIoEx(raw(&**socket) as HANDLE, std::ptr::null()) };
        } else if l.counted {
            l.counted = false;
            self.done.push_back(Done::AcceptEnded(listener));
        }
    }

    /// Posts `AcceptEx` calls until the pool is full. When not one can be
    /// posted (out of sockets, or the listener is broken), accepting stops
    /// with that error and the loop retries later.
    fn fill(&mut self, listener: u32) {
        let pool = self.accept_pool;
        let l = &mut self.listeners[listener as usize];
        while l.accepting && l.posted < pool {
            let idle = match l.ops.iter().position(|op| !op.op().is_pending()) {
                Some(idle) => idle,
                None => {
                    l.ops.push(OpBox::new(AcceptOp {
                        op: Op::new(Kind::Accept, listener),
                        socket: Cell::new(None),
                        addrs: UnsafeCell::new([0; 2 * ADDR_LEN]),
                    }));
                    l.ops.len() - 1
                }
            };
            match post_accept(l.socket, l.domain, listener, &l.ops[idle]) {
                Ok(()) => l.posted += 1,
                Err(e) => {
                    if l.posted == 0 {
                        // Not one accept is waiting: stop and report.
                        l.accepting = false;
                        l.error = Some(e);
                        if l.counted {
                            l.counted = false;
                            self.done.push_back(Done::AcceptEnded(listener));
                        }
                    } else {
                        // Go on with fewer; the next completion tries again.
                        tracing::debug!(error = %e, "could not post an AcceptEx");
                    }
                    return;
                }
            }
        }
    }

    pub(super) fn accept_completed(
        &mut self,
        listener: u32,
        entry: &OVERLAPPED_ENTRY,
        f: &mut impl FnMut(Event<'_>) -> Flow,
    ) {
        let l = &mut self.listeners[listener as usize];
        let Some(op) = l.ops.iter().find(|op| op.is(entry.lpOverlapped)) else {
            debug_assert!(false, "an accept completion that is not in the pool");
            return;
        };
        let result = op.op().complete(entry);
        let socket = op.socket.take();
        l.posted -= 1;
        let listen_socket = l.socket;
        if l.accepting {
            // Keep the pool full before handing the connection over.
            self.fill(listener);
        }
        match (result, socket) {
            (Ok(_), Some(socket)) => match finish_accept(listen_socket, &socket) {
                Ok(()) => {
                    f(Event::Accepted {
                        listener,
                        socket,
                        peer: None,
                    });
                }
                Err(e) => tracing::debug!(error = %e, "an accepted socket could not be set up"),
            },
            (Err(e), _) if e.raw_os_error() == Some(WSA_OPERATION_ABORTED) => {}
            // The client reset before it was accepted: its socket goes, the
            // listener goes on.
            (Err(e), _) => tracing::debug!(error = %e, "an AcceptEx failed"),
            (Ok(_), None) => debug_assert!(false, "an accept without its socket"),
        }
        let l = &mut self.listeners[listener as usize];
        if !l.accepting && l.posted == 0 && l.counted {
            l.counted = false;
            self.done.push_back(Done::AcceptEnded(listener));
        }
    }
}

/// Makes a socket and posts one `AcceptEx` into it with `op`.
fn post_accept(
    listen: SOCKET,
    domain: Domain,
    listener: u32,
    op: &OpBox<AcceptOp>,
) -> io::Result<()> {
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    let (overlapped, _) = op.start(listen, listener);
    let mut received = 0u32;
    // SAFETY: the address buffer, the OVERLAPPED and the accept socket stay
    // in the pool's heap block, neither moved nor freed while the accept is
    // pending (see `op.rs`); no data is asked for (length 0).
    let ok = unsafe {
        AcceptEx(
            listen,
            raw(&socket),
            op.addrs.get().cast(),
            0,
            ADDR_LEN as u32,
            ADDR_LEN as u32,
            &mut received,
            overlapped,
        )
    };
    if ok == 0 {
        let e = last_wsa_error();
        if e.raw_os_error() != Some(ERROR_IO_PENDING as i32) {
            op.op.failed();
            return Err(e);
        }
    }
    op.op.posted();
    op.socket.set(Some(socket));
    Ok(())
}

/// Gives an accepted socket the listener's properties (so `getpeername`
/// and `shutdown` work). Its first receive or send routes it to the port.
fn finish_accept(listen: SOCKET, socket: &Socket) -> io::Result<()> {
    // SAFETY: passes a pointer to a live SOCKET and its size, as
    // SO_UPDATE_ACCEPT_CONTEXT requires.
    let rc = unsafe {
        setsockopt(
            raw(socket),
            SOL_SOCKET,
            SO_UPDATE_ACCEPT_CONTEXT,
            (&listen as *const SOCKET).cast(),
            std::mem::size_of::<SOCKET>() as i32,
        )
    };
    if rc != 0 {
        return Err(last_wsa_error());
    }
    Ok(())
}
