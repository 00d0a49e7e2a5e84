//! Starting, reaching and stopping a server: `Builder`, `Server`, `Handle`.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{FrameError, Framing};
use crate::error::{SendError, ShutdownError};
use crate::event_loop::{EventLoop, LoopConfig};
use crate::handler::Handler;
use crate::id::{ConnId, LiveTable, MAX_LOOPS, MAX_SLOTS};
use crate::limits::{ConnCounter, Limits};
use crate::mailbox::{Command, Mailbox};
use crate::sys::{self, DriverConfig, Listener, Share};

/// Which completion engine the loops run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The best one this machine supports.
    #[default]
    Auto,
    /// io_uring (Linux).
    Uring,
    /// Readiness polling through mio (epoll, kqueue): on Unix, and where
    /// io_uring is blocked (container seccomp profiles) or too old.
    Poll,
    /// I/O completion ports (Windows).
    Iocp,
}

impl Backend {
    /// Reads `WHARF_BACKEND` (`uring`, `poll`, `iocp` or `auto`), which overrides
    /// the builder's choice.
    fn from_env() -> Option<Backend> {
        let v = std::env::var("WHARF_BACKEND").ok()?;
        match v.to_ascii_lowercase().as_str() {
            "uring" | "io_uring" => Some(Backend::Uring),
            "poll" | "mio" => Some(Backend::Poll),
            "iocp" => Some(Backend::Iocp),
            "auto" | "" => Some(Backend::Auto),
            other => {
                tracing::warn!(value = other, "ignoring unknown WHARF_BACKEND");
                None
            }
        }
    }
}

/// Configures and starts a server (or a client: start without `bind` and
/// use [`Handle::connect`]).
#[derive(Debug)]
pub struct Builder {
    threads: usize,
    framing: Framing,
    listeners: Vec<(SocketAddr, Listener, Share)>,
    backlog: i32,
    reuse_port: bool,
    recv_buffers: u16,
    recv_buffer_size: u32,
    queue_depth: u32,
    socket_options: sys::SocketOptions,
    limits: Limits,
    backend: Backend,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            framing: Framing::default(),
            listeners: Vec::new(),
            backlog: 1024,
            reuse_port: true,
            recv_buffers: 512,
            recv_buffer_size: 16 * 1024,
            queue_depth: 4096,
            socket_options: sys::SocketOptions {
                nodelay: true,
                send_buffer: None,
            },
            limits: Limits {
                high_water: 64 * 1024,
                low_water: 32 * 1024,
                write_stall_timeout: Some(Duration::from_secs(30)),
                idle_timeout: None,
                first_message_timeout: None,
                close_linger: Duration::from_secs(2),
                close_slow_broadcast_peers: false,
                max_connections: 100_000,
                max_connections_per_ip: None,
            },
            backend: Backend::Auto,
        }
    }
}

impl Builder {
    /// Event-loop threads (default: one per CPU).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n.clamp(1, MAX_LOOPS);
        self
    }

    /// How messages are cut from the byte stream (default: 4-byte
    /// big-endian length prefix, 1 MiB maximum).
    pub fn framing(mut self, framing: impl Into<Framing>) -> Self {
        self.framing = framing.into();
        self
    }

    /// Gives each loop its own listening socket with `SO_REUSEPORT`, so the
    /// kernel spreads new connections evenly across loops (default: on).
    /// Off, one socket is shared by all loops and whichever is awake
    /// accepts, which can leave a loop idle. Call before `bind` (and after
    /// `threads`). A port already in use fails either way; but while wharf
    /// listens with this on, another process of the same user that also
    /// sets `SO_REUSEPORT` could join the port.
    pub fn reuse_port(mut self, on: bool) -> Self {
        self.reuse_port = on;
        self
    }

    /// Listens on `addr` (may be called for several addresses). The port is
    /// taken now, so a busy port or a malformed address fails here.
    pub fn bind(mut self, addr: impl ToSocketAddrs) -> io::Result<Self> {
        let mut last = None;
        for addr in addr.to_socket_addrs()? {
            let share = if self.reuse_port && self.threads > 1 {
                Share::FirstOfGroup
            } else {
                Share::Alone
            };
            match sys::bind(addr, self.backlog, share) {
                Ok(listener) => {
                    let local = listener
                        .local_addr()?
                        .as_socket()
                        .ok_or_else(|| io::Error::other("listener has no IP address"))?;
                    self.listeners.push((local, listener, share));
                    return Ok(self);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")
        }))
    }

    /// Most connections open at once, inbound and outbound, across all
    /// loops (default 100,000). One more is closed as soon as it is
    /// accepted (and counted in [`Stats::refused`]); the open ones never
    /// notice.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.limits.max_connections = n.clamp(1, MAX_SLOTS);
        self
    }

    /// Most inbound connections open at once from one IP address (default:
    /// no limit).
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.limits.max_connections_per_ip = Some(n.max(1));
        self
    }

    /// Closes a connection on which nothing arrived for `d`
    /// ([`CloseReason::IdleTimeout`](crate::CloseReason::IdleTimeout)).
    /// Default: none.
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.limits.idle_timeout = Some(d);
        self
    }

    /// Closes a connection whose first whole message has not arrived `d`
    /// after it opened: a client that connects and stays silent, or trickles
    /// a byte at a time (slowloris). Default: none.
    pub fn first_message_timeout(mut self, d: Duration) -> Self {
        self.limits.first_message_timeout = Some(d);
        self
    }

    /// Closes a connection whose queued data has not moved for `d`: the
    /// peer stopped reading (default 30 s; `None` never).
    pub fn write_stall_timeout(mut self, d: Option<Duration>) -> Self {
        self.limits.write_stall_timeout = d;
        self
    }

    /// Whether `broadcast` closes a peer that is over its high-water mark
    /// ([`CloseReason::SlowPeer`](crate::CloseReason::SlowPeer)) instead of
    /// skipping it (the default; counted in [`Stats::broadcast_skipped`]).
    pub fn close_slow_broadcast_peers(mut self, close: bool) -> Self {
        self.limits.close_slow_broadcast_peers = close;
        self
    }

    /// The receive-buffer pool of each loop: `count` (a power of two) buffers
    /// of `size` bytes (default 512 × 16 KiB). Buffers are shared by all of
    /// a loop's connections and held only while data is being handled.
    pub fn recv_buffers(mut self, count: u16, size: u32) -> Self {
        self.recv_buffers = count;
        self.recv_buffer_size = size;
        self
    }

    /// Disable Nagle's algorithm on every connection (default: true).
    pub fn nodelay(mut self, on: bool) -> Self {
        self.socket_options.nodelay = on;
        self
    }

    /// The kernel's send buffer per connection (SO_SNDBUF; default: the
    /// system's, which on Linux grows to megabytes). Smaller means less
    /// kernel memory per connection and earlier back-pressure.
    pub fn socket_send_buffer(mut self, bytes: usize) -> Self {
        self.socket_options.send_buffer = Some(bytes);
        self
    }

    /// Send-queue water marks per connection (default 64 KiB high, 32 KiB
    /// low, as Netty's). Over the high mark, sends fail with
    /// [`SendError::Backpressure`] and the connection's reading pauses (so a
    /// handler that answers every message cannot grow memory); below the low
    /// mark both resume and `Handler::on_drain` runs. A message is refused
    /// only when the queue is already over the mark, so one message of any
    /// size up to the maximum frame always fits: a connection holds at most
    /// `high + max_frame` bytes. With 10,000 stalled peers the defaults bound
    /// queued memory near 640 MiB plus one frame each.
    pub fn send_water_marks(mut self, high: usize, low: usize) -> Self {
        self.limits.high_water = high;
        self.limits.low_water = low.min(high);
        self
    }

    /// How long a closing connection waits for its peer to finish after
    /// queued data has been sent (default 2 s).
    pub fn close_linger(mut self, d: Duration) -> Self {
        self.limits.close_linger = d;
        self
    }

    /// The completion engine (default: [`Backend::Auto`]). The environment
    /// variable `WHARF_BACKEND=uring|poll|iocp|auto` overrides it.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Starts the loops and returns the running server.
    pub fn start<H: Handler>(self, handler: H) -> io::Result<Server> {
        let backend = sys::choose(Backend::from_env().unwrap_or(self.backend))?;
        let threads = self.threads;
        // One listener per loop and address, sharing the port.
        let mut per_loop: Vec<Vec<Listener>> = (0..threads).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        // Loops sharing one socket accept whenever they are awake, which can
        // leave a loop without connections: they spread them instead.
        let spread_accepts = threads > 1
            && self
                .listeners
                .iter()
                .any(|(_, _, share)| *share == Share::Alone || !sys::KERNEL_SPREADS_GROUPS);
        for (addr, first, share) in self.listeners {
            local_addrs.push(addr);
            for listeners in per_loop.iter_mut().skip(1) {
                if share == Share::FirstOfGroup {
                    listeners.push(sys::bind(addr, self.backlog, Share::JoinGroup)?);
                } else {
                    // One listening socket, a handle of it per loop: every
                    // loop accepts from the same queue.
                    listeners.push(first.try_clone()?);
                }
            }
            per_loop[0].push(first);
        }
        let slots = self.limits.max_connections;
        let shared = Arc::new(Shared {
            loops: (0..threads)
                .map(|_| LoopShared {
                    mailbox: Mailbox::new(),
                    live: LiveTable::new(slots),
                    stats: LoopStats::default(),
                })
                .collect(),
            framing: self.framing.clone(),
            next_loop: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            conns: ConnCounter::default(),
            limits: self.limits,
        });
        let handle = Handle { shared };
        let handler = Arc::new(handler);
        let driver = DriverConfig {
            recv_buffers: self.recv_buffers,
            recv_buffer_size: self.recv_buffer_size,
            queue_depth: self.queue_depth,
            backend,
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut joins = Vec::new();
        for (index, listeners) in per_loop.into_iter().enumerate() {
            let config = LoopConfig {
                index,
                driver,
                framing: self.framing.clone(),
                socket_options: self.socket_options,
                limits: self.limits,
                spread_accepts,
            };
            let handler = handler.clone();
            let handle = handle.clone();
            let ready = ready_tx.clone();
            let join = std::thread::Builder::new()
                .name(format!("wharf-loop-{index}"))
                .spawn(
                    move || match EventLoop::new(config, handler, handle, listeners) {
                        Ok(event_loop) => {
                            let _ = ready.send(Ok(()));
                            event_loop.run();
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    },
                )?;
            joins.push(join);
        }
        drop(ready_tx);
        let mut server = Server {
            handle,
            joins,
            local_addrs,
            backend,
        };
        for _ in 0..threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = server.stop(Duration::ZERO);
                    return Err(e);
                }
                Err(_) => {
                    let _ = server.stop(Duration::ZERO);
                    return Err(io::Error::other("an event-loop thread died while starting"));
                }
            }
        }
        Ok(server)
    }
}

/// A running server: its loops, listeners and connections.
///
/// Dropping it stops it at once (as `shutdown(Duration::ZERO)`): call
/// [`Server::shutdown`] to let queued data drain.
#[derive(Debug)]
pub struct Server {
    handle: Handle,
    joins: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    backend: Backend,
}

impl Server {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A handle to reach connections from any thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The first address listened on (useful after binding port 0).
    ///
    /// # Panics
    /// If the server listens on nothing.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// The backend the loops run on (never `Auto`).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Every address listened on.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Stops accepting, lets every connection flush what is queued (until
    /// `deadline` has passed), closes them (each gets `on_close` with
    /// [`CloseReason::Shutdown`](crate::CloseReason::Shutdown)) and joins the
    /// loop threads. No callback runs after this returns.
    pub fn shutdown(mut self, deadline: Duration) -> Result<(), ShutdownError> {
        self.stop(deadline)
    }

    fn stop(&mut self, deadline: Duration) -> Result<(), ShutdownError> {
        let until = Instant::now() + deadline;
        for l in &self.handle.shared.loops {
            l.mailbox.post(Command::Shutdown(until));
        }
        let mut panicked = false;
        for join in self.joins.drain(..) {
            panicked |= join.join().is_err();
        }
        self.handle.shared.stopped.store(true, Ordering::Release);
        if panicked {
            Err(ShutdownError::Panicked)
        } else {
            Ok(())
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.joins.is_empty() {
            let _ = self.stop(Duration::ZERO);
        }
    }
}

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
    /// Fails at once with [`SendError::Closed`] if `id` is not open: a stale
    /// id never reaches a newer connection in the same slot; and with
    /// [`SendError::Backpressure`] while the connection is over its
    /// high-water mark. A connection that closes (or crosses its mark) after
    /// this returns `Ok` drops the message.
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
        l.mailbox.post(Command::Send(id, msg));
        Ok(())
    }

    /// Sends one message to every open connection. It is encoded once and
    /// shared by all of them.
    pub fn broadcast(&self, msg: Bytes) -> Result<(), SendError> {
        self.check_running()?;
        let wire = self
            .shared
            .framing
            .encode_shared(&msg)
            .map_err(|e| match e {
                FrameError::TooLarge { len, max } => SendError::TooLarge { len, max },
                FrameError::Invalid(_) => SendError::TooLarge {
                    len: msg.len(),
                    max: 0,
                },
            })?;
        for l in &self.shared.loops {
            l.mailbox.post(Command::Broadcast(wire.clone()));
        }
        Ok(())
    }

    /// Closes connection `id` after what is queued for it has been sent; its
    /// `on_close` gets [`CloseReason::Disconnected`](crate::CloseReason::Disconnected).
    pub fn disconnect(&self, id: ConnId) -> Result<(), SendError> {
        let l = self.open_loop(id)?;
        l.mailbox.post(Command::Disconnect(id));
        Ok(())
    }

    /// Opens an outbound connection on one of the loops. It gets the same
    /// callbacks as an accepted one (`Conn::is_outbound` tells them apart);
    /// a failure calls `Handler::on_connect_failed`.
    pub fn connect(&self, addr: impl ToSocketAddrs) -> io::Result<()> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(io::Error::other("server stopped"));
        }
        let addr = addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "address resolved to nothing")
        })?;
        let n = self.shared.next_loop.fetch_add(1, Ordering::Relaxed);
        let l = &self.shared.loops[n % self.shared.loops.len()];
        l.mailbox.post(Command::Connect(addr));
        Ok(())
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
        let mut s = Stats::default();
        for l in &self.shared.loops {
            let t = &l.stats;
            s.connections += t.open.load(Ordering::Relaxed);
            s.accepted += t.accepted.load(Ordering::Relaxed);
            s.refused += t.refused.load(Ordering::Relaxed);
            s.closed += t.closed.load(Ordering::Relaxed);
            s.messages_in += t.messages_in.load(Ordering::Relaxed);
            s.messages_out += t.messages_out.load(Ordering::Relaxed);
            s.bytes_in += t.bytes_in.load(Ordering::Relaxed);
            s.bytes_out += t.bytes_out.load(Ordering::Relaxed);
            s.recv_buffer_waits += t.recv_buffer_waits.load(Ordering::Relaxed);
            s.timed_out += t.timed_out.load(Ordering::Relaxed);
            s.broadcast_skipped += t.broadcast_skipped.load(Ordering::Relaxed);
            s.accept_pauses += t.accept_pauses.load(Ordering::Relaxed);
        }
        s
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
        match self.shared.loops.get(id.loop_index()) {
            Some(l) if l.live.state(id).is_some() => Ok(l),
            _ => Err(SendError::Closed),
        }
    }
}

/// Live counters of a server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now.
    pub connections: u64,
    /// Connections opened so far (accepted or connected).
    pub accepted: u64,
    /// Connections refused (over `max_connections`, or during shutdown).
    pub refused: u64,
    /// Connections closed so far.
    pub closed: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Messages queued for sending.
    pub messages_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Times a receive paused because every pooled receive buffer was in
    /// use (often: raise `Builder::recv_buffers`).
    pub recv_buffer_waits: u64,
    /// Connections closed by a timeout (idle, first message, write stall).
    pub timed_out: u64,
    /// Broadcast messages not queued to a peer over its high-water mark.
    pub broadcast_skipped: u64,
    /// Times accepting paused on an error such as running out of
    /// descriptors (EMFILE).
    pub accept_pauses: u64,
}

/// What every thread may see of one loop.
pub(crate) struct LoopShared {
    pub(crate) mailbox: Mailbox,
    pub(crate) live: LiveTable,
    pub(crate) stats: LoopStats,
}

/// One loop's counters; written by that loop only, once per turn.
#[derive(Default)]
pub(crate) struct LoopStats {
    pub(crate) open: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) messages_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) recv_buffer_waits: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) broadcast_skipped: AtomicU64,
    pub(crate) accept_pauses: AtomicU64,
}

pub(crate) struct Shared {
    pub(crate) loops: Vec<LoopShared>,
    pub(crate) framing: Framing,
    next_loop: AtomicUsize,
    stopped: AtomicBool,
    conns: ConnCounter,
    limits: Limits,
}

impl Shared {
    /// Counts a new connection if the caps allow (`ip`: inbound peer).
    pub(crate) fn admit(&self, ip: Option<IpAddr>) -> bool {
        self.conns.admit(ip, &self.limits)
    }

    /// Uncounts a connection when its descriptor is closed.
    pub(crate) fn release(&self, ip: Option<IpAddr>) {
        self.conns.release(ip, &self.limits)
    }
}
