//! One event loop: a thread that owns a driver, a slab of connections, and
//! every callback of those connections.
//!
//! A turn of the loop: wait for completions and handle them (callbacks run
//! here), take commands posted by other threads, expire deadlines, then move
//! every touched connection forward (start sends, re-arm receives, close).
//! Submissions made during the turn reach the kernel together at the start
//! of the next wait.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::codec::{FrameError, FrameReader, Framing};
use crate::conn::{Conn, ConnCtl};
use crate::error::CloseReason;
use crate::handler::{Accept, Handler};
use crate::id::{next_generation, ConnId};
use crate::mailbox::Command;
use crate::server::{Handle, LoopShared};
use crate::sys::{self, Driver, DriverConfig, Event, Listener, RecvEnd, SendBatch, Socket};

/// What a loop is started with.
pub(crate) struct LoopConfig {
    pub(crate) index: usize,
    pub(crate) driver: DriverConfig,
    pub(crate) framing: Framing,
    pub(crate) max_slots: usize,
    pub(crate) nodelay: bool,
    pub(crate) high_water: usize,
    pub(crate) close_linger: Duration,
}

/// How long accepting pauses after an error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// An outbound connect is in flight.
    Connecting,
    /// Callbacks run; sends are accepted.
    Open,
    /// `on_close` has run; flushing, then waiting for the peer, then
    /// waiting for in-flight operations to end before the slot is freed.
    Closing,
}

struct Slot<S> {
    state: S,
    ctl: ConnCtl,
    reader: FrameReader,
    socket: Socket,
    generation: u32,
    peer: SocketAddr,
    phase: Phase,
    outbound: bool,
    /// A receive is in flight (it may write into ring buffers).
    recv_armed: bool,
    /// A send of `batch` is in flight: the kernel reads it.
    sending: bool,
    /// Buffers being sent, or left over from a short send.
    batch: Option<Box<SendBatch>>,
    /// The peer sent EOF or the connection failed: nothing more to read.
    peer_done: bool,
    /// Closing: deliver what is queued before closing.
    flush: bool,
    /// Closing: the write side has been shut (FIN queued after the data).
    fin_sent: bool,
    /// Closing: in-flight operations have been asked to end.
    cancelled: bool,
    /// Closing: when to stop waiting for the flush or the peer.
    deadline: Instant,
}

struct ListenerState {
    socket: Option<Listener>,
    accepting: bool,
    retry_at: Option<Instant>,
}

/// Per-loop counters, published to `LoopStats` once per turn.
#[derive(Default)]
struct Counters {
    open: u64,
    accepted: u64,
    refused: u64,
    closed: u64,
    messages_in: u64,
    messages_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    recv_buffer_waits: u64,
}

pub(crate) struct EventLoop<H: Handler> {
    // Declared first so it is dropped first: nothing of the kernel's may
    // outlive the memory in `core` (see `Drop`).
    driver: Driver,
    core: Core<H>,
}

struct Core<H: Handler> {
    index: usize,
    handler: Arc<H>,
    handle: Handle,
    framing: Framing,
    max_slots: usize,
    nodelay: bool,
    high_water: usize,
    close_linger: Duration,
    conns: Slab<Slot<H::State>>,
    /// The last generation given out per slot, kept across reuse.
    generations: Vec<u32>,
    listeners: Vec<ListenerState>,
    /// Slots to move forward at the end of the turn.
    touched: Vec<u32>,
    /// Slots in the closing phase (for their deadlines).
    closing: Vec<u32>,
    commands: Vec<Command>,
    /// Boxed on purpose: a batch in flight must not move (the kernel reads
    /// its message header), and boxes move between slots and this pool.
    #[allow(clippy::vec_box)]
    spare_batches: Vec<Box<SendBatch>>,
    shutdown: Option<Instant>,
    counters: Counters,
}

impl<H: Handler> EventLoop<H> {
    pub(crate) fn new(
        config: LoopConfig,
        handler: Arc<H>,
        handle: Handle,
        listeners: Vec<Listener>,
    ) -> std::io::Result<Self> {
        let mut driver = Driver::new(&config.driver)?;
        let listeners: Vec<ListenerState> = listeners
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                driver.listen(i as u32, &socket);
                ListenerState {
                    socket: Some(socket),
                    accepting: true,
                    retry_at: None,
                }
            })
            .collect();
        handle.shared.loops[config.index]
            .mailbox
            .set_waker(driver.waker());
        Ok(EventLoop {
            driver,
            core: Core {
                index: config.index,
                handler,
                handle,
                framing: config.framing,
                max_slots: config.max_slots,
                nodelay: config.nodelay,
                high_water: config.high_water,
                close_linger: config.close_linger,
                conns: Slab::new(),
                generations: Vec::new(),
                listeners,
                touched: Vec::new(),
                closing: Vec::new(),
                commands: Vec::new(),
                spare_batches: Vec::new(),
                shutdown: None,
                counters: Counters::default(),
            },
        })
    }

    pub(crate) fn run(mut self) {
        loop {
            let timeout = self.core.next_timeout();
            let EventLoop { driver, core } = &mut self;
            if let Err(e) = driver.poll(timeout, |event| core.on_event(event)) {
                tracing::error!(loop_index = core.index, error = %e, "event loop failed");
                break;
            }
            core.run_commands(driver);
            core.maintain(driver);
            core.publish();
            if core.finished(driver) {
                break;
            }
        }
    }
}

impl<H: Handler> Drop for EventLoop<H> {
    fn drop(&mut self) {
        if self.driver.in_flight() > 0 {
            // Only after a panic or a driver failure: the kernel may still
            // read send batches owned by the slots, so they must not be
            // freed. Leak them with the slab.
            std::mem::forget(std::mem::take(&mut self.core.conns));
        }
    }
}

impl<H: Handler> Core<H> {
    fn shared(&self) -> &LoopShared {
        &self.handle.shared.loops[self.index]
    }

    fn on_event(&mut self, event: Event<'_>) {
        match event {
            Event::Accepted { listener, socket } => self.accepted(listener, socket),
            Event::AcceptEnded { listener, error } => {
                let l = &mut self.listeners[listener as usize];
                l.accepting = false;
                if self.shutdown.is_some() {
                    l.socket = None;
                } else if let Some(e) = error {
                    tracing::warn!(error = %e, "accept failed; pausing accepts");
                    l.retry_at = Some(Instant::now() + ACCEPT_BACKOFF);
                } else {
                    l.retry_at = Some(Instant::now());
                }
            }
            Event::Received { slot, data } => self.received(slot, data),
            Event::RecvEnded { slot, why } => self.recv_ended(slot, why),
            Event::Sent { slot, result } => self.sent(slot, result),
            Event::Connected { slot, result } => self.connected(slot, result),
            Event::Woken => {}
        }
    }

    fn accepted(&mut self, _listener: u32, socket: Socket) {
        if self.shutdown.is_some() || self.conns.len() >= self.max_slots {
            self.counters.refused += 1;
            return; // dropping the socket closes it
        }
        let peer = match sys::peer_addr(&socket) {
            Ok(peer) => peer,
            Err(_) => return, // already reset by the peer
        };
        sys::prepare(&socket, self.nodelay);
        let key = self.insert(socket, peer, Phase::Open, false);
        self.open(key);
    }

    fn insert(&mut self, socket: Socket, peer: SocketAddr, phase: Phase, outbound: bool) -> u32 {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if self.generations.len() <= key {
            self.generations.resize(key + 1, 0);
        }
        let generation = next_generation(self.generations[key]);
        self.generations[key] = generation;
        entry.insert(Slot {
            state: H::State::default(),
            ctl: ConnCtl::new(self.framing.reader()),
            reader: self.framing.reader(),
            socket,
            generation,
            peer,
            phase,
            outbound,
            recv_armed: false,
            sending: false,
            batch: None,
            peer_done: false,
            flush: false,
            fin_sent: false,
            cancelled: false,
            deadline: Instant::now(),
        });
        key as u32
    }

    /// A connection became usable: run `on_open` and start receiving.
    fn open(&mut self, key: u32) {
        self.counters.accepted += 1;
        self.counters.open += 1;
        let id = self.id_of(key);
        self.shared().live.set_open(key, id.generation());
        let handler = self.handler.clone();
        let accept = self.with_conn(key, |conn| handler.on_open(conn));
        if accept == Accept::No {
            // Refused: what on_open queued is still flushed; no on_close.
            self.shared().live.set_closed(key);
            self.counters.open -= 1;
            self.start_closing(key, true);
            return;
        }
        self.touch(key);
    }

    fn id_of(&self, key: u32) -> ConnId {
        ConnId::new(self.index, key, self.conns[key as usize].generation)
    }

    /// Runs `f` with a `Conn` view of slot `key`.
    fn with_conn<R>(&mut self, key: u32, f: impl FnOnce(&mut Conn<'_, H::State>) -> R) -> R {
        let id = self.id_of(key);
        let slot = &mut self.conns[key as usize];
        let mut conn = Conn {
            id,
            slot: key,
            peer: slot.peer,
            outbound: slot.outbound,
            high_water: self.high_water,
            state: &mut slot.state,
            ctl: &mut slot.ctl,
            touched: &mut self.touched,
            messages_out: &mut self.counters.messages_out,
            handle: &self.handle,
        };
        f(&mut conn)
    }

    fn received(&mut self, key: u32, data: &[u8]) {
        self.counters.bytes_in += data.len() as u64;
        let id = self.id_of(key);
        let slot = &mut self.conns[key as usize];
        if slot.phase != Phase::Open {
            return; // closing: the bytes are read only to be discarded
        }
        let handler = &*self.handler;
        let messages = &mut self.counters.messages_in;
        let mut conn = Conn {
            messages_out: &mut self.counters.messages_out,
            id,
            slot: key,
            peer: slot.peer,
            outbound: slot.outbound,
            high_water: self.high_water,
            state: &mut slot.state,
            ctl: &mut slot.ctl,
            touched: &mut self.touched,
            handle: &self.handle,
        };
        let result = slot.reader.feed(data, |msg| {
            *messages += 1;
            handler.on_message(&mut conn, msg);
            if conn.ctl.close_request.is_some() {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        });
        if let Err(e) = result {
            let reason = match e {
                FrameError::TooLarge { len, max } => CloseReason::FrameTooLarge { len, max },
                FrameError::Invalid(why) => CloseReason::Protocol(why),
            };
            tracing::debug!(conn = %id, ?reason, "closing on a framing error");
            self.close(key, reason, false);
        }
        self.touch(key);
    }

    fn recv_ended(&mut self, key: u32, why: RecvEnd) {
        let slot = &mut self.conns[key as usize];
        slot.recv_armed = false;
        match why {
            RecvEnd::Eof => {
                slot.peer_done = true;
                if slot.phase == Phase::Open {
                    self.close(key, CloseReason::PeerClosed, true);
                }
            }
            RecvEnd::Error(e) => {
                slot.peer_done = true;
                slot.flush = false;
                if slot.phase == Phase::Open {
                    self.close(key, CloseReason::Io(e.kind()), false);
                }
            }
            RecvEnd::NoBuffers => self.counters.recv_buffer_waits += 1,
            RecvEnd::Cancelled | RecvEnd::Rearm => {}
        }
        self.touch(key);
    }

    fn sent(&mut self, key: u32, result: std::io::Result<usize>) {
        let slot = &mut self.conns[key as usize];
        slot.sending = false;
        let mut batch = slot.batch.take().expect("a send in flight owns a batch");
        match result {
            Ok(n) => {
                self.counters.bytes_out += n as u64;
                slot.ctl.unsent = slot.ctl.unsent.saturating_sub(n);
                batch.advance(n);
                if batch.is_empty() {
                    self.spare_batches.push(batch);
                } else {
                    slot.batch = Some(batch);
                }
            }
            Err(e) => {
                batch.bufs.clear();
                batch.offset = 0;
                self.spare_batches.push(batch);
                slot.ctl.out.clear();
                slot.ctl.unsent = 0;
                slot.flush = false;
                if slot.phase == Phase::Open {
                    self.close(key, CloseReason::Io(e.kind()), false);
                }
            }
        }
        self.touch(key);
    }

    fn connected(&mut self, key: u32, result: std::io::Result<()>) {
        let slot = &mut self.conns[key as usize];
        match result {
            Ok(()) if self.shutdown.is_none() => {
                sys::prepare(&slot.socket, self.nodelay);
                slot.phase = Phase::Open;
                self.open(key);
            }
            other => {
                let error = other
                    .err()
                    .unwrap_or_else(|| std::io::Error::other("shutting down"));
                let peer = slot.peer;
                self.conns.remove(key as usize);
                self.handler.on_connect_failed(peer, error);
            }
        }
    }

    /// Starts closing an open connection: `on_close` runs now, once.
    fn close(&mut self, key: u32, reason: CloseReason, flush: bool) {
        if self.conns[key as usize].phase != Phase::Open {
            return;
        }
        self.shared().live.set_closed(key);
        self.counters.closed += 1;
        self.counters.open -= 1;
        self.conns[key as usize].ctl.open = false;
        let handler = self.handler.clone();
        self.with_conn(key, |conn| handler.on_close(conn, reason));
        self.start_closing(key, flush);
    }

    fn start_closing(&mut self, key: u32, flush: bool) {
        let linger = self.close_linger;
        let until = match self.shutdown {
            Some(t) => t.min(Instant::now() + linger),
            None => Instant::now() + linger,
        };
        let slot = &mut self.conns[key as usize];
        slot.phase = Phase::Closing;
        slot.ctl.open = false;
        slot.flush = flush;
        if !slot.flush {
            slot.ctl.out.clear();
        }
        slot.deadline = until;
        self.closing.push(key);
        self.touch(key);
    }

    fn touch(&mut self, key: u32) {
        let slot = &mut self.conns[key as usize];
        if !slot.ctl.touched {
            slot.ctl.touched = true;
            self.touched.push(key);
        }
    }

    fn run_commands(&mut self, driver: &mut Driver) {
        if !self.shared().mailbox.has_pending() {
            return;
        }
        let mut commands = std::mem::take(&mut self.commands);
        self.shared().mailbox.take(&mut commands);
        for command in commands.drain(..) {
            match command {
                Command::Send(id, msg) => {
                    if let Some(key) = self.lookup(id) {
                        let slot = &mut self.conns[key as usize];
                        // Past the high-water mark the message is dropped;
                        // `Handle::send` could not know, being on another
                        // thread (back-pressure for it is a later feature).
                        if slot.ctl.send_shared(msg, self.high_water).is_ok() {
                            self.counters.messages_out += 1;
                            self.touch(key);
                        }
                    }
                }
                Command::Broadcast(wire) => {
                    for (key, slot) in self.conns.iter_mut() {
                        // A peer over its high-water mark misses the message
                        // rather than growing its queue without bound.
                        if slot.phase != Phase::Open || slot.ctl.unsent > self.high_water {
                            continue;
                        }
                        slot.ctl.send_encoded(wire.clone());
                        self.counters.messages_out += 1;
                        if !slot.ctl.touched {
                            slot.ctl.touched = true;
                            self.touched.push(key as u32);
                        }
                    }
                }
                Command::Disconnect(id) => {
                    if let Some(key) = self.lookup(id) {
                        self.close(key, CloseReason::Disconnected, true);
                    }
                }
                Command::Connect(addr) => self.connect(driver, addr),
                Command::Shutdown(until) => self.begin_shutdown(driver, until),
            }
        }
        self.commands = commands;
    }

    fn lookup(&self, id: ConnId) -> Option<u32> {
        let key = id.slot();
        match self.conns.get(key as usize) {
            Some(s) if s.generation == id.generation() && s.phase == Phase::Open => Some(key),
            _ => None,
        }
    }

    fn connect(&mut self, driver: &mut Driver, addr: SocketAddr) {
        if self.shutdown.is_some() {
            return;
        }
        if self.conns.len() >= self.max_slots {
            self.handler
                .on_connect_failed(addr, std::io::Error::other("max_connections reached"));
            return;
        }
        let socket = match sys::stream_socket(addr) {
            Ok(s) => s,
            Err(e) => return self.handler.on_connect_failed(addr, e),
        };
        let key = self.insert(socket, addr, Phase::Connecting, true);
        let slot = &mut self.conns[key as usize];
        driver.connect(key, &slot.socket, addr);
    }

    fn begin_shutdown(&mut self, driver: &mut Driver, until: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(until);
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if let Some(socket) = &l.socket {
                if l.accepting {
                    driver.unlisten(i as u32, socket);
                } else {
                    l.socket = None;
                }
            }
        }
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        for key in keys {
            match self.conns[key as usize].phase {
                Phase::Open => self.close(key, CloseReason::Shutdown, true),
                Phase::Connecting => {
                    let slot = &self.conns[key as usize];
                    driver.cancel(key, &slot.socket);
                }
                Phase::Closing => {
                    let slot = &mut self.conns[key as usize];
                    slot.deadline = slot.deadline.min(until);
                }
            }
        }
    }

    /// Expires deadlines, retries listeners and moves touched slots forward.
    fn maintain(&mut self, driver: &mut Driver) {
        let now = Instant::now();
        for i in 0..self.listeners.len() {
            let l = &mut self.listeners[i];
            if let (Some(at), Some(socket)) = (l.retry_at, &l.socket) {
                if at <= now && self.shutdown.is_none() {
                    l.retry_at = None;
                    l.accepting = true;
                    driver.listen(i as u32, socket);
                }
            }
        }
        let conns = &self.conns;
        self.closing.retain(|&k| {
            conns
                .get(k as usize)
                .is_some_and(|s| s.phase == Phase::Closing)
        });
        self.closing.dedup();
        for i in 0..self.closing.len() {
            let key = self.closing[i];
            let slot = &mut self.conns[key as usize];
            if slot.deadline <= now && (slot.flush || !slot.peer_done) {
                // Out of time: drop what is unsent and stop waiting for
                // the peer.
                slot.flush = false;
                slot.peer_done = true;
                slot.ctl.out.clear();
                self.touch(key);
            }
        }
        let mut touched = std::mem::take(&mut self.touched);
        for key in touched.drain(..) {
            if let Some(slot) = self.conns.get_mut(key as usize) {
                slot.ctl.touched = false;
                self.advance(driver, key);
            }
        }
        if self.touched.is_empty() {
            self.touched = touched;
        }
    }

    /// Moves one connection forward: carry out a requested close, start a
    /// send, re-arm a receive, or finish closing.
    fn advance(&mut self, driver: &mut Driver, key: u32) {
        let slot = &mut self.conns[key as usize];
        if slot.phase == Phase::Open {
            if let Some(reason) = slot.ctl.close_request.take() {
                self.close(key, reason, true);
                return; // `close` touched it again
            }
        }
        let slot = &mut self.conns[key as usize];
        match slot.phase {
            Phase::Connecting => {}
            Phase::Open => {
                self.start_send(driver, key);
                let slot = &mut self.conns[key as usize];
                if !slot.recv_armed && !slot.peer_done {
                    driver.recv(key, &slot.socket);
                    slot.recv_armed = true;
                }
            }
            Phase::Closing => {
                if slot.flush {
                    self.start_send(driver, key);
                    let slot = &self.conns[key as usize];
                    if slot.sending || !slot.ctl.out.is_empty() || slot.batch.is_some() {
                        return; // still flushing
                    }
                }
                let slot = &mut self.conns[key as usize];
                if !slot.fin_sent && !slot.peer_done {
                    // Everything queued is with the kernel: FIN follows it.
                    // Then keep reading (and discarding) until the peer
                    // closes too, so that no unread data turns our close
                    // into a reset that could destroy what we sent.
                    sys::shutdown_write(&slot.socket);
                    slot.fin_sent = true;
                }
                if !slot.peer_done {
                    if !slot.recv_armed {
                        driver.recv(key, &slot.socket);
                        slot.recv_armed = true;
                    }
                    return;
                }
                if slot.recv_armed || slot.sending {
                    if !slot.cancelled {
                        slot.cancelled = true;
                        driver.cancel(key, &slot.socket);
                    }
                    return;
                }
                self.free(key);
            }
        }
    }

    fn start_send(&mut self, driver: &mut Driver, key: u32) {
        let slot = &mut self.conns[key as usize];
        if slot.sending || (slot.ctl.out.is_empty() && slot.batch.is_none()) {
            return;
        }
        let mut batch = slot
            .batch
            .take()
            .or_else(|| self.spare_batches.pop())
            .unwrap_or_default();
        slot.ctl.out.fill(&mut batch);
        driver.send(key, &slot.socket, &mut batch);
        slot.batch = Some(batch);
        slot.sending = true;
    }

    /// Releases a slot whose operations have all ended.
    fn free(&mut self, key: u32) {
        let slot = self.conns.remove(key as usize);
        debug_assert!(!slot.recv_armed && !slot.sending);
        if let Some(mut batch) = slot.batch {
            batch.bufs.clear();
            batch.offset = 0;
            self.spare_batches.push(batch);
        }
        // Its entry in `closing` is dropped by the next `maintain`.
        // Dropping `slot.socket` closes the descriptor.
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for l in &self.listeners {
            if let Some(t) = l.retry_at {
                consider(t);
            }
        }
        for &key in &self.closing {
            match self.conns.get(key as usize) {
                Some(s) if s.phase == Phase::Closing && (s.flush || !s.peer_done) => {
                    consider(s.deadline)
                }
                _ => {}
            }
        }
        if let Some(t) = self.shutdown {
            consider(t);
        }
        next.map(|t| t.saturating_duration_since(now))
    }

    fn publish(&self) {
        let s = &self.shared().stats;
        let c = &self.counters;
        s.open.store(c.open, Ordering::Relaxed);
        s.accepted.store(c.accepted, Ordering::Relaxed);
        s.refused.store(c.refused, Ordering::Relaxed);
        s.closed.store(c.closed, Ordering::Relaxed);
        s.messages_in.store(c.messages_in, Ordering::Relaxed);
        s.messages_out.store(c.messages_out, Ordering::Relaxed);
        s.bytes_in.store(c.bytes_in, Ordering::Relaxed);
        s.bytes_out.store(c.bytes_out, Ordering::Relaxed);
        s.recv_buffer_waits
            .store(c.recv_buffer_waits, Ordering::Relaxed);
    }

    fn finished(&self, driver: &Driver) -> bool {
        self.shutdown.is_some()
            && self.conns.is_empty()
            && self.listeners.iter().all(|l| l.socket.is_none())
            && driver.in_flight() == 0
    }
}
