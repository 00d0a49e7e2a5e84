//! Outbound connections: where to connect, how long to try each address,
//! the token that names the connection in its callbacks, and whether to
//! keep it alive with reconnects.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// An outbound connection to open with [`Handle::connect`](crate::Handle::connect).
///
/// ```no_run
/// # use std::time::Duration;
/// # use wharf::{Connect, Reconnect};
/// # fn f(handle: &wharf::Handle) -> std::io::Result<()> {
/// handle.connect(
///     Connect::to("feed.example.com:9000")
///         .token(7)
///         .timeout(Duration::from_secs(3))
///         .reconnect(Reconnect::new().max(Duration::from_secs(10))),
/// )?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Connect {
    pub(crate) target: Target,
    pub(crate) token: u64,
    pub(crate) timeout: Duration,
    pub(crate) reconnect: Option<Reconnect>,
    pub(crate) tls: Option<crate::tls::ClientTls>,
}

#[derive(Clone, Debug)]
pub(crate) enum Target {
    Addrs(Vec<SocketAddr>),
    /// A name to resolve (`host:port`), off the loop threads.
    Host(String),
}

/// How long one address may take to connect, by default: long enough for
/// two lost SYNs (retransmitted after 1 s and 3 s), far short of the
/// system's own limit (about two minutes on Linux), which leaves a caller
/// waiting on an unreachable host for that long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Connect {
    /// Connects to `target`, a `host:port` (resolved on a thread of its
    /// own, never on a loop) or an `ip:port`.
    pub fn to(target: &str) -> Connect {
        let target = match target.parse::<SocketAddr>() {
            Ok(addr) => Target::Addrs(vec![addr]),
            Err(_) => Target::Host(target.to_owned()),
        };
        Connect::new(target)
    }

    /// Connects to `addrs`, tried in turn until one accepts.
    pub fn addrs(addrs: impl IntoIterator<Item = SocketAddr>) -> Connect {
        Connect::new(Target::Addrs(addrs.into_iter().collect()))
    }

    fn new(target: Target) -> Connect {
        Connect {
            target,
            token: 0,
            timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect: None,
            tls: None,
        }
    }

    /// The host part of a `Connect::to("host:port")`, the name TLS asks
    /// for by default.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) fn host(&self) -> Option<&str> {
        match &self.target {
            Target::Host(h) => h
                .rsplit_once(':')
                .map(|(host, _)| host.trim_matches(['[', ']'])),
            Target::Addrs(_) => None,
        }
    }

    /// Speaks TLS on this connection: the handshake comes first, and
    /// `on_open` runs when it completes (a failed handshake is a failed
    /// connect, retried as the reconnect policy says). The server name is
    /// the host of [`Connect::to`] unless `tls` names one.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::tls::ClientTls) -> Connect {
        self.tls = Some(tls);
        self
    }

    /// A number of the caller's choosing that comes back in
    /// [`Conn::token`](crate::Conn::token), `Handler::new_state`,
    /// `Handler::on_connect_failed` and `Handler::on_reconnect` (default 0).
    pub fn token(mut self, token: u64) -> Connect {
        self.token = token;
        self
    }

    /// How long each address may take (default
    /// [`DEFAULT_CONNECT_TIMEOUT`]); then the next is tried, and after
    /// the last the connect fails with `TimedOut`.
    pub fn timeout(mut self, d: Duration) -> Connect {
        self.timeout = d.max(Duration::from_millis(1));
        self
    }

    /// Keeps the connection alive: a failed connect is retried, and a
    /// connection that closes (other than by the server's shutdown) is
    /// opened again, after a back-off. [`Handle::stop_reconnect`](crate::Handle::stop_reconnect)
    /// with the same token ends it.
    pub fn reconnect(mut self, policy: Reconnect) -> Connect {
        self.reconnect = Some(policy);
        self
    }
}

impl From<SocketAddr> for Connect {
    fn from(addr: SocketAddr) -> Connect {
        Connect::addrs([addr])
    }
}

impl From<&str> for Connect {
    fn from(target: &str) -> Connect {
        Connect::to(target)
    }
}

impl From<String> for Connect {
    fn from(target: String) -> Connect {
        Connect::to(&target)
    }
}

/// The back-off between reconnect attempts: exponential from `initial`,
/// capped at `max`, each delay shortened by a random part of up to
/// `jitter` of it so that many clients cut off together do not come back
/// together.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reconnect {
    initial: Duration,
    max: Duration,
    jitter: f64,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            jitter: 0.5,
        }
    }
}

impl Reconnect {
    /// 100 ms, doubling to at most 30 s, jitter 0.5.
    pub fn new() -> Reconnect {
        Reconnect::default()
    }

    /// The first delay.
    pub fn initial(mut self, d: Duration) -> Reconnect {
        self.initial = d;
        self
    }

    /// The largest delay.
    pub fn max(mut self, d: Duration) -> Reconnect {
        self.max = d;
        self
    }

    /// The part of each delay (0 to 1) that is random.
    pub fn jitter(mut self, fraction: f64) -> Reconnect {
        self.jitter = fraction.clamp(0.0, 1.0);
        self
    }

    /// The delay before retry `attempt` (1 for the first), with `random`
    /// uniform in 0..=u64::MAX.
    pub(crate) fn delay(&self, attempt: u32, random: u64) -> Duration {
        let doublings = attempt.saturating_sub(1).min(32);
        let base = self
            .initial
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max);
        let cut = base.as_secs_f64() * self.jitter * (random as f64 / u64::MAX as f64);
        base.saturating_sub(Duration::from_secs_f64(cut))
    }
}

/// Why an outbound connect failed: given to `Handler::on_connect_failed`.
#[derive(Debug)]
#[non_exhaustive]
pub struct ConnectFailure {
    /// The connect's token ([`Connect::token`]).
    pub token: u64,
    /// The last address tried (none if the name did not resolve).
    pub addr: Option<SocketAddr>,
    /// What went wrong with it.
    pub error: io::Error,
    /// With [`Connect::reconnect`], when the next attempt starts.
    pub retry_in: Option<Duration>,
}

/// A connection about to open, as `Handler::new_state` sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct Opening {
    /// The remote address.
    pub peer: SocketAddr,
    /// The token of an outbound connection ([`Connect::token`]); `None`
    /// for an accepted one.
    pub token: Option<u64>,
}

/// An outbound connect as a loop carries it: the request, the addresses
/// left to try, and where its attempts stand.
#[derive(Debug)]
pub(crate) struct Dial {
    pub(crate) request: Connect,
    /// Addresses of this attempt not tried yet.
    pub(crate) pending: VecDeque<SocketAddr>,
    /// Retries so far since the connection was last open.
    pub(crate) attempt: u32,
    /// When the address being tried gives up.
    pub(crate) deadline: Option<Instant>,
    pub(crate) timed_out: bool,
    /// Why the last address (or the name) failed.
    pub(crate) last_error: Option<io::Error>,
}

impl Dial {
    pub(crate) fn new(request: Connect) -> Dial {
        let pending = match &request.target {
            Target::Addrs(addrs) => addrs.iter().copied().collect(),
            Target::Host(_) => VecDeque::new(),
        };
        Dial {
            request,
            pending,
            attempt: 0,
            deadline: None,
            timed_out: false,
            last_error: None,
        }
    }

    /// Resolves a name target (blocking: call off the loop threads).
    pub(crate) fn resolve(&mut self) {
        use std::net::ToSocketAddrs;
        if let Target::Host(host) = &self.request.target {
            match host.to_socket_addrs() {
                Ok(addrs) => {
                    self.pending = addrs.collect();
                    if self.pending.is_empty() {
                        self.last_error = Some(io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("{host} resolved to no address"),
                        ));
                    }
                }
                Err(e) => self.last_error = Some(e),
            }
        }
    }

    pub(crate) fn needs_resolving(&self) -> bool {
        matches!(self.request.target, Target::Host(_)) && self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_to_the_cap_and_jitter_only_shortens() {
        let r = Reconnect::new()
            .initial(Duration::from_millis(100))
            .max(Duration::from_secs(1))
            .jitter(0.0);
        let ms: Vec<u128> = (1..=6).map(|a| r.delay(a, 12345).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(r.delay(u32::MAX, 0), Duration::from_secs(1));
        let j = r.jitter(0.5);
        assert_eq!(j.delay(3, 0), Duration::from_millis(400));
        assert_eq!(j.delay(3, u64::MAX), Duration::from_millis(200));
        let mid = j.delay(3, u64::MAX / 2);
        assert!(mid > Duration::from_millis(290) && mid < Duration::from_millis(310));
    }

    #[test]
    fn targets_parse_addresses_and_keep_names() {
        assert!(matches!(Connect::to("127.0.0.1:80").target, Target::Addrs(ref a) if a.len() == 1));
        assert!(matches!(Connect::to("[::1]:80").target, Target::Addrs(_)));
        assert!(matches!(
            Connect::to("localhost:80").target,
            Target::Host(_)
        ));
        let mut d = Dial::new(Connect::to("localhost:1"));
        assert!(d.needs_resolving());
        d.resolve();
        assert!(!d.pending.is_empty() || d.last_error.is_some());
        let mut bad = Dial::new(Connect::to("no port here"));
        bad.resolve();
        assert!(bad.pending.is_empty() && bad.last_error.is_some());
    }
}
