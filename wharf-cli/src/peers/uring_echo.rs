//! A minimal io_uring echo on the io-uring crate and nothing else, as the
//! stand-in for what this machine can do: one thread, one ring, multishot
//! accept, and per connection one fixed buffer with one recv or one send
//! in flight. It echoes bytes as they come (raw), which for length-prefixed
//! messages is the same echo. No timeouts, limits, framing or back-pressure:
//! everything wharf does beyond this is what wharf costs.
//!
//! Broadcast: a receive is copied once into a shared buffer and a send of it
//! is queued on every connection (the obvious loop).

use std::collections::VecDeque;
use std::error::Error;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::{Mode, RAW_BUFFER};

const RING_ENTRIES: u32 = 4096;
const ACCEPT: u64 = u64::MAX;
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;

/// Bytes waiting to be sent on a connection.
enum Out {
    /// Echo: the first `len` bytes of the connection's own buffer.
    Own { len: usize, sent: usize },
    /// Broadcast: a message shared by every connection.
    Shared { msg: Rc<[u8]>, sent: usize },
}

struct Conn {
    fd: RawFd,
    /// Receives land here. In echo mode it is also the source of the send,
    /// so no receive is posted until the echo is out.
    buf: Box<[u8]>,
    recv_busy: bool,
    send_busy: bool,
    out: VecDeque<Out>,
    closing: bool,
}

struct Echo {
    ring: IoUring,
    mode: Mode,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
}

/// Serves on `listener` until the process exits.
pub(super) fn serve(
    listener: TcpListener,
    mode: Mode,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn Error>> {
    let mut echo = Echo {
        ring: IoUring::new(RING_ENTRIES)?,
        mode,
        conns: Vec::new(),
        free: Vec::new(),
    };
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(ACCEPT);
    echo.push(&accept)?;
    ready(listener.local_addr()?);
    let mut done = Vec::new();
    loop {
        echo.ring.submit_and_wait(1)?;
        done.extend(
            echo.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for (data, result, flags) in done.drain(..) {
            if data == ACCEPT {
                if result >= 0 {
                    echo.opened(result)?;
                }
                if !cqueue::more(flags) {
                    echo.push(&accept)?;
                }
                continue;
            }
            let slot = (data >> 2) as usize;
            match data & 3 {
                OP_RECV => echo.received(slot, result)?,
                _ => echo.sent(slot, result)?,
            }
        }
    }
}

impl Echo {
    /// Queues `entry`, submitting first if the queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points at belongs to a `Conn`
        // (its boxed `buf`, or an `Rc` in its `out` queue) that stays
        // in `conns`, unmoved and untouched by us, until the entry's
        // completion has been handled: a connection is freed only when
        // neither its recv nor its send is in flight.
        unsafe { super::push_entry(&mut self.ring, entry) }
    }

    fn opened(&mut self, fd: RawFd) -> io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: `fd` is the socket just accepted, and `one` outlives the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let conn = Conn {
            fd,
            buf: vec![0u8; RAW_BUFFER].into_boxed_slice(),
            recv_busy: false,
            send_busy: false,
            out: VecDeque::new(),
            closing: false,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.conns[slot] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                self.conns.len() - 1
            }
        };
        self.post_recv(slot)
    }

    fn post_recv(&mut self, slot: usize) -> io::Result<()> {
        let Some(conn) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        conn.recv_busy = true;
        let entry = opcode::Recv::new(
            types::Fd(conn.fd),
            conn.buf.as_mut_ptr(),
            conn.buf.len() as u32,
        )
        .build()
        .user_data((slot as u64) << 2 | OP_RECV);
        self.push(&entry)
    }

    /// Posts the send at the head of the connection's queue, if none is in
    /// flight.
    fn post_send(&mut self, slot: usize) -> io::Result<()> {
        let Some(conn) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        if conn.send_busy || conn.closing {
            return Ok(());
        }
        let (ptr, len) = match conn.out.front() {
            None => return Ok(()),
            Some(Out::Own { len, sent }) => (conn.buf[*sent..].as_ptr(), len - sent),
            Some(Out::Shared { msg, sent }) => (msg[*sent..].as_ptr(), msg.len() - sent),
        };
        conn.send_busy = true;
        let entry = opcode::Send::new(types::Fd(conn.fd), ptr, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data((slot as u64) << 2 | OP_SEND);
        self.push(&entry)
    }

    fn received(&mut self, slot: usize, result: i32) -> io::Result<()> {
        let Some(conn) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        conn.recv_busy = false;
        if result <= 0 {
            conn.closing = true;
            self.close_if_quiet(slot);
            return Ok(());
        }
        let n = result as usize;
        match self.mode {
            Mode::Echo => {
                conn.out.push_back(Out::Own { len: n, sent: 0 });
                self.post_send(slot)
            }
            // No groups here: the group is every connection.
            Mode::Broadcast | Mode::Group => {
                let msg: Rc<[u8]> = Rc::from(&conn.buf[..n]);
                self.post_recv(slot)?;
                for other in 0..self.conns.len() {
                    if let Some(c) = self.conns[other].as_mut() {
                        if !c.closing {
                            c.out.push_back(Out::Shared {
                                msg: msg.clone(),
                                sent: 0,
                            });
                            self.post_send(other)?;
                        }
                    }
                }
                Ok(())
            }
        }
    }

    fn sent(&mut self, slot: usize, result: i32) -> io::Result<()> {
        let Some(conn) = self.conns[slot].as_mut() else {
            return Ok(());
        };
        conn.send_busy = false;
        if result < 0 {
            conn.closing = true;
            self.close_if_quiet(slot);
            return Ok(());
        }
        let finished = match conn.out.front_mut() {
            Some(Out::Own { len, sent }) => {
                *sent += result as usize;
                sent == len
            }
            Some(Out::Shared { msg, sent }) => {
                *sent += result as usize;
                *sent == msg.len()
            }
            None => false,
        };
        if finished {
            conn.out.pop_front();
        }
        if conn.closing {
            self.close_if_quiet(slot);
            return Ok(());
        }
        if !conn.out.is_empty() {
            return self.post_send(slot);
        }
        if self.mode == Mode::Echo {
            return self.post_recv(slot);
        }
        Ok(())
    }

    /// Closes and frees a closing connection once nothing is in flight.
    fn close_if_quiet(&mut self, slot: usize) {
        let quiet = self.conns[slot]
            .as_ref()
            .is_some_and(|c| c.closing && !c.recv_busy && !c.send_busy);
        if quiet {
            if let Some(conn) = self.conns[slot].take() {
                // SAFETY: the descriptor is ours (accepted here) and no
                // operation on it is in flight any more.
                unsafe { libc::close(conn.fd) };
                self.free.push(slot);
            }
        }
    }
}
