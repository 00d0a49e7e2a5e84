//! Connection identity: which loop, which slot, which generation.
//!
//! The operating system reuses socket numbers, and wharf reuses slots; a
//! `ConnId` names one connection for its whole life and never another. The
//! generation of a slot changes every time it is reused, and every lookup
//! compares it, so a stale id fails with `Closed` instead of reaching the
//! connection that took its place.

use std::alloc::{self, Layout};
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// The identity of one connection, unique for the life of its process.
///
/// Ids are cheap to copy and may be kept after the connection closes: using
/// such an id fails with [`SendError::Closed`](crate::SendError::Closed),
/// and so does an id of another `Server` of the same process. A slot's
/// generation has 63 bits and is never reused, so a stale id could reach a
/// new connection only after 2^63 connections in one slot (at 100,000 a
/// second, millions of years).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// The server's tag (see `next_server_tag`).
    server: u32,
    /// Loop index in the high 8 bits, slot in the low 24.
    place: u32,
    generation: u64,
}

const SLOT_BITS: u32 = 24;
/// Most slots (connections at once) one loop can hold.
pub(crate) const MAX_SLOTS: usize = 1 << SLOT_BITS;
/// Most loops one server can run.
pub(crate) const MAX_LOOPS: usize = 256;
/// Generations stay below this (the live table keeps a flag above them).
const MAX_GENERATION: u64 = (1 << 63) - 1;

/// A tag for a new server, different from every other server's in this
/// process (until 2^32 servers have been started).
pub(crate) fn next_server_tag() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl ConnId {
    pub(crate) fn new(server: u32, loop_index: usize, slot: u32, generation: u64) -> ConnId {
        debug_assert!(loop_index < MAX_LOOPS && (slot as usize) < MAX_SLOTS);
        ConnId {
            server,
            place: (loop_index as u32) << SLOT_BITS | slot,
            generation,
        }
    }

    /// The event loop (thread) the connection lives on, from 0 to the
    /// server's thread count: handlers can shard their own data by it.
    pub fn loop_index(self) -> usize {
        (self.place >> SLOT_BITS) as usize
    }

    pub(crate) fn slot(self) -> u32 {
        self.place & (MAX_SLOTS as u32 - 1)
    }

    pub(crate) fn generation(self) -> u64 {
        self.generation
    }

    pub(crate) fn server(self) -> u32 {
        self.server
    }

    /// The id as one number (for logs and maps): server, loop, slot and
    /// generation.
    pub fn as_u128(self) -> u128 {
        (self.server as u128) << 96 | (self.place as u128) << 64 | self.generation as u128
    }
}

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ConnId({}:{}:{}:{})",
            self.server,
            self.loop_index(),
            self.slot(),
            self.generation
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
/// at once; and the bytes other threads have posted to each slot that the
/// loop has not taken yet. Only the loop writes the first: when a
/// connection opens, closes, or crosses its water marks; never per message.
pub(crate) struct LiveTable {
    slots: Box<[AtomicU64]>,
    posted: Box<[AtomicUsize]>,
}

const CONGESTED: u64 = 1 << 63;

/// A zeroed boxed slice of `len` atomics, from `alloc_zeroed`: the kernel
/// maps it lazily, so untouched slots cost no resident memory.
fn zeroed<T>(len: usize) -> Box<[T]> {
    let layout = Layout::array::<T>(len).expect("a table of slots fits in memory");
    if layout.size() == 0 {
        // SAFETY: a dangling, aligned pointer is a valid empty slice.
        return unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                std::ptr::NonNull::<T>::dangling().as_ptr(),
                0,
            ))
        };
    }
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        alloc::handle_alloc_error(layout);
    }
    // `T` is `AtomicU64` or `AtomicUsize` (see `new`): zero bytes are 0.
    // SAFETY: allocated with the layout of `[T; len]` (the box frees it so)
    // and aligned for `T`, whose all-zero bytes are a valid value.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) }
}

impl LiveTable {
    /// A table for `len` slots.
    pub(crate) fn new(len: usize) -> LiveTable {
        LiveTable {
            slots: zeroed::<AtomicU64>(len),
            posted: zeroed::<AtomicUsize>(len),
        }
    }

    pub(crate) fn set_open(&self, slot: u32, generation: u64) {
        self.slots[slot as usize].store(generation, Ordering::Release);
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
        (v & !CONGESTED == id.generation() && id.generation() != 0).then_some(v & CONGESTED != 0)
    }

    /// Counts `len` bytes posted to `slot` by another thread, unless what
    /// is in transit is already over `limit`.
    pub(crate) fn post(&self, slot: u32, len: usize, limit: usize) -> bool {
        let p = &self.posted[slot as usize];
        if p.fetch_add(len, Ordering::AcqRel) > limit {
            p.fetch_sub(len, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// The loop took `len` posted bytes of `slot`.
    pub(crate) fn unpost(&self, slot: u32, len: usize) {
        self.posted[slot as usize].fetch_sub(len, Ordering::AcqRel);
    }

    /// Bytes in transit to `slot`.
    pub(crate) fn posted(&self, slot: u32) -> usize {
        self.posted[slot as usize].load(Ordering::Acquire)
    }

    #[cfg(test)]
    fn is_open(&self, id: ConnId) -> bool {
        self.state(id).is_some()
    }
}

/// Hands out a slot's next generation: never 0 (which means "closed").
pub(crate) fn next_generation(g: u64) -> u64 {
    if g >= MAX_GENERATION {
        1
    } else {
        g + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_its_parts() {
        let id = ConnId::new(u32::MAX, 255, MAX_SLOTS as u32 - 1, MAX_GENERATION);
        assert_eq!(
            (id.server(), id.loop_index(), id.slot(), id.generation()),
            (u32::MAX, 255, MAX_SLOTS as u32 - 1, MAX_GENERATION)
        );
        let id = ConnId::new(1, 3, 17, 9);
        assert_eq!((id.loop_index(), id.slot(), id.generation()), (3, 17, 9));
        assert_ne!(id, ConnId::new(2, 3, 17, 9), "another server's id differs");
        assert_ne!(next_server_tag(), next_server_tag());
    }

    #[test]
    fn stale_generation_is_not_open() {
        let t = LiveTable::new(4);
        let id = |slot, g| ConnId::new(1, 0, slot, g);
        t.set_open(2, 7);
        assert!(t.is_open(id(2, 7)));
        assert!(!t.is_open(id(2, 6)));
        t.set_congested(2, true);
        assert_eq!(t.state(id(2, 7)), Some(true));
        t.set_congested(2, false);
        assert_eq!(t.state(id(2, 7)), Some(false));
        t.set_closed(2);
        assert!(!t.is_open(id(2, 7)));
        assert!(!t.is_open(id(9, 7)), "out of range is closed");
        t.set_open(3, MAX_GENERATION);
        t.set_congested(3, true);
        assert_eq!(t.state(id(3, MAX_GENERATION)), Some(true));
        assert_eq!(next_generation(MAX_GENERATION), 1);
        assert_eq!(next_generation(u32::MAX as u64), u32::MAX as u64 + 1);
    }

    #[test]
    fn posted_bytes_are_bounded_and_given_back() {
        let t = LiveTable::new(2);
        assert!(t.post(1, 100, 150));
        assert!(t.post(1, 100, 150), "admitted while at or under the limit");
        assert!(!t.post(1, 1, 150), "refused once over it");
        assert_eq!(t.posted(1), 200);
        t.unpost(1, 200);
        assert!(t.post(1, 1, 150));
    }
}
