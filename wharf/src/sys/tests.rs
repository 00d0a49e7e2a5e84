//! Driver-level tests: each backend through the same contract.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use super::*;

fn drivers() -> Vec<Driver> {
    drivers_with(4, 4096)
}

/// One driver of each backend, with `recv_buffers` receive buffers of
/// `recv_buffer_size` bytes.
fn drivers_with(recv_buffers: u16, recv_buffer_size: u32) -> Vec<Driver> {
    let config = |backend| DriverConfig {
        recv_buffers,
        recv_buffer_size,
        queue_depth: 64,
        backend,
    };
    vec![
        #[cfg(unix)]
        Driver::new(&config(Backend::Poll)).unwrap(),
        #[cfg(target_os = "linux")]
        Driver::new(&config(Backend::Uring)).unwrap(),
        #[cfg(windows)]
        Driver::new(&config(Backend::Iocp)).unwrap(),
    ]
}

/// A connected pair: (our side as a `Socket`, the peer).
fn pair() -> (Socket, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (ours, _) = l.accept().unwrap();
    (Socket::from(ours), peer)
}

/// Polls until `want` matches an event, for at most two seconds.
fn wait_for(driver: &mut Driver, mut want: impl FnMut(&Event<'_>) -> bool) -> bool {
    let mut seen = false;
    for _ in 0..200 {
        driver
            .poll(Some(Duration::from_millis(10)), |e| {
                seen |= want(&e);
                Flow::Continue
            })
            .unwrap();
        if seen {
            return true;
        }
    }
    false
}

/// Polls until nothing is in flight: what a driver starts of its own
/// (io_uring's watch beside a multishot receive) ends within a turn or two
/// of the last event the loop waits for.
fn settled(driver: &mut Driver) -> bool {
    for _ in 0..200 {
        if driver.in_flight() == 0 {
            return true;
        }
        driver
            .poll(Some(Duration::from_millis(10)), |_| Flow::Continue)
            .unwrap();
    }
    false
}

/// A send on a socket whose writing side is shut fails with EPIPE: the
/// condition that raises SIGPIPE unless every send says MSG_NOSIGNAL.
#[test]
fn a_send_after_our_fin_fails_with_epipe_and_raises_no_sigpipe() {
    // If a send raised SIGPIPE, this test binary would die, failing the run.
    #[cfg(unix)]
    // SAFETY: sets SIGPIPE's default disposition (terminate); no handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL)
    };
    // Windows has no SIGPIPE: the send fails with WSAESHUTDOWN.
    #[cfg(unix)]
    let expected = libc::EPIPE;
    #[cfg(windows)]
    let expected = 10058;
    for mut driver in drivers() {
        let (ours, _peer) = pair();
        shutdown_write(&ours);
        let batch = Box::new(SendBatch {
            bufs: vec![bytes::Bytes::from_static(b"after FIN")],
            ..SendBatch::default()
        });
        driver.send(0, &ours, batch);
        let mut error = None;
        assert!(wait_for(&mut driver, |e| match e {
            Event::Sent { result, .. } => {
                error = result.as_ref().err().and_then(|e| e.raw_os_error());
                true
            }
            _ => false,
        }));
        assert_eq!(error, Some(expected));
        assert!(settled(&mut driver), "operations left in flight");
    }
}

/// Data followed at once by a reset: the receive reports the data and then
/// ends with an error (or EOF); it never waits forever.
#[test]
fn data_then_reset_ends_the_receive() {
    for mut driver in drivers() {
        for _ in 0..50 {
            let (ours, peer) = pair();
            let peer = socket2::Socket::from(peer);
            std::io::Write::write_all(&mut &peer, b"half a frame").unwrap();
            peer.set_linger(Some(Duration::ZERO)).unwrap();
            drop(peer);
            driver.recv(7, &ours);
            let mut ended = false;
            let mut rearm = false;
            for _ in 0..200 {
                driver
                    .poll(Some(Duration::from_millis(10)), |e| {
                        match e {
                            Event::RecvEnded {
                                why: RecvEnd::Rearm | RecvEnd::NoBuffers,
                                ..
                            } => rearm = true,
                            Event::RecvEnded { .. } => ended = true,
                            _ => {}
                        }
                        Flow::Continue
                    })
                    .unwrap();
                if rearm {
                    rearm = false;
                    driver.recv(7, &ours);
                }
                if ended {
                    break;
                }
            }
            assert!(ended, "a reset went unreported");
            assert!(settled(&mut driver), "operations left in flight");
        }
    }
}

/// More data waiting on many sockets at once than the receive ring holds
/// (io_uring keeps only a window of its pool in the ring, and a receive
/// that finds it empty ends, to be re-armed): every byte still arrives,
/// in order, with each receive re-armed when it asks.
#[test]
fn more_waiting_than_the_ring_holds_arrives_whole_and_in_order() {
    const SOCKETS: usize = 32;
    const EACH: usize = 48 * 1024;
    let pattern = |s: usize, i: usize| ((s * 7 + i) % 251) as u8;
    for mut driver in drivers_with(256, 4096) {
        let pairs: Vec<_> = (0..SOCKETS).map(|_| pair()).collect();
        for (s, (_, peer)) in pairs.iter().enumerate() {
            let data: Vec<u8> = (0..EACH).map(|i| pattern(s, i)).collect();
            std::io::Write::write_all(&mut &*peer, &data).unwrap();
        }
        for (s, (ours, _)) in pairs.iter().enumerate() {
            driver.recv(s as u32, ours);
        }
        let mut got = [0usize; SOCKETS];
        let mut rearms = 0;
        for _ in 0..500 {
            let mut rearm = Vec::new();
            driver
                .poll(Some(Duration::from_millis(10)), |e| {
                    match e {
                        Event::Received { slot, data } => {
                            let s = slot as usize;
                            for (k, &b) in data.iter().enumerate() {
                                assert_eq!(
                                    b,
                                    pattern(s, got[s] + k),
                                    "socket {s} byte {}",
                                    got[s] + k
                                );
                            }
                            got[s] += data.len();
                        }
                        Event::RecvEnded { slot, why } => {
                            match why {
                                RecvEnd::NoBuffers | RecvEnd::Rearm => rearms += 1,
                                why => panic!("socket {slot}'s receive ended: {why:?}"),
                            }
                            rearm.push(slot);
                        }
                        _ => {}
                    }
                    Flow::Continue
                })
                .unwrap();
            for slot in rearm {
                driver.recv(slot, &pairs[slot as usize].0);
            }
            if got.iter().all(|&n| n == EACH) {
                break;
            }
        }
        assert_eq!(got, [EACH; SOCKETS], "bytes missing");
        // A multishot receive ends only when the ring runs dry (one-shot
        // ones end after each completion): either way, some ended here.
        #[cfg(target_os = "linux")]
        if matches!(driver, Driver::Uring(_)) {
            assert!(
                rearms > 0,
                "no receive ended: nothing here tested the window"
            );
        }
        let _ = rearms;
        for (s, (ours, _)) in pairs.iter().enumerate() {
            driver.cancel_recv(s as u32, ours);
        }
        assert!(settled(&mut driver), "operations left in flight");
    }
}

/// A receive answered with `Flow::Pause` and then not cancelled (the
/// loop's queue drained within the same turn) goes on reading in the next
/// turn, though the peer sends nothing new: the bytes waiting in the
/// socket must not wait for an edge that never comes.
#[test]
fn a_pause_not_followed_by_a_cancel_reads_on_next_turn() {
    for mut driver in drivers() {
        // io_uring reports what its multishot receive has queued: it
        // cannot take back a completion (the loop cancels instead).
        #[cfg(target_os = "linux")]
        let strict = !matches!(driver, Driver::Uring(_));
        #[cfg(not(target_os = "linux"))]
        let strict = true;
        let (ours, mut peer) = pair();
        let sent = vec![7u8; 64 * 1024];
        std::io::Write::write_all(&mut peer, &sent).unwrap();
        driver.recv(3, &ours);
        let mut got = 0;
        let mut pauses = 0;
        let mut rearm = false;
        for _ in 0..300 {
            let mut paused_now = false;
            driver
                .poll(Some(Duration::from_millis(10)), |e| {
                    match e {
                        Event::Received { data, .. } => {
                            assert!(!(strict && paused_now), "read on in the turn it paused");
                            got += data.len();
                            if pauses < 3 && !paused_now {
                                // The first buffer of each of three turns.
                                pauses += 1;
                                paused_now = true;
                                return Flow::Pause;
                            }
                        }
                        Event::RecvEnded {
                            why: RecvEnd::Rearm | RecvEnd::NoBuffers,
                            ..
                        } => rearm = true,
                        Event::RecvEnded { why, .. } => panic!("the receive ended: {why:?}"),
                        _ => {}
                    }
                    Flow::Continue
                })
                .unwrap();
            if rearm {
                rearm = false;
                driver.recv(3, &ours);
            }
            if got == sent.len() {
                break;
            }
        }
        assert_eq!(pauses, 3);
        assert_eq!(got, sent.len(), "bytes left in the socket after a pause");
        driver.cancel_recv(3, &ours);
        assert!(wait_for(&mut driver, |e| matches!(
            e,
            Event::RecvEnded { .. }
        )));
        assert!(settled(&mut driver), "operations left in flight");
    }
}
