//! A peer that vanishes mid-frame: one `on_close`, nothing leaks.
//! (One test in this file: it counts the process's descriptors.)

mod util;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use util::*;
use wharf::CloseReason;

#[test]
fn peer_vanishing_mid_frame_closes_once_and_leaks_nothing() {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        // Warm up so lazily created state exists before the baseline.
        let mut warm = connect(addr);
        write_frame(&mut warm, b"warm");
        assert_eq!(read_frame(&mut warm).unwrap(), b"warm");
        drop(warm);
        wait_until(10, "warm-up closed", || {
            echo.closed.load(Ordering::SeqCst) == 1
        });
        wait_until(10, "warm-up freed", || handle.connections() == 0);
        let baseline = open_fds();

        // Half a frame, then a clean close (FIN).
        let mut s = connect(addr);
        s.write_all(&[0, 0, 0, 100]).unwrap();
        s.write_all(&[1; 10]).unwrap();
        drop(s);
        // Half a frame, then a reset (SO_LINGER 0).
        let s = connect(addr);
        let sock = socket2::Socket::from(s);
        (&sock).write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
        sock.set_linger(Some(Duration::ZERO)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        drop(sock);

        wait_until(10, "two closes", || echo.closed.load(Ordering::SeqCst) == 3);
        if cfg!(windows) {
            eprintln!("SKIPPED the descriptor count on Windows: it reads /proc/self/fd");
        } else {
            wait_until(10, "descriptors back to baseline", || {
                open_fds() == baseline
            });
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(echo.opened.load(Ordering::SeqCst), 3);
        assert_eq!(
            echo.closed.load(Ordering::SeqCst),
            3,
            "exactly one on_close each"
        );
        let reasons = echo.reasons.lock().unwrap().clone();
        assert_eq!(reasons[1], CloseReason::PeerClosed);
        assert!(
            matches!(reasons[2], CloseReason::Io(_) | CloseReason::PeerClosed),
            "reset reported as {:?}",
            reasons[2]
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
