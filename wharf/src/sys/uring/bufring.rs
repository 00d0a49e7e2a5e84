//! The provided-buffer ring: a pool of receive buffers shared by every
//! connection of one loop. The kernel picks a buffer only when data arrives,
//! so an idle connection pins no receive memory (the io_uring answer to the
//! IOCP servers' WSAENOBUFS lesson).
//!
//! Where the kernel consumes buffers incrementally (6.12), receives share a
//! buffer: each takes what it needs from the part not yet used, and the
//! buffer comes back to the ring only once the kernel has used it all. Small
//! receives then land side by side in warm memory instead of one to a
//! buffer across the whole pool.
//!
//! The kernel takes buffers from the ring in the order they were put in,
//! so a ring holding the whole pool would send every receive through all
//! of it: with the default 8 MiB pool, each receive would write memory
//! that had left the cache long before. (Echoing 16 KiB messages, the
//! kernel's copy into the buffers took 6.8 % of the loop's CPU on one
//! connection and 16.6 % on 100 with the whole pool in the ring, 4.3 % and
//! 11.9 % with the window.) So the ring holds only a *window* of the
//! pool, about twice what recent turns used, and is topped up once a turn
//! from the buffers that came back last: the pool's other buffers wait
//! cold, and the kernel writes into memory it wrote a moment ago. A
//! receive that finds the ring empty (`ENOBUFS`) doubles the window.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

/// The buffer group id every receive of a loop uses.
pub(super) const GROUP: u16 = 0;

/// `IOU_PBUF_RING_INC`: the kernel consumes each buffer incrementally.
pub(super) const INCREMENTAL: u16 = 2;

pub(super) struct BufRing {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    memory: NonNull<u8>,
    memory_layout: Layout,
    count: u16,
    size: u32,
    tail: u16,
    /// With incremental consumption, how much of each buffer the kernel
    /// has used (its next receive lands there); empty otherwise.
    used: Vec<u32>,
    /// Buffers out of the ring, the one that came back last at the end:
    /// `refill` takes from the end, so the warmest go in first. Every other
    /// buffer is in the ring (wharf holds none past its event), so the ring
    /// holds `count - spare.len()`.
    spare: Vec<u16>,
    /// How many buffers `refill` keeps in the ring.
    window: u32,
    /// Buffers that came back since the last `refill`.
    returned: u32,
    /// The last `refill` left the whole pool in the ring.
    all_offered: bool,
}

/// The fewest buffers the ring is kept topped up to.
const MIN_WINDOW: u32 = 16;

/// The window after a turn that used up `returned` buffers of a pool of
/// `count`: up at once to twice what the turn used, down slowly (by a
/// sixty-fourth of the difference, at least one, a turn), never below
/// [`MIN_WINDOW`] or above the pool.
fn next_window(window: u32, returned: u32, count: u32) -> u32 {
    let want = returned
        .saturating_mul(2)
        .clamp(MIN_WINDOW.min(count), count);
    if want >= window {
        want
    } else {
        window - ((window - want) / 64).max(1)
    }
}

impl BufRing {
    /// Allocates `count` buffers of `size` bytes and registers them with
    /// `ring`, consumed incrementally if `incremental`. `count` must be a
    /// power of two, at most 32768.
    pub(super) fn new(
        ring: &IoUring,
        count: u16,
        size: u32,
        incremental: bool,
    ) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 32768 || size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "receive buffer count must be a power of two up to 32768, size above 0",
            ));
        }
        let entries_layout =
            Layout::from_size_align(count as usize * std::mem::size_of::<BufRingEntry>(), 4096)
                .map_err(io::Error::other)?;
        let memory_layout = Layout::from_size_align(count as usize * size as usize, 4096)
            .map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size (count and size are > 0).
        // The ring must start zeroed: the kernel reads the tail from it.
        let entries = unsafe { alloc::alloc_zeroed(entries_layout) };
        let entries = NonNull::new(entries as *mut BufRingEntry)
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        // SAFETY: as above. Untouched pages of this allocation are not
        // resident, so a large pool costs memory only as it is used.
        let memory = unsafe { alloc::alloc(memory_layout) };
        let Some(memory) = NonNull::new(memory) else {
            // SAFETY: allocated just above with this layout.
            unsafe { alloc::dealloc(entries.as_ptr() as *mut u8, entries_layout) };
            return Err(io::ErrorKind::OutOfMemory.into());
        };
        let mut this = BufRing {
            entries,
            entries_layout,
            memory,
            memory_layout,
            count,
            size,
            tail: 0,
            used: if incremental {
                vec![0; count as usize]
            } else {
                Vec::new()
            },
            // Buffer 0 on top: the first in.
            spare: (0..count).rev().collect(),
            window: MIN_WINDOW.min(count as u32),
            returned: 0,
            all_offered: false,
        };
        // SAFETY: the entries and buffers stay allocated until `drop`, which
        // runs only after the ring itself is gone (the driver declares the
        // ring first) or deliberately leaks them if operations are in flight.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                this.entries.as_ptr() as u64,
                count,
                GROUP,
                if incremental { INCREMENTAL } else { 0 },
            )?;
        }
        this.refill();
        Ok(this)
    }

    /// The `len` bytes that a receive completion just reported in buffer
    /// `bid` (from its start, or, consumed incrementally, from where the
    /// previous receive into it ended).
    ///
    /// # Safety
    /// `bid` must come from a receive completion of this ring reporting `len`
    /// bytes, not yet passed to [`BufRing::consumed`].
    pub(super) unsafe fn filled(&self, bid: u16, len: usize) -> &[u8] {
        let start = self.used.get(bid as usize).map_or(0, |&u| u as usize);
        debug_assert!(bid < self.count && start + len <= self.size as usize);
        // SAFETY: the caller's contract: the kernel wrote these `len` bytes
        // and writes only past them (or nowhere in this buffer) until we
        // give it back.
        unsafe {
            std::slice::from_raw_parts(
                self.memory
                    .as_ptr()
                    .add(bid as usize * self.size as usize + start),
                len,
            )
        }
    }

    /// The program is done with the `len` bytes of buffer `bid` that a
    /// completion with `flags` reported: the buffer goes back to the kernel
    /// unless the kernel said it goes on filling it (`IORING_CQE_F_BUF_MORE`,
    /// incremental consumption only).
    pub(super) fn consumed(&mut self, bid: u16, len: usize, flags: u32) {
        if let Some(used) = self.used.get_mut(bid as usize) {
            if io_uring::cqueue::buffer_more(flags) {
                *used += len as u32;
                return;
            }
            *used = 0;
        }
        self.returned += 1;
        self.spare.push(bid);
    }

    /// A receive found the ring empty: keep twice as many buffers in it.
    /// True if the last `refill` had put the whole pool in the ring (every
    /// buffer was out to the kernel: the pool itself is too small for the
    /// load), false if only the window ran dry. (Not the window's size:
    /// several receives can run dry in one turn, and each doubles it.)
    pub(super) fn starved(&mut self) -> bool {
        self.window = (self.window * 2).min(self.count as u32);
        self.all_offered
    }

    /// Tops the ring up to its window (see [`next_window`]), warmest
    /// buffers first. Called once a turn, before the kernel next receives.
    pub(super) fn refill(&mut self) {
        self.window = next_window(self.window, self.returned, self.count as u32);
        self.returned = 0;
        let in_ring = self.count as u32 - self.spare.len() as u32;
        if in_ring < self.window {
            for _ in in_ring..self.window {
                let bid = self.spare.pop().expect("the window is at most the pool");
                self.push(bid);
            }
            self.publish();
        }
        self.all_offered = self.spare.is_empty();
    }

    fn push(&mut self, bid: u16) {
        let mask = self.count - 1;
        let index = (self.tail & mask) as usize;
        // SAFETY: `index < count`, inside the entries allocation; the kernel
        // reads only entries between its head and the published tail, and
        // this one is past the tail until `publish`.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        // SAFETY: `bid < count`, so the buffer lies inside `memory`.
        let addr = unsafe { self.memory.as_ptr().add(bid as usize * self.size as usize) };
        entry.set_addr(addr as u64);
        entry.set_len(self.size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&self) {
        // SAFETY: the tail field overlays the first entry's reserved field,
        // inside the entries allocation; the kernel reads it concurrently,
        // hence the atomic store with release ordering after the entry writes.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Keeps the memory allocated forever: used when the kernel may still
    /// write into it (operations in flight when a loop is torn down).
    pub(super) fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the ring that used these buffers is gone and no operation
        // is in flight (otherwise the driver calls `leak` instead), so the
        // kernel holds no reference to them.
        unsafe {
            alloc::dealloc(self.entries.as_ptr() as *mut u8, self.entries_layout);
            alloc::dealloc(self.memory.as_ptr(), self.memory_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{next_window, MIN_WINDOW};

    /// The window follows use: up at once, down slowly, within the pool.
    #[test]
    fn the_window_grows_at_once_and_shrinks_slowly() {
        assert_eq!(next_window(MIN_WINDOW, 0, 512), MIN_WINDOW, "idle");
        assert_eq!(next_window(MIN_WINDOW, 100, 512), 200, "a busy turn");
        assert_eq!(next_window(200, 1000, 512), 512, "at most the pool");
        assert_eq!(next_window(4, 0, 4), 4, "a pool smaller than the least");
        // Idle turns after a busy one: a sixty-fourth of the way down a
        // turn, so back to the least in a few hundred turns, not one.
        let mut window = 512;
        let mut turns = 0;
        while window > MIN_WINDOW {
            let next = next_window(window, 0, 512);
            assert!(next < window && next >= MIN_WINDOW);
            window = next;
            turns += 1;
        }
        assert!((100..1000).contains(&turns), "{turns} idle turns to shrink");
        // A busy turn while shrinking goes straight back up.
        assert_eq!(next_window(300, 160, 512), 320);
        assert_eq!(next_window(300, 140, 512), 299);
    }
}
