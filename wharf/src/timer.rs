//! A hashed timing wheel: O(1) to schedule, and a tick touches only the
//! entries of its own bucket, so idle connections cost nothing per tick.
//!
//! Entries are hints, not promises: when one comes due, the loop looks at
//! the connection's real deadline (which may have moved later, as activity
//! pushes an idle timeout forward) and either acts or schedules again. So a
//! busy connection is re-examined once per timeout period, not once per
//! message, and nothing is ever removed from the wheel early.

use std::time::{Duration, Instant};

/// Resolution of the wheel.
pub(crate) const TICK: Duration = Duration::from_millis(50);
const BUCKETS: usize = 512;

/// One scheduled look at a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) slot: u32,
    pub(crate) generation: u32,
    /// The tick it is due at (entries of later rounds share the bucket).
    pub(crate) tick: u64,
}

pub(crate) struct Wheel {
    start: Instant,
    buckets: Vec<Vec<Entry>>,
    /// The next tick not yet processed.
    next: u64,
    len: usize,
}

impl Wheel {
    pub(crate) fn new(now: Instant) -> Wheel {
        Wheel {
            start: now,
            buckets: vec![Vec::new(); BUCKETS],
            next: 0,
            len: 0,
        }
    }

    /// The tick at or after `t` (deadlines are never rounded earlier).
    pub(crate) fn tick_of(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.start);
        since.as_nanos().div_ceil(TICK.as_nanos()) as u64
    }

    /// The tick `t` falls in (for stamping activity).
    pub(crate) fn tick_floor(&self, t: Instant) -> u64 {
        (t.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos()) as u64
    }

    /// Schedules a look at (slot, generation) at `at`; returns the tick.
    #[cfg(test)]
    pub(crate) fn schedule(&mut self, slot: u32, generation: u32, at: Instant) -> u64 {
        let tick = self.tick_of(at);
        self.schedule_tick(slot, generation, tick)
    }

    /// Schedules a look at (slot, generation) at `tick` (not before the
    /// next unprocessed tick); returns the tick used.
    pub(crate) fn schedule_tick(&mut self, slot: u32, generation: u32, tick: u64) -> u64 {
        let tick = tick.max(self.next);
        self.buckets[(tick % BUCKETS as u64) as usize].push(Entry {
            slot,
            generation,
            tick,
        });
        self.len += 1;
        tick
    }

    /// Moves every entry due by `now` into `due`.
    pub(crate) fn expire(&mut self, now: Instant, due: &mut Vec<Entry>) {
        let now_tick = now.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos();
        let now_tick = now_tick as u64;
        if self.len == 0 {
            self.next = self.next.max(now_tick + 1);
            return;
        }
        // Past a full turn every bucket is visited once.
        let last = now_tick.min(self.next + BUCKETS as u64 - 1);
        while self.next <= last {
            let bucket = &mut self.buckets[(self.next % BUCKETS as u64) as usize];
            let before = bucket.len();
            let mut i = 0;
            while i < bucket.len() {
                if bucket[i].tick <= now_tick {
                    due.push(bucket.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            self.len -= before - bucket.len();
            self.next += 1;
        }
        self.next = self.next.max(now_tick + 1);
    }

    /// How long until the next tick that has entries, if any.
    pub(crate) fn next_timeout(&self, now: Instant) -> Option<Duration> {
        if self.len == 0 {
            return None;
        }
        let next_at = self.start + TICK * self.next as u32;
        Some(next_at.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_fire_at_their_tick_not_before() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        w.schedule(1, 1, t0 + Duration::from_millis(120));
        w.schedule(2, 1, t0 + Duration::from_millis(40));
        let mut due = Vec::new();
        w.expire(t0 + Duration::from_millis(30), &mut due);
        assert!(due.is_empty());
        w.expire(t0 + Duration::from_millis(60), &mut due);
        assert_eq!(due.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![2]);
        due.clear();
        w.expire(t0 + Duration::from_millis(149), &mut due);
        assert!(due.is_empty(), "120 ms rounds up to the 150 ms tick");
        w.expire(t0 + Duration::from_millis(151), &mut due);
        assert_eq!(due.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![1]);
        assert_eq!(w.next_timeout(t0), None);
    }

    #[test]
    fn entries_of_later_rounds_wait_their_turn() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        let far = t0 + TICK * (BUCKETS as u32 * 2 + 3);
        w.schedule(7, 3, far);
        let mut due = Vec::new();
        for step in 1..(BUCKETS as u32 * 2 + 3) {
            w.expire(t0 + TICK * step, &mut due);
            assert!(due.is_empty(), "fired early at step {step}");
        }
        w.expire(far, &mut due);
        assert_eq!(
            due,
            vec![Entry {
                slot: 7,
                generation: 3,
                tick: (BUCKETS * 2 + 3) as u64
            }]
        );
    }

    #[test]
    fn a_long_sleep_fires_everything_overdue_once() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        for i in 0..1000u32 {
            w.schedule(i, 1, t0 + Duration::from_millis(i as u64 * 37));
        }
        let mut due = Vec::new();
        w.expire(t0 + Duration::from_secs(3600), &mut due);
        assert_eq!(due.len(), 1000);
        let mut slots: Vec<u32> = due.iter().map(|e| e.slot).collect();
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), 1000);
    }

    #[test]
    fn next_timeout_points_at_the_next_tick() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        w.schedule(1, 1, t0 + Duration::from_secs(1));
        assert!(w.next_timeout(t0).unwrap() <= TICK);
    }
}
