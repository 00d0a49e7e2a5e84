//! A hashed timing wheel: O(1) to schedule, and a tick touches only the
//! entries of its own bucket, so idle connections cost nothing per tick.
//!
//! Entries are hints, not promises: when one comes due, the loop looks at
//! the connection's real deadline (which may have moved later, as activity
//! pushes an idle timeout forward) and either acts or schedules again. So a
//! busy connection is re-examined once per timeout period, not once per
//! message, and nothing is ever removed from the wheel early.
//!
//! A bitmask of occupied buckets (as tokio's `level.rs` keeps) finds the
//! next tick that has entries, so a loop with timers armed sleeps until the
//! first one is due instead of waking every tick.

use std::time::{Duration, Instant};

/// Resolution of the wheel.
pub(crate) const TICK: Duration = Duration::from_millis(50);
/// `TICK` in nanoseconds. Tick arithmetic runs in u64 with this constant
/// divisor (a multiplication once compiled): `Duration::as_nanos` gives a
/// u128, and each u128 division is a call to a slow helper, several per
/// message (0.5 % of the loop's CPU at one connection).
const TICK_NANOS: u64 = TICK.as_nanos() as u64;
const BUCKETS: usize = 512;

/// The furthest any deadline is put off: longer waits (up to
/// `Duration::MAX`, which users write for "never") stand for it, so that
/// adding them to an `Instant` cannot overflow. 2^32 s is 136 years.
pub(crate) const FOREVER: Duration = Duration::from_secs(1 << 32);

/// `now + d`, with `d` capped at [`FOREVER`]: for every deadline made from
/// a duration a user gave.
pub(crate) fn deadline(now: Instant, d: Duration) -> Instant {
    now + d.min(FOREVER)
}

/// `d` in nanoseconds, saturating (u64 nanoseconds span 584 years).
fn nanos(d: Duration) -> u64 {
    d.as_secs()
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(d.subsec_nanos()))
}

/// Ticks in `d`, rounded up (a timeout never fires early).
pub(crate) fn ticks(d: Duration) -> u64 {
    nanos(d).div_ceil(TICK_NANOS)
}

/// One scheduled look at a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) slot: u32,
    pub(crate) generation: u64,
    /// The tick it is due at (entries of later rounds share the bucket).
    pub(crate) tick: u64,
}

pub(crate) struct Wheel {
    start: Instant,
    buckets: Vec<Vec<Entry>>,
    /// Bit `b` is set when bucket `b` holds entries.
    occupied: [u64; BUCKETS / 64],
    /// The next tick not yet processed.
    next: u64,
    len: usize,
    /// The earliest tick that has an entry, while known: a loop asks for it
    /// before every wait, and a busy connection's activity moves its real
    /// deadline without touching the wheel, so it is kept rather than
    /// searched for each turn. Scheduling keeps it; expiring entries
    /// forgets it, and the next question searches again. `None`: not
    /// known; `Some(None)`: known to be empty.
    earliest: Option<Option<u64>>,
}

/// A moment as a wheel reads it, from one read of the clock: the
/// nanoseconds since the wheel's start, and the ticks it falls in and
/// rounds up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Moment {
    pub(crate) at: Instant,
    nanos: u64,
    /// The tick `at` falls in (for "is it due": a tick is due once it has
    /// begun).
    pub(crate) floor: u64,
    /// The tick at or after `at` (for stamping activity, so that a timeout
    /// counted from it never fires early).
    pub(crate) ceil: u64,
}

impl Wheel {
    pub(crate) fn new(now: Instant) -> Wheel {
        Wheel {
            start: now,
            buckets: vec![Vec::new(); BUCKETS],
            occupied: [0; BUCKETS / 64],
            next: 0,
            len: 0,
            earliest: Some(None),
        }
    }

    /// `t` as this wheel counts time.
    pub(crate) fn moment(&self, t: Instant) -> Moment {
        let nanos = nanos(t.saturating_duration_since(self.start));
        Moment {
            at: t,
            nanos,
            floor: nanos / TICK_NANOS,
            ceil: nanos.div_ceil(TICK_NANOS),
        }
    }

    /// The tick at or after `t` (deadlines are never rounded earlier).
    pub(crate) fn tick_of(&self, t: Instant) -> u64 {
        ticks(t.saturating_duration_since(self.start))
    }

    /// Schedules a look at (slot, generation) at `at`; returns the tick.
    #[cfg(test)]
    pub(crate) fn schedule(&mut self, slot: u32, generation: u64, at: Instant) -> u64 {
        let tick = self.tick_of(at);
        self.schedule_tick(slot, generation, tick)
    }

    /// Schedules a look at (slot, generation) at `tick` (not before the
    /// next unprocessed tick); returns the tick used.
    pub(crate) fn schedule_tick(&mut self, slot: u32, generation: u64, tick: u64) -> u64 {
        let tick = tick.max(self.next);
        let b = (tick % BUCKETS as u64) as usize;
        self.buckets[b].push(Entry {
            slot,
            generation,
            tick,
        });
        self.occupied[b / 64] |= 1 << (b % 64);
        self.len += 1;
        if let Some(earliest) = &mut self.earliest {
            *earliest = Some(earliest.map_or(tick, |e| e.min(tick)));
        }
        tick
    }

    /// Entries on the wheel.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Moves every entry due by `now` into `due`.
    pub(crate) fn expire(&mut self, now: Instant, due: &mut Vec<Entry>) {
        let now_tick = self.moment(now).floor;
        self.expire_tick(now_tick, due);
    }

    /// Moves every entry due by the tick `now_tick` (a `Moment::floor`)
    /// into `due`.
    pub(crate) fn expire_tick(&mut self, now_tick: u64, due: &mut Vec<Entry>) {
        if self.len == 0 {
            self.next = self.next.max(now_tick + 1);
            return;
        }
        // Past a full turn every bucket is visited once.
        let last = now_tick.min(self.next + BUCKETS as u64 - 1);
        while self.next <= last {
            let b = (self.next % BUCKETS as u64) as usize;
            let bucket = &mut self.buckets[b];
            let before = bucket.len();
            let mut i = 0;
            while i < bucket.len() {
                if bucket[i].tick <= now_tick {
                    due.push(bucket.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            if bucket.len() < before {
                self.len -= before - bucket.len();
                self.earliest = None;
            }
            if bucket.is_empty() {
                self.occupied[b / 64] &= !(1 << (b % 64));
                // A burst (ten thousand connections opened at once) leaves
                // its buckets large, and a stream of sends leaves a little
                // room in every bucket it passed; an emptied bucket gives
                // that back, so the wheel of a quiet loop costs what a fresh
                // one does. Refilling costs a few reallocations per bucket
                // per turn of the wheel.
                *bucket = Vec::new();
            }
            self.next += 1;
        }
        self.next = self.next.max(now_tick + 1);
    }

    /// How long from `now` until the next tick that has entries, if any.
    pub(crate) fn next_timeout(&mut self, now: &Moment) -> Option<Duration> {
        let tick = match self.earliest {
            Some(known) => known,
            None => {
                let found = self.next_tick();
                self.earliest = Some(found);
                found
            }
        }?;
        let at = tick.saturating_mul(TICK_NANOS);
        Some(Duration::from_nanos(at.saturating_sub(now.nanos)))
    }

    /// The earliest tick that has an entry. Buckets are visited in order
    /// from `next`, through the occupied bitmask; a bucket's entries of
    /// later rounds are skipped, and the earliest of those is the answer if
    /// no bucket has one in the current round.
    fn next_tick(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let round_end = self.next + BUCKETS as u64;
        let mut later: Option<u64> = None;
        let mut distance = 0;
        while let Some(d) = self.next_occupied(distance) {
            let b = ((self.next + d) % BUCKETS as u64) as usize;
            for e in &self.buckets[b] {
                if e.tick < round_end {
                    // This round's tick of this bucket: no earlier bucket
                    // had one, and later ones are later.
                    return Some(e.tick);
                }
                later = Some(later.map_or(e.tick, |t| t.min(e.tick)));
            }
            distance = d + 1;
        }
        later
    }

    /// The distance from `next` (at least `from`, below `BUCKETS`) of the
    /// next occupied bucket.
    fn next_occupied(&self, from: u64) -> Option<u64> {
        let start = (self.next % BUCKETS as u64) as usize;
        let mut d = from as usize;
        while d < BUCKETS {
            let b = (start + d) % BUCKETS;
            let word = self.occupied[b / 64] >> (b % 64);
            if word != 0 {
                let skip = word.trailing_zeros() as usize;
                // Bits past the word's end wrap to the next word, which the
                // next round of this loop reads.
                if d + skip < BUCKETS {
                    return Some((d + skip) as u64);
                }
                return None;
            }
            d += 64 - b % 64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(w: &mut Wheel, now: Instant) -> Option<Duration> {
        let now = w.moment(now);
        w.next_timeout(&now)
    }

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
        assert_eq!(timeout(&mut w, t0), None);
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
    fn an_emptied_bucket_gives_its_room_back() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        // A burst: ten thousand entries in three buckets.
        for i in 0..10_000u32 {
            w.schedule(i, 1, t0 + TICK * (i % 3));
        }
        assert!(w.buckets.iter().map(Vec::capacity).sum::<usize>() >= 10_000);
        let mut due = Vec::new();
        w.expire(t0 + TICK * 3, &mut due);
        assert_eq!(due.len(), 10_000);
        let room: usize = w.buckets.iter().map(Vec::capacity).sum();
        assert_eq!(room, 0, "the emptied buckets keep room for {room} entries");
    }

    #[test]
    fn ticks_round_up_and_saturate() {
        use super::{ticks, TICK_NANOS};
        assert_eq!(ticks(Duration::ZERO), 0);
        assert_eq!(ticks(Duration::from_nanos(1)), 1);
        assert_eq!(ticks(TICK), 1);
        assert_eq!(ticks(TICK + Duration::from_nanos(1)), 2);
        assert_eq!(ticks(Duration::from_secs(30)), 600);
        // Far past any deadline, not wrapped round (to 0, in u128 arithmetic
        // cast down).
        assert_eq!(ticks(Duration::MAX), u64::MAX.div_ceil(TICK_NANOS));
        let now = Instant::now();
        assert_eq!(super::deadline(now, Duration::MAX), now + super::FOREVER);
        assert_eq!(super::deadline(now, TICK), now + TICK);
    }

    #[test]
    fn next_timeout_points_at_the_first_entry_not_the_next_tick() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        w.schedule(1, 1, t0 + Duration::from_secs(1));
        w.schedule(2, 1, t0 + Duration::from_secs(60));
        let d = timeout(&mut w, t0).unwrap();
        assert_eq!(d, Duration::from_secs(1), "sleeps until the first entry");
        let mut due = Vec::new();
        w.expire(t0 + Duration::from_secs(1), &mut due);
        assert_eq!(due.len(), 1);
        let d = timeout(&mut w, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(d, Duration::from_secs(59), "then until the next one");
    }

    #[test]
    fn next_timeout_finds_entries_of_later_rounds_and_wrapped_buckets() {
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        // Past a whole turn of the wheel: the bucket is near, its tick far.
        let far = TICK * (BUCKETS as u32 * 3 + 5);
        w.schedule(1, 1, t0 + far);
        assert_eq!(timeout(&mut w, t0), Some(far));
        // Move `next` near the end of the buckets so the search wraps.
        let mut due = Vec::new();
        w.expire(t0 + TICK * (BUCKETS as u32 - 3), &mut due);
        assert!(due.is_empty());
        let now = t0 + TICK * (BUCKETS as u32 - 3);
        w.schedule(2, 1, now + TICK * 10);
        assert_eq!(timeout(&mut w, now), Some(TICK * 10));
    }

    #[test]
    fn next_timeout_matches_a_scan_of_every_entry() {
        // A seeded random walk of schedules and expiries, checked against
        // the obvious answer (the smallest tick of any entry).
        let t0 = Instant::now();
        let mut w = Wheel::new(t0);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut now = t0;
        let mut due = Vec::new();
        for _ in 0..5000 {
            if rand() % 3 == 0 {
                now += TICK * (rand() % 40) as u32;
                w.expire(now, &mut due);
            } else {
                let ahead = TICK * (rand() % (BUCKETS as u64 * 3)) as u32;
                w.schedule(0, 0, now + ahead);
            }
            let want = w.buckets.iter().flatten().map(|e| e.tick).min();
            assert_eq!(w.next_tick(), want);
            // And the earliest tick the wheel keeps between questions (asked
            // now and then, so that schedules and expiries pile up between).
            if rand() % 4 == 0 {
                let want = want.map(|t| (t0 + TICK * t as u32).saturating_duration_since(now));
                assert_eq!(timeout(&mut w, now), want);
            }
        }
    }
}
