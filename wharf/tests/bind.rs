//! Binding: busy ports and malformed addresses fail clearly; listeners are
//! shared by the loops (or spread with `reuse_port`).

mod util;

use std::collections::HashSet;
use std::time::Duration;

use util::*;
use wharf::Server;

#[test]
fn a_busy_port_is_refused() {
    each_backend(|b| {
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let err = Server::builder()
            .bind(server.local_addr())
            .expect_err("port in use");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        server.shutdown(Duration::from_secs(1)).unwrap();
    });
}

#[test]
fn a_malformed_address_is_an_error_not_a_panic() {
    for bad in ["127.0.0.1", "127.0.0.1:99999", "not an address:80x", ""] {
        assert!(Server::builder().bind(bad).is_err(), "{bad:?} was accepted");
    }
}

/// Which loops the accepted connections landed on.
fn loops_used(echo: &Echo) -> HashSet<usize> {
    echo.ids
        .lock()
        .unwrap()
        .iter()
        .map(|id| id.loop_index())
        .collect()
}

#[test]
fn every_loop_accepts_from_the_shared_or_reused_port() {
    each_backend_kind(|backend| {
        for reuse in [false, true] {
            let echo = Echo::default();
            let server = Server::builder()
                .backend(backend)
                .threads(2)
                .reuse_port(reuse)
                .bind("127.0.0.1:0")
                .unwrap()
                .start(echo.clone())
                .unwrap();
            let mut clients = Vec::new();
            for i in 0..200 {
                let mut s = connect(server.local_addr());
                write_frame(&mut s, &pattern(i, 10));
                assert_eq!(read_frame(&mut s).unwrap(), pattern(i, 10));
                clients.push(s);
            }
            let used = loops_used(&echo);
            eprintln!("reuse_port {reuse}: connections on loops {used:?}");
            drop(clients);
            server.shutdown(Duration::from_secs(2)).unwrap();
            // Either the kernel hashes connections across the loops'
            // listeners, or the loops hand accepted ones round-robin.
            assert_eq!(used.len(), 2, "a loop was left without connections");
        }
    });
}
