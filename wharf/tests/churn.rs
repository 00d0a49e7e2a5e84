//! Churn: clients connect, send half a frame and reset, over and over.
//! Descriptors return to the baseline, opens equal closes, memory is flat.
//! The heap is counted exactly (`util::counting`): while serving it may
//! grow only as far as the most connections open at once took the slab
//! (under 4 MiB, which a leak of 12 bytes per connection would pass), and
//! once the server is dropped it is back to what it was before the server
//! started, within 64 KiB. The resident size grows by what the heap grew,
//! give or take 4 MiB (the allocator keeps some freed memory).
//! (One test per run: it counts descriptors and RSS.)

mod util;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use util::counting::{live, Counting};
use util::*;
use wharf::{CloseReason, Conn, Handler};

#[global_allocator]
static ALLOC: Counting = Counting;

/// Counts opens and closes, and keeps nothing per connection (the shared
/// `Echo` records every id and reason, which would grow with the churn).
#[derive(Default, Clone)]
struct Count {
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl Handler for Count {
    type State = ();
    fn on_open(&self, _conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.opened.fetch_add(1, Ordering::SeqCst);
        wharf::Accept::Yes
    }
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        let _ = conn.send(msg);
    }
    fn on_close(&self, _conn: &mut Conn<'_, ()>, _reason: CloseReason) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

fn churn(secs: u64) {
    each_backend(|b| {
        let heap_before_server = live();
        let echo = Count::default();
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        let run = |d: Duration| {
            let stop = Arc::new(AtomicBool::new(false));
            let cycles = Arc::new(AtomicUsize::new(0));
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    let (stop, cycles) = (stop.clone(), cycles.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let s = connect(addr);
                            let sock = socket2::Socket::from(s);
                            let _ = (&sock).write_all(&[0, 0, 1, 0, 9, 9, 9]);
                            sock.set_linger(Some(Duration::ZERO)).unwrap();
                            drop(sock); // RST
                            cycles.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            std::thread::sleep(d);
            stop.store(true, Ordering::Relaxed);
            for w in workers {
                w.join().unwrap();
            }
            cycles.load(Ordering::Relaxed)
        };
        let settle = |what: &str| {
            let end = Instant::now() + Duration::from_secs(30);
            while handle.connections() != 0
                || echo.opened.load(Ordering::SeqCst) != echo.closed.load(Ordering::SeqCst)
            {
                assert!(
                    Instant::now() < end,
                    "{what}: not settled: {:?}, on_open {} on_close {}",
                    handle.stats(),
                    echo.opened.load(Ordering::SeqCst),
                    echo.closed.load(Ordering::SeqCst)
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        // Warm-up: slabs, pools and the allocator reach their working size.
        run(Duration::from_secs(2));
        settle("warm-up settled");
        let fds = open_fds();
        let rss = rss_kib();
        let heap = live();
        let t = Instant::now();
        let cycles = run(Duration::from_secs(secs));
        settle("churn settled");
        if cfg!(windows) {
            eprintln!("SKIPPED the descriptor count on Windows: it reads /proc/self/fd");
        } else {
            wait_until(10, "descriptors back", || open_fds() == fds);
        }
        let rss_after = rss_kib();
        let heap_after = live();
        let (opened, closed) = (
            echo.opened.load(Ordering::SeqCst),
            echo.closed.load(Ordering::SeqCst),
        );
        eprintln!(
            "{cycles} connect/half-frame/reset cycles in {:?}; opens {opened} closes {closed}; fds {fds} -> {}; RSS {rss} -> {rss_after} KiB; heap {heap} -> {heap_after} B",
            t.elapsed(),
            open_fds()
        );
        assert_eq!(opened, closed);
        assert!(cycles > 1000, "only {cycles} cycles");
        assert!(
            heap_after - heap < 4 << 20,
            "the heap grew from {heap} to {heap_after} bytes over {opened} connections"
        );
        if memory_bounds_apply("churn") {
            // Memory outside the heap (and what the allocator keeps of
            // freed heap) stays flat: the resident size grows by what the
            // heap grew, give or take 4 MiB.
            let heap_kib = (heap_after - heap).max(0) as usize / 1024;
            assert!(
                rss_after <= rss + heap_kib + 4096,
                "RSS grew from {rss} to {rss_after} KiB (the heap by {heap_kib} KiB)"
            );
        }
        server.shutdown(Duration::from_secs(2)).unwrap();
        drop((handle, echo));
        let heap_left = live() - heap_before_server;
        assert!(
            heap_left < 64 * 1024,
            "{heap_left} heap bytes still live after the server is gone ({opened} connections)"
        );
    });
}

#[test]
fn churn_ten_seconds() {
    churn(10);
}

#[test]
#[ignore = "long version: cargo test --test churn -- --ignored"]
fn churn_sixty_seconds() {
    churn(60);
}
