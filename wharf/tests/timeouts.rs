//! Idle and first-message timeouts: silent and slowloris clients are closed,
//! active ones are not.

mod util;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use util::*;
use wharf::CloseReason;

/// Reads until the server closes the connection; returns how long it took.
fn time_to_close(s: &mut std::net::TcpStream, started: Instant) -> Duration {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

/// `unit` scales every period: the first-message timeout is 8 units, the
/// idle timeout 15, the slowloris sends a byte every 2 units and the active
/// client a message every 3.
fn timeouts(unit: Duration) {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(1)
            .first_message_timeout(unit * 8)
            .idle_timeout(unit * 15)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        let addr = server.local_addr();
        let started = Instant::now();
        // Silent: connects and says nothing.
        let mut silent = connect(addr);
        // Slowloris: a byte every 200 ms, never finishing a frame in time.
        let slow = std::thread::spawn(move || {
            let mut s = connect(addr);
            let t = Instant::now();
            let wire = frame(&[1u8; 100]);
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            for byte in wire.iter() {
                if s.write_all(std::slice::from_ref(byte)).is_err() {
                    break;
                }
                // Wait 2 units for the next byte, watching for the server's
                // FIN meanwhile.
                let mut b = [0u8; 1];
                match s.read(&mut b) {
                    Ok(0) => return t.elapsed(),
                    Ok(_) => panic!("the server answered half a frame"),
                    Err(_) => {}
                }
            }
            time_to_close(&mut s, t)
        });
        // Active: a message every 3 units, 10 times, all echoed.
        let active = std::thread::spawn(move || {
            let mut s = connect(addr);
            for i in 0..10 {
                write_frame(&mut s, &pattern(i, 32));
                assert_eq!(
                    read_frame(&mut s).unwrap(),
                    pattern(i, 32),
                    "active client cut off"
                );
                std::thread::sleep(unit * 3);
            }
            s
        });
        let silent_after = time_to_close(&mut silent, started);
        let slow_after = slow.join().unwrap();
        let mut active = active.join().unwrap();
        eprintln!(
            "silent closed after {silent_after:?}, slowloris after {slow_after:?}; reasons {:?}",
            echo.reasons.lock().unwrap()
        );
        for (who, t) in [("silent", silent_after), ("slowloris", slow_after)] {
            assert!(t >= unit * 15 / 2, "{who} closed early: {t:?}");
            assert!(
                t < unit * 8 + Duration::from_millis(1500),
                "{who} closed late: {t:?}"
            );
        }
        let reasons = echo.reasons.lock().unwrap().clone();
        let first = reasons
            .iter()
            .filter(|r| **r == CloseReason::FirstMessageTimeout)
            .count();
        assert_eq!(first, 2, "reasons: {reasons:?}");
        assert!(server.handle().stats().timed_out >= 2);
        // The active client, now silent, times out as idle.
        let idle_from = Instant::now();
        let idle_after = time_to_close(&mut active, idle_from);
        assert!(
            idle_after < unit * 15 + Duration::from_secs(1),
            "idle close late: {idle_after:?}"
        );
        assert!(echo
            .reasons
            .lock()
            .unwrap()
            .contains(&CloseReason::IdleTimeout));
        server.shutdown(Duration::from_secs(1)).unwrap();
    });
}

#[test]
fn silent_and_slowloris_clients_are_closed_active_ones_are_not() {
    timeouts(Duration::from_millis(100));
}

/// The slowloris of the issue: a byte every 2 s against a 8 s first-message
/// timeout (about a minute per backend).
#[test]
#[ignore = "long version: cargo test --test timeouts -- --ignored"]
fn slowloris_one_byte_every_two_seconds() {
    timeouts(Duration::from_secs(1));
}
