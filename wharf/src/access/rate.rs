//! Accept rate limits: token buckets, one for the server and one per
//! client address, kept in their GCRA form (a bucket is the one instant at
//! which it would be full again), so a bucket is one integer and taking a
//! token is a compare and an add.
//!
//! A bucket that would be full by now holds nothing a fresh bucket does
//! not, so per-client buckets are dropped once they are: swept at most
//! once a second once the table holds more than `SWEEP_ABOVE`, it holds
//! about the last second's clients (or fewer than `SWEEP_ABOVE`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::limits::client_key;

/// A rate of accepted connections: so many per second (or per minute),
/// with a burst of at most one second's worth (the default).
///
/// ```
/// let steady = wharf::AcceptRate::per_second(1000);
/// let tight = wharf::AcceptRate::per_second(50).burst(5);
/// assert_eq!(tight.burst_size(), 5);
/// // A burst is never more than a second's worth, nor less than one.
/// assert_eq!(wharf::AcceptRate::per_second(50).burst(500).burst_size(), 50);
/// assert_eq!(wharf::AcceptRate::per_second(50).burst(0).burst_size(), 1);
/// // Slower than one a second: exactly that, one at a time.
/// let slow = wharf::AcceptRate::per_minute(30);
/// assert_eq!((slow.rate(), slow.burst_size()), (0.5, 1));
/// # let _ = steady;
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptRate {
    /// Nanoseconds per token (at least 1).
    interval: u64,
    burst: u32,
}

const SECOND: u64 = 1_000_000_000;

impl AcceptRate {
    /// `n` connections per second (at least 1), with a burst of `n`.
    pub fn per_second(n: u32) -> AcceptRate {
        AcceptRate::every(SECOND / u64::from(n.max(1)))
    }

    /// `n` connections per minute (at least 1), with a burst of a second's
    /// worth (at least 1).
    pub fn per_minute(n: u32) -> AcceptRate {
        AcceptRate::every(60 * SECOND / u64::from(n.max(1)))
    }

    fn every(interval: u64) -> AcceptRate {
        let interval = interval.max(1);
        AcceptRate {
            interval,
            burst: AcceptRate::second_of(interval),
        }
    }

    /// Tokens in one second at `interval` (at least 1).
    fn second_of(interval: u64) -> u32 {
        (SECOND / interval).clamp(1, u64::from(u32::MAX)) as u32
    }

    /// How many may come at once after a quiet spell: between 1 and one
    /// second's worth.
    pub fn burst(self, burst: u32) -> AcceptRate {
        AcceptRate {
            burst: burst.clamp(1, AcceptRate::second_of(self.interval)),
            ..self
        }
    }

    /// The rate, in connections per second.
    pub fn rate(&self) -> f64 {
        SECOND as f64 / self.interval as f64
    }

    /// The burst.
    pub fn burst_size(&self) -> u32 {
        self.burst
    }

    /// Nanoseconds per token, and the tolerance (how far ahead of now a
    /// bucket's full-again instant may be and still give a token).
    fn gcra(&self) -> (u64, u64) {
        let tolerance = self.interval.saturating_mul(u64::from(self.burst - 1));
        (self.interval, tolerance)
    }
}

/// Takes a token from the bucket whose full-again instant is `*tat`;
/// `false` if it is empty.
fn take(tat: &mut u64, now: u64, (interval, tolerance): (u64, u64)) -> bool {
    let base = (*tat).max(now);
    if base - now > tolerance {
        return false;
    }
    *tat = base + interval;
    true
}

/// Why a connection is over an accept rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Over {
    PerIp,
    Global,
}

/// The server's accept rate limits.
pub(crate) struct AcceptLimiter {
    start: Instant,
    global: Option<(AcceptRate, AtomicU64)>,
    per_ip: Option<(AcceptRate, Mutex<Clients>)>,
    ipv6_prefix: u8,
}

struct Clients {
    buckets: HashMap<IpAddr, u64>,
    /// When full buckets were last dropped.
    swept: u64,
}

/// Buckets are dropped only while the table is over this size (and at
/// most once a second).
const SWEEP_ABOVE: usize = 1024;

impl AcceptLimiter {
    pub(crate) fn new(
        global: Option<AcceptRate>,
        per_ip: Option<AcceptRate>,
        ipv6_prefix: u8,
        start: Instant,
    ) -> AcceptLimiter {
        AcceptLimiter {
            start,
            global: global.map(|r| (r, AtomicU64::new(0))),
            per_ip: per_ip.map(|r| {
                let clients = Clients {
                    buckets: HashMap::new(),
                    swept: 0,
                };
                (r, Mutex::new(clients))
            }),
            ipv6_prefix,
        }
    }

    /// Takes a token for a connection from `ip` accepted at `now`: its
    /// client's first, then the server's (so that a flooding client spends
    /// only its own).
    pub(crate) fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Over> {
        if self.global.is_none() && self.per_ip.is_none() {
            return Ok(());
        }
        let now = now.saturating_duration_since(self.start).as_nanos() as u64;
        if let Some((rate, clients)) = &self.per_ip {
            let mut c = clients.lock().unwrap_or_else(|p| p.into_inner());
            if c.buckets.len() > SWEEP_ABOVE && now - c.swept.min(now) > 1_000_000_000 {
                c.swept = now;
                c.buckets.retain(|_, tat| *tat > now);
            }
            let tat = c
                .buckets
                .entry(client_key(ip, self.ipv6_prefix))
                .or_insert(0);
            if !take(tat, now, rate.gcra()) {
                return Err(Over::PerIp);
            }
        }
        if let Some((rate, tat)) = &self.global {
            let params = rate.gcra();
            let mut current = tat.load(Ordering::Acquire);
            loop {
                let mut next = current;
                if !take(&mut next, now, params) {
                    return Err(Over::Global);
                }
                match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => break,
                    Err(seen) => current = seen,
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.per_ip
            .as_ref()
            .map_or(0, |(_, c)| c.lock().unwrap().buckets.len())
    }
}

/// What `--accept-rate 500/s` and its like mean: `N`, `N/s` or `N/min`.
impl std::str::FromStr for AcceptRate {
    type Err = String;

    fn from_str(s: &str) -> Result<AcceptRate, String> {
        let bad = || format!("{s:?} is not a rate (N/s or N/min)");
        let (n, per) = match s.trim().split_once('/') {
            Some((n, per)) => (n.trim(), per.trim()),
            None => (s.trim(), "s"),
        };
        let n: u32 = n.parse().map_err(|_| bad())?;
        if n == 0 {
            return Err(format!("{s:?}: a rate of 0 would refuse everyone"));
        }
        match per {
            "s" | "sec" | "second" => Ok(AcceptRate::per_second(n)),
            "m" | "min" | "minute" => Ok(AcceptRate::per_minute(n)),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// How many of `tries` evenly spread over `over` are let through.
    fn admitted(l: &AcceptLimiter, from: &str, t0: Instant, tries: u32, over: Duration) -> u32 {
        (0..tries)
            .filter(|i| l.admit(ip(from), t0 + over * *i / tries).is_ok())
            .count() as u32
    }

    #[test]
    fn a_client_gets_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let l = AcceptLimiter::new(None, Some(AcceptRate::per_second(100)), 64, t0);
        // 10,000 attempts over 5 s: the burst of 100, then 100 a second.
        let n = admitted(&l, "10.0.0.1", t0, 10_000, Duration::from_secs(5));
        assert!((598..=601).contains(&n), "{n}");
        // Another client has its own bucket.
        assert!(l.admit(ip("10.0.0.2"), t0 + Duration::from_secs(5)).is_ok());
        assert_eq!(l.admit(ip("10.0.0.1"), t0), Err(Over::PerIp));
    }

    #[test]
    fn the_global_rate_counts_everyone_and_ipv6_clients_by_prefix() {
        let t0 = Instant::now();
        let rate = AcceptRate::per_second(10).burst(1);
        let l = AcceptLimiter::new(Some(AcceptRate::per_second(1000)), Some(rate), 64, t0);
        assert!(l.admit(ip("2001:db8:1:2::1"), t0).is_ok());
        // The same /64: the same client, whose burst of one is spent.
        assert_eq!(l.admit(ip("2001:db8:1:2:ffff::2"), t0), Err(Over::PerIp));
        assert!(l.admit(ip("2001:db8:1:3::1"), t0).is_ok());
        assert!(l
            .admit(ip("2001:db8:1:2::1"), t0 + Duration::from_millis(100))
            .is_ok());
        // The global bucket, alone: 1,000 at once, then none.
        let g = AcceptLimiter::new(Some(AcceptRate::per_second(1000)), None, 64, t0);
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..2000u32)
            .filter(|i| {
                g.admit(ip(&format!("10.0.{}.{}", i / 250, i % 250)), t1)
                    .is_ok()
            })
            .count();
        assert_eq!(passed, 1000);
    }

    #[test]
    fn full_buckets_are_dropped_so_the_table_stays_small() {
        let t0 = Instant::now();
        let l = AcceptLimiter::new(None, Some(AcceptRate::per_second(10)), 64, t0);
        for i in 0..3000u32 {
            let from = IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
            let _ = l.admit(from, t0);
        }
        assert_eq!(l.clients(), 3000);
        // Two seconds on, every bucket is full again: one sweep drops them.
        assert!(l.admit(ip("10.9.9.9"), t0 + Duration::from_secs(2)).is_ok());
        assert_eq!(l.clients(), 1);
    }

    #[test]
    fn rates_slower_than_one_a_second_hold() {
        let t0 = Instant::now();
        let l = AcceptLimiter::new(None, Some(AcceptRate::per_minute(6)), 64, t0);
        // One every 10 s: over a minute, 6 (the first at once), not 60.
        let n = admitted(&l, "10.0.0.1", t0, 6000, Duration::from_secs(60));
        assert_eq!(n, 6);
        let huge = AcceptRate::per_second(u32::MAX);
        assert!(
            huge.rate() > 1e9 - 1.0 && huge.gcra().0 == 1,
            "never a zero interval"
        );
    }

    #[test]
    fn rates_parse_from_the_command_line_form() {
        assert_eq!("500/s".parse(), Ok(AcceptRate::per_second(500)));
        assert_eq!("500".parse(), Ok(AcceptRate::per_second(500)));
        assert_eq!("120/min".parse(), Ok(AcceptRate::per_second(2)));
        let close = |r: &str, want: f64| {
            let got = r.parse::<AcceptRate>().unwrap().rate();
            assert!((got - want).abs() < 1e-6, "{r}: {got}");
        };
        close("90/min", 1.5);
        close("1/min", 1.0 / 60.0);
        for bad in ["", "x/s", "5/h", "0/s", "-1/s"] {
            assert!(bad.parse::<AcceptRate>().is_err(), "{bad}");
        }
    }
}
