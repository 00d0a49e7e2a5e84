//! A global allocator for the framing targets: counts the heap bytes
//! allocated and not yet freed while armed, and the peak of that, so a
//! target can bound what a reader holds. A target opts in with
//! `#[path = "common/counting.rs"] mod counting;` and
//! `#[global_allocator] static ALLOC: counting::Counting = counting::Counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering::Relaxed};

/// The system allocator, counting while armed.
pub struct Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn count(delta: isize) {
    if ARMED.load(Relaxed) {
        let live = LIVE.fetch_add(delta, Relaxed) + delta;
        PEAK.fetch_max(live, Relaxed);
    }
}

/// Starts a measurement from zero (disarmed).
pub fn reset() {
    ARMED.store(false, Relaxed);
    LIVE.store(0, Relaxed);
    PEAK.store(0, Relaxed);
}

/// Counts what `f` allocates and frees.
pub fn measure<R>(f: impl FnOnce() -> R) -> R {
    ARMED.store(true, Relaxed);
    let r = f();
    ARMED.store(false, Relaxed);
    r
}

/// The most heap bytes live at once since `reset`, while measured.
pub fn peak() -> isize {
    PEAK.load(Relaxed)
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize);
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        // SAFETY: the caller's contract for `dealloc`, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract for `realloc`, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
