//! Hostile length headers are refused before anything is allocated for
//! them; other connections never notice. (A counting allocator watches the
//! largest allocation, so this file holds one test.)

mod util;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use util::*;
use wharf::{CloseReason, Framing};

struct Counting;

static WATCH: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if WATCH.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX: usize = 64 * 1024;

#[test]
fn hostile_headers_are_refused_without_allocation() {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(2)
            .framing(Framing::length_prefixed().max_frame(MAX))
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        let addr = server.local_addr();
        // 100 good connections echo all along.
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let good: Vec<_> = (0..100)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut s = connect(addr);
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) || n < 10 {
                        let body = pattern(i * 1000 + n, 100 + n % 50);
                        write_frame(&mut s, &body);
                        assert_eq!(
                            read_frame(&mut s).unwrap(),
                            body,
                            "good client {i} disturbed"
                        );
                        n += 1;
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        LARGEST.store(0, Ordering::SeqCst);
        WATCH.store(true, Ordering::SeqCst);
        let headers: [u32; 3] = [0xFFFF_FFFF, 0x8000_0000, MAX as u32 + 1];
        for h in headers {
            let mut s = connect(addr);
            s.write_all(&h.to_be_bytes()).unwrap();
            s.write_all(&[0xAB; 1000]).unwrap();
            // The server closes this connection (EOF or reset) and sends
            // nothing back.
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(rest.is_empty());
        }
        std::thread::sleep(Duration::from_millis(200));
        WATCH.store(false, Ordering::SeqCst);
        let largest = LARGEST.load(Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        for g in good {
            g.join().unwrap();
        }
        let reasons = echo.reasons.lock().unwrap().clone();
        let too_large: Vec<_> = reasons
            .iter()
            .filter(|r| matches!(r, CloseReason::FrameTooLarge { .. }))
            .collect();
        eprintln!("largest allocation while attacked: {largest} bytes; closes: {too_large:?}");
        assert_eq!(
            too_large.len(),
            3,
            "one FrameTooLarge close per hostile header"
        );
        for (r, h) in too_large.iter().zip(headers) {
            assert_eq!(
                **r,
                CloseReason::FrameTooLarge {
                    len: h as usize,
                    max: MAX
                }
            );
        }
        assert!(
            largest <= MAX,
            "allocated {largest} bytes, above the {MAX}-byte maximum"
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
