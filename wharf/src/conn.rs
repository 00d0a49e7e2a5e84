//! `Conn`: what a callback sees of its connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::FrameWriter;
use crate::error::{CloseReason, SendError};
use crate::groups::{LoopGroups, Memberships, Outgoing};
use crate::handle::Handle;
use crate::id::ConnId;
use crate::pool::SubmitError;
use crate::sendq::OutQueue;
use crate::sys::Socket;

/// The part of a connection's slot that sending and closing touch; the loop
/// owns it, a `Conn` borrows it during a callback.
pub(crate) struct ConnCtl {
    pub(crate) writer: FrameWriter,
    pub(crate) out: OutQueue,
    /// Bytes queued or in flight, for the high-water mark.
    pub(crate) unsent: usize,
    /// Sends are accepted (false once the connection starts closing).
    pub(crate) open: bool,
    /// A close asked for during a callback, carried out after it returns.
    pub(crate) close_request: Option<CloseReason>,
    /// Already on the loop's list of slots to look at after this turn.
    pub(crate) touched: bool,
    /// Jobs on the worker pool, applied in the order they were submitted.
    pub(crate) jobs: Jobs,
    /// The handler's timers of this connection.
    pub(crate) timers: Timers,
    /// The handler paused reading (`Conn::pause_reading`).
    pub(crate) read_paused: bool,
    /// The handler shut the write side (`Conn::shutdown_write`): the FIN
    /// goes out once the queue is flushed; `write_shut` once it has.
    pub(crate) shut_write: bool,
    pub(crate) write_shut: bool,
    /// The close asked for is abortive (`Conn::abort`): a reset, nothing
    /// queued is sent.
    pub(crate) abort: bool,
    /// The groups the connection is in.
    pub(crate) groups: Memberships,
    /// The next bytes of the stream go into a file
    /// (`Conn::receive_to_file`).
    pub(crate) sink: Option<Box<crate::file::Sink>>,
}

/// A connection's jobs on the worker pool, by sequence number. Results
/// are applied in submission order: one that finishes before an earlier
/// job waits in its loop's map of early results (so that a connection
/// costs two numbers for its jobs, whatever it did before).
#[derive(Default)]
pub(crate) struct Jobs {
    /// The sequence number the next job gets.
    pub(crate) next: u32,
    /// The sequence number of the next result to apply.
    pub(crate) applied: u32,
}

impl Jobs {
    /// Jobs submitted whose results have not been applied.
    pub(crate) fn in_flight(&self) -> u32 {
        self.next.wrapping_sub(self.applied)
    }
}

/// What a job's result does on the connection's loop.
pub(crate) type Apply<S> = Box<dyn FnOnce(&mut Conn<'_, S>) + Send>;

/// A connection's own timers (`Conn::set_timer`), by token. The loop's
/// wheel holds one entry per connection for all of its deadlines, these
/// included, so arming and cancelling are a map insert or remove; the
/// earliest due time is kept as a hint that is never later than the real
/// one (cancelling or moving a timer later leaves it early), and is made
/// exact when it comes due, as the wheel's own entries are. A connection
/// without timers holds one empty pointer for them.
#[derive(Default)]
pub(crate) struct Timers(Option<Box<TimerMap>>);

struct TimerMap {
    due: HashMap<u64, Instant>,
    /// At or before the earliest timer in `due`.
    earliest: Instant,
}

impl Timers {
    fn set(&mut self, token: u64, due: Instant) {
        match &mut self.0 {
            Some(map) => {
                map.due.insert(token, due);
                map.earliest = map.earliest.min(due);
            }
            None => {
                self.0 = Some(Box::new(TimerMap {
                    due: HashMap::from([(token, due)]),
                    earliest: due,
                }))
            }
        }
    }

    fn cancel(&mut self, token: u64) -> bool {
        let Some(map) = &mut self.0 else {
            return false;
        };
        let was = map.due.remove(&token).is_some();
        if map.due.is_empty() {
            self.0 = None;
        }
        was
    }

    /// When to look at the timers next: at or before the first one due.
    pub(crate) fn earliest(&self) -> Option<Instant> {
        self.0.as_ref().map(|m| m.earliest)
    }

    /// Removes the timers due by `now` into `into`, earliest first.
    pub(crate) fn take_due(&mut self, now: Instant, into: &mut Vec<(Instant, u64)>) {
        let Some(map) = &mut self.0 else {
            return;
        };
        if map.earliest > now {
            return;
        }
        let start = into.len();
        let mut earliest = None::<Instant>;
        map.due.retain(|&token, &mut due| {
            if due <= now {
                into.push((due, token));
                false
            } else {
                earliest = Some(earliest.map_or(due, |e| e.min(due)));
                true
            }
        });
        into[start..].sort_unstable();
        match earliest {
            Some(e) => map.earliest = e,
            None => self.0 = None,
        }
    }

    /// Drops every timer (the connection is closing).
    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }
}

impl ConnCtl {
    pub(crate) fn new(writer: FrameWriter) -> ConnCtl {
        ConnCtl {
            writer,
            out: OutQueue::default(),
            unsent: 0,
            open: true,
            close_request: None,
            touched: false,
            jobs: Jobs::default(),
            timers: Timers::default(),
            read_paused: false,
            shut_write: false,
            write_shut: false,
            abort: false,
            groups: Memberships::default(),
            sink: None,
        }
    }

    /// Queues `msg` (copied) unless refused; the bytes queued.
    pub(crate) fn send_copy(&mut self, msg: &[u8], high_water: usize) -> Result<usize, SendError> {
        self.admit(high_water)?;
        let n = self
            .out
            .push_copy(&mut self.writer, msg)
            .map_err(SendError::from)?;
        self.unsent += n;
        Ok(n)
    }

    /// Queues `msg` (shared, not copied) unless refused; the bytes queued.
    pub(crate) fn send_shared(
        &mut self,
        msg: Bytes,
        high_water: usize,
    ) -> Result<usize, SendError> {
        self.admit(high_water)?;
        let n = self
            .out
            .push_shared(&mut self.writer, msg)
            .map_err(SendError::from)?;
        self.unsent += n;
        Ok(n)
    }

    /// Queues a file's range unless refused; the bytes queued (the file's
    /// among them).
    pub(crate) fn send_file(
        &mut self,
        file: crate::FileRange,
        high_water: usize,
    ) -> Result<usize, SendError> {
        self.admit(high_water)?;
        let n = self
            .out
            .push_file(&mut self.writer, file)
            .map_err(SendError::from)?;
        self.unsent += n;
        Ok(n)
    }

    /// Queues bytes already in wire form; the bytes queued.
    pub(crate) fn send_encoded(&mut self, wire: Bytes) -> usize {
        let n = wire.len();
        self.unsent += n;
        self.out.push_encoded(wire);
        n
    }

    /// Open, and its sending not ended by a half-close: what is queued
    /// now would still go out (after the FIN it would fail the connection,
    /// after close_notify it could not be encrypted).
    pub(crate) fn writable(&self) -> bool {
        self.open && !self.shut_write
    }

    fn admit(&self, high_water: usize) -> Result<(), SendError> {
        if !self.writable() {
            Err(SendError::Closed)
        } else if self.unsent > high_water {
            Err(SendError::Backpressure)
        } else {
            Ok(())
        }
    }
}

/// One connection, as seen from inside a [`Handler`](crate::Handler)
/// callback. Sending from here needs no lock and no cross-thread hop.
pub struct Conn<'a, S> {
    pub(crate) id: ConnId,
    pub(crate) slot: u32,
    pub(crate) peer: SocketAddr,
    pub(crate) outbound: bool,
    pub(crate) token: Option<u64>,
    pub(crate) high_water: usize,
    pub(crate) state: &'a mut S,
    pub(crate) ctl: &'a mut ConnCtl,
    pub(crate) touched: &'a mut Vec<u32>,
    pub(crate) counters: &'a mut crate::stats::Counters,
    /// This loop's groups.
    pub(crate) groups: &'a mut LoopGroups,
    pub(crate) handle: &'a Handle,
    /// The loop's time for this turn.
    pub(crate) now: Instant,
    pub(crate) socket: &'a Socket,
    /// The connection's TLS, if any.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) tls: Option<&'a crate::tls::Session>,
}

impl<S> Conn<'_, S> {
    /// This connection's id, valid from any thread through [`Handle`].
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The remote address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The connection's TLS (ALPN protocol, SNI name, version, the peer's
    /// certificate), or `None` for a plaintext connection. Its handshake is
    /// always complete here.
    #[cfg(feature = "tls")]
    pub fn tls(&self) -> Option<crate::tls::TlsInfo<'_>> {
        self.tls.map(|session| crate::tls::TlsInfo { session })
    }

    /// Whether this connection was opened by [`Handle::connect`].
    pub fn is_outbound(&self) -> bool {
        self.outbound
    }

    /// The token of an outbound connection (`Connect::token`); `None` for
    /// an accepted one.
    pub fn token(&self) -> Option<u64> {
        self.token
    }

    /// The per-connection state.
    pub fn state(&mut self) -> &mut S {
        self.state
    }

    /// Sends one message (copied into the connection's send buffer).
    ///
    /// Messages queued during one loop turn go out in one gathered write.
    pub fn send(&mut self, msg: &[u8]) -> Result<(), SendError> {
        let n = self.ctl.send_copy(msg, self.high_water)?;
        self.counters.sent(n);
        self.touch();
        Ok(())
    }

    /// Sends one message without copying its body.
    pub fn send_bytes(&mut self, msg: Bytes) -> Result<(), SendError> {
        let n = self.ctl.send_shared(msg, self.high_water)?;
        self.counters.sent(n);
        self.touch();
        Ok(())
    }

    /// Sends a file's range, in order with the messages sent before and
    /// after it: as one message's body (length-prefixed framing), or as
    /// it is ([`FileRange::raw`](crate::FileRange::raw), raw framing). The
    /// file is read only when its turn comes, and not through user space
    /// where the backend can avoid it (`sendfile` on io_uring and poll;
    /// TLS connections and IOCP read it a piece at a time). Its bytes
    /// count against the high-water mark like any queued bytes, so a big
    /// file holds further sends (and reading) until most of it is out;
    /// the write-stall timeout applies to it. The file is closed when its
    /// send ends, or the connection does.
    ///
    /// Refused like [`send`](Self::send), and with
    /// [`SendError::TooLarge`] for a file larger than the frame maximum
    /// (nothing of it is sent).
    pub fn send_file(&mut self, file: crate::FileRange) -> Result<(), SendError> {
        let n = self.ctl.send_file(file, self.high_water)?;
        self.counters.sent(n);
        self.touch();
        Ok(())
    }

    /// Directs the next `len` bytes of the stream into `file` (written at
    /// its cursor) instead of the framing: the bytes right after the
    /// message being handled, when called from `on_message`. When they are
    /// all there, [`Handler::on_file_received`](crate::Handler::on_file_received)
    /// gets the count, and framing resumes with the byte after them. It
    /// gets an error instead if a write failed (disk full: the rest of the
    /// `len` bytes are passed over, so framing still resumes in step), or
    /// the stream ended or the connection closed first (`UnexpectedEof`).
    ///
    /// The bytes are written from the loop's receive buffers, not spliced:
    /// they are copied once, as a message would be, by the loop's thread
    /// (a write to a slow disk holds up the loop's other connections for
    /// as long). Fails if a receive into a file is already under way on
    /// this connection, or the connection is closing.
    pub fn receive_to_file(&mut self, file: std::fs::File, len: u64) -> std::io::Result<()> {
        if !self.ctl.open || self.ctl.close_request.is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the connection is closing",
            ));
        }
        if self.ctl.sink.is_some() {
            return Err(std::io::Error::other(
                "a receive into a file is already under way on this connection",
            ));
        }
        self.ctl.sink = Some(Box::new(crate::file::Sink::new(file, len)));
        self.touch();
        Ok(())
    }

    /// Runs `job` on the server's worker pool, off this loop; the function
    /// it returns is then called on this connection's loop with the
    /// connection at hand (to send a reply, update the state), in the
    /// order the jobs were submitted, even when a later job finishes
    /// first. A result that comes back after the connection closed is
    /// dropped, never applied to another connection.
    ///
    /// ```no_run
    /// # use wharf::{Conn, Handler};
    /// struct Hash;
    /// impl Handler for Hash {
    ///     type State = ();
    ///     fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
    ///         let msg = msg.to_vec(); // the job owns its input
    ///         let _ = conn.submit(move || {
    ///             let digest = expensive(&msg);
    ///             move |conn: &mut Conn<'_, ()>| {
    ///                 let _ = conn.send(&digest);
    ///             }
    ///         });
    ///     }
    /// }
    /// # fn expensive(m: &[u8]) -> Vec<u8> { m.to_vec() }
    /// ```
    ///
    /// While `Builder::jobs_per_connection` jobs of this connection are in
    /// flight, its reading pauses (what arrives is held, as under the
    /// send queue's back-pressure). A job (or its result) that panics is
    /// contained like a panicking callback: the connection closes with
    /// `CloseReason::HandlerPanic`. Fails with [`SubmitError::Saturated`]
    /// when the pool's queue is full, and with `Closed` once the
    /// connection is closing.
    pub fn submit<F, R>(&mut self, job: F) -> Result<(), SubmitError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: FnOnce(&mut Conn<'_, S>) + Send + 'static,
        S: 'static,
    {
        if !self.ctl.open || self.ctl.close_request.is_some() {
            return Err(SubmitError::Closed);
        }
        let seq = self.ctl.jobs.next;
        let run = Box::new(move || -> Box<dyn std::any::Any + Send> {
            let apply: Apply<S> = Box::new(job());
            Box::new(apply)
        });
        let shared = &self.handle.shared;
        shared.pool.submit(shared, self.id, seq, run)?;
        self.ctl.jobs.next = seq.wrapping_add(1);
        self.touch();
        Ok(())
    }

    /// Arms timer `token` of this connection to fire `after` from now
    /// (re-arming it if it was armed): `Handler::on_timer` runs on this
    /// loop with `token`, never before the time and within one tick of
    /// the loop's timer wheel (50 ms) after it. Timers die with their
    /// connection: none fires once `on_close` has run. Ignored once the
    /// connection is closing.
    pub fn set_timer(&mut self, token: u64, after: Duration) {
        if !self.ctl.open {
            return;
        }
        let due = crate::timer::deadline(self.now, after);
        self.ctl.timers.set(token, due);
        self.touch();
    }

    /// Cancels timer `token`; whether it was armed.
    pub fn cancel_timer(&mut self, token: u64) -> bool {
        self.ctl.timers.cancel(token)
    }

    /// Jobs of this connection submitted and not yet applied.
    pub fn jobs_in_flight(&self) -> usize {
        self.ctl.jobs.in_flight() as usize
    }

    /// Bytes queued for this connection and not yet written to the socket.
    pub fn queued_bytes(&self) -> usize {
        self.ctl.unsent
    }

    /// Closes the connection once what is queued has been sent. No
    /// `on_message` follows; `on_close` runs with [`CloseReason::Local`].
    pub fn close(&mut self) {
        if self.ctl.close_request.is_none() {
            self.ctl.close_request = Some(CloseReason::Local);
        }
        self.touch();
    }

    /// Bans the peer's address for `duration` and closes this connection
    /// (after a flush: a last message sent before this still goes out)
    /// with [`CloseReason::Banned`]. Its other connections are closed too,
    /// and new ones are refused at accept until the ban expires. The
    /// address is banned as the per-IP cap counts clients (IPv6 by prefix);
    /// see [`Handle::ban_ip`](crate::Handle::ban_ip).
    pub fn ban_peer(&mut self, duration: std::time::Duration) {
        self.handle.ban_ip(self.peer.ip(), duration);
        self.ctl.close_request = Some(CloseReason::Banned);
        self.touch();
    }

    /// Closes the connection abortively: what is queued is dropped and
    /// the peer gets a reset (RST) instead of an orderly FIN. `on_close`
    /// runs with [`CloseReason::Local`].
    pub fn abort(&mut self) {
        self.ctl.abort = true;
        self.ctl.close_request = Some(CloseReason::Local);
        self.touch();
    }

    /// Shuts the write side once what is queued has been sent (the peer
    /// reads EOF) and keeps reading: messages still arrive, and the
    /// connection closes when the peer finishes too. Sends fail with
    /// [`SendError::Closed`] from now on.
    pub fn shutdown_write(&mut self) {
        self.ctl.shut_write = true;
        self.touch();
    }

    /// Stops reading from this connection until
    /// [`resume_reading`](Self::resume_reading): no `on_message` runs
    /// (what already arrived is held, at most one receive buffer more),
    /// and the peer's sends stall once the kernel's buffers fill.
    pub fn pause_reading(&mut self) {
        self.ctl.read_paused = true;
        self.touch();
    }

    /// Resumes reading after [`pause_reading`](Self::pause_reading); what
    /// was held is delivered first.
    pub fn resume_reading(&mut self) {
        self.ctl.read_paused = false;
        self.touch();
    }

    /// The local address of the connection's socket.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("the socket has no IP address"))
    }

    /// Makes this connection a member of `group` (false if it was one
    /// already, or is closing). It gets what is published to the group from
    /// now on, on this server and, with a backplane, on every node; it
    /// leaves every group when it closes (after `on_close`, which still
    /// sees them).
    pub fn join(&mut self, group: &str) -> bool {
        if !self.ctl.open {
            return false;
        }
        if self.ctl.groups.contains(group) {
            return false;
        }
        let index = self.id.loop_index();
        let name = self.handle.shared.groups.add(index, group);
        self.groups.insert(self.slot, name, &mut self.ctl.groups)
    }

    /// Takes this connection out of `group`; false if it was not in it.
    pub fn leave(&mut self, group: &str) -> bool {
        if !self.groups.remove(self.slot, group, &mut self.ctl.groups) {
            return false;
        }
        self.handle
            .shared
            .groups
            .remove(self.id.loop_index(), group);
        true
    }

    /// Whether this connection is in `group`.
    pub fn in_group(&self, group: &str) -> bool {
        self.ctl.groups.contains(group)
    }

    /// The groups this connection is in.
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.ctl.groups.iter()
    }

    /// Publishes one message to every member of `group` (this connection
    /// too, if it is one), on every loop and, with a backplane, on every
    /// node. It is encoded once and shared by all of them. Each publisher
    /// is heard in the order it published; this connection gets its copy at
    /// once, in order with its own sends, the members on other connections
    /// after this callback returns. A member over its high-water mark
    /// misses it (counted in [`Stats::broadcast_skipped`](crate::Stats)),
    /// or is closed with `Builder::close_slow_broadcast_peers`. Fails only
    /// if the message cannot be framed; a group without members takes it
    /// and drops it.
    pub fn publish(&mut self, group: &str, msg: &[u8]) -> Result<(), SendError> {
        let shared = &self.handle.shared;
        let wire = shared.framing.encode_shared(msg).map_err(SendError::from)?;
        let index = self.id.loop_index();
        if let Some((name, loops)) = shared.groups.loops_of(group) {
            for i in loops.iter().filter(|&i| i != index) {
                // A loop that has ended has no members to reach.
                let _ = shared.loops[i]
                    .mailbox
                    .post(crate::mailbox::Command::Publish(name.clone(), wire.clone()));
            }
            if loops.contains(index) {
                // Its own copy now, in order with its sends; a publisher
                // over its mark is left to the loop, which skips or closes
                // it as it does any slow member.
                let mut skip = None;
                let mine = self.ctl.writable() && self.ctl.groups.contains(group);
                if mine && self.ctl.unsent <= self.high_water {
                    skip = Some(self.slot);
                    let n = self.ctl.send_encoded(wire.clone());
                    self.counters.sent(n);
                    self.touch();
                }
                if self.groups.count(group) > usize::from(skip.is_some()) {
                    self.groups.outbox.push(Outgoing {
                        group: name,
                        wire,
                        skip,
                    });
                }
            }
        }
        if let Some(b) = &shared.groups.backplane {
            b.publish(group, msg);
        }
        Ok(())
    }

    /// The server's handle: broadcast, reach other connections, connect.
    pub fn handle(&self) -> &Handle {
        self.handle
    }

    fn touch(&mut self) {
        if !self.ctl.touched {
            self.ctl.touched = true;
            self.touched.push(self.slot);
        }
    }
}
