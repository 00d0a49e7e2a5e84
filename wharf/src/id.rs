//! Connection identity: which loop, which slot, which generation.
//!
//! The operating system reuses socket numbers, and wharf reuses slots; a
//! `ConnId` names one connection for its whole life and never another. The
//! generation of a slot changes every time it is reused, and every lookup
//! compares it, so a stale id fails with `Closed` instead of reaching the
//! connection that took its place.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// The identity of one connection, unique for the life of its server.
///
/// Ids are cheap to copy and may be kept after the connection closes: using
/// such an id fails with [`SendError::Closed`](crate::SendError::Closed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

const SLOT_BITS: u32 = 24;
/// Most slots (connections at once) one loop can hold.
pub(crate) const MAX_SLOTS: usize = 1 << SLOT_BITS;
/// Most loops one server can run.
pub(crate) const MAX_LOOPS: usize = 256;

impl ConnId {
    pub(crate) fn new(loop_index: usize, slot: u32, generation: u32) -> ConnId {
        debug_assert!(loop_index < MAX_LOOPS && (slot as usize) < MAX_SLOTS);
        ConnId((loop_index as u64) << 56 | (slot as u64) << 32 | generation as u64)
    }

    /// The event loop (thread) the connection lives on, from 0 to the
    /// server's thread count: handlers can shard their own data by it.
    pub fn loop_index(self) -> usize {
        (self.0 >> 56) as usize
    }

    pub(crate) fn slot(self) -> u32 {
        ((self.0 >> 32) as u32) & (MAX_SLOTS as u32 - 1)
    }

    pub(crate) fn generation(self) -> u32 {
        self.0 as u32
    }

    /// The id as one number (for logs and maps).
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ConnId({}:{}:{})",
            self.loop_index(),
            self.slot(),
            self.generation()
        )
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The generation of the open connection in each slot of one loop (0: none)
/// and whether its send queue is over the high-water mark, readable from any
/// thread so that `Handle::send` can refuse a stale id or a congested peer
/// at once. Only the loop writes it: when a connection opens, closes, or
/// crosses its water marks; never per message.
pub(crate) struct LiveTable {
    slots: Box<[AtomicU64]>,
}

const CONGESTED: u64 = 1 << 32;

impl LiveTable {
    /// A table for `len` slots. It is zero-filled memory that the kernel maps
    /// lazily, so untouched slots cost no resident memory.
    pub(crate) fn new(len: usize) -> LiveTable {
        let zeros: Box<[u64]> = vec![0u64; len].into_boxed_slice();
        let raw = Box::into_raw(zeros) as *mut [AtomicU64];
        // SAFETY: `AtomicU64` has the size, alignment and bit validity of
        // `u64` (std documents it): the zeroed allocation is a valid
        // `[AtomicU64]` of the same layout, and may be freed as one.
        let slots = unsafe { Box::from_raw(raw) };
        LiveTable { slots }
    }

    pub(crate) fn set_open(&self, slot: u32, generation: u32) {
        self.slots[slot as usize].store(generation as u64, Ordering::Release);
    }

    pub(crate) fn set_congested(&self, slot: u32, congested: bool) {
        let s = &self.slots[slot as usize];
        if congested {
            s.fetch_or(CONGESTED, Ordering::Release);
        } else {
            s.fetch_and(!CONGESTED, Ordering::Release);
        }
    }

    pub(crate) fn set_closed(&self, slot: u32) {
        self.slots[slot as usize].store(0, Ordering::Release);
    }

    /// Whether `id` names the connection open in its slot right now, and
    /// if so whether it is congested.
    pub(crate) fn state(&self, id: ConnId) -> Option<bool> {
        let v = self.slots.get(id.slot() as usize)?.load(Ordering::Acquire);
        (v as u32 == id.generation() && id.generation() != 0).then_some(v & CONGESTED != 0)
    }

    #[cfg(test)]
    fn is_open(&self, id: ConnId) -> bool {
        self.state(id).is_some()
    }
}

/// Hands out a slot's next generation: never 0 (which means "closed").
pub(crate) fn next_generation(g: u32) -> u32 {
    match g.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_its_parts() {
        let id = ConnId::new(255, MAX_SLOTS as u32 - 1, u32::MAX);
        assert_eq!(
            (id.loop_index(), id.slot(), id.generation()),
            (255, MAX_SLOTS as u32 - 1, u32::MAX)
        );
        let id = ConnId::new(3, 17, 9);
        assert_eq!((id.loop_index(), id.slot(), id.generation()), (3, 17, 9));
    }

    #[test]
    fn stale_generation_is_not_open() {
        let t = LiveTable::new(4);
        t.set_open(2, 7);
        assert!(t.is_open(ConnId::new(0, 2, 7)));
        assert!(!t.is_open(ConnId::new(0, 2, 6)));
        t.set_congested(2, true);
        assert_eq!(t.state(ConnId::new(0, 2, 7)), Some(true));
        t.set_congested(2, false);
        assert_eq!(t.state(ConnId::new(0, 2, 7)), Some(false));
        t.set_closed(2);
        assert!(!t.is_open(ConnId::new(0, 2, 7)));
        assert!(!t.is_open(ConnId::new(0, 9, 7)), "out of range is closed");
        assert_eq!(next_generation(u32::MAX), 1);
    }
}
