//! A global allocator that counts the heap bytes live, for tests that
//! measure memory exactly: a test binary opts in with
//! `#[global_allocator] static ALLOC: Counting = Counting;` and reads
//! [`live`]. Unlike a resident-size reading, the count has no page
//! granularity and no allocator caching in it: what is freed is gone.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

/// The system allocator, counting the bytes live.
pub struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc`, passed on.
        let p = unsafe { System.alloc(layout) };
        count(!p.is_null(), layout.size() as isize);
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        count(!p.is_null(), layout.size() as isize);
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc`, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        // A failed realloc leaves the old block as it was.
        count(!p.is_null(), new_size as isize - layout.size() as isize);
        p
    }
}

fn count(done: bool, delta: isize) {
    if done {
        LIVE.fetch_add(delta, Relaxed);
    }
}

/// Heap bytes allocated and not yet freed, if the binary counts them.
pub fn live() -> isize {
    LIVE.load(Relaxed)
}
