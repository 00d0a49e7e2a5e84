//! A scripted driver: the event loop's test seam.
//!
//! No byte goes through the kernel. Each simulated client ("peer") writes
//! what its script says, reads as much as the script lets it (its window),
//! half-closes or resets; the driver turns that into the same events a real
//! backend reports, in a fixed order, so a run is reproducible to the byte.
//! Time is virtual: a wait with a timeout and nothing to report moves the
//! clock on by the timeout, so timers fire at exact, early-or-late-checkable
//! moments without anyone sleeping.
//!
//! The loop is handed placeholder descriptors (unbound Unix sockets), which
//! it owns and closes as it would real ones; nothing is read from or
//! written to them.
//!
//! The driver also checks the loop's side of the backend contract (see
//! `sys`): no second receive or send on a slot while one is in flight, no
//! empty send, no wait that could never end.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::{Domain, Type};

use super::{Event, Flow, Listener, RecvEnd, SendBatch, Socket};

/// The virtual clock, shared with the loop (and the test's handler).
#[derive(Clone, Debug)]
pub(crate) struct Clock {
    base: Instant,
    nanos: Arc<AtomicU64>,
    /// The driver's waits so far: events of one turn come before that
    /// turn's timers.
    turns: Arc<AtomicU64>,
}

impl Clock {
    pub(crate) fn new() -> Clock {
        Clock {
            base: Instant::now(),
            nanos: Arc::new(AtomicU64::new(0)),
            turns: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn turn(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    pub(crate) fn base(&self) -> Instant {
        self.base
    }

    pub(crate) fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }

    fn advance(&self, d: Duration) {
        self.nanos.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// One step of a script.
pub(crate) enum Op {
    /// A new client connects; peers are numbered in the order they connect.
    Connect,
    /// The peer writes these bytes (they arrive as one segment).
    Write { peer: usize, bytes: Vec<u8> },
    /// The peer shuts down its writing side.
    Eof { peer: usize },
    /// The peer's connection is reset: its receive fails, sends fail.
    Reset { peer: usize },
    /// The peer reads this many more bytes of what the server sends.
    Read { peer: usize, bytes: usize },
    /// Nothing happens for this long.
    Sleep(Duration),
    /// Ends the current wait: what happened so far is reported.
    Turn,
    /// The test does something on the server's side (a `Handle` call).
    Host(Box<dyn FnOnce()>),
    /// The next wait fails, as a broken ring would.
    Fail,
}

/// The receive side of one peer, as the loop has asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum Recv {
    #[default]
    Idle,
    Armed,
    Cancelling,
}

/// One simulated client and what the server did to it.
#[derive(Default)]
pub(crate) struct Peer {
    pub(crate) addr: Option<SocketAddr>,
    /// The driver handed the loop its connection.
    pub(crate) accepted: bool,
    /// Written by the peer, not yet read by the server.
    inbound: VecDeque<Vec<u8>>,
    eof: bool,
    pub(crate) reset: bool,
    /// Bytes the peer will still read.
    window: usize,
    /// Everything the server wrote to the peer.
    pub(crate) received: Vec<u8>,
    /// A send was cancelled (or failed) with bytes left: what arrived may
    /// be cut short.
    pub(crate) cut: bool,
    recv: Recv,
    /// A late buffer was reported for the receive being cancelled.
    late: bool,
    send: Option<Box<SendBatch>>,
    connecting: bool,
    cancel: bool,
    /// When the server read from this peer (or accepted it): the turn
    /// (see `World::turns`) and the time.
    pub(crate) reads: Vec<(u64, Instant)>,
}

impl Peer {
    fn busy(&self) -> usize {
        (self.recv != Recv::Idle) as usize + self.send.is_some() as usize + self.connecting as usize
    }
}

/// What the script and the loop did, kept for the test after the run.
#[derive(Default)]
pub(crate) struct World {
    pub(crate) peers: Vec<Peer>,
    /// Turns the loop waited through.
    pub(crate) turns: u64,
    /// The script ran out and the end hook ran.
    pub(crate) ended: bool,
    /// A wait failed (`Op::Fail`).
    pub(crate) failed: bool,
}

impl World {
    pub(crate) fn peer_by_addr(&self, addr: SocketAddr) -> Option<&Peer> {
        self.peers.iter().find(|p| p.addr == Some(addr))
    }
}

/// The address of client number `n`: one address per client, so per-IP
/// caps never merge two.
pub(crate) fn client_addr(n: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (n >> 8) as u8, n as u8], 1000 + n as u16))
}

/// How the scripted driver behaves where a real kernel has a choice.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Quirks {
    /// The most bytes one `Received` carries (a receive buffer's size).
    pub(crate) chunk: usize,
    /// The most bytes one send writes.
    pub(crate) max_write: usize,
    /// A receive being cancelled still reports one more buffer first, and
    /// the end of the stream if that was the last, as completions already
    /// queued would.
    pub(crate) late_data: bool,
    /// Buffers still reported in the turn the loop answered `Flow::Pause`,
    /// as io_uring reports what its multishot receive had queued (0: none,
    /// as poll and IOCP).
    pub(crate) after_pause: usize,
}

const MAX_TURNS: u64 = 200_000;
/// Received events per slot per turn, as the poll backend's bound.
const READS_PER_TURN: usize = 16;

pub(crate) struct Driver {
    clock: Clock,
    quirks: Quirks,
    ops: VecDeque<Op>,
    /// Runs once when the script is exhausted (the test posts its shutdown).
    end: Option<Box<dyn FnOnce()>>,
    world: Rc<RefCell<World>>,
    woken: Arc<AtomicBool>,
    listening: bool,
    unlisten: bool,
    /// Peers connected but not yet accepted.
    backlog: VecDeque<usize>,
    /// Which peer each placeholder descriptor stands for, and each slot.
    by_fd: HashMap<RawFd, usize>,
    by_slot: HashMap<u32, usize>,
    /// The peer of each client the script connected, in order.
    clients: Vec<usize>,
    fail: bool,
}

/// Wakes the scripted driver (another thread posted to its loop).
#[derive(Clone, Debug)]
pub(crate) struct Waker(Arc<AtomicBool>);

impl Waker {
    pub(crate) fn wake(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A descriptor the loop can own and close; nothing is done with it.
pub(crate) fn placeholder() -> Socket {
    Socket::new(Domain::UNIX, Type::STREAM, None).expect("a placeholder socket")
}

impl Driver {
    pub(crate) fn new(
        clock: Clock,
        quirks: Quirks,
        ops: Vec<Op>,
        end: Box<dyn FnOnce()>,
        world: Rc<RefCell<World>>,
    ) -> Driver {
        Driver {
            clock,
            quirks,
            ops: ops.into(),
            end: Some(end),
            world,
            woken: Arc::new(AtomicBool::new(false)),
            listening: false,
            unlisten: false,
            backlog: VecDeque::new(),
            by_fd: HashMap::new(),
            by_slot: HashMap::new(),
            clients: Vec::new(),
            fail: false,
        }
    }

    pub(crate) fn waker(&self) -> Waker {
        Waker(self.woken.clone())
    }

    pub(crate) fn listen(&mut self, listener: u32, _socket: &Listener) {
        assert_eq!(listener, 0, "the scripted driver has one listener");
        assert!(!self.listening, "listen while listening");
        self.listening = true;
    }

    pub(crate) fn unlisten(&mut self, _listener: u32, _socket: &Listener) {
        assert!(self.listening, "unlisten while not listening");
        self.unlisten = true;
    }

    /// The peer a slot's socket stands for.
    fn peer_of(&mut self, slot: u32, socket: &Socket) -> usize {
        let peer = *self
            .by_fd
            .get(&socket.as_raw_fd())
            .unwrap_or_else(|| panic!("slot {slot}: a socket the driver never gave out"));
        self.by_slot.insert(slot, peer);
        peer
    }

    pub(crate) fn recv(&mut self, slot: u32, socket: &Socket) {
        let peer = self.peer_of(slot, socket);
        let mut world = self.world.borrow_mut();
        let p = &mut world.peers[peer];
        assert_eq!(
            p.recv,
            Recv::Idle,
            "slot {slot}: recv while a receive is in flight"
        );
        p.recv = Recv::Armed;
    }

    pub(crate) fn send(&mut self, slot: u32, socket: &Socket, batch: Box<SendBatch>) {
        let peer = self.peer_of(slot, socket);
        let mut world = self.world.borrow_mut();
        let p = &mut world.peers[peer];
        assert!(p.send.is_none(), "slot {slot}: a second send in flight");
        assert!(!batch.is_empty(), "slot {slot}: an empty send");
        p.send = Some(batch);
    }

    pub(crate) fn connect(&mut self, slot: u32, socket: &Socket, addr: SocketAddr) {
        let mut world = self.world.borrow_mut();
        world.peers.push(Peer {
            addr: Some(addr),
            connecting: true,
            ..Peer::default()
        });
        let peer = world.peers.len() - 1;
        self.by_fd.insert(socket.as_raw_fd(), peer);
        self.by_slot.insert(slot, peer);
    }

    pub(crate) fn cancel(&mut self, slot: u32, socket: &Socket) {
        let peer = self.peer_of(slot, socket);
        let mut world = self.world.borrow_mut();
        let p = &mut world.peers[peer];
        p.cancel = true;
        if p.recv == Recv::Armed {
            p.recv = Recv::Cancelling;
        }
    }

    pub(crate) fn cancel_recv(&mut self, slot: u32, socket: &Socket) {
        let peer = self.peer_of(slot, socket);
        let mut world = self.world.borrow_mut();
        let p = &mut world.peers[peer];
        if p.recv == Recv::Armed {
            p.recv = Recv::Cancelling;
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        let world = self.world.borrow_mut();
        let peers: usize = world.peers.iter().map(Peer::busy).sum();
        peers + self.listening as usize
    }

    pub(crate) fn poll(
        &mut self,
        timeout: Option<Duration>,
        mut f: impl FnMut(Event<'_>) -> Flow,
    ) -> io::Result<()> {
        {
            let mut world = self.world.borrow_mut();
            world.turns += 1;
            self.clock.turns.store(world.turns, Ordering::Relaxed);
            assert!(
                world.turns < MAX_TURNS,
                "the loop is still turning after {MAX_TURNS} waits"
            );
        }
        if std::mem::take(&mut self.fail) {
            self.world.borrow_mut().failed = true;
            return Err(io::Error::other("the scripted driver failed"));
        }
        let slept = self.run_ops(timeout);
        if self.ops.is_empty() && !self.ready() {
            if let Some(end) = self.end.take() {
                let mut world = self.world.borrow_mut();
                world.ended = true;
                // From now on every peer reads whatever it is sent.
                for p in &mut world.peers {
                    p.window = usize::MAX;
                }
                drop(world);
                end();
            }
        }
        if self.report(&mut f) || slept {
            return Ok(());
        }
        if !self.ops.is_empty() || self.end.is_some() {
            return Ok(());
        }
        match timeout {
            Some(t) => self.clock.advance(t),
            None => {
                let world = self.world.borrow_mut();
                let busy: Vec<usize> = (0..world.peers.len())
                    .filter(|&i| world.peers[i].busy() > 0)
                    .collect();
                panic!(
                    "the loop waits forever: script done, nothing to report, \
                     no timer; peers with operations in flight: {busy:?}"
                );
            }
        }
        Ok(())
    }

    /// Runs `f` on client number `n` (as the script counts them), if it
    /// has connected.
    fn with_client(&self, n: usize, f: impl FnOnce(&mut Peer)) {
        if let Some(&peer) = self.clients.get(n) {
            f(&mut self.world.borrow_mut().peers[peer]);
        }
    }

    /// Whether anything is ready to report.
    fn ready(&self) -> bool {
        if self.woken.load(Ordering::Acquire) || self.unlisten {
            return true;
        }
        if self.listening && !self.backlog.is_empty() {
            return true;
        }
        let world = self.world.borrow_mut();
        world.peers.iter().any(|p| {
            p.connecting
                || p.recv == Recv::Cancelling
                || (p.recv == Recv::Armed && (p.reset || p.eof || !p.inbound.is_empty()))
                || (p.send.is_some() && (p.reset || p.cancel || p.window > 0))
        })
    }

    /// Runs script steps up to the next `Turn` or `Sleep`; returns whether
    /// the wait slept (virtual time passed).
    fn run_ops(&mut self, timeout: Option<Duration>) -> bool {
        while let Some(op) = self.ops.pop_front() {
            match op {
                Op::Turn => return false,
                Op::Sleep(d) => {
                    if self.ready() {
                        // A wait returns as soon as something is ready.
                        self.ops.push_front(Op::Sleep(d));
                        return false;
                    }
                    let step = timeout.map_or(d, |t| t.min(d));
                    self.clock.advance(step);
                    if step < d {
                        self.ops.push_front(Op::Sleep(d - step));
                    }
                    return true;
                }
                Op::Connect => {
                    let mut world = self.world.borrow_mut();
                    let n = world.peers.len();
                    world.peers.push(Peer {
                        addr: Some(client_addr(self.clients.len())),
                        ..Peer::default()
                    });
                    self.clients.push(n);
                    self.backlog.push_back(n);
                }
                Op::Write { peer, bytes } => self.with_client(peer, |p| {
                    if !p.eof && !p.reset && !bytes.is_empty() {
                        p.inbound.push_back(bytes);
                    }
                }),
                Op::Eof { peer } => self.with_client(peer, |p| p.eof = true),
                Op::Reset { peer } => self.with_client(peer, |p| {
                    p.reset = true;
                    p.inbound.clear();
                }),
                Op::Read { peer, bytes } => {
                    self.with_client(peer, |p| p.window = p.window.saturating_add(bytes))
                }
                Op::Host(action) => action(),
                Op::Fail => self.fail = true,
            }
        }
        false
    }

    /// Reports everything ready, in a fixed order; returns whether anything
    /// was reported.
    fn report(&mut self, f: &mut impl FnMut(Event<'_>) -> Flow) -> bool {
        let mut any = false;
        if self.woken.swap(false, Ordering::AcqRel) {
            f(Event::Woken);
            any = true;
        }
        if std::mem::take(&mut self.unlisten) {
            self.listening = false;
            f(Event::AcceptEnded {
                listener: 0,
                error: None,
            });
            any = true;
        }
        while self.listening {
            let Some(peer) = self.backlog.pop_front() else {
                break;
            };
            let socket = placeholder();
            self.by_fd.insert(socket.as_raw_fd(), peer);
            let now = self.clock.now();
            let addr = {
                let mut world = self.world.borrow_mut();
                let turn = world.turns;
                world.peers[peer].reads.push((turn, now));
                world.peers[peer].accepted = true;
                world.peers[peer].addr
            };
            f(Event::Accepted {
                listener: 0,
                socket,
                peer: addr,
            });
            any = true;
        }
        let mut slots: Vec<(u32, usize)> = self.by_slot.iter().map(|(&s, &p)| (s, p)).collect();
        slots.sort_unstable();
        for (slot, peer) in slots {
            any |= self.report_peer(slot, peer, f);
        }
        any
    }

    fn report_peer(
        &mut self,
        slot: u32,
        peer: usize,
        f: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> bool {
        let mut any = false;
        // Each event is taken out of the world before the loop sees it:
        // the loop's callbacks may call back into the driver.
        let connected = {
            let mut world = self.world.borrow_mut();
            let p = &mut world.peers[peer];
            std::mem::take(&mut p.connecting).then(|| {
                let port = p.addr.map_or(0, |a| a.port());
                if std::mem::take(&mut p.cancel) {
                    Err(io::Error::from_raw_os_error(libc::ECANCELED))
                } else if port % 2 == 1 {
                    Err(io::ErrorKind::ConnectionRefused.into())
                } else {
                    Ok(())
                }
            })
        };
        if let Some(result) = connected {
            f(Event::Connected { slot, result });
            any = true;
        }
        let mut after_pause = None;
        for _ in 0..READS_PER_TURN {
            let (event, data) = self.next_recv(peer);
            match event {
                None => break,
                Some(Some(why)) => {
                    f(Event::RecvEnded { slot, why });
                    any = true;
                    break;
                }
                Some(None) => {
                    any = true;
                    let flow = f(Event::Received { slot, data: &data });
                    if flow == Flow::Pause || after_pause.is_some() {
                        let left = after_pause.get_or_insert(self.quirks.after_pause);
                        if *left == 0 {
                            break;
                        }
                        *left -= 1;
                    }
                }
            }
        }
        let sent = {
            let mut world = self.world.borrow_mut();
            let max_write = self.quirks.max_write;
            let p = &mut world.peers[peer];
            match p.send.take() {
                Some(batch) if p.reset => Some((batch, Err(io::ErrorKind::ConnectionReset.into()))),
                Some(batch) if p.cancel => {
                    p.cut = true;
                    Some((batch, Err(io::Error::from_raw_os_error(libc::ECANCELED))))
                }
                Some(batch) if p.window > 0 => {
                    let mut n = 0;
                    let mut skip = batch.offset;
                    for buf in &batch.bufs {
                        let room = p.window.min(max_write) - n;
                        let take = (buf.len() - skip).min(room);
                        p.received.extend_from_slice(&buf[skip..skip + take]);
                        n += take;
                        skip = 0;
                        if n == p.window.min(max_write) {
                            break;
                        }
                    }
                    p.window -= n;
                    Some((batch, Ok(n)))
                }
                other => {
                    p.send = other;
                    None
                }
            }
        };
        if let Some((batch, result)) = sent {
            f(Event::Sent {
                slot,
                batch,
                result,
            });
            any = true;
        }
        any
    }

    /// The next receive event of `peer`: `None` when there is none,
    /// `Some(None)` for data (returned beside), `Some(Some(why))` for its end.
    fn next_recv(&mut self, peer: usize) -> (Option<Option<RecvEnd>>, Vec<u8>) {
        let now = self.clock.now();
        let chunk = self.quirks.chunk.max(1);
        let mut world = self.world.borrow_mut();
        let turn = world.turns;
        let p = &mut world.peers[peer];
        let mut data = || {
            let front = p.inbound.front_mut()?;
            let take = front.len().min(chunk);
            let data: Vec<u8> = front.drain(..take).collect();
            if front.is_empty() {
                p.inbound.pop_front();
            }
            p.reads.push((turn, now));
            Some(data)
        };
        match p.recv {
            Recv::Idle => (None, Vec::new()),
            Recv::Cancelling => {
                if self.quirks.late_data && !p.late {
                    if let Some(data) = data() {
                        // One buffer, then the cancel completes.
                        p.late = true;
                        return (Some(None), data);
                    }
                }
                p.late = false;
                p.recv = Recv::Idle;
                if self.quirks.late_data && p.eof && p.inbound.is_empty() {
                    // The end of the stream was queued before the cancel.
                    return (Some(Some(RecvEnd::Eof)), Vec::new());
                }
                (Some(Some(RecvEnd::Cancelled)), Vec::new())
            }
            Recv::Armed => {
                if p.reset {
                    p.recv = Recv::Idle;
                    let e = io::ErrorKind::ConnectionReset.into();
                    return (Some(Some(RecvEnd::Error(e))), Vec::new());
                }
                if let Some(data) = data() {
                    return (Some(None), data);
                }
                if p.eof {
                    p.recv = Recv::Idle;
                    return (Some(Some(RecvEnd::Eof)), Vec::new());
                }
                (None, Vec::new())
            }
        }
    }
}
