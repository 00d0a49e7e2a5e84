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
    /// How long a TLS handshake may take.
    pub(crate) tls_handshake_timeout: Duration,
    pub(crate) close_linger: Duration,
    pub(crate) close_slow_broadcast_peers: bool,
    pub(crate) max_connections: usize,
    pub(crate) max_connections_per_ip: Option<usize>,
    /// Leading bits of an IPv6 address counted as one client by the
    /// per-IP cap.
    pub(crate) ipv6_prefix: u8,
    /// Jobs of one connection in flight at which its reading pauses.
    pub(crate) jobs_per_connection: u32,
    /// Files go out without a copy through user space where the backend
    /// can (`Builder::zero_copy_files`); `None`: except to loopback peers.
    pub(crate) zero_copy_files: Option<bool>,
}

/// The address a client at `ip` is counted under by the per-IP cap, the
/// per-IP accept rate and `Conn::ban_peer`: an IPv4 address (or an
/// IPv4-mapped IPv6 one, as a dual-stack listener sees IPv4 clients) as
/// itself, an IPv6 address by its first `prefix` bits (one host is given a
/// whole /64 and may use any address in it).
pub(crate) fn client_key(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6);
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
        },
    }
}

/// The network of the client at `ip` (see `client_key`).
pub(crate) fn client_network(ip: IpAddr, prefix: u8) -> ipnet::IpNet {
    let key = client_key(ip, prefix);
    let len = if key.is_ipv4() { 32 } else { prefix.min(128) };
    ipnet::IpNet::new(key, len).expect("a prefix length within the family's")
}

/// The cap a connection was refused over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cap {
    Global,
    PerIp,
}

/// Open connections, counted across loops. Touched once per connect and
/// once per close, never per message.
#[derive(Default)]
pub(crate) struct ConnCounter {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnCounter {
    /// Counts a new connection if the caps allow it, or says which cap it
    /// is over. `ip` is the peer of an inbound connection (outbound ones
    /// count only globally).
    pub(crate) fn admit(&self, ip: Option<IpAddr>, limits: &Limits) -> Result<(), Cap> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Cap::Global);
        }
        if let (Some(ip), Some(max)) = (ip, limits.max_connections_per_ip) {
            let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(client_key(ip, limits.ipv6_prefix)).or_insert(0);
            if *n >= max {
                drop(map);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Cap::PerIp);
            }
            *n += 1;
        }
        Ok(())
    }

    /// Uncounts a connection admitted with the same `ip`.
    pub(crate) fn release(&self, ip: Option<IpAddr>, limits: &Limits) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if let (Some(ip), Some(_)) = (ip, limits.max_connections_per_ip) {
            let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let key = client_key(ip, limits.ipv6_prefix);
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
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
            tls_handshake_timeout: crate::tls::DEFAULT_HANDSHAKE_TIMEOUT,
            close_linger: Duration::ZERO,
            close_slow_broadcast_peers: false,
            max_connections: max,
            max_connections_per_ip: per_ip,
            ipv6_prefix: 64,
            jobs_per_connection: 1,
            zero_copy_files: None,
        }
    }

    #[test]
    fn ipv6_clients_are_counted_by_prefix_and_mapped_ipv4_as_ipv4() {
        let c = ConnCounter::default();
        let l = limits(10, Some(2));
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // One client rotating through its /64 is one client.
        assert!(c.admit(Some(ip("2001:db8:1:2::1")), &l).is_ok());
        assert!(c.admit(Some(ip("2001:db8:1:2:ffff::9")), &l).is_ok());
        assert_eq!(
            c.admit(Some(ip("2001:db8:1:2:dead:beef:0:1")), &l),
            Err(Cap::PerIp)
        );
        // Another /64 is another client.
        assert!(c.admit(Some(ip("2001:db8:1:3::1")), &l).is_ok());
        // IPv4 through a dual-stack listener counts with plain IPv4.
        assert!(c.admit(Some(ip("::ffff:10.0.0.1")), &l).is_ok());
        assert!(c.admit(Some(ip("10.0.0.1")), &l).is_ok());
        assert_eq!(c.admit(Some(ip("10.0.0.1")), &l), Err(Cap::PerIp));
        c.release(Some(ip("2001:db8:1:2::1")), &l);
        assert!(c.admit(Some(ip("2001:db8:1:2::77")), &l).is_ok());
        // /128 counts exact addresses again.
        let exact = Limits {
            ipv6_prefix: 128,
            ..l
        };
        let c = ConnCounter::default();
        assert!(c.admit(Some(ip("2001:db8::1")), &exact).is_ok());
        assert!(c.admit(Some(ip("2001:db8::2")), &exact).is_ok());
        assert!(c.admit(Some(ip("2001:db8::2")), &exact).is_ok());
        assert_eq!(c.admit(Some(ip("2001:db8::2")), &exact), Err(Cap::PerIp));
        assert_eq!(client_key(ip("2001:db8::1"), 0), ip("::"));
    }

    #[test]
    fn global_cap_refuses_the_one_too_many_and_frees_on_release() {
        let c = ConnCounter::default();
        let l = limits(2, None);
        assert!(c.admit(None, &l).is_ok());
        assert!(c.admit(None, &l).is_ok());
        assert_eq!(c.admit(None, &l), Err(Cap::Global));
        c.release(None, &l);
        assert!(c.admit(None, &l).is_ok());
    }

    #[test]
    fn per_ip_cap_counts_each_address_alone() {
        let c = ConnCounter::default();
        let l = limits(10, Some(1));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(c.admit(Some(a), &l).is_ok());
        assert_eq!(c.admit(Some(a), &l), Err(Cap::PerIp));
        assert!(c.admit(Some(b), &l).is_ok());
        c.release(Some(a), &l);
        assert!(c.admit(Some(a), &l).is_ok());
        assert!(c.per_ip.lock().unwrap().len() == 2);
    }
}
