//! Bans: networks refused at accept until a deadline.
//!
//! One table for the server, behind a lock that is taken only while some
//! ban exists (a count says so). A lookup tries the few prefix lengths that
//! bans use (most often one: single addresses), one hash probe each, so it
//! costs the same with ten bans or ten thousand. Each ban has an entry on a
//! timing wheel of its own (the loops' wheel type); whoever takes the lock
//! (a lookup, a ban, a listing) first moves the wheel on, which removes the
//! bans that are due: nothing is ever scanned for expiry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use slab::Slab;

use crate::timer::{Entry, Wheel};

/// One ban, as [`Handle::bans`](crate::Handle::bans) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ban {
    /// The network banned (`203.0.113.7/32`, `2001:db8:1:2::/64`).
    pub network: String,
    /// How long until it expires.
    pub remaining: Duration,
}

struct Banned {
    net: IpNet,
    until: Instant,
    /// The serial and tick of its entry on the wheel.
    serial: u64,
    tick: u64,
}

struct Table {
    wheel: Wheel,
    bans: Slab<Banned>,
    by_net: HashMap<IpNet, usize>,
    /// How many bans use each prefix length, IPv4 (0..=32) then IPv6
    /// (33..=161): the lengths a lookup tries.
    prefixes: [u32; 33 + 129],
    serial: u64,
    due: Vec<Entry>,
}

/// The server's bans.
pub(crate) struct Bans {
    /// Bans in the table: while 0, a lookup takes no lock.
    count: AtomicUsize,
    table: Mutex<Table>,
}

fn prefix_index(net: &IpNet) -> usize {
    match net {
        IpNet::V4(n) => usize::from(n.prefix_len()),
        IpNet::V6(n) => 33 + usize::from(n.prefix_len()),
    }
}

impl Bans {
    pub(crate) fn new(now: Instant) -> Bans {
        Bans {
            count: AtomicUsize::new(0),
            table: Mutex::new(Table {
                wheel: Wheel::new(now),
                bans: Slab::new(),
                by_net: HashMap::new(),
                prefixes: [0; 33 + 129],
                serial: 0,
                due: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bans `net` until `now + duration` (a ban of it already in force is
    /// given the new deadline).
    pub(crate) fn ban(&self, net: IpNet, duration: Duration, now: Instant) {
        let net = super::rules::canonical(net).trunc();
        let until = crate::timer::deadline(now, duration);
        let mut t = self.lock();
        t.expire(now);
        let tick = t.wheel.tick_of(until);
        let existing = t.by_net.get(&net).copied();
        match existing {
            // Later (or as late): its entry on the wheel finds the deadline
            // moved when it comes due, and schedules itself again then; a
            // ban renewed on every bad message adds nothing to the wheel.
            Some(key) if tick >= t.bans[key].tick => t.bans[key].until = until,
            // Earlier: an entry of its own (the old one, its serial stale,
            // is dropped when it comes due).
            Some(key) => {
                t.serial += 1;
                let serial = t.serial;
                let b = &mut t.bans[key];
                (b.until, b.serial, b.tick) = (until, serial, tick);
                t.wheel.schedule_tick(key as u32, serial, tick);
            }
            None => {
                t.serial += 1;
                let serial = t.serial;
                let key = t.bans.insert(Banned {
                    net,
                    until,
                    serial,
                    tick,
                });
                t.by_net.insert(net, key);
                t.prefixes[prefix_index(&net)] += 1;
                t.wheel.schedule_tick(key as u32, serial, tick);
            }
        }
        self.count.store(t.bans.len(), Ordering::Release);
    }

    /// Lifts the ban of exactly `net`; whether there was one.
    pub(crate) fn unban(&self, net: IpNet, now: Instant) -> bool {
        let mut t = self.lock();
        t.expire(now);
        let found = t.remove(&super::rules::canonical(net).trunc());
        self.count.store(t.bans.len(), Ordering::Release);
        found
    }

    /// Whether `ip` is in a banned network.
    pub(crate) fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let ip = ip.to_canonical();
        let mut t = self.lock();
        t.expire(now);
        self.count.store(t.bans.len(), Ordering::Release);
        let (first, last) = match ip {
            IpAddr::V4(_) => (0, 32),
            IpAddr::V6(_) => (33, 33 + 128),
        };
        (first..=last).rev().any(|i| {
            if t.prefixes[i] == 0 {
                return false;
            }
            let len = (i - first) as u8;
            let net = IpNet::new(ip, len)
                .expect("a prefix length within the family's")
                .trunc();
            t.by_net
                .get(&net)
                .is_some_and(|&key| t.bans[key].until > now)
        })
    }

    /// The bans in force, soonest to expire first. The table is locked
    /// only to copy them out (accepts wait on that lock while bans exist).
    pub(crate) fn list(&self, now: Instant) -> Vec<Ban> {
        let mut bans: Vec<(Instant, IpNet)> = {
            let mut t = self.lock();
            t.expire(now);
            self.count.store(t.bans.len(), Ordering::Release);
            t.bans.iter().map(|(_, b)| (b.until, b.net)).collect()
        };
        bans.retain(|(until, _)| *until > now);
        bans.sort_by_key(|(until, _)| *until);
        bans.into_iter()
            .map(|(until, net)| Ban {
                network: net.to_string(),
                remaining: until - now,
            })
            .collect()
    }

    /// How many bans are in force (the expired removed first).
    pub(crate) fn len(&self, now: Instant) -> usize {
        if self.count.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut t = self.lock();
        t.expire(now);
        self.count.store(t.bans.len(), Ordering::Release);
        t.bans.len()
    }
}

impl Table {
    /// Removes the bans that are due by `now`.
    fn expire(&mut self, now: Instant) {
        let mut due = std::mem::take(&mut self.due);
        self.wheel.expire(now, &mut due);
        for e in due.drain(..) {
            let key = e.slot as usize;
            match self.bans.get(key) {
                // A ban given a new deadline has a newer entry of its own.
                Some(b) if b.serial == e.generation && b.until <= now => {
                    let net = b.net;
                    self.remove(&net);
                }
                Some(b) if b.serial == e.generation => {
                    // Its deadline moved later, or it is due by its tick
                    // but not yet by its instant: look again then.
                    let tick = self.wheel.tick_of(b.until);
                    let tick = self.wheel.schedule_tick(e.slot, e.generation, tick);
                    self.bans[key].tick = tick;
                }
                _ => {}
            }
        }
        self.due = due;
    }

    fn remove(&mut self, net: &IpNet) -> bool {
        let Some(key) = self.by_net.remove(net) else {
            return false;
        };
        self.bans.remove(key);
        self.prefixes[prefix_index(net)] -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_ban_refuses_its_network_until_it_expires_by_itself() {
        let t0 = Instant::now();
        let bans = Bans::new(t0);
        assert!(!bans.is_banned(ip("10.0.0.1"), t0));
        bans.ban(net("10.0.0.1/32"), Duration::from_secs(2), t0);
        bans.ban(net("2001:db8:1:2::/64"), Duration::from_secs(10), t0);
        bans.ban(net("192.168.7.99/24"), Duration::from_secs(5), t0);
        assert!(bans.is_banned(ip("10.0.0.1"), t0));
        assert!(!bans.is_banned(ip("10.0.0.2"), t0));
        assert!(bans.is_banned(ip("::ffff:10.0.0.1"), t0), "v4-mapped is v4");
        assert!(bans.is_banned(ip("2001:db8:1:2:abcd::1"), t0));
        assert!(!bans.is_banned(ip("2001:db8:1:3::1"), t0));
        assert!(bans.is_banned(ip("192.168.7.1"), t0), "host bits dropped");
        let listed = bans.list(t0);
        assert_eq!(
            listed
                .iter()
                .map(|b| b.network.as_str())
                .collect::<Vec<_>>(),
            ["10.0.0.1/32", "192.168.7.0/24", "2001:db8:1:2::/64"]
        );
        // Past 2 s the first is gone from the table, not only ignored.
        let t2 = t0 + Duration::from_millis(2100);
        assert!(!bans.is_banned(ip("10.0.0.1"), t2));
        assert_eq!(bans.lock().bans.len(), 2);
        assert!(bans.is_banned(ip("192.168.7.200"), t2));
        let t11 = t0 + Duration::from_secs(11);
        assert!(bans.list(t11).is_empty());
        assert_eq!(bans.count.load(Ordering::Relaxed), 0);
        assert!(bans.lock().prefixes.iter().all(|&n| n == 0));
    }

    #[test]
    fn a_new_ban_of_the_same_network_moves_its_deadline_and_unban_lifts_it() {
        let t0 = Instant::now();
        let bans = Bans::new(t0);
        bans.ban(net("10.0.0.0/8"), Duration::from_secs(1), t0);
        bans.ban(net("10.0.0.0/8"), Duration::from_secs(60), t0);
        let later = t0 + Duration::from_secs(5);
        assert!(
            bans.is_banned(ip("10.9.9.9"), later),
            "the old entry did not lift it"
        );
        assert_eq!(bans.list(later).len(), 1);
        // Renewed a thousand times, later each time: one entry on the wheel.
        for i in 0..1000u64 {
            bans.ban(net("10.0.0.0/8"), Duration::from_secs(60 + i), later);
        }
        assert_eq!(bans.lock().wheel.len(), 1);
        // Shortened: it ends at the new, earlier deadline.
        bans.ban(net("10.0.0.0/8"), Duration::from_secs(2), later);
        assert!(bans.is_banned(ip("10.9.9.9"), later + Duration::from_millis(1900)));
        assert!(!bans.is_banned(ip("10.9.9.9"), later + Duration::from_millis(2100)));
        assert_eq!(bans.len(later + Duration::from_millis(2100)), 0);
        bans.ban(net("10.0.0.0/8"), Duration::from_secs(60), later);
        assert!(bans.unban(net("10.0.0.0/8"), later));
        assert!(!bans.unban(net("10.0.0.0/8"), later));
        assert!(!bans.is_banned(ip("10.9.9.9"), later));
        // Long bans (past the wheel's turn) last their whole time.
        bans.ban(net("10.0.0.0/8"), Duration::from_secs(3600), later);
        let mut t = later;
        for _ in 0..59 {
            t += Duration::from_secs(60);
            assert!(bans.is_banned(ip("10.1.1.1"), t));
        }
        assert!(!bans.is_banned(ip("10.1.1.1"), later + Duration::from_secs(3601)));
        // An IPv4-mapped network is the IPv4 one, banned and lifted alike.
        bans.ban(net("::ffff:192.0.2.9/128"), Duration::from_secs(60), later);
        assert!(bans.is_banned(ip("192.0.2.9"), later));
        assert!(bans.is_banned(ip("::ffff:192.0.2.9"), later));
        assert!(bans.unban(net("192.0.2.9/32"), later));
        // Forever is a long time, not an overflow.
        bans.ban(net("::1/128"), Duration::MAX, later);
        assert!(bans.is_banned(ip("::1"), later + Duration::from_secs(86400 * 365)));
    }
}
