//! Configuring and starting a server: `Backend`, `Builder`.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::access::{AcceptLimiter, AcceptRate, Access, Bans, IpRules, SharedRules};
use crate::backend::Backend;
use crate::codec::Framing;
use crate::event_loop::{EventLoop, LoopConfig};
use crate::groups::{Backplane, Registry};
use crate::handle::{Handle, LoopShared, Shared};
use crate::handler::Handler;
use crate::id::{next_server_tag, MAX_LOOPS, MAX_SLOTS};
use crate::limits::{ConnCounter, Limits};
use crate::pool::Pool;
use crate::server::Server;
use crate::sys::{self, DriverConfig, Listener, Share};

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
    workers: usize,
    job_queue: usize,
    tick: Option<Duration>,
    backplane: BackplaneSlot,
    ip_rules: IpRules,
    accept_rate: Option<AcceptRate>,
    accept_rate_per_ip: Option<AcceptRate>,
    tls: Option<crate::tls::ServerTls>,
}

/// The backplane, if any (not `Debug` itself).
#[derive(Default, Clone)]
struct BackplaneSlot(Option<Arc<dyn Backplane>>);

impl std::fmt::Debug for BackplaneSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
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
                ipv6_prefix: 64,
                jobs_per_connection: 32,
                zero_copy_files: None,
                tls_handshake_timeout: crate::tls::DEFAULT_HANDSHAKE_TIMEOUT,
            },
            backend: Backend::Auto,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get().min(16)),
            job_queue: 4096,
            tick: None,
            backplane: BackplaneSlot::default(),
            ip_rules: IpRules::default(),
            accept_rate: None,
            accept_rate_per_ip: None,
            tls: None,
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
    /// no limit). IPv6 clients are counted by network prefix (see
    /// [`per_ip_ipv6_prefix`](Self::per_ip_ipv6_prefix)), since one client
    /// usually holds a whole /64; IPv4 (and IPv4-mapped IPv6) by address.
    pub fn max_connections_per_ip(mut self, n: usize) -> Self {
        self.limits.max_connections_per_ip = Some(n.max(1));
        self
    }

    /// How many leading bits of an IPv6 address make one "IP" for
    /// [`max_connections_per_ip`](Self::max_connections_per_ip),
    /// [`accept_rate_per_ip`](Self::accept_rate_per_ip) and
    /// [`Conn::ban_peer`](crate::Conn::ban_peer) (default 64; 128 counts
    /// exact addresses).
    pub fn per_ip_ipv6_prefix(mut self, bits: u8) -> Self {
        self.limits.ipv6_prefix = bits.min(128);
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

    /// Serves TLS on every listener: each accepted connection does a
    /// handshake first, and opens (`on_open`) once it completes. Keep a
    /// clone of `tls` to replace its certificate while the server runs
    /// ([`ServerTls::replace`](crate::tls::ServerTls::replace)).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long a TLS handshake may take (default 10 s): a connection that
    /// has not finished it by then is closed, never having opened, and is
    /// counted in `Stats::tls_handshake_failures`. Applies to client
    /// connections too.
    #[cfg(feature = "tls")]
    pub fn tls_handshake_timeout(mut self, d: Duration) -> Self {
        self.limits.tls_handshake_timeout = d.max(Duration::from_millis(1));
        self
    }

    /// Whether files ([`Conn::send_file`](crate::Conn::send_file)) go out
    /// without a copy through user space where the backend can
    /// (`sendfile(2)` on io_uring and poll, `TransmitFile` on IOCP), or
    /// are read 256 KiB at a time and sent as bytes (as on a TLS
    /// connection).
    ///
    /// By default, zero copy except to a loopback peer. Over loopback the
    /// receiver is handed the page cache's pages as 4 KiB fragments, and
    /// copying into the socket's own buffers measured both faster and
    /// cheaper (`wharf bench --files` on this project's machines: about
    /// 1.4× the rate and 0.75× the sender's CPU per GiB). Elsewhere zero
    /// copy saves the pass over every byte that a NIC's gather DMA makes
    /// unneeded. `true` or `false` forces one way for every peer.
    pub fn zero_copy_files(mut self, on: bool) -> Self {
        self.limits.zero_copy_files = Some(on);
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
    /// a loop's connections and held only while data is being handled. On
    /// io_uring the kernel is offered only as many as recent turns used
    /// (about twice that, at least 16), the last used first, so that
    /// receives land in memory still in the cache; the rest of the pool is
    /// touched only under bursts.
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
    /// [`SendError::Backpressure`](crate::SendError::Backpressure) and the
    /// connection's reading pauses (at most one receive buffer arrives after
    /// the mark is crossed, and is held), so a handler that answers every
    /// message cannot grow memory; below the low mark both resume and
    /// `Handler::on_drain` runs. A message is refused only when the queue is
    /// already over the mark, so one message of any size up to the maximum
    /// frame always fits: sends from callbacks hold a connection to
    /// `high + max_frame` bytes, and sends from other threads that its loop
    /// has not yet taken to another `high + max_frame`. With 10,000 stalled
    /// peers the defaults bound queued memory near 640 MiB plus one frame
    /// each (twice that if other threads keep sending to all of them).
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

    /// Threads of the worker pool that runs the jobs handlers submit with
    /// [`Conn::submit`](crate::Conn::submit) (default: one per CPU, at most
    /// 16). Jobs are CPU work taken off the loops: more threads than cores
    /// only add switching, fewer leave a core idle while the loops wait.
    /// The threads start on the first submit, so a server that never
    /// submits has none.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.clamp(1, 1024);
        self
    }

    /// Most jobs waiting for a worker, across the server (default 4,096);
    /// a submit beyond it fails with
    /// [`SubmitError::Saturated`](crate::SubmitError::Saturated).
    pub fn job_queue(mut self, n: usize) -> Self {
        self.job_queue = n.max(1);
        self
    }

    /// Jobs of one connection in flight at which its reading pauses until
    /// results come back (default 32): a peer that pipelines requests to a
    /// slow job holds at most this many jobs, not the whole queue.
    pub fn jobs_per_connection(mut self, n: usize) -> Self {
        self.limits.jobs_per_connection = n.clamp(1, 1 << 20) as u32;
        self
    }

    /// Runs `Handler::on_tick` on every loop every `every` (default: never),
    /// with that loop's connections at hand through
    /// [`Tick`](crate::Tick). A loop with no tick and no timer due sleeps.
    pub fn tick(mut self, every: Duration) -> Self {
        self.tick = Some(every.max(Duration::from_millis(1)));
        self
    }

    /// Carries groups past this server: what is published here goes to the
    /// other nodes through `backplane`, and what they publish reaches the
    /// members here (see [`Backplane`], and `wharf::cluster::Redis` with
    /// the `redis` feature). Default: none, groups are this server's own.
    pub fn backplane(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.backplane = BackplaneSlot(Some(backplane));
        self
    }

    /// Who may connect: allow and deny lists of networks (default: every
    /// peer). A refused peer's connection is closed when it is accepted,
    /// before any callback and before it takes a slot, and counted in
    /// [`Stats::denied`](crate::Stats::denied). `Handle::set_ip_rules`
    /// replaces them at runtime.
    pub fn ip_rules(mut self, rules: IpRules) -> Self {
        self.ip_rules = rules;
        self
    }

    /// Most connections accepted per second, from everyone together
    /// (default: no limit). Over it a connection is closed when it is
    /// accepted, before any callback, and counted in
    /// [`Stats::rate_limited`](crate::Stats::rate_limited).
    pub fn accept_rate(mut self, rate: AcceptRate) -> Self {
        self.accept_rate = Some(rate);
        self
    }

    /// Most connections accepted per second from one client address (IPv6
    /// by prefix, as [`max_connections_per_ip`](Self::max_connections_per_ip)
    /// counts them), checked before the server-wide rate, so that one
    /// client flooding spends only its own share. Default: no limit.
    pub fn accept_rate_per_ip(mut self, rate: AcceptRate) -> Self {
        self.accept_rate_per_ip = Some(rate);
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
        let handle = self.handle(threads);
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
                tick: self.tick,
                tls: self.tls.clone(),
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
        let mut server = Server::new(handle, joins, local_addrs, backend);
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
        if let Some(b) = &server.handle().shared.groups.backplane {
            b.attach(server.handle());
        }
        Ok(server)
    }
}

impl Builder {
    /// What every thread shares with `threads` loops.
    fn handle(&self, threads: usize) -> Handle {
        let slots = self.limits.max_connections;
        let shared = Arc::new(Shared {
            tag: next_server_tag(),
            loops: (0..threads).map(|_| LoopShared::new(slots)).collect(),
            framing: self.framing.clone(),
            next_loop: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            conns: ConnCounter::default(),
            limits: self.limits,
            pool: Pool::new(self.workers, self.job_queue),
            groups: Registry::new(threads, self.backplane.0.clone()),
            access: Access {
                rules: SharedRules::new(self.ip_rules.clone()),
                bans: Bans::new(Instant::now()),
                rate: AcceptLimiter::new(
                    self.accept_rate,
                    self.accept_rate_per_ip,
                    self.limits.ipv6_prefix,
                    Instant::now(),
                ),
            },
        });
        Handle { shared }
    }

    /// One loop on the scripted driver, to run on this thread (the tests'
    /// seam: see `sys::fake` and `crate::scripted`). With `ended_siblings`,
    /// the server has that many more loops, which have ended already: the
    /// loop spreads its accepts to them as loops sharing one listening
    /// socket do, and must keep what they refuse.
    #[cfg(all(unix, any(test, fuzzing)))]
    pub(crate) fn scripted<H: Handler>(
        self,
        handler: H,
        driver: sys::fake::Driver,
        now: std::time::Instant,
        ended_siblings: usize,
    ) -> (EventLoop<H>, Handle) {
        let handle = self.handle(1 + ended_siblings);
        for sibling in &handle.shared.loops[1..] {
            drop(sibling.mailbox.close());
        }
        let config = LoopConfig {
            index: 0,
            driver: DriverConfig {
                recv_buffers: self.recv_buffers,
                recv_buffer_size: self.recv_buffer_size,
                queue_depth: self.queue_depth,
                backend: Backend::Poll,
            },
            framing: self.framing.clone(),
            socket_options: self.socket_options,
            limits: self.limits,
            spread_accepts: ended_siblings > 0,
            tick: self.tick,
            tls: self.tls.clone(),
        };
        let listener = sys::fake::placeholder();
        let event_loop = EventLoop::with_driver(
            config,
            Arc::new(handler),
            handle.clone(),
            vec![listener],
            sys::Driver::Fake(driver),
            now,
        );
        (event_loop, handle)
    }
}

impl Server {
    /// A builder with the defaults.
    pub fn builder() -> Builder {
        Builder::default()
    }
}
