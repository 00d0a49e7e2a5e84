//! The data every loop shares: one map cut into shards, each behind its own
//! lock, a key's shard chosen by its hash.
//!
//! Why shards rather than one map per loop with requests forwarded to the
//! key's owner: a command here is a hash-map operation of well under a
//! microsecond, while a hop to another loop is a wake-up (tens of
//! microseconds on this kind of VM) and reorders a connection's pipeline
//! unless every reply waits for it. With 64 shards and a handful of loops
//! two loops rarely want the same lock, and an uncontended lock costs about
//! what the hop's queueing alone would.
//!
//! Expiry costs nothing per idle key: a key with a deadline also has an
//! entry in its shard's heap of deadlines; the loops' tick pops the entries
//! that are due (and only those) and removes the keys whose deadline is
//! still that one. A key read after its deadline and before the tick is
//! treated as gone (and removed) by the read itself.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

const SHARDS: usize = 64;

struct Entry {
    value: Bytes,
    /// Milliseconds since the store started.
    expires: Option<u64>,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Bytes, Entry>,
    /// (deadline, key) for each deadline set; stale once the key's
    /// deadline changed or it is gone.
    deadlines: BinaryHeap<Reverse<(u64, Bytes)>>,
}

impl Shard {
    /// The live entry of `key` (an expired one is removed).
    fn live(&mut self, key: &[u8], now: u64) -> Option<&mut Entry> {
        let expired = self
            .map
            .get(key)
            .is_some_and(|e| e.expires.is_some_and(|t| t <= now));
        if expired {
            self.map.remove(key);
            return None;
        }
        self.map.get_mut(key)
    }

    fn set_deadline(&mut self, key: &Bytes, at: u64) {
        self.deadlines.push(Reverse((at, key.clone())));
    }
}

/// How `SET` treats a key that is there, or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    Always,
    /// NX: only if it is not there.
    Absent,
    /// XX: only if it is there.
    Present,
}

/// The key-value store.
pub struct Store {
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
    start: Instant,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            start: Instant::now(),
        }
    }
}

impl Store {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        let i = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        let now = self.now();
        self.shard(key).live(key, now).map(|e| e.value.clone())
    }

    /// SET with an optional time to live; whether it was set.
    pub fn set(&self, key: &[u8], value: Bytes, ttl: Option<Duration>, when: Condition) -> bool {
        let now = self.now();
        let mut s = self.shard(key);
        let there = s.live(key, now).is_some();
        match (when, there) {
            (Condition::Absent, true) | (Condition::Present, false) => return false,
            _ => {}
        }
        let key = Bytes::copy_from_slice(key);
        let expires = ttl.map(|d| now + d.as_millis() as u64);
        if let Some(at) = expires {
            s.set_deadline(&key, at);
        }
        s.map.insert(key, Entry { value, expires });
        true
    }

    /// Removes `key`; whether it was there.
    pub fn del(&self, key: &[u8]) -> bool {
        let now = self.now();
        let mut s = self.shard(key);
        s.live(key, now).is_some() && s.map.remove(key).is_some()
    }

    pub fn exists(&self, key: &[u8]) -> bool {
        let now = self.now();
        self.shard(key).live(key, now).is_some()
    }

    /// Adds `by` to the integer at `key` (0 if absent); the new value.
    pub fn incr(&self, key: &[u8], by: i64) -> Result<i64, &'static str> {
        let now = self.now();
        let mut s = self.shard(key);
        let current = match s.live(key, now) {
            Some(e) => std::str::from_utf8(&e.value)
                .ok()
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or("value is not an integer or out of range")?,
            None => 0,
        };
        let n = current
            .checked_add(by)
            .ok_or("increment or decrement would overflow")?;
        let value = Bytes::from(n.to_string());
        match s.live(key, now) {
            Some(e) => e.value = value,
            None => {
                let entry = Entry {
                    value,
                    expires: None,
                };
                s.map.insert(Bytes::copy_from_slice(key), entry);
            }
        }
        Ok(n)
    }

    /// Gives `key` a time to live (a negative one deletes it); whether it
    /// is there.
    pub fn expire(&self, key: &[u8], secs: i64) -> bool {
        let now = self.now();
        let mut s = self.shard(key);
        if s.live(key, now).is_none() {
            return false;
        }
        if secs <= 0 {
            s.map.remove(key);
            return true;
        }
        let at = now.saturating_add((secs as u64).saturating_mul(1000));
        let key = Bytes::copy_from_slice(key);
        s.set_deadline(&key, at);
        s.map.get_mut(&key).expect("live").expires = Some(at);
        true
    }

    /// Seconds left: -2 for no key, -1 for no deadline.
    pub fn ttl(&self, key: &[u8]) -> i64 {
        let now = self.now();
        match self.shard(key).live(key, now) {
            None => -2,
            Some(Entry { expires: None, .. }) => -1,
            Some(Entry {
                expires: Some(t), ..
            }) => (*t - now).div_ceil(1000) as i64,
        }
    }

    /// Keys (including those past their deadline the tick has not yet
    /// removed, as in Redis).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).map.len())
            .sum()
    }

    pub fn flush(&self) {
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            s.map = HashMap::new();
            s.deadlines = BinaryHeap::new();
        }
    }

    /// Removes the keys whose deadline has passed, at most `budget` per
    /// shard (the rest wait for the next tick or their next read); what
    /// it removed. Costs nothing for keys without a deadline, or with one
    /// still ahead.
    pub fn expire_due(&self, budget: usize) -> usize {
        let now = self.now();
        let mut removed = 0;
        for s in &self.shards {
            let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
            for _ in 0..budget {
                match s.deadlines.peek() {
                    Some(Reverse((at, _))) if *at <= now => {}
                    _ => break,
                }
                let Reverse((at, key)) = s.deadlines.pop().expect("peeked");
                // Only if the key still has this deadline.
                if s.map.get(&key).is_some_and(|e| e.expires == Some(at)) {
                    s.map.remove(&key);
                    removed += 1;
                }
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_conditions_counters_and_deadlines() {
        let s = Store::default();
        assert!(s.set(b"a", Bytes::from_static(b"1"), None, Condition::Always));
        assert!(!s.set(b"a", Bytes::from_static(b"2"), None, Condition::Absent));
        assert!(s.set(b"a", Bytes::from_static(b"3"), None, Condition::Present));
        assert!(!s.set(b"b", Bytes::from_static(b"3"), None, Condition::Present));
        assert_eq!(s.get(b"a").as_deref(), Some(&b"3"[..]));
        assert_eq!(s.incr(b"a", 4), Ok(7));
        assert_eq!(s.incr(b"n", -1), Ok(-1));
        assert!(s.set(b"x", Bytes::from_static(b"nope"), None, Condition::Always));
        assert!(s.incr(b"x", 1).is_err());
        assert!(s.set(
            b"m",
            Bytes::from(i64::MAX.to_string()),
            None,
            Condition::Always
        ));
        assert!(s.incr(b"m", 1).is_err());
        assert_eq!(s.ttl(b"a"), -1);
        assert_eq!(s.ttl(b"zz"), -2);
        assert!(s.expire(b"a", 100));
        assert!((99..=100).contains(&s.ttl(b"a")));
        assert!(s.del(b"a") && !s.del(b"a") && !s.exists(b"a"));
        assert_eq!(s.len(), 3);
        s.flush();
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn keys_expire_by_the_tick_or_the_read_and_idle_keys_cost_nothing() {
        let s = Store::default();
        for i in 0..1000 {
            s.set(
                format!("idle{i}").as_bytes(),
                Bytes::new(),
                None,
                Condition::Always,
            );
        }
        for i in 0..10 {
            let ttl = Some(Duration::from_millis(30));
            s.set(
                format!("brief{i}").as_bytes(),
                Bytes::new(),
                ttl,
                Condition::Always,
            );
        }
        // A deadline moved later makes the old heap entry stale.
        s.set(
            b"kept",
            Bytes::new(),
            Some(Duration::from_millis(30)),
            Condition::Always,
        );
        s.expire(b"kept", 100);
        assert_eq!(s.expire_due(1000), 0);
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            s.get(b"brief0").is_none(),
            "gone on read after its deadline"
        );
        assert_eq!(s.expire_due(1000), 9, "the rest, by the tick");
        assert!(s.exists(b"kept"));
        assert_eq!(s.len(), 1001);
        let heap: usize = s
            .shards
            .iter()
            .map(|x| x.lock().unwrap().deadlines.len())
            .sum();
        assert_eq!(heap, 1, "only kept's current deadline is left");
    }
}
