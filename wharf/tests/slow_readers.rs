//! Broadcasting to peers that stopped reading: memory stays bounded by the
//! water marks, readers keep receiving. (One test per run: it reads RSS.)

mod util;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use util::*;
use wharf::Bytes;

const SLOW: usize = 200;
const READERS: usize = 5;
const MSG: usize = 1024;

fn slow_readers(secs: u64) {
    each_backend(|b| {
        // Small kernel buffers on both sides, so that the slow peers' queues
        // reach their marks after a few hundred KiB instead of megabytes.
        let server = b
            .threads(2)
            .socket_send_buffer(64 * 1024)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        let slow: Vec<_> = (0..SLOW)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.set_recv_buffer_size(16 * 1024).unwrap();
                s.connect(&addr.into()).unwrap();
                s
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let mut s = connect(addr);
                let (stop, received) = (stop.clone(), received.clone());
                std::thread::spawn(move || {
                    // Messages carry a sequence number: each reader sees them
                    // in order, never twice.
                    let mut last = None;
                    s.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    while !stop.load(Ordering::SeqCst) {
                        let Ok(m) = read_frame(&mut s) else { continue };
                        let seq = u64::from_be_bytes(m[..8].try_into().unwrap());
                        if let Some(l) = last {
                            assert!(seq > l, "a reader got a message twice or out of order");
                        }
                        last = Some(seq);
                        received.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        wait_until(20, "all connected", || {
            handle.connections() == SLOW + READERS
        });
        let base = rss_kib();
        let mut peak = base;
        let end = Instant::now() + Duration::from_secs(secs);
        let mut seq = 0u64;
        while Instant::now() < end {
            // About 1,000 broadcasts a second: 200 MB/s of fan-out.
            let mut m = vec![0u8; MSG];
            m[..8].copy_from_slice(&seq.to_be_bytes());
            handle.broadcast(Bytes::from(m)).unwrap();
            seq += 1;
            std::thread::sleep(Duration::from_millis(1));
            peak = peak.max(rss_kib());
        }
        // A slow peer's queue holds at most the high mark plus one message
        // (64 KiB + 1 KiB) of references to shared buffers; bound the growth
        // by that, as if none were shared, plus 8 MiB for allocator slack.
        let bound_kib = SLOW * (64 + 1) + 8 * 1024;
        let stats = handle.stats();
        eprintln!(
            "{seq} broadcasts in {secs} s; RSS {base} KiB -> peak {peak} KiB (bound +{bound_kib} KiB); skipped {} ; readers got {}",
            stats.broadcast_skipped,
            received.load(Ordering::SeqCst)
        );
        if memory_bounds_apply("slow readers") {
            assert!(peak - base < bound_kib, "RSS grew by {} KiB", peak - base);
        }
        assert!(
            stats.broadcast_skipped > 0,
            "the slow peers were never over their mark"
        );
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert!(
            received.load(Ordering::SeqCst) as u64 >= seq * READERS as u64 * 9 / 10,
            "readers fell behind"
        );
        drop(slow);
        server.shutdown(Duration::from_secs(5)).unwrap();
    });
}

#[test]
fn slow_readers_short() {
    slow_readers(3);
}

#[test]
#[ignore = "long version (20 s per backend): cargo test -- --ignored"]
fn slow_readers_twenty_seconds() {
    slow_readers(20);
}
