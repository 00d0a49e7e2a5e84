//! Idle connections cost almost no user-space memory: no receive buffer,
//! no send buffer, only a small slot. (One test: it reads the process RSS.)

mod util;

use std::time::Duration;

use util::*;

/// Client and server share this process's 20,000 descriptors, so the test
/// stays under that: 2 × (WARM + IDLE) plus the harness's own.
const WARM: usize = 200;
const IDLE: usize = 9_000;

#[test]
fn idle_connections_cost_under_a_kib_each() {
    each_backend(|b| {
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        let mut clients = Vec::with_capacity(WARM + IDLE);
        // Warm up: the loops' buffer pools, rings and first slab pages.
        for i in 0..WARM {
            let mut s = connect(addr);
            write_frame(&mut s, &pattern(i, 64));
            assert_eq!(read_frame(&mut s).unwrap(), pattern(i, 64));
            clients.push(s);
        }
        wait_until(10, "warm-up connections", || handle.connections() == WARM);
        std::thread::sleep(Duration::from_millis(200));
        let before = rss_kib();
        for _ in 0..IDLE {
            clients.push(connect(addr));
        }
        wait_until(30, "idle connections", || {
            handle.connections() == WARM + IDLE
        });
        std::thread::sleep(Duration::from_millis(200));
        let after = rss_kib();
        let per_conn = (after.saturating_sub(before) * 1024) as f64 / IDLE as f64;
        eprintln!(
            "RSS {before} KiB -> {after} KiB with {IDLE} more idle connections: {per_conn:.0} bytes each (server and client sides together)"
        );
        if memory_bounds_apply("idle connections") {
            assert!(per_conn < 1024.0, "{per_conn:.0} bytes per idle connection");
        }
        drop(clients);
        server.shutdown(Duration::from_secs(5)).unwrap();
    });
}
