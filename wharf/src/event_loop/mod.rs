//! One event loop: a thread that owns a driver, a slab of connections, and
//! every callback of those connections.
//!
//! A turn of the loop: wait for completions and handle them (callbacks run
//! here), take commands posted by other threads, fire due timers, then move
//! every touched connection forward (start sends, pause or re-arm receives,
//! close). Submissions made during the turn reach the kernel together at the
//! start of the next wait.
//!
//! `mod.rs` holds the loop and what concerns all connections (listeners,
//! commands, timers, counters); `conn_life.rs` holds one connection's life.

mod conn_life;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::codec::{FrameReader, Framing};
use crate::conn::ConnCtl;
use crate::error::CloseReason;
use crate::handler::Handler;
use crate::id::ConnId;
use crate::limits::Limits;
use crate::mailbox::Command;
use crate::server::{Handle, LoopShared};
use crate::sys::{self, Driver, DriverConfig, Event, Listener, SendBatch, Socket};
use crate::timer::{Entry, Wheel};

/// What a loop is started with.
pub(crate) struct LoopConfig {
    pub(crate) index: usize,
    pub(crate) driver: DriverConfig,
    pub(crate) framing: Framing,
    pub(crate) socket_options: sys::SocketOptions,
    pub(crate) limits: Limits,
    /// The loops share listening sockets whose accepts the kernel does not
    /// spread: hand accepted connections round-robin to every loop.
    pub(crate) spread_accepts: bool,
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
    /// A cancel of the receive alone is on its way (pausing).
    recv_cancelling: bool,
    /// Reading is paused: the send queue is over its high-water mark.
    paused: bool,
    /// Over the high-water mark since the last drain: `on_drain` is owed.
    congested: bool,
    /// A send of `batch` is in flight: the kernel reads it.
    sending: bool,
    /// Buffers being sent, or left over from a short send.
    batch: Option<Box<SendBatch>>,
    /// Bytes received while delivery was paused by back-pressure, kept to
    /// be delivered when the send queue drains (at most about one receive
    /// buffer: reading stops as soon as the mark is crossed).
    stash: Vec<u8>,
    /// At least one whole message has arrived.
    got_message: bool,
    /// The peer sent EOF or the connection failed: nothing more to read.
    peer_done: bool,
    /// Closing: deliver what is queued before closing.
    flush: bool,
    /// Closing: the write side has been shut (FIN queued after the data).
    fin_sent: bool,
    /// Closing: in-flight operations have been asked to end.
    cancelled: bool,
    /// Ticks (of the timer wheel) of the last activity, for timeouts.
    opened_tick: u64,
    last_recv_tick: u64,
    last_write_tick: u64,
    /// The tick of this slot's live wheel entry (older entries are stale).
    timer: Option<u64>,
    /// Closing: when to stop waiting for the flush (the shutdown deadline,
    /// if shutting down) or, once FIN is sent, for the peer (the linger).
    deadline: Option<Instant>,
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
    timed_out: u64,
    broadcast_skipped: u64,
    accept_pauses: u64,
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
    socket_options: sys::SocketOptions,
    limits: Limits,
    spread_accepts: bool,
    /// The loop the next accepted connection goes to, when spreading.
    next_adopter: usize,
    conns: Slab<Slot<H::State>>,
    /// The last generation given out per slot, kept across reuse.
    generations: Vec<u32>,
    listeners: Vec<ListenerState>,
    /// A spare descriptor, given up for a moment when the process runs out
    /// so that a waiting client can be accepted and closed, not left hanging.
    reserve: sys::Reserve,
    /// Slots to move forward at the end of the turn.
    touched: Vec<u32>,
    wheel: Wheel,
    due: Vec<Entry>,
    /// The wheel tick of this turn.
    now_tick: u64,
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
        let now = Instant::now();
        Ok(EventLoop {
            driver,
            core: Core {
                index: config.index,
                handler,
                handle,
                framing: config.framing,
                socket_options: config.socket_options,
                spread_accepts: config.spread_accepts,
                next_adopter: config.index,
                limits: config.limits,
                conns: Slab::new(),
                generations: Vec::new(),
                listeners,
                reserve: sys::Reserve::new(),
                touched: Vec::new(),
                wheel: Wheel::new(now),
                due: Vec::new(),
                now_tick: 0,
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
            // The clock is read once per batch of events, after the wait.
            let mut stamped = false;
            let result = driver.poll(timeout, |event| {
                if !stamped {
                    stamped = true;
                    core.now_tick = core.wheel.tick_floor(Instant::now());
                }
                core.on_event(event)
            });
            if let Err(e) = result {
                tracing::error!(loop_index = core.index, error = %e, "event loop failed");
                break;
            }
            core.now_tick = core.wheel.tick_floor(Instant::now());
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
            Event::AcceptEnded { listener, error } => self.accept_ended(listener, error),
            Event::Received { slot, data } => self.received(slot, data),
            Event::RecvEnded { slot, why } => self.recv_ended(slot, why),
            Event::Sent { slot, result } => self.sent(slot, result),
            Event::Connected { slot, result } => self.connected(slot, result),
            Event::Woken => {}
        }
    }

    fn accept_ended(&mut self, listener: u32, error: Option<std::io::Error>) {
        let l = &mut self.listeners[listener as usize];
        l.accepting = false;
        if self.shutdown.is_some() {
            l.socket = None;
            return;
        }
        match error {
            Some(e) => {
                // Out of descriptors (or another accept failure): never spin.
                // Accept-and-close what waits, using the spare descriptor,
                // then pause; existing connections are not affected.
                self.counters.accept_pauses += 1;
                if let Some(socket) = &l.socket {
                    let shed = self.reserve.shed(socket);
                    self.counters.refused += shed as u64;
                }
                tracing::warn!(error = %e, "accept failed; pausing accepts");
                l.retry_at = Some(Instant::now() + ACCEPT_BACKOFF);
            }
            None => l.retry_at = Some(Instant::now()),
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
                        // `Handle::send` admitted it (the mark is checked
                        // there): queue it even if the mark was crossed
                        // meanwhile, so an accepted message is never lost.
                        // The overshoot is bounded by what other threads post
                        // in one loop turn.
                        if slot.ctl.send_shared(msg, usize::MAX).is_ok() {
                            self.counters.messages_out += 1;
                            self.touch(key);
                        }
                    }
                }
                Command::Broadcast(wire) => self.broadcast(wire),
                Command::Disconnect(id) => {
                    if let Some(key) = self.lookup(id) {
                        self.close(key, CloseReason::Disconnected, true);
                    }
                }
                Command::Connect(addr) => self.connect(driver, addr),
                Command::Adopt(socket) => self.adopt(socket),
                Command::Shutdown(until) => self.begin_shutdown(driver, until),
            }
        }
        self.commands = commands;
    }

    fn broadcast(&mut self, wire: bytes::Bytes) {
        let mut slow = Vec::new();
        for (key, slot) in self.conns.iter_mut() {
            if slot.phase != Phase::Open {
                continue;
            }
            if slot.ctl.unsent > self.limits.high_water {
                // A slow peer misses the message (or is closed) rather than
                // growing its queue without bound.
                self.counters.broadcast_skipped += 1;
                if self.limits.close_slow_broadcast_peers {
                    slow.push(key as u32);
                }
                continue;
            }
            slot.ctl.send_encoded(wire.clone());
            self.counters.messages_out += 1;
            if !slot.ctl.touched {
                slot.ctl.touched = true;
                self.touched.push(key as u32);
            }
        }
        for key in slow {
            self.close(key, CloseReason::SlowPeer, false);
        }
    }

    fn lookup(&self, id: ConnId) -> Option<u32> {
        let key = id.slot();
        match self.conns.get(key as usize) {
            Some(s) if s.generation == id.generation() && s.phase == Phase::Open => Some(key),
            _ => None,
        }
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
                    slot.deadline = Some(slot.deadline.map_or(until, |d| d.min(until)));
                    self.arm_timer(key);
                }
            }
        }
    }

    /// Retries listeners, fires due timers and moves touched slots forward.
    fn maintain(&mut self, driver: &mut Driver) {
        let now = Instant::now();
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if let (Some(at), Some(socket)) = (l.retry_at, &l.socket) {
                if at <= now && self.shutdown.is_none() {
                    l.retry_at = None;
                    l.accepting = true;
                    driver.listen(i as u32, socket);
                }
            }
        }
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(now, &mut due);
        for entry in due.drain(..) {
            self.timer_fired(entry);
        }
        self.due = due;
        // Moving a slot forward can touch it (or another) again, as when a
        // close it carries out starts the closing steps: go round until
        // nothing is left, or leave the rest for a zero-wait next turn.
        for _ in 0..4 {
            if self.touched.is_empty() {
                break;
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
    }

    fn next_timeout(&self) -> Option<Duration> {
        if !self.touched.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut next = self.wheel.next_timeout(now);
        for l in &self.listeners {
            if let Some(t) = l.retry_at {
                let d = t.saturating_duration_since(now);
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        // The shutdown deadline needs no wake-up of its own: every closing
        // connection's deadline is capped by it and is on the wheel.
        next
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
        s.timed_out.store(c.timed_out, Ordering::Relaxed);
        s.broadcast_skipped
            .store(c.broadcast_skipped, Ordering::Relaxed);
        s.accept_pauses.store(c.accept_pauses, Ordering::Relaxed);
    }

    fn finished(&self, driver: &Driver) -> bool {
        self.shutdown.is_some()
            && self.conns.is_empty()
            && self.listeners.iter().all(|l| l.socket.is_none())
            && driver.in_flight() == 0
    }
}
