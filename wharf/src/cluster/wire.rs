//! What any broker-backed backplane needs: the form a message takes on the
//! broker (the publishing node, its sequence number, the body), and the
//! sequence numbers kept per publisher, which tell a receiver what it
//! missed.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How a message crosses the broker: the publishing node's id, its
/// sequence number in the group, then the body.
pub(crate) const HEADER: usize = 16;

pub(crate) fn encode(node: u64, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + body.len());
    v.extend_from_slice(&node.to_be_bytes());
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// The node, the sequence number and the body; `None` if too short.
pub(crate) fn decode(wire: &[u8]) -> Option<(u64, u64, &[u8])> {
    if wire.len() < HEADER {
        return None;
    }
    let node = u64::from_be_bytes(wire[..8].try_into().ok()?);
    let seq = u64::from_be_bytes(wire[8..16].try_into().ok()?);
    Some((node, seq, &wire[HEADER..]))
}

/// How long a publisher's (or a sender's) sequence is remembered without
/// a message: past it, a sequence starts again at 1 and a receiver takes
/// that as a fresh start.
pub(crate) const FORGET: Duration = Duration::from_secs(120);

/// Sequence numbers per group (publishing) or per (node, group)
/// (receiving), forgotten when idle, so that nodes and groups that come
/// and go leave nothing that grows.
pub(crate) struct Sequences<K> {
    last: HashMap<K, (u64, Instant)>,
    swept: Instant,
}

/// What a receiver makes of a sequence number.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// The next one, or a fresh start: deliver it. `missed` messages came
    /// before it that never arrived.
    Deliver { missed: u64 },
    /// A repeat or an old one: drop it.
    Stale,
}

impl<K: std::hash::Hash + Eq> Sequences<K> {
    pub(crate) fn new(now: Instant) -> Self {
        Sequences {
            last: HashMap::new(),
            swept: now,
        }
    }

    /// The next sequence number for `key` (publishing), from 1.
    pub(crate) fn next(&mut self, key: K, now: Instant) -> u64 {
        self.sweep(now);
        let e = self.last.entry(key).or_insert((0, now));
        e.0 += 1;
        e.1 = now;
        e.0
    }

    /// A message numbered `seq` came for `key` (receiving).
    pub(crate) fn see(&mut self, key: K, seq: u64, now: Instant) -> Seen {
        self.sweep(now);
        match self.last.get_mut(&key) {
            None => {
                // The first heard of this publisher in this group: it may
                // have published before this node subscribed, which is not
                // a loss.
                self.last.insert(key, (seq, now));
                Seen::Deliver { missed: 0 }
            }
            Some(e) if seq == 1 && now.duration_since(e.1) >= FORGET / 2 => {
                // The publisher forgot the group after a quiet spell, and
                // started again.
                *e = (1, now);
                Seen::Deliver { missed: 0 }
            }
            Some(e) if seq > e.0 => {
                let missed = seq - e.0 - 1;
                *e = (seq, now);
                Seen::Deliver { missed }
            }
            Some(_) => Seen::Stale,
        }
    }

    /// Forgets what is `key`'s (the group was unsubscribed).
    pub(crate) fn forget(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.last.retain(|k, _| keep(k));
    }

    fn sweep(&mut self, now: Instant) {
        if now.duration_since(self.swept) < FORGET / 4 {
            return;
        }
        self.swept = now;
        self.last
            .retain(|_, (_, at)| now.duration_since(*at) < FORGET);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_round_trips() {
        let w = encode(7, 9, b"hi");
        assert_eq!(decode(&w), Some((7, 9, &b"hi"[..])));
        assert_eq!(decode(&w[..15]), None);
        assert_eq!(decode(&encode(1, 2, b"")), Some((1, 2, &b""[..])));
    }

    #[test]
    fn receivers_count_gaps_and_drop_repeats() {
        let t = Instant::now();
        let mut s = Sequences::new(t);
        // Joined late: the first one heard is not a gap.
        assert_eq!(s.see("a", 5, t), Seen::Deliver { missed: 0 });
        assert_eq!(s.see("a", 6, t), Seen::Deliver { missed: 0 });
        assert_eq!(s.see("a", 9, t), Seen::Deliver { missed: 2 });
        assert_eq!(s.see("a", 9, t), Seen::Stale);
        assert_eq!(s.see("a", 8, t), Seen::Stale);
        assert_eq!(s.see("a", 1, t), Seen::Stale);
        // The publisher forgot the group after a quiet spell and began
        // again at 1.
        let later = t + FORGET / 2;
        assert_eq!(s.see("a", 1, later), Seen::Deliver { missed: 0 });
        assert_eq!(s.see("a", 2, later), Seen::Deliver { missed: 0 });
        assert_eq!(s.see("b", 1, t), Seen::Deliver { missed: 0 });
        s.forget(|k| *k != "b");
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn idle_sequences_are_forgotten() {
        let t = Instant::now();
        let mut s = Sequences::new(t);
        for g in 0..100 {
            assert_eq!(s.next(g, t), 1);
        }
        assert_eq!(s.next(0, t), 2);
        let later = t + FORGET + Duration::from_secs(1);
        assert_eq!(s.next(1000, later), 1);
        assert_eq!(s.len(), 1, "the idle ones went");
        assert_eq!(s.next(0, later), 1, "a forgotten group starts again");
    }
}
