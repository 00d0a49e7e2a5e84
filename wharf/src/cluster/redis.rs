//! The Redis backplane: two connections to the broker, each on a thread of
//! its own, so that no loop ever waits for the network.
//!
//! - The publisher thread takes what the loops publish from a bounded
//!   queue (a full queue drops and counts, never blocks a loop) and writes
//!   it to Redis in pipelines: one round trip for a batch of publishes.
//!   Every half second it publishes a heartbeat to this node's own control
//!   channel.
//! - The subscriber thread holds the pub/sub connection: it delivers what
//!   other nodes publish to the members here, and changes its
//!   subscriptions when groups gain or lose their members here. It is
//!   told of such a change by a message on the control channel (written
//!   by the publisher thread), so it can block on the socket without
//!   polling; the heartbeats tell it the link is alive, and their absence
//!   for two seconds that it is not.
//!
//! Each thread reconnects on its own, with exponential back-off from
//! 100 ms to 5 s.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::{Client, Connection};

use super::wire::{decode, encode, Seen, Sequences};
use super::ClusterStats;
use crate::groups::Backplane;
use crate::handle::Handle;

const HEARTBEAT: Duration = Duration::from_millis(500);
/// No message (heartbeats included) for this long: the link is dead.
const SILENCE: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Publishes written in one pipeline, at most.
const BATCH: usize = 512;

/// A [`Backplane`] over Redis pub/sub: see the [module](super) for what it
/// promises. Give it to `Builder::backplane`; one per server.
pub struct Redis {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("node", &format_args!("{:016x}", self.inner.node))
            .field("namespace", &self.inner.namespace)
            .finish()
    }
}

struct Inner {
    client: Client,
    namespace: String,
    /// This node's id, in every message it publishes.
    node: u64,
    queue_len: usize,
    /// The publisher thread's queue, set once at attach (no lock per
    /// publish).
    to_publisher: OnceLock<SyncSender<Out>>,
    /// The groups with members here: what the subscriber should be
    /// subscribed to.
    wanted: Mutex<HashSet<String>>,
    /// Bumped at every change of `wanted`.
    wanted_version: AtomicU64,
    /// What it is subscribed to now (for `wait_subscribed`).
    subscribed: Mutex<HashSet<String>>,
    changed: Condvar,
    handle: Mutex<Option<Handle>>,
    stopping: AtomicBool,
    publisher_up: AtomicBool,
    subscriber_up: AtomicBool,
    published: AtomicU64,
    publish_lost: AtomicU64,
    received: AtomicU64,
    gaps: AtomicU64,
    stale: AtomicU64,
    reconnects: AtomicU64,
    /// How long this node's presence (its member counts) lives in Redis
    /// without a refresh.
    presence_ttl: Duration,
    /// A connection for `cluster_groups`, made on first use.
    queries: Mutex<Option<Connection>>,
}

enum Out {
    Publish(String, Vec<u8>),
    /// Tell the subscriber to look at `wanted` again.
    Wake,
    /// The backplane is detaching: send what came before, then end.
    Stop,
}

impl Redis {
    /// A backplane through the Redis server at `url`
    /// (`redis://HOST:PORT[/DB]`, `redis://:PASSWORD@HOST:PORT`). Nothing
    /// connects until the server starts; fails only on a malformed URL.
    pub fn new(url: &str) -> Result<Redis, redis::RedisError> {
        let client = Client::open(url)?;
        Ok(Redis {
            inner: Arc::new(Inner {
                client,
                namespace: "wharf".into(),
                node: node_id(),
                queue_len: 65_536,
                to_publisher: OnceLock::new(),
                wanted: Mutex::new(HashSet::new()),
                wanted_version: AtomicU64::new(0),
                subscribed: Mutex::new(HashSet::new()),
                changed: Condvar::new(),
                handle: Mutex::new(None),
                stopping: AtomicBool::new(false),
                publisher_up: AtomicBool::new(false),
                subscriber_up: AtomicBool::new(false),
                published: AtomicU64::new(0),
                publish_lost: AtomicU64::new(0),
                received: AtomicU64::new(0),
                gaps: AtomicU64::new(0),
                stale: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
                presence_ttl: Duration::from_secs(10),
                queries: Mutex::new(None),
            }),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// The prefix of this cluster's channel names (default `wharf`): nodes
    /// with the same namespace on the same broker form one cluster.
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.inner_mut().namespace = namespace.to_owned();
        self
    }

    /// Publishes that may wait for the broker (default 65,536); beyond it
    /// a publish is dropped and counted in `publish_lost`.
    pub fn queue(mut self, messages: usize) -> Self {
        self.inner_mut().queue_len = messages.max(1);
        self
    }

    /// How long a node's member counts stay in Redis without a refresh
    /// (default 10 s; each node refreshes its own every third of it): the
    /// longest a dead node's members are still counted by
    /// [`cluster_groups`](Self::cluster_groups).
    pub fn presence_ttl(mut self, ttl: Duration) -> Self {
        self.inner_mut().presence_ttl = ttl.max(Duration::from_millis(300));
        self
    }

    /// Members per group on every node of the cluster, by name: the sum of
    /// what each live node last wrote of its own (refreshed every third of
    /// [`presence_ttl`](Self::presence_ttl), so a join or a leave shows
    /// within that; a node that died drops out within the TTL).
    ///
    /// This asks the broker and waits for it (one or two round trips):
    /// call it off the loops, from a job on the worker pool
    /// (`Conn::submit`) or a thread of your own.
    pub fn cluster_groups(&self) -> redis::RedisResult<Vec<(String, u64)>> {
        let i = &self.inner;
        let mut link = i.queries.lock().unwrap_or_else(|p| p.into_inner());
        if link.is_none() {
            *link = Some(i.connect("query")?);
        }
        let con = link.as_mut().expect("connected above");
        let result = i.read_presence(con);
        if result.is_err() {
            *link = None; // a fresh connection next time
        }
        result
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("configured before it is attached")
    }

    /// This node's id (random, new at every start of the process).
    pub fn node(&self) -> u64 {
        self.inner.node
    }

    /// The counters of this node's links.
    pub fn stats(&self) -> ClusterStats {
        let i = &self.inner;
        ClusterStats {
            linked: i.publisher_up.load(Ordering::Acquire)
                && i.subscriber_up.load(Ordering::Acquire),
            published: i.published.load(Ordering::Relaxed),
            publish_lost: i.publish_lost.load(Ordering::Relaxed),
            received: i.received.load(Ordering::Relaxed),
            gaps: i.gaps.load(Ordering::Relaxed),
            stale: i.stale.load(Ordering::Relaxed),
            reconnects: i.reconnects.load(Ordering::Relaxed),
            subscriptions: i.lock_subscribed().len() as u64,
        }
    }

    /// Waits up to `timeout` until this node is subscribed to `group` on
    /// the broker (it has members here and the subscription is in place):
    /// from then on, what other nodes publish to it reaches them.
    pub fn wait_subscribed(&self, group: &str, timeout: Duration) -> bool {
        let until = crate::timer::deadline(Instant::now(), timeout);
        let mut subscribed = self.inner.lock_subscribed();
        while !subscribed.contains(group) {
            let now = Instant::now();
            if now >= until {
                return false;
            }
            subscribed = self
                .inner
                .changed
                .wait_timeout(subscribed, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Waits up to `timeout` until both links to the broker are up.
    pub fn wait_linked(&self, timeout: Duration) -> bool {
        let until = crate::timer::deadline(Instant::now(), timeout);
        while !self.stats().linked {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Backplane for Redis {
    fn attach(&self, handle: Handle) {
        let inner = &self.inner;
        {
            let mut attached = inner.handle.lock().unwrap_or_else(|p| p.into_inner());
            if attached.is_some() || inner.stopping.load(Ordering::Acquire) {
                tracing::error!("cluster: a Redis backplane serves one server, once; ignored");
                return;
            }
            *attached = Some(handle);
        }
        let (tx, rx) = mpsc::sync_channel(inner.queue_len);
        if inner.to_publisher.set(tx).is_err() {
            return; // cannot happen: attach runs once (checked above)
        }
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let p = inner.clone();
        let s = inner.clone();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .expect("spawn a cluster thread")
        };
        threads.push(spawn("wharf-redis-pub", Box::new(move || p.publisher(rx))));
        threads.push(spawn("wharf-redis-sub", Box::new(move || s.subscriber())));
    }

    fn subscribe(&self, group: &str) {
        self.inner.lock_wanted().insert(group.to_owned());
        self.inner.wanted_version.fetch_add(1, Ordering::Release);
        self.inner.wake_subscriber();
    }

    fn unsubscribe(&self, group: &str) {
        self.inner.lock_wanted().remove(group);
        self.inner.wanted_version.fetch_add(1, Ordering::Release);
        self.inner.wake_subscriber();
    }

    fn publish(&self, group: &str, msg: &[u8]) {
        if self.inner.stopping.load(Ordering::Acquire) {
            return;
        }
        let Some(tx) = self.inner.to_publisher.get() else {
            return; // not started
        };
        match tx.try_send(Out::Publish(group.to_owned(), msg.to_vec())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.inner.publish_lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn detach(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::Release);
        // The publisher ends at the stop, and tells the subscriber on its
        // way out. (A full queue makes this wait while the publisher
        // drains it: it never waits on the loops.)
        if let Some(tx) = inner.to_publisher.get() {
            let _ = tx.send(Out::Stop);
        }
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
        inner
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

impl Inner {
    fn lock_wanted(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.wanted.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_subscribed(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.subscribed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake_subscriber(&self) {
        if let Some(tx) = self.to_publisher.get() {
            // A full queue is fine: the next heartbeat wakes it too.
            let _ = tx.try_send(Out::Wake);
        }
    }

    fn group_channel(&self, group: &str) -> String {
        format!("{}:g:{group}", self.namespace)
    }

    fn presence_key(&self, node: &str) -> String {
        format!("{}:presence:{node}", self.namespace)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.namespace)
    }

    fn node_name(&self) -> String {
        format!("{:016x}", self.node)
    }

    /// Writes this node's member counts (a hash that expires unless
    /// refreshed) and its entry in the cluster's set of nodes (scored by
    /// when it expires, so that any node can drop the dead), in one
    /// transaction.
    fn write_presence(&self, con: &mut Connection) -> redis::RedisResult<()> {
        // The handle is cloned out first: no lock of ours is held while the
        // server's registry is locked.
        let handle = self
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let groups = handle.map(|h| h.groups()).unwrap_or_default();
        let key = self.presence_key(&self.node_name());
        let ttl = self.presence_ttl.as_millis() as u64;
        let now = unix_ms();
        let mut pipe = redis::pipe();
        pipe.atomic().cmd("DEL").arg(&key).ignore();
        if !groups.is_empty() {
            let cmd = pipe.cmd("HSET").arg(&key);
            for (group, n) in &groups {
                cmd.arg(group).arg(*n as u64);
            }
            cmd.ignore();
            pipe.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
        }
        let nodes = self.nodes_key();
        pipe.cmd("ZADD")
            .arg(&nodes)
            .arg(now + ttl)
            .arg(self.node_name())
            .ignore();
        // Entries a TTL past their expiry: nodes that died (the margin
        // allows for clocks a TTL apart).
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&nodes)
            .arg("-inf")
            .arg(now.saturating_sub(ttl))
            .ignore();
        pipe.query(con)
    }

    /// Takes this node out at once (it is stopping).
    fn erase_presence(&self, con: &mut Connection) -> redis::RedisResult<()> {
        redis::pipe()
            .cmd("DEL")
            .arg(self.presence_key(&self.node_name()))
            .ignore()
            .cmd("ZREM")
            .arg(self.nodes_key())
            .arg(self.node_name())
            .ignore()
            .query(con)
    }

    fn read_presence(&self, con: &mut Connection) -> redis::RedisResult<Vec<(String, u64)>> {
        let ttl = self.presence_ttl.as_millis() as u64;
        let nodes: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.nodes_key())
            .arg(unix_ms().saturating_sub(ttl))
            .arg("+inf")
            .query(con)?;
        let mut pipe = redis::pipe();
        for n in &nodes {
            pipe.cmd("HGETALL").arg(self.presence_key(n));
        }
        let each: Vec<Vec<(String, u64)>> = pipe.query(con)?;
        let mut sum: std::collections::BTreeMap<String, u64> = Default::default();
        for (group, n) in each.into_iter().flatten() {
            *sum.entry(group).or_default() += n;
        }
        Ok(sum.into_iter().collect())
    }

    fn control_channel(&self) -> String {
        format!("{}:ctl:{:016x}", self.namespace, self.node)
    }

    fn group_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel
            .strip_prefix(self.namespace.as_str())?
            .strip_prefix(":g:")
    }

    /// A connection to the broker for `role` (`pub`, `sub` or `query`),
    /// named `wharf-NAMESPACE-NODE-ROLE` in Redis's `CLIENT LIST`, so that
    /// an operator sees which node holds which link.
    fn connect(&self, role: &str) -> redis::RedisResult<Connection> {
        let mut con = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        // A broker that vanishes without a word (a host gone, a cable
        // pulled) must not hold a thread forever: no write or reply takes
        // longer than this on a live link, whose heartbeats come every
        // half second.
        con.set_write_timeout(Some(SILENCE))?;
        con.set_read_timeout(Some(SILENCE))?;
        let name = format!("wharf-{}-{}-{role}", self.namespace, self.node_name());
        // Names hold no spaces: a namespace with one is named without it.
        let name: String = name.chars().filter(|c| !c.is_whitespace()).collect();
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .query::<()>(&mut con)?;
        Ok(con)
    }

    /// The publisher thread: until the sender is dropped (`detach`).
    fn publisher(self: Arc<Self>, rx: Receiver<Out>) {
        let control = self.control_channel();
        let mut link: Option<Connection> = None;
        let mut backoff = Backoff::default();
        let mut seqs = Sequences::new(Instant::now());
        let mut batch: Vec<Out> = Vec::with_capacity(BATCH);
        let mut last_beat = Instant::now() - HEARTBEAT;
        let mut last_presence: Option<Instant> = None;
        let mut stop = false;
        while !stop {
            if link.is_none() && backoff.due() {
                match self.connect("pub") {
                    Ok(c) => {
                        if backoff.failed_before() {
                            self.reconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        backoff.reset();
                        self.publisher_up.store(true, Ordering::Release);
                        link = Some(c);
                        // A broker that restarted has lost the presence.
                        last_presence = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: cannot reach the broker to publish");
                        backoff.failed();
                    }
                }
            }
            let wait = if link.is_some() {
                HEARTBEAT.saturating_sub(last_beat.elapsed())
            } else {
                backoff.until_due().min(HEARTBEAT)
            };
            match rx.recv_timeout(wait) {
                Ok(first) => {
                    batch.push(first);
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // What came after the stop is not sent: the server is
            // stopping, and it is counted as lost.
            if let Some(at) = batch.iter().position(|m| matches!(m, Out::Stop)) {
                stop = true;
                let late = batch.split_off(at);
                let late = late
                    .iter()
                    .filter(|m| matches!(m, Out::Publish(..)))
                    .count();
                self.publish_lost.fetch_add(late as u64, Ordering::Relaxed);
            }
            let now = Instant::now();
            let beat = now.duration_since(last_beat) >= HEARTBEAT
                || batch.iter().any(|m| matches!(m, Out::Wake));
            let publishes = batch
                .iter()
                .filter(|m| matches!(m, Out::Publish(..)))
                .count() as u64;
            // Every publish is numbered, the ones lost here too: the
            // receivers then count them in their gaps.
            let mut pipe = redis::pipe();
            for m in batch.drain(..) {
                if let Out::Publish(group, body) = m {
                    let seq = seqs.next(group.clone(), now);
                    if link.is_some() {
                        pipe.cmd("PUBLISH")
                            .arg(self.group_channel(&group))
                            .arg(encode(self.node, seq, &body))
                            .ignore();
                    }
                }
            }
            let Some(con) = link.as_mut() else {
                // At most once: what comes while the link is down is lost.
                self.publish_lost.fetch_add(publishes, Ordering::Relaxed);
                continue;
            };
            if beat {
                pipe.cmd("PUBLISH").arg(&control).arg("beat").ignore();
                last_beat = now;
            }
            if publishes == 0 && !beat {
                continue;
            }
            let presence_due = beat
                && match last_presence {
                    Some(at) => now.duration_since(at) >= self.presence_ttl / 3,
                    None => true,
                };
            let mut result = pipe.query::<()>(con);
            if result.is_ok() {
                self.published.fetch_add(publishes, Ordering::Relaxed);
                if presence_due {
                    result = self.write_presence(con);
                    last_presence = Some(now);
                }
            } else {
                self.publish_lost.fetch_add(publishes, Ordering::Relaxed);
            }
            match result {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: publishing failed; reconnecting");
                    self.publisher_up.store(false, Ordering::Release);
                    link = None;
                    backoff.failed();
                }
            }
        }
        // Stopping: leave the cluster's counts, and wake the subscriber so
        // it sees the flag.
        if let Some(con) = link.as_mut() {
            let _ = self.erase_presence(con);
            let _: redis::RedisResult<()> =
                redis::cmd("PUBLISH").arg(&control).arg("stop").query(con);
        }
        self.publisher_up.store(false, Ordering::Release);
    }

    /// The subscriber thread: until `stopping`.
    fn subscriber(self: Arc<Self>) {
        let mut backoff = Backoff::default();
        let mut seqs: Sequences<(u64, String)> = Sequences::new(Instant::now());
        while !self.stopping.load(Ordering::Acquire) {
            if !backoff.due() {
                std::thread::sleep(backoff.until_due().min(Duration::from_millis(50)));
                continue;
            }
            let mut con = match self.connect("sub") {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: cannot reach the broker to subscribe");
                    backoff.failed();
                    continue;
                }
            };
            if backoff.failed_before() {
                self.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            let e = self.listen(&mut con, &mut seqs, &mut backoff);
            self.subscriber_up.store(false, Ordering::Release);
            self.lock_subscribed().clear();
            self.changed.notify_all();
            match e {
                Some(e) if !self.stopping.load(Ordering::Acquire) => {
                    tracing::warn!(error = %e, "cluster: the subscription failed; reconnecting");
                    backoff.failed();
                }
                _ => {}
            }
        }
    }

    /// Holds one pub/sub connection until it fails (the error) or the
    /// backplane stops (`None`).
    fn listen(
        &self,
        con: &mut Connection,
        seqs: &mut Sequences<(u64, String)>,
        backoff: &mut Backoff,
    ) -> Option<redis::RedisError> {
        let control = self.control_channel();
        let mut ps = con.as_pubsub();
        if let Err(e) = ps.set_read_timeout(Some(SILENCE)) {
            return Some(e);
        }
        if let Err(e) = ps.subscribe(&control) {
            return Some(e);
        }
        let mut current = HashSet::new();
        let mut version = self.wanted_version.load(Ordering::Acquire);
        if let Err(e) = self.reconcile(&mut ps, &mut current, seqs) {
            return Some(e);
        }
        backoff.reset();
        self.subscriber_up.store(true, Ordering::Release);
        loop {
            let msg = match ps.get_message() {
                Ok(m) => m,
                Err(e) => return Some(e),
            };
            if self.stopping.load(Ordering::Acquire) {
                return None;
            }
            let channel = msg.get_channel_name();
            if channel == control {
                // A heartbeat, or news of a change: subscribe to what
                // changed since the last look, if anything did.
                let now = self.wanted_version.load(Ordering::Acquire);
                if now != version {
                    version = now;
                    if let Err(e) = self.reconcile(&mut ps, &mut current, seqs) {
                        return Some(e);
                    }
                }
                continue;
            }
            let Some(group) = self.group_of(channel) else {
                continue;
            };
            let Some((node, seq, body)) = decode(msg.get_payload_bytes()) else {
                tracing::warn!(channel, "cluster: a message without a header; dropped");
                continue;
            };
            if node == self.node {
                continue; // delivered here when it was published
            }
            match seqs.see((node, group.to_owned()), seq, Instant::now()) {
                Seen::Stale => {
                    self.stale.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Seen::Deliver { missed } => {
                    self.gaps.fetch_add(missed, Ordering::Relaxed);
                }
            }
            let handle = self
                .handle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(h) = handle {
                if h.publish_local(group, body).is_ok() {
                    self.received.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Subscribes to the groups wanted and not subscribed, unsubscribes
    /// from the others.
    fn reconcile(
        &self,
        ps: &mut redis::PubSub<'_>,
        current: &mut HashSet<String>,
        seqs: &mut Sequences<(u64, String)>,
    ) -> redis::RedisResult<()> {
        let wanted = self.lock_wanted().clone();
        let add: Vec<String> = wanted.difference(current).cloned().collect();
        let drop: Vec<String> = current.difference(&wanted).cloned().collect();
        for chunk in add.chunks(256) {
            let channels: Vec<String> = chunk.iter().map(|g| self.group_channel(g)).collect();
            ps.subscribe(&channels)?;
            current.extend(chunk.iter().cloned());
            self.lock_subscribed().extend(chunk.iter().cloned());
            self.changed.notify_all();
        }
        for chunk in drop.chunks(256) {
            let channels: Vec<String> = chunk.iter().map(|g| self.group_channel(g)).collect();
            ps.unsubscribe(&channels)?;
            let mut subscribed = self.lock_subscribed();
            for g in chunk {
                current.remove(g);
                subscribed.remove(g);
            }
        }
        if !drop.is_empty() {
            seqs.forget(|(_, g)| current.contains(g));
        }
        Ok(())
    }
}

/// Exponential back-off between attempts to reach the broker.
struct Backoff {
    next_at: Instant,
    delay: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next_at: Instant::now(),
            delay: BACKOFF_MIN,
            failures: 0,
        }
    }
}

impl Backoff {
    fn due(&self) -> bool {
        Instant::now() >= self.next_at
    }

    fn until_due(&self) -> Duration {
        self.next_at.saturating_duration_since(Instant::now())
    }

    fn failed(&mut self) {
        self.failures += 1;
        self.next_at = Instant::now() + self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
    }

    fn failed_before(&self) -> bool {
        self.failures > 0
    }

    fn reset(&mut self) {
        self.failures = 0;
        self.delay = BACKOFF_MIN;
    }
}

/// A random node id: the standard library's per-process random hasher
/// keys, mixed with the time and the process id.
fn node_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Milliseconds since the Unix epoch: presence is compared across hosts,
/// so it is wall-clock time (a TTL of margin allows for their skew).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
