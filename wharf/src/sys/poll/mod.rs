//! The portable readiness backend, on mio (epoll, kqueue).
//!
//! It keeps the completion contract of `sys`: the loop asks for a receive,
//! a send or a connect and hears back through the same events as from
//! io_uring. Readiness is edge-triggered, so each socket is registered once
//! for reading and writing; a receive reads into one buffer per loop (an idle
//! connection holds none), and a send writes the queued buffers with one
//! gathered `sendmsg` as soon as it is asked for, waiting for writability
//! only when the socket is full.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use socket2::SockRef;

use super::unix::{Listener, Socket, SEND_FLAGS};
use super::{DriverConfig, Event, Flow, RecvEnd, SendBatch};

const WAKE: Token = Token(usize::MAX);
/// Listener `i` has token `LISTENER + i`; connection slots are below it.
const LISTENER: usize = 1 << 40;
/// Reads per connection per turn before others get a go.
const READS_PER_TURN: usize = 16;
/// Accepts per listener per turn.
const ACCEPTS_PER_TURN: usize = 256;
/// Most buffers gathered into one `sendmsg`.
const MAX_IOV: usize = 64;

/// Wakes a driver from another thread.
#[derive(Clone, Debug)]
pub(crate) struct Waker(Arc<mio::Waker>);

impl Waker {
    pub(crate) fn wake(&self) {
        // An error means the wake-up counter is full: a wake-up is pending.
        let _ = self.0.wake();
    }
}

/// What the driver knows of one connection slot.
#[derive(Default)]
struct SlotIo {
    /// The registered descriptor, if any.
    fd: Option<RawFd>,
    recv: bool,
    /// The loop answered `Flow::Pause` in this turn: read nothing more
    /// until the next one.
    paused: bool,
    connect: bool,
    /// The batch being sent, waiting for the socket to take more; it goes
    /// back to the loop with `Sent`.
    send: Option<Box<SendBatch>>,
}

struct ListenerIo {
    fd: RawFd,
    accepting: bool,
}

/// Endings decided outside a wait (cancels, immediate results), reported at
/// the start of the next `poll`.
enum Done {
    Sent(u32, Box<SendBatch>, io::Result<usize>),
    RecvEnded(u32, RecvEnd),
    Connected(u32, io::Result<()>),
    AcceptEnded(u32),
}

pub(crate) struct Driver {
    poll: Poll,
    events: Events,
    waker: Waker,
    buf: Box<[u8]>,
    slots: Vec<SlotIo>,
    listeners: Vec<ListenerIo>,
    done: VecDeque<Done>,
    /// Slots whose reading was cut short by the per-turn budget or a pause.
    read_again: Vec<u32>,
    /// Slots paused in this turn.
    paused: Vec<u32>,
    /// Listeners to accept from without waiting for a new edge.
    accept_again: Vec<u32>,
    /// This turn's events, copied out of `events` (reused).
    ready: Vec<(Token, bool, bool)>,
    in_flight: usize,
}

impl Driver {
    pub(crate) fn new(config: &DriverConfig) -> io::Result<Driver> {
        let poll = Poll::new()?;
        let waker = Waker(Arc::new(mio::Waker::new(poll.registry(), WAKE)?));
        Ok(Driver {
            poll,
            events: Events::with_capacity(1024),
            waker,
            buf: vec![0u8; config.recv_buffer_size.max(4096) as usize].into_boxed_slice(),
            slots: Vec::new(),
            listeners: Vec::new(),
            done: VecDeque::new(),
            read_again: Vec::new(),
            paused: Vec::new(),
            accept_again: Vec::new(),
            ready: Vec::new(),
            in_flight: 0,
        })
    }

    pub(crate) fn waker(&self) -> Waker {
        self.waker.clone()
    }

    pub(crate) fn listen(&mut self, listener: u32, socket: &Listener) {
        let i = listener as usize;
        let fd = socket.as_raw_fd();
        if self.listeners.len() <= i {
            self.listeners.resize_with(i + 1, || ListenerIo {
                fd: -1,
                accepting: false,
            });
        }
        let l = &mut self.listeners[i];
        if l.fd != fd {
            l.fd = fd;
            let token = Token(LISTENER + i);
            let _ = self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), token, Interest::READABLE);
        }
        l.accepting = true;
        self.in_flight += 1;
        // Connections may be waiting already, their edge long gone.
        self.accept_again.push(listener);
    }

    pub(crate) fn unlisten(&mut self, listener: u32, socket: &Listener) {
        let l = &mut self.listeners[listener as usize];
        if l.accepting {
            l.accepting = false;
            self.done.push_back(Done::AcceptEnded(listener));
        }
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&socket.as_raw_fd()));
        l.fd = -1;
    }

    pub(crate) fn recv(&mut self, slot: u32, socket: &Socket) {
        self.register(slot, socket);
        self.slots[slot as usize].recv = true;
        self.in_flight += 1;
        self.read_again.push(slot);
    }

    pub(crate) fn send(&mut self, slot: u32, socket: &Socket, batch: Box<SendBatch>) {
        self.register(slot, socket);
        self.in_flight += 1;
        match write_batch(socket, &batch) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.slots[slot as usize].send = Some(batch);
            }
            result => self.done.push_back(Done::Sent(slot, batch, result)),
        }
    }

    pub(crate) fn connect(&mut self, slot: u32, socket: &Socket, addr: SocketAddr) {
        self.in_flight += 1;
        let started = socket
            .set_nonblocking(true)
            .and_then(|()| socket.connect(&addr.into()));
        match started {
            Ok(()) => self.done.push_back(Done::Connected(slot, Ok(()))),
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                self.register(slot, socket);
                self.slots[slot as usize].connect = true;
            }
            Err(e) => self.done.push_back(Done::Connected(slot, Err(e))),
        }
    }

    pub(crate) fn cancel(&mut self, slot: u32, socket: &Socket) {
        let _ = socket;
        let Some(io) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if io.recv {
            io.recv = false;
            self.done
                .push_back(Done::RecvEnded(slot, RecvEnd::Cancelled));
        }
        if let Some(batch) = io.send.take() {
            self.done
                .push_back(Done::Sent(slot, batch, Err(cancelled())));
        }
        if io.connect {
            io.connect = false;
            self.done.push_back(Done::Connected(slot, Err(cancelled())));
        }
        self.release(slot);
    }

    pub(crate) fn cancel_recv(&mut self, slot: u32, socket: &Socket) {
        let _ = socket;
        if let Some(io) = self.slots.get_mut(slot as usize) {
            if io.recv {
                io.recv = false;
                self.done
                    .push_back(Done::RecvEnded(slot, RecvEnd::Cancelled));
            }
        }
    }

    /// Registers the slot's socket for both directions, once.
    fn register(&mut self, slot: u32, socket: &Socket) {
        let i = slot as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, SlotIo::default);
        }
        let fd = socket.as_raw_fd();
        if self.slots[i].fd == Some(fd) {
            return;
        }
        let mut source = SourceFd(&fd);
        let interest = Interest::READABLE | Interest::WRITABLE;
        let registry = self.poll.registry();
        if registry.register(&mut source, Token(i), interest).is_err() {
            let _ = registry.reregister(&mut source, Token(i), interest);
        }
        // The socket is non-blocking from here on (accepted and connected
        // sockets are; setting it again costs one call per connection).
        let _ = socket.set_nonblocking(true);
        self.slots[i].fd = Some(fd);
    }

    /// Forgets a slot's registration once nothing is pending on it, before
    /// the loop closes the socket (a later socket may reuse the number).
    fn release(&mut self, slot: u32) {
        let io = &mut self.slots[slot as usize];
        if io.recv || io.connect || io.send.is_some() {
            return;
        }
        if let Some(fd) = io.fd.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
    }

    /// Reports what is ready, waiting up to `timeout` (forever if `None`)
    /// when nothing is.
    pub(crate) fn poll(
        &mut self,
        timeout: Option<Duration>,
        mut f: impl FnMut(Event<'_>) -> Flow,
    ) -> io::Result<()> {
        for slot in self.paused.drain(..) {
            if let Some(io) = self.slots.get_mut(slot as usize) {
                io.paused = false;
            }
        }
        let mut busy = self.report_done(&mut f);
        // Handling these can queue them again, into the emptied lists; the
        // drained ones are kept for their room when nothing was.
        let mut again = std::mem::take(&mut self.accept_again);
        for listener in again.drain(..) {
            busy = true;
            self.accept(listener, &mut f);
        }
        if self.accept_again.is_empty() {
            self.accept_again = again;
        }
        let mut again = std::mem::take(&mut self.read_again);
        for slot in again.drain(..) {
            busy = true;
            self.read(slot, &mut f);
        }
        if self.read_again.is_empty() {
            self.read_again = again;
        }
        let timeout = if busy || !self.done.is_empty() {
            Some(Duration::ZERO)
        } else {
            timeout
        };
        if let Err(e) = self.poll.poll(&mut self.events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        // Copied out of `events` (handling one can change the driver), into
        // a list kept from turn to turn rather than allocated each.
        let mut ready = std::mem::take(&mut self.ready);
        ready.extend(self.events.iter().map(|e| {
            (
                e.token(),
                e.is_readable() || e.is_read_closed() || e.is_error(),
                e.is_writable() || e.is_write_closed() || e.is_error(),
            )
        }));
        for (token, readable, writable) in ready.drain(..) {
            match token {
                WAKE => {
                    f(Event::Woken);
                }
                Token(t) if t >= LISTENER => self.accept((t - LISTENER) as u32, &mut f),
                Token(t) => {
                    let slot = t as u32;
                    if writable {
                        self.writable(slot, &mut f);
                    }
                    if readable {
                        self.read(slot, &mut f);
                    }
                }
            }
        }
        self.ready = ready;
        self.report_done(&mut f);
        Ok(())
    }

    fn report_done(&mut self, f: &mut impl FnMut(Event<'_>) -> Flow) -> bool {
        let any = !self.done.is_empty();
        while let Some(done) = self.done.pop_front() {
            // Every ending queued here was counted in flight when started.
            self.in_flight -= 1;
            match done {
                Done::Sent(slot, batch, result) => {
                    self.end(slot);
                    f(Event::Sent {
                        slot,
                        batch,
                        result,
                    });
                }
                Done::RecvEnded(slot, why) => {
                    self.end(slot);
                    f(Event::RecvEnded { slot, why });
                }
                Done::Connected(slot, result) => {
                    self.end(slot);
                    f(Event::Connected { slot, result });
                }
                Done::AcceptEnded(listener) => {
                    f(Event::AcceptEnded {
                        listener,
                        error: None,
                    });
                }
            }
        }
        any
    }

    /// One operation on `slot` ended; drop the registration if it was the
    /// last.
    fn end(&mut self, slot: u32) {
        if (slot as usize) < self.slots.len() {
            self.release(slot);
        }
    }

    fn accept(&mut self, listener: u32, f: &mut impl FnMut(Event<'_>) -> Flow) {
        let Some(l) = self.listeners.get_mut(listener as usize) else {
            return;
        };
        if !l.accepting {
            return;
        }
        // SAFETY: the loop keeps the listener open while it is accepting
        // (it closes it only after `unlisten` or an `AcceptEnded`).
        let fd = unsafe { BorrowedFd::borrow_raw(l.fd) };
        let socket = SockRef::from(&fd);
        for _ in 0..ACCEPTS_PER_TURN {
            match socket.accept() {
                Ok((conn, peer)) => {
                    let _ = conn.set_nonblocking(true);
                    f(Event::Accepted {
                        listener,
                        socket: conn,
                        peer: peer.as_socket(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if is_transient_accept_error(&e) => {}
                Err(e) => {
                    // EMFILE and the like: stop until the loop retries.
                    l.accepting = false;
                    self.in_flight -= 1;
                    f(Event::AcceptEnded {
                        listener,
                        error: Some(e),
                    });
                    return;
                }
            }
        }
        self.accept_again.push(listener);
    }

    fn read(&mut self, slot: u32, f: &mut impl FnMut(Event<'_>) -> Flow) {
        let Driver {
            slots,
            buf,
            read_again,
            paused,
            ..
        } = self;
        let Some(io) = slots.get_mut(slot as usize) else {
            return;
        };
        let Some(fd) = io.fd.filter(|_| io.recv && !io.paused) else {
            return; // not receiving, or paused until the next turn
        };
        // SAFETY: the loop keeps the socket open while a receive is on.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        for _ in 0..READS_PER_TURN {
            match (&*socket).read(buf) {
                Ok(0) => return self.recv_ended(slot, RecvEnd::Eof, f),
                // Read on until WouldBlock even after a short read: the
                // edge that woke us may also carry an error or EOF that
                // arrived with the data, and no new edge would report it.
                // When the loop pauses the receive, the next `recv` reads
                // again from the start, so nothing is missed either.
                Ok(n) => {
                    let flow = f(Event::Received {
                        slot,
                        data: &buf[..n],
                    });
                    if flow == Flow::Pause {
                        // Nothing more this turn; the next one reads on
                        // unless the loop cancels meanwhile (the socket
                        // may hold more, and no new edge will say so).
                        io.paused = true;
                        paused.push(slot);
                        read_again.push(slot);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.recv_ended(slot, RecvEnd::Error(e), f),
            }
        }
        read_again.push(slot);
    }

    fn recv_ended(&mut self, slot: u32, why: RecvEnd, f: &mut impl FnMut(Event<'_>) -> Flow) {
        let io = &mut self.slots[slot as usize];
        if io.recv {
            io.recv = false;
            self.in_flight -= 1;
            self.release(slot);
            f(Event::RecvEnded { slot, why });
        }
    }

    fn writable(&mut self, slot: u32, f: &mut impl FnMut(Event<'_>) -> Flow) {
        let Some(io) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let Some(fd) = io.fd else { return };
        // SAFETY: the loop keeps the socket open while an operation is on.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = SockRef::from(&fd);
        if io.connect {
            io.connect = false;
            self.in_flight -= 1;
            let result = match socket.take_error() {
                Ok(None) => socket.peer_addr().map(drop),
                Ok(Some(e)) | Err(e) => Err(e),
            };
            self.release(slot);
            f(Event::Connected { slot, result });
            return;
        }
        if let Some(batch) = &io.send {
            let result = write_batch(&socket, batch);
            if matches!(&result, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                return;
            }
            let batch = io.send.take().expect("checked above");
            self.in_flight -= 1;
            self.release(slot);
            f(Event::Sent {
                slot,
                batch,
                result,
            });
        }
    }

    /// Operations whose ending has not been reported.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// Writes as much of `batch` as the socket takes, in one call.
fn write_batch(socket: &Socket, batch: &SendBatch) -> io::Result<usize> {
    if let Some(file) = &batch.file {
        return super::unix::send_file(socket, file);
    }
    let mut iov = [IoSlice::new(&[]); MAX_IOV];
    let mut n = 0;
    for (i, buf) in batch.bufs.iter().take(MAX_IOV).enumerate() {
        let skip = if i == 0 { batch.offset } else { 0 };
        iov[i] = IoSlice::new(&buf[skip..]);
        n += 1;
    }
    loop {
        match socket.send_vectored_with_flags(&iov[..n], SEND_FLAGS) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

fn cancelled() -> io::Error {
    io::Error::from_raw_os_error(libc::ECANCELED)
}

/// Accept errors that concern only the connection being accepted.
fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM)
    )
}

/// The poll backend works wherever mio does.
pub(crate) fn probe() -> io::Result<()> {
    Poll::new().map(drop)
}
