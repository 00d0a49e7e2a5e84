//! One event loop: a thread that owns a driver, a slab of connections, and
//! every callback of those connections.
//!
//! A turn of the loop: wait for completions and handle them (callbacks run
//! here), take commands posted by other threads, fire due timers, then move
//! every touched connection forward (start sends, pause or re-arm receives,
//! close). Submissions made during the turn reach the kernel together at the
//! start of the next wait. The clock is read once per batch of events and
//! once before each wait; everything in between uses that `now`.
//!
//! `mod.rs` holds the loop and what concerns all connections (listeners,
//! commands, timers, counters). One connection's life is in
//! `opening.rs` (accepted or connected, opened), `receiving.rs` (framed
//! and delivered), `sending.rs` (sent, and each turn's step forward) and
//! `closing.rs` (its end); `slot.rs` holds its phases, `dial.rs` outbound
//! connects and their retries, and `guard.rs` the containment of handler
//! panics.

mod closing;
mod dial;
mod guard;
mod jobs;
mod opening;
mod receiving;
mod sending;
mod slot;
mod tick;

pub use tick::Tick;

use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::codec::Framing;
use crate::connect::ConnectFailure;
use crate::error::CloseReason;
use crate::handle::{Handle, LoopShared};
use crate::handler::Handler;
use crate::id::ConnId;
use crate::limits::Limits;
use crate::mailbox::Command;
use crate::stats::Counters;
use crate::sys::{self, Driver, DriverConfig, Event, Flow, Listener, SendBatch};
use crate::timer::{Entry, Moment, Wheel};

use self::slot::{Closing, Phase, Slot};

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
    /// The period of `Handler::on_tick`, if any.
    pub(crate) tick: Option<Duration>,
    /// TLS for every accepted connection.
    pub(crate) tls: Option<crate::tls::ServerTls>,
}

/// How long accepting pauses after an error such as EMFILE.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

struct ListenerState {
    socket: Option<Listener>,
    accepting: bool,
    retry_at: Option<Instant>,
}

/// One message on its way to many connections of a loop (a broadcast, a
/// group's members): shared, not copied, and skipped (or the peer closed)
/// where the peer is over its high-water mark, rather than growing its
/// queue without bound.
struct Fanout<'a> {
    wire: &'a bytes::Bytes,
    limits: &'a Limits,
    touched: &'a mut Vec<u32>,
    counters: &'a mut Counters,
    /// Peers to close (`close_slow_broadcast_peers`).
    slow: Vec<u32>,
}

impl Fanout<'_> {
    fn queue<S>(&mut self, key: u32, slot: &mut Slot<S>) {
        if !slot.ctl.writable() {
            return;
        }
        if slot.ctl.unsent > self.limits.high_water {
            self.counters.broadcast_skipped += 1;
            if self.limits.close_slow_broadcast_peers {
                self.slow.push(key);
            }
            return;
        }
        let n = slot.ctl.send_encoded(self.wire.clone());
        self.counters.sent(n);
        if !slot.ctl.touched {
            slot.ctl.touched = true;
            self.touched.push(key);
        }
    }
}

pub(crate) struct EventLoop<H: Handler> {
    // Declared first so it is dropped first: a driver dropped with
    // operations in flight leaks the memory they use (see `sys`), so what
    // `core` frees afterwards is never the kernel's.
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
    /// TLS for every accepted connection.
    tls: Option<crate::tls::ServerTls>,
    /// Plaintext just decrypted (reused).
    plain: Vec<u8>,
    /// Plaintext on its way into a TLS session (reused).
    tls_chunks: Vec<bytes::Bytes>,
    spread_accepts: bool,
    /// The loop the next accepted connection goes to, when spreading.
    next_adopter: usize,
    conns: Slab<Slot<H::State>>,
    /// The last generation given out per slot, kept across reuse.
    generations: Vec<u64>,
    listeners: Vec<ListenerState>,
    /// A spare descriptor, given up for a moment when the process runs out
    /// so that a waiting client can be accepted and closed, not left hanging.
    reserve: sys::Reserve,
    /// Slots to move forward at the end of the turn.
    touched: Vec<u32>,
    wheel: Wheel,
    due: Vec<Entry>,
    /// Handler timers of one connection firing now (reused).
    due_timers: Vec<(Instant, u64)>,
    /// The periodic tick (`Builder::tick`), and when it is next due.
    tick: Option<(Duration, Instant)>,
    /// The connections `Tick::for_each` visits (reused from tick to tick).
    tick_keys: Vec<u32>,
    /// Outbound connects waiting to start: a next address, a reconnect.
    redials: Vec<dial::Redial>,
    /// State of the back-off jitter's generator.
    rng: u64,
    /// The groups of this loop's connections.
    groups: crate::groups::LoopGroups,
    /// Who may connect, as this loop last read it.
    rules: crate::access::LoopRules,
    /// Job results that came back before an earlier job of their
    /// connection, by (slot, sequence number); emptied as they are applied
    /// or their connection closes.
    early_results: std::collections::HashMap<(u32, u32), crate::mailbox::Output>,
    /// This turn's time, and the wheel ticks it falls in (for "is it due")
    /// and rounds up to (for stamping activity, so that a timeout never
    /// fires early).
    now: Moment,
    commands: Vec<Command>,
    #[allow(clippy::vec_box)] // boxes move to the driver and back
    spare_batches: Vec<Box<SendBatch>>,
    /// Reassembly buffers that frames larger than a connection keeps
    /// grew, lent to the next reader that needs one: a stream of such
    /// frames reuses them instead of allocating (and the allocator giving
    /// memory back to the system and faulting it in again) per frame,
    /// and an idle connection still holds none.
    spare_reassembly: Vec<Vec<u8>>,
    shutdown: Option<Instant>,
    /// A test asked this loop to fail (`Command::InjectFailure`).
    failure_injected: bool,
    counters: Counters,
}

impl<H: Handler> EventLoop<H> {
    pub(crate) fn new(
        config: LoopConfig,
        handler: Arc<H>,
        handle: Handle,
        listeners: Vec<Listener>,
    ) -> std::io::Result<Self> {
        let driver = Driver::new(&config.driver)?;
        Ok(Self::with_driver(
            config,
            handler,
            handle,
            listeners,
            driver,
            Instant::now(),
        ))
    }

    /// A loop on a driver made elsewhere (the tests' scripted driver),
    /// whose clock reads `now` at the start.
    pub(crate) fn with_driver(
        config: LoopConfig,
        handler: Arc<H>,
        handle: Handle,
        listeners: Vec<Listener>,
        mut driver: Driver,
        now: Instant,
    ) -> Self {
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
        let rules = crate::access::LoopRules::new(&handle.shared.access.rules);
        let wheel = Wheel::new(now);
        let now = wheel.moment(now);
        EventLoop {
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
                tls: config.tls,
                plain: Vec::new(),
                tls_chunks: Vec::new(),
                conns: Slab::new(),
                generations: Vec::new(),
                listeners,
                reserve: sys::Reserve::new(),
                touched: Vec::new(),
                wheel,
                due: Vec::new(),
                due_timers: Vec::new(),
                tick: config
                    .tick
                    .map(|every| (every, crate::timer::deadline(now.at, every))),
                tick_keys: Vec::new(),
                redials: Vec::new(),
                rng: jitter_seed(config.index),
                groups: Default::default(),
                rules,
                early_results: std::collections::HashMap::new(),
                now,
                commands: Vec::new(),
                spare_batches: Vec::new(),
                spare_reassembly: Vec::new(),
                shutdown: None,
                failure_injected: false,
                counters: Counters::default(),
            },
        }
    }

    pub(crate) fn run(self) {
        self.run_with(Instant::now)
    }

    /// Runs the loop until it finishes, reading the time from `clock`
    /// (the tests pass a virtual one).
    pub(crate) fn run_with(mut self, mut clock: impl FnMut() -> Instant) {
        let failure = loop {
            let EventLoop { driver, core } = &mut self;
            core.set_now(clock());
            let timeout = core.next_timeout();
            // The clock is read once per batch of events, after the wait.
            let mut stamped = false;
            let result = driver.poll(timeout, |event| {
                if !stamped {
                    stamped = true;
                    core.set_now(clock());
                }
                core.on_event(event)
            });
            if let Err(e) = result {
                break Some(e);
            }
            if !stamped {
                core.set_now(clock());
            }
            core.run_commands(driver);
            if core.failure_injected {
                break Some(std::io::Error::other(
                    "a failure injected by Handle::inject_loop_failure",
                ));
            }
            core.maintain(driver);
            core.publish();
            if core.finished(driver) {
                break None;
            }
        };
        if let Some(e) = failure {
            tracing::error!(loop_index = self.core.index, error = %e, "event loop failed");
            self.core.fail();
        }
        self.core.close_mailbox();
    }
}

impl<H: Handler> Core<H> {
    fn shared(&self) -> &LoopShared {
        &self.handle.shared.loops[self.index]
    }

    fn set_now(&mut self, now: Instant) {
        self.now = self.wheel.moment(now);
    }

    fn on_event(&mut self, event: Event<'_>) -> Flow {
        match event {
            Event::Accepted {
                listener,
                socket,
                peer,
            } => self.accepted(listener, socket, peer),
            Event::AcceptEnded { listener, error } => self.accept_ended(listener, error),
            Event::Received { slot, data } => return self.received(slot, data),
            Event::RecvEnded { slot, why } => self.recv_ended(slot, why),
            Event::Sent {
                slot,
                batch,
                result,
            } => self.sent(slot, batch, result),
            Event::Connected { slot, result } => self.connected(slot, result),
            Event::Woken => {}
        }
        Flow::Continue
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
                    self.counters.shed += shed as u64;
                }
                tracing::warn!(error = %e, "accept failed; pausing accepts");
                l.retry_at = Some(self.now.at + ACCEPT_BACKOFF);
            }
            None => l.retry_at = Some(self.now.at),
        }
    }

    fn run_commands(&mut self, driver: &mut Driver) {
        if !self.shared().mailbox.has_pending() {
            return;
        }
        let mut commands = std::mem::take(&mut self.commands);
        self.shared().mailbox.take(&mut commands);
        for command in commands.drain(..) {
            self.run_command(driver, command);
        }
        self.commands = commands;
    }

    fn run_command(&mut self, driver: &mut Driver, command: Command) {
        match command {
            Command::Send(id, msg) => {
                // Admitted by `Handle::send` against the bytes other threads
                // have in transit to this slot (see `LiveTable::post`):
                // queue it even if the mark was crossed meanwhile, so an
                // accepted message is never lost.
                self.shared().live.unpost(id.slot(), msg.len());
                if let Some(key) = self.lookup(id) {
                    let slot = &mut self.conns[key as usize];
                    match slot.ctl.send_shared(msg, usize::MAX) {
                        Ok(n) => {
                            self.counters.sent(n);
                            self.touch(key);
                        }
                        Err(e) => {
                            tracing::debug!(conn = %id, error = %e, "a send from another thread failed")
                        }
                    }
                }
            }
            Command::SendFile(id, file) => {
                // As `Send`: admitted by `Handle::send_file` (its prefix
                // is what was in transit).
                self.shared().live.unpost(id.slot(), file.prefix.len());
                if let Some(key) = self.lookup(id) {
                    let slot = &mut self.conns[key as usize];
                    match slot.ctl.send_file(file, usize::MAX) {
                        Ok(n) => {
                            self.counters.sent(n);
                            self.touch(key);
                        }
                        Err(e) => {
                            tracing::debug!(conn = %id, error = %e, "a file send from another thread failed")
                        }
                    }
                }
            }
            Command::Broadcast(wire) => self.broadcast(wire),
            Command::Publish(group, wire) => self.publish_to(&group, &wire, None),
            Command::Join(id, group) => self.join(id, group),
            Command::Leave(id, group) => self.leave(id, &group),
            Command::Disconnect(id) => {
                if let Some(key) = self.lookup(id) {
                    self.close(key, CloseReason::Disconnected, true);
                }
            }
            Command::Connect(dial) => self.connect(driver, dial),
            Command::StopReconnect(token) => self.stop_reconnect(token),
            Command::Kick(net) => self.kick(net),
            Command::Adopt(socket, peer) => self.adopt(socket, peer),
            Command::Shutdown(until) => self.begin_shutdown(driver, until),
            Command::JobDone(done) => self.job_done(done),
            Command::InjectFailure => self.failure_injected = true,
        }
    }

    fn broadcast(&mut self, wire: bytes::Bytes) {
        let mut fan = Fanout {
            wire: &wire,
            limits: &self.limits,
            touched: &mut self.touched,
            counters: &mut self.counters,
            slow: Vec::new(),
        };
        for (key, slot) in self.conns.iter_mut() {
            if matches!(slot.phase, Phase::Open(_)) {
                fan.queue(key as u32, slot);
            }
        }
        for key in fan.slow {
            self.close(key, CloseReason::SlowPeer, false);
        }
    }

    /// Closes (after a flush) every open connection from `net`, a network
    /// just banned, while the ban is in force: a ban lifted before this
    /// command arrived closes nothing (connections accepted since were let
    /// in after the unban).
    fn kick(&mut self, net: ipnet::IpNet) {
        let bans = &self.handle.shared.access.bans;
        let banned: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, s)| {
                let ip = s.peer.ip().to_canonical();
                !s.outbound
                    && matches!(s.phase, Phase::Open(_))
                    && net.contains(&ip)
                    && bans.is_banned(ip, self.now.at)
            })
            .map(|(k, _)| k as u32)
            .collect();
        for key in banned {
            self.close(key, CloseReason::Banned, true);
        }
    }

    /// Queues `wire` to this loop's members of `group` but `skip`.
    fn publish_to(&mut self, group: &str, wire: &bytes::Bytes, skip: Option<u32>) {
        let Some(members) = self.groups.members(group) else {
            return;
        };
        let mut fan = Fanout {
            wire,
            limits: &self.limits,
            touched: &mut self.touched,
            counters: &mut self.counters,
            slow: Vec::new(),
        };
        for &key in members {
            if Some(key) != skip {
                fan.queue(key, &mut self.conns[key as usize]);
            }
        }
        for key in fan.slow {
            self.close(key, CloseReason::SlowPeer, false);
        }
    }

    /// Carries out the publishes that callbacks made this turn.
    fn run_outbox(&mut self) {
        while !self.groups.outbox.is_empty() {
            let outbox = std::mem::take(&mut self.groups.outbox);
            for out in &outbox {
                self.publish_to(&out.group, &out.wire, out.skip);
            }
        }
    }

    /// A join posted by `Handle::join`, counted in the registry already.
    fn join(&mut self, id: ConnId, group: std::sync::Arc<str>) {
        let joined = match self.lookup(id) {
            Some(key) => {
                let slot = &mut self.conns[key as usize];
                slot.ctl.open && self.groups.insert(key, group.clone(), &mut slot.ctl.groups)
            }
            None => false,
        };
        if !joined {
            self.handle.shared.groups.remove(self.index, &group);
        }
    }

    fn leave(&mut self, id: ConnId, group: &str) {
        if let Some(key) = self.lookup(id) {
            let slot = &mut self.conns[key as usize];
            if self.groups.remove(key, group, &mut slot.ctl.groups) {
                self.handle.shared.groups.remove(self.index, group);
            }
        }
    }

    fn lookup(&self, id: ConnId) -> Option<u32> {
        let key = id.slot();
        match self.conns.get(key as usize) {
            Some(s) if s.generation == id.generation() && matches!(s.phase, Phase::Open(_)) => {
                Some(key)
            }
            _ => None,
        }
    }

    fn begin_shutdown(&mut self, driver: &mut Driver, until: Instant) {
        if self.shutdown.is_some() {
            return;
        }
        self.shutdown = Some(until);
        // Reconnects waiting for their back-off had their failure
        // reported; a connect on its way to its next address has not.
        for redial in std::mem::take(&mut self.redials) {
            if !redial.announce {
                let addr = redial.dial.pending.front().copied();
                let e = std::io::Error::other("the server is shutting down");
                self.dial_failed(redial.dial, addr, e);
            }
        }
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
            let slot = &mut self.conns[key as usize];
            match &mut slot.phase {
                // Its jobs' results are waited for (until the deadline):
                // `advance_open` closes it once they are applied.
                Phase::Open(_) if slot.ctl.jobs.in_flight() > 0 => {
                    self.arm_timer(key);
                    self.touch(key);
                }
                Phase::Open(_) => self.close(key, CloseReason::Shutdown, true),
                Phase::Connecting => driver.cancel(key, &slot.socket),
                Phase::Closing(Closing::Flushing { deadline, .. }) => {
                    *deadline = Some(deadline.map_or(until, |d| d.min(until)));
                    self.arm_timer(key);
                }
                Phase::Closing(Closing::Lingering { deadline }) => {
                    *deadline = (*deadline).min(until);
                    self.arm_timer(key);
                }
                Phase::Closing(Closing::Draining { .. }) => {}
            }
        }
    }

    /// Retries listeners, fires due timers and moves touched slots forward.
    fn maintain(&mut self, driver: &mut Driver) {
        let now = self.now.at;
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
        self.wheel.expire_tick(self.now.floor, &mut due);
        for entry in due.drain(..) {
            self.timer_fired(entry);
        }
        self.due = due;
        self.run_tick();
        if !self.redials.is_empty() {
            self.run_redials(driver);
        }
        // Moving a slot forward can touch it (or another) again, as when a
        // close it carries out starts the closing steps: go round until
        // nothing is left, or leave the rest for a zero-wait next turn.
        for _ in 0..4 {
            self.run_outbox();
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
        self.shared().drained.notify_if_waited();
        self.handle.shared.pool.wake_workers();
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        if !self.touched.is_empty()
            || !self.groups.outbox.is_empty()
            || self.shared().mailbox.has_pending()
        {
            // Work left, or commands posted before this loop could be woken
            // (before its waker was set): do not sleep on them.
            return Some(Duration::ZERO);
        }
        let mut next = self.wheel.next_timeout(&self.now);
        let now = self.now.at;
        for l in &self.listeners {
            if let Some(t) = l.retry_at {
                let d = t.saturating_duration_since(now);
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        if let Some(at) = self.next_redial() {
            let d = at.saturating_duration_since(now);
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        if let (Some((_, at)), None) = (self.tick, self.shutdown) {
            let d = at.saturating_duration_since(now);
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        // The shutdown deadline needs no wake-up of its own: every closing
        // connection's deadline is capped by it and is on the wheel.
        next
    }

    fn publish(&self) {
        self.shared().stats.publish(&self.counters);
    }

    fn finished(&self, driver: &Driver) -> bool {
        self.shutdown.is_some()
            && self.conns.is_empty()
            && self.listeners.iter().all(|l| l.socket.is_none())
            && driver.in_flight() == 0
    }

    /// The driver failed: nothing more can be sent or received here. Every
    /// connection is closed at once (`on_close` with `LoopFailed`), its id
    /// is marked closed and its count released; listeners are closed.
    /// Memory the kernel may still use belongs to the driver, which leaks
    /// it when dropped.
    fn fail(&mut self) {
        self.shared().mark_failed();
        let keys: Vec<u32> = self.conns.iter().map(|(k, _)| k as u32).collect();
        for key in keys {
            if matches!(self.conns[key as usize].phase, Phase::Open(_)) {
                self.close(key, CloseReason::LoopFailed, false);
            }
            let slot = self.conns.remove(key as usize);
            self.counters.bytes_dropped += slot.ctl.unsent as u64;
            if let (Phase::Connecting, Some(dial)) = (&slot.phase, slot.dial) {
                self.handle.shared.release(None);
                self.guard_connect_failed(ConnectFailure {
                    token: dial.request.token,
                    addr: Some(slot.peer),
                    error: std::io::Error::other("the event loop failed"),
                    retry_in: None,
                });
            } else {
                let ip = (!slot.outbound).then(|| slot.peer.ip());
                self.handle.shared.release(ip);
            }
            // Dropping the slot closes its socket.
        }
        for l in &mut self.listeners {
            l.socket = None;
        }
        self.counters.open = 0;
        self.publish();
    }

    /// Refuses further posts to this loop and answers what is left in its
    /// mailbox: connects fail through `on_connect_failed`, handed-over
    /// sockets are closed, sends are dropped (they were posted before the
    /// loop ended, which is the same as before a close).
    fn close_mailbox(&mut self) {
        let handle = self.handle.clone();
        let shared = &handle.shared.loops[self.index];
        let shared_groups = &handle.shared.groups;
        for command in shared.mailbox.close() {
            match command {
                Command::Connect(dial) => self.guard_connect_failed(ConnectFailure {
                    token: dial.request.token,
                    addr: dial.pending.front().copied(),
                    error: std::io::Error::other("the server is shutting down"),
                    retry_in: None,
                }),
                Command::Send(id, msg) => shared.live.unpost(id.slot(), msg.len()),
                Command::SendFile(id, file) => shared.live.unpost(id.slot(), file.prefix.len()),
                Command::Adopt(..) => self.counters.refused_shutdown += 1,
                Command::JobDone(_) => self.counters.jobs_discarded += 1,
                // Counted in the registry when posted: uncount it.
                Command::Join(_, group) => shared_groups.remove(self.index, &group),
                Command::Broadcast(_)
                | Command::Publish(..)
                | Command::Leave(..)
                | Command::Disconnect(_)
                | Command::Shutdown(_)
                | Command::InjectFailure
                | Command::StopReconnect(_)
                | Command::Kick(_) => {}
            }
        }
        self.publish();
        self.shared().drained.notify_if_waited();
    }
}

/// A seed for a loop's jitter generator: different per loop and per run
/// (never 0, which xorshift cannot leave).
fn jitter_seed(index: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (nanos ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}
