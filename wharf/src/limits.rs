//! Connection caps and the per-connection limits every loop applies.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The limits a loop enforces (copied into every loop at start).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) high_water: usize,
    pub(crate) low_water: usize,
    pub(crate) write_stall_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) first_message_timeout: Option<Duration>,
    pub(crate) close_linger: Duration,
    pub(crate) close_slow_broadcast_peers: bool,
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: Option<usize>,
}

/// Open connections, counted across loops. Touched once per connect and
/// once per close, never per message.
#[derive(Default)]
pub(crate) struct ConnCounter {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnCounter {
    /// Counts a new connection if the caps allow it. `ip` is the peer of an
    /// inbound connection (outbound ones count only globally).
    pub(crate) fn admit(&self, ip: Option<IpAddr>, limits: &Limits) -> bool {
        if self.open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if let (Some(ip), Some(max)) = (ip, limits.max_connections_per_ip) {
            let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= max {
                drop(map);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
            *n += 1;
        }
        true
    }

    /// Uncounts a connection admitted with the same `ip`.
    pub(crate) fn release(&self, ip: Option<IpAddr>, limits: &Limits) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if let (Some(ip), Some(_)) = (ip, limits.max_connections_per_ip) {
            let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, per_ip: Option<usize>) -> Limits {
        Limits {
            high_water: 0,
            low_water: 0,
            write_stall_timeout: None,
            idle_timeout: None,
            first_message_timeout: None,
            close_linger: Duration::ZERO,
            close_slow_broadcast_peers: false,
            max_connections: max,
            max_connections_per_ip: per_ip,
        }
    }

    #[test]
    fn global_cap_refuses_the_one_too_many_and_frees_on_release() {
        let c = ConnCounter::default();
        let l = limits(2, None);
        assert!(c.admit(None, &l));
        assert!(c.admit(None, &l));
        assert!(!c.admit(None, &l));
        c.release(None, &l);
        assert!(c.admit(None, &l));
    }

    #[test]
    fn per_ip_cap_counts_each_address_alone() {
        let c = ConnCounter::default();
        let l = limits(10, Some(1));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(c.admit(Some(a), &l));
        assert!(!c.admit(Some(a), &l));
        assert!(c.admit(Some(b), &l));
        c.release(Some(a), &l);
        assert!(c.admit(Some(a), &l));
        assert!(c.per_ip.lock().unwrap().len() == 2);
    }
}
