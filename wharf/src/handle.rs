//! What every thread shares with the loops (`Shared`, one `LoopShared` per
//! loop), and `Handle`, which reaches connections from any thread through
//! it.

use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::access::{parse_network, Access, BadNetwork, Ban, IpRules};
use crate::codec::Framing;
use crate::connect::{Connect, Dial};
use crate::error::SendError;
use crate::groups::Registry;
use crate::id::{ConnId, LiveTable};
use crate::limits::{client_network, Cap, ConnCounter, Limits};
use crate::mailbox::{Command, Mailbox};
use crate::pool::Pool;
use crate::stats::{LoopStats, Stats};

/// Reaches a server's connections from any thread. Cheap to clone.
#[derive(Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("loops", &self.shared.loops.len())
            .finish()
    }
}

impl Handle {
    /// Sends one message to connection `id`.
    ///
    /// Fails at once with [`SendError::Closed`] if `id` is not open (a stale
    /// id never reaches a newer connection in the same slot, nor one of
    /// another server), and with [`SendError::Backpressure`] while the
    /// connection is over its high-water mark or while the bytes other
    /// threads have sent it and its loop has not yet taken are over the
    /// mark: a connection holds at most about twice the high mark plus two
    /// frames, however many threads send to it. [`Handle::wait_writable`]
    /// waits for it to drain. A connection that closes after this returns
    /// `Ok` drops the message.
    pub fn send(&self, id: ConnId, msg: Bytes) -> Result<(), SendError> {
        let l = self.open_loop(id)?;
        if l.live.state(id) == Some(true) {
            return Err(SendError::Backpressure);
        }
        let max = self.shared.framing.max_frame();
        if msg.len() > max {
            return Err(SendError::TooLarge {
                len: msg.len(),
                max,
            });
        }
        let len = msg.len();
        if !l.live.post(id.slot(), len, self.shared.limits.high_water) {
            return Err(SendError::Backpressure);
        }
        l.mailbox.post(Command::Send(id, msg)).map_err(|_| {
            l.live.unpost(id.slot(), len);
            l.refusal()
        })
    }

    /// Sends a file's range to connection `id`, as
    /// [`Conn::send_file`](crate::Conn::send_file) does (in order with this
    /// thread's other sends to it). Refused like [`send`](Self::send); a
    /// file too large for the framing is refused here, before anything is
    /// posted.
    pub fn send_file(&self, id: ConnId, file: crate::FileRange) -> Result<(), SendError> {
        let l = self.open_loop(id)?;
        if l.live.state(id) == Some(true) {
            return Err(SendError::Backpressure);
        }
        self.shared
            .framing
            .check_file(file.body_len(), file.raw)
            .map_err(SendError::from)?;
        // What is in memory is in transit; the file's bytes count once
        // queued, as the loop's own queue.
        let len = file.prefix.len();
        if !l.live.post(id.slot(), len, self.shared.limits.high_water) {
            return Err(SendError::Backpressure);
        }
        l.mailbox.post(Command::SendFile(id, file)).map_err(|_| {
            l.live.unpost(id.slot(), len);
            l.refusal()
        })
    }

    /// Waits up to `timeout` until connection `id` takes sends again (it is
    /// under its high-water mark and what other threads sent it has reached
    /// its loop): `Ok(true)`; `Ok(false)` if the time ran out. Fails like
    /// [`send`](Self::send) once the connection is closed. For threads
    /// other than the loop's, which hears of it through `Handler::on_drain`.
    pub fn wait_writable(&self, id: ConnId, timeout: Duration) -> Result<bool, SendError> {
        let until = crate::timer::deadline(Instant::now(), timeout);
        let l = self.open_loop(id)?;
        let writable = || match l.live.state(id) {
            Some(false) => Ok(l.live.posted(id.slot()) <= self.shared.limits.high_water),
            Some(true) => Ok(false),
            None => Err(self.open_loop(id).err().unwrap_or(SendError::Closed)),
        };
        l.drained.wait_until(until, writable)
    }

    /// Sends one message to every open connection. It is encoded once and
    /// shared by all of them.
    pub fn broadcast(&self, msg: Bytes) -> Result<(), SendError> {
        self.check_running()?;
        let wire = self
            .shared
            .framing
            .encode_shared(&msg)
            .map_err(SendError::from)?;
        for l in &self.shared.loops {
            // A loop that has ended has no connections to reach.
            let _ = l.mailbox.post(Command::Broadcast(wire.clone()));
        }
        Ok(())
    }

    /// Makes connection `id` a member of `group` (see [`Conn::join`]). The
    /// join is carried out on the connection's loop; a publish this thread
    /// makes afterwards reaches it. Fails if `id` is not open.
    ///
    /// [`Conn::join`]: crate::Conn::join
    pub fn join(&self, id: ConnId, group: &str) -> Result<(), SendError> {
        let l = self.open_loop(id)?;
        let index = id.loop_index();
        // Counted now, so that a publish after this reaches the loop; the
        // loop uncounts it if the connection is closed or in it already.
        let name = self.shared.groups.add(index, group);
        l.mailbox.post(Command::Join(id, name)).map_err(|_| {
            self.shared.groups.remove(index, group);
            l.refusal()
        })
    }

    /// Takes connection `id` out of `group` (on its loop). Fails if `id` is
    /// not open.
    pub fn leave(&self, id: ConnId, group: &str) -> Result<(), SendError> {
        let l = self.open_loop(id)?;
        l.mailbox
            .post(Command::Leave(id, group.to_owned()))
            .map_err(|_| l.refusal())
    }

    /// Publishes one message to every member of `group`, on every loop
    /// and, with a backplane, on every node: encoded once and shared by
    /// all. Messages one thread publishes arrive in that order. Members
    /// over their high-water mark miss it, as with
    /// [`broadcast`](Self::broadcast).
    pub fn publish(&self, group: &str, msg: &[u8]) -> Result<(), SendError> {
        self.publish_local(group, msg)?;
        if let Some(b) = &self.shared.groups.backplane {
            b.publish(group, msg);
        }
        Ok(())
    }

    /// Publishes to the members of `group` on this server only: for a
    /// [`Backplane`](crate::Backplane) delivering what another node
    /// published.
    pub fn publish_local(&self, group: &str, msg: &[u8]) -> Result<(), SendError> {
        self.check_running()?;
        let wire = self
            .shared
            .framing
            .encode_shared(msg)
            .map_err(SendError::from)?;
        if let Some((name, loops)) = self.shared.groups.loops_of(group) {
            for i in loops.iter() {
                // A loop that has ended has no members to reach.
                let _ = self.shared.loops[i]
                    .mailbox
                    .post(Command::Publish(name.clone(), wire.clone()));
            }
        }
        Ok(())
    }

    /// Replaces the allow and deny lists ([`Builder::ip_rules`]); each
    /// loop checks the new ones from its next accepted connection on.
    /// Connections open now are not affected.
    ///
    /// [`Builder::ip_rules`]: crate::Builder::ip_rules
    pub fn set_ip_rules(&self, rules: IpRules) {
        self.shared.access.rules.replace(rules);
    }

    /// Bans `network` (`ADDRESS/PREFIX`, or an address) for `duration`:
    /// connections from it are refused at accept, before any callback,
    /// and counted in [`Stats::banned`]; its open connections are closed
    /// (after a flush) with [`CloseReason::Banned`](crate::CloseReason::Banned).
    /// Banning a network banned already gives it the new duration. Bans
    /// expire by themselves.
    pub fn ban(&self, network: &str, duration: Duration) -> Result<(), BadNetwork> {
        self.ban_network(parse_network(network)?, duration);
        Ok(())
    }

    /// Bans the client at `ip` as the per-IP cap counts clients: an IPv4
    /// address alone, an IPv6 one with its whole prefix
    /// ([`Builder::per_ip_ipv6_prefix`](crate::Builder::per_ip_ipv6_prefix)).
    /// Otherwise as [`ban`](Self::ban).
    pub fn ban_ip(&self, ip: IpAddr, duration: Duration) {
        self.ban_network(client_network(ip, self.shared.limits.ipv6_prefix), duration);
    }

    pub(crate) fn ban_network(&self, net: ipnet::IpNet, duration: Duration) {
        self.shared.access.bans.ban(net, duration, Instant::now());
        tracing::info!(network = %net, ?duration, "banned");
        for l in &self.shared.loops {
            // A loop that has ended has no connections to close.
            let _ = l.mailbox.post(Command::Kick(net));
        }
    }

    /// Lifts the ban of `network` (as it was given to [`ban`](Self::ban),
    /// or as [`bans`](Self::bans) lists it); whether it was banned.
    pub fn unban(&self, network: &str) -> Result<bool, BadNetwork> {
        let net = parse_network(network)?;
        Ok(self.shared.access.bans.unban(net, Instant::now()))
    }

    /// The bans in force, the soonest to expire first.
    pub fn bans(&self) -> Vec<Ban> {
        self.shared.access.bans.list(Instant::now())
    }

    /// The allow and deny lists in force.
    pub fn ip_rules(&self) -> IpRules {
        self.shared.access.rules.get()
    }

    /// Members of `group` on this server (joins in transit included).
    pub fn group_size(&self, group: &str) -> usize {
        self.shared.groups.size(group)
    }

    /// Every group with members on this server, and how many, by name.
    pub fn groups(&self) -> Vec<(String, usize)> {
        self.shared.groups.list()
    }

    /// Makes loop `index` fail as if its driver had returned an error: it
    /// closes its connections (`CloseReason::LoopFailed`) and its
    /// listeners, and calls on its ids fail with `SendError::LoopFailed`.
    /// For tests of that path on real sockets; `false` if the loop had
    /// ended already.
    #[doc(hidden)]
    pub fn inject_loop_failure(&self, index: usize) -> bool {
        self.shared.loops[index]
            .mailbox
            .post(Command::InjectFailure)
            .is_ok()
    }

    /// Closes connection `id` after what is queued for it has been sent; its
    /// `on_close` gets [`CloseReason::Disconnected`](crate::CloseReason::Disconnected).
    pub fn disconnect(&self, id: ConnId) -> Result<(), SendError> {
        let l = self.open_loop(id)?;
        l.mailbox
            .post(Command::Disconnect(id))
            .map_err(|_| l.refusal())
    }

    /// Opens an outbound connection on one of the loops: an address, a
    /// `host:port` or a [`Connect`] with a token, a timeout and a
    /// reconnect policy. It gets the same callbacks as an accepted one
    /// (`Conn::is_outbound` and `Conn::token` tell them apart); every
    /// address is tried in turn, and when all fail
    /// `Handler::on_connect_failed` runs with the token, also when the
    /// server shuts down before the connect is carried out. A name is
    /// resolved on a thread of its own, so this never blocks (and may be
    /// called from a callback); if the server stops before it resolves,
    /// the connect is dropped without a callback.
    pub fn connect(&self, target: impl Into<Connect>) -> io::Result<()> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(io::Error::other("server stopped"));
        }
        let dial = Box::new(Dial::new(target.into()));
        let loops = &self.shared.loops;
        let first = self.shared.next_loop.fetch_add(1, Ordering::Relaxed) % loops.len();
        if dial.needs_resolving() {
            self.shared.resolve_then_connect(first, dial);
            return Ok(());
        }
        let mut command = Command::Connect(dial);
        // A loop that failed refuses the post: try the others.
        for i in 0..loops.len() {
            match loops[(first + i) % loops.len()].mailbox.post(command) {
                Ok(()) => return Ok(()),
                Err(back) => command = back,
            }
        }
        Err(io::Error::other("every event loop has ended"))
    }

    /// Ends the reconnects of the connects with `token`
    /// ([`Connect::reconnect`]): no attempt waiting for its back-off
    /// starts, and a connection open now is not reopened when it closes
    /// (it stays open: [`disconnect`](Self::disconnect) it if need be).
    pub fn stop_reconnect(&self, token: u64) {
        for l in &self.shared.loops {
            let _ = l.mailbox.post(Command::StopReconnect(token));
        }
    }

    /// Whether `id` names an open connection.
    pub fn is_open(&self, id: ConnId) -> bool {
        self.open_loop(id).is_ok()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.stats().connections as usize
    }

    /// Counters summed over every loop (each loop publishes its own once per
    /// turn, so they lag by at most one turn).
    pub fn stats(&self) -> Stats {
        let loops = &self.shared.loops;
        let mut s = Stats::of_loops(loops.iter().map(|l| l.stats.read()));
        s.failed_loops = loops
            .iter()
            .filter(|l| l.failed.load(Ordering::Acquire))
            .count() as u64;
        s.jobs_queued = self.shared.pool.queued() as u64;
        s.jobs_refused = self.shared.pool.refused();
        s
    }

    /// The counters of each loop, in loop order (the jobs' figures, which
    /// are the pool's, are in [`stats`](Self::stats) only).
    pub fn loop_stats(&self) -> Vec<Stats> {
        self.shared
            .loops
            .iter()
            .map(|l| {
                let mut s = Stats::of_loops(std::iter::once(l.stats.read()));
                s.failed_loops = u64::from(l.failed.load(Ordering::Acquire));
                s
            })
            .collect()
    }

    fn check_running(&self) -> Result<(), SendError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            Err(SendError::Stopped)
        } else {
            Ok(())
        }
    }

    fn open_loop(&self, id: ConnId) -> Result<&LoopShared, SendError> {
        self.check_running()?;
        if id.server() != self.shared.tag {
            return Err(SendError::Closed); // an id of another server
        }
        match self.shared.loops.get(id.loop_index()) {
            Some(l) if l.failed.load(Ordering::Acquire) => Err(SendError::LoopFailed),
            Some(l) if l.live.state(id).is_some() => Ok(l),
            _ => Err(SendError::Closed),
        }
    }
}

/// What every thread may see of one loop.
pub(crate) struct LoopShared {
    pub(crate) mailbox: Mailbox,
    pub(crate) live: LiveTable,
    pub(crate) stats: LoopStats,
    pub(crate) drained: Drained,
    /// The loop's driver failed: its connections are closed.
    failed: AtomicBool,
}

impl LoopShared {
    pub(crate) fn new(slots: usize) -> LoopShared {
        LoopShared {
            mailbox: Mailbox::new(),
            live: LiveTable::new(slots),
            stats: LoopStats::default(),
            drained: Drained::default(),
            failed: AtomicBool::new(false),
        }
    }

    pub(crate) fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// The loop's driver failed (`mark_failed`).
    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The error for a post this loop's mailbox refused (the loop ended).
    fn refusal(&self) -> SendError {
        if self.failed.load(Ordering::Acquire) {
            SendError::LoopFailed
        } else {
            SendError::Stopped
        }
    }
}

/// Tells threads waiting in `Handle::wait_writable` that something changed
/// on the loop (a connection drained or closed, sends were taken). The loop
/// pays one atomic load per turn while nobody waits.
#[derive(Default)]
pub(crate) struct Drained {
    waiters: AtomicUsize,
    epoch: Mutex<u64>,
    cond: Condvar,
}

impl Drained {
    /// Once per turn (loop thread): wakes the waiters, if any.
    pub(crate) fn notify_if_waited(&self) {
        if self.waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        *self.epoch.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.cond.notify_all();
    }

    fn wait_until(
        &self,
        until: Instant,
        mut ready: impl FnMut() -> Result<bool, SendError>,
    ) -> Result<bool, SendError> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let result = (|| {
            let mut epoch = self.epoch.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                // Checked under the lock: a notify after this check waits
                // for the lock, so it cannot be missed.
                if ready()? {
                    return Ok(true);
                }
                let now = Instant::now();
                if now >= until {
                    return Ok(false);
                }
                // Bounded waits: a state change the loop did not notify
                // (a turn that ended without one) is seen within 50 ms.
                let wait = (until - now).min(Duration::from_millis(50));
                epoch = self
                    .cond
                    .wait_timeout(epoch, wait)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        })();
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

pub(crate) struct Shared {
    /// Tells this server's ids from another's in the same process.
    pub(crate) tag: u32,
    pub(crate) loops: Vec<LoopShared>,
    pub(crate) framing: Framing,
    pub(crate) next_loop: AtomicUsize,
    pub(crate) stopped: AtomicBool,
    pub(crate) conns: ConnCounter,
    pub(crate) limits: Limits,
    pub(crate) pool: Pool,
    pub(crate) groups: Registry,
    pub(crate) access: Access,
}

impl Shared {
    /// Counts a new connection if the caps allow (`ip`: inbound peer).
    pub(crate) fn admit(&self, ip: Option<IpAddr>) -> Result<(), Cap> {
        self.conns.admit(ip, &self.limits)
    }

    /// Uncounts a connection when its descriptor is closed.
    pub(crate) fn release(&self, ip: Option<IpAddr>) {
        self.conns.release(ip, &self.limits)
    }
    /// Resolves `dial`'s name on a thread of its own, then hands it to loop
    /// `index`. If the loop has ended meanwhile the connect is dropped: the
    /// server is stopping, and `on_connect_failed` can no longer run.
    pub(crate) fn resolve_then_connect(self: &Arc<Self>, index: usize, mut dial: Box<Dial>) {
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("wharf-resolve".into())
            .spawn(move || {
                dial.resolve();
                let _ = shared.loops[index].mailbox.post(Command::Connect(dial));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no thread to resolve a name on; the connect is dropped");
        }
    }
}
