//! Allow and deny lists of networks.
//!
//! The lists are shared by every loop and can be replaced at runtime
//! (`Handle::set_ip_rules`). Each loop keeps the set it last read and looks
//! at a version number once per accepted connection, so a check costs no
//! lock.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

/// Allow and deny lists of IPv4 and IPv6 networks (CIDR). A peer in a
/// denied network is refused; with an allow list, so is a peer in none
/// of its networks; deny wins over allow. The default allows everyone.
///
/// ```
/// let rules = wharf::IpRules::default()
///     .allow("10.0.0.0/8")?
///     .allow("2001:db8::/32")?
///     .deny("10.66.0.0/16")?;
/// assert!(rules.permits("10.1.2.3".parse()?));
/// assert!(!rules.permits("10.66.0.1".parse()?));
/// assert!(!rules.permits("192.0.2.1".parse()?));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// An IPv4 peer seen on an IPv6 socket (`::ffff:10.1.2.3`) is checked as
/// the IPv4 address it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRules {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

/// A network that is not `ADDRESS/PREFIX` (or a bare address).
#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not a network (ADDRESS/PREFIX, or an address)")]
pub struct BadNetwork {
    text: String,
}

pub(crate) fn parse(text: &str) -> Result<IpNet, BadNetwork> {
    let bad = || BadNetwork {
        text: text.to_owned(),
    };
    let t = text.trim();
    // A bare address is the network of that one address. The host bits of
    // a network are dropped (10.1.2.3/8 is 10.0.0.0/8).
    let net = match IpNet::from_str(t) {
        Ok(net) => net,
        Err(_) => IpAddr::from_str(t).map(IpNet::from).map_err(|_| bad())?,
    };
    Ok(canonical(net).trunc())
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network
/// it is (`10.0.0.0/8`): peers are checked as IPv4 whatever socket they
/// came on, so a network must be written the same way to match them.
pub(crate) fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(
                ipnet::Ipv4Net::new(v4, n.prefix_len() - 96).expect("a prefix of at most 32"),
            ),
            None => net,
        },
        _ => net,
    }
}

impl IpRules {
    /// Adds a network to the allow list (once there is one, only the
    /// networks on it may connect).
    pub fn allow(mut self, network: &str) -> Result<Self, BadNetwork> {
        self.allow.push(parse(network)?);
        Ok(self)
    }

    /// Adds a network to the deny list.
    pub fn deny(mut self, network: &str) -> Result<Self, BadNetwork> {
        self.deny.push(parse(network)?);
        Ok(self)
    }

    /// Whether a peer at `ip` may connect.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }

    fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// The rules every loop reads, and their version.
#[derive(Default)]
pub(crate) struct SharedRules {
    current: Mutex<Arc<IpRules>>,
    version: AtomicU64,
}

impl SharedRules {
    pub(crate) fn new(rules: IpRules) -> SharedRules {
        SharedRules {
            current: Mutex::new(Arc::new(rules)),
            version: AtomicU64::new(0),
        }
    }

    pub(crate) fn replace(&self, rules: IpRules) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
        self.version.fetch_add(1, Ordering::Release);
    }

    pub(crate) fn get(&self) -> IpRules {
        (**self.current.lock().unwrap_or_else(|p| p.into_inner())).clone()
    }
}

/// One loop's copy of the rules.
pub(crate) struct LoopRules {
    version: u64,
    rules: Arc<IpRules>,
    /// Nothing is denied: the check is skipped.
    open: bool,
}

impl LoopRules {
    pub(crate) fn new(shared: &SharedRules) -> LoopRules {
        let rules = shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        LoopRules {
            version: shared.version.load(Ordering::Acquire),
            open: rules.is_open(),
            rules,
        }
    }

    /// Whether a peer at `ip` may connect, under the rules as they are now.
    pub(crate) fn permits(&mut self, shared: &SharedRules, ip: IpAddr) -> bool {
        if shared.version.load(Ordering::Acquire) != self.version {
            *self = LoopRules::new(shared);
        }
        self.open || self.rules.permits(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_and_an_allow_list_closes_the_rest() {
        let r = IpRules::default()
            .allow("127.0.0.0/8")
            .unwrap()
            .allow("fd00::/8")
            .unwrap()
            .deny("127.0.0.2")
            .unwrap();
        assert!(r.permits(ip("127.0.0.1")));
        assert!(!r.permits(ip("127.0.0.2")), "a bare address is one address");
        assert!(r.permits(ip("127.0.0.3")));
        assert!(!r.permits(ip("10.0.0.1")));
        assert!(r.permits(ip("fd12::1")));
        assert!(!r.permits(ip("::1")));
        // IPv4 seen through an IPv6 socket.
        assert!(r.permits(ip("::ffff:127.0.0.1")));
        assert!(!r.permits(ip("::ffff:127.0.0.2")));
        assert!(IpRules::default().permits(ip("203.0.113.9")));
        // A network written in its IPv4-mapped form is the IPv4 network.
        let mapped = IpRules::default().deny("::ffff:10.0.0.0/104").unwrap();
        assert!(!mapped.permits(ip("10.9.9.9")));
        assert!(!mapped.permits(ip("::ffff:10.9.9.9")));
        assert!(mapped.permits(ip("11.0.0.1")));
        let only = IpRules::default().allow("::ffff:10.0.0.1").unwrap();
        assert!(only.permits(ip("10.0.0.1")));
        assert!(!only.permits(ip("10.0.0.2")));
    }

    #[test]
    fn networks_parse_or_say_why_not() {
        let r = IpRules::default().deny("10.1.2.3/8").unwrap();
        assert!(!r.permits(ip("10.200.0.1")), "host bits are dropped");
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0/8", "::1/129", ""] {
            let e = IpRules::default().deny(bad).unwrap_err();
            assert!(e.to_string().contains("is not a network"), "{bad}: {e}");
        }
    }

    #[test]
    fn loops_see_replaced_rules_at_the_next_accept() {
        let shared = SharedRules::new(IpRules::default().deny("127.0.0.1").unwrap());
        let mut mine = LoopRules::new(&shared);
        assert!(!mine.permits(&shared, ip("127.0.0.1")));
        shared.replace(IpRules::default());
        assert!(mine.permits(&shared, ip("127.0.0.1")));
        assert_eq!(shared.get(), IpRules::default());
    }
}
