//! Start, serve, shut down, many times over: one loop and several, both
//! listener modes. Every cycle serves a client, and nothing is left behind
//! (threads, descriptors).

mod util;

use std::time::{Duration, Instant};

use util::*;
use wharf::Server;

#[test]
fn hundreds_of_start_serve_shutdown_cycles() {
    each_backend_kind(|backend| {
        let threads_before = threads();
        let fds_before = open_fds();
        let mut cycles = 0;
        for threads in [1, 3] {
            for reuse in [true, false] {
                for i in 0..60 {
                    let server = Server::builder()
                        .backend(backend)
                        .threads(threads)
                        .reuse_port(reuse)
                        .bind("127.0.0.1:0")
                        .unwrap()
                        .start(Echo::default())
                        .unwrap();
                    // Every other cycle serves; the rest stop at once, some
                    // with a client connected and unserved.
                    let client = (i % 3 != 2).then(|| {
                        let mut s = connect(server.local_addr());
                        if i % 3 == 0 {
                            write_frame(&mut s, &pattern(i, 100));
                            assert_eq!(read_frame(&mut s).unwrap(), pattern(i, 100));
                        }
                        s
                    });
                    let t0 = Instant::now();
                    server.shutdown(Duration::from_millis(50)).unwrap();
                    if timing_bounds_apply("a shutdown cycle") {
                        assert!(t0.elapsed() < Duration::from_secs(3), "shutdown hung");
                    }
                    drop(client);
                    cycles += 1;
                }
            }
        }
        eprintln!("{cycles} cycles");
        if cfg!(target_os = "linux") {
            wait_until(10, "threads back", || threads() <= threads_before);
            wait_until(10, "descriptors back", || open_fds() <= fds_before + 2);
        }
    });
}
