//! The worker pool: jobs run off the loop, their results come back to the
//! connection's loop in submission order, and the pool's limits, panics,
//! closes and shutdowns behave as documented.

mod util;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use util::*;
use wharf::{CloseReason, Conn, ConnId, Handler, SubmitError};

/// A gate jobs wait at until the test opens it.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cond: Condvar,
}

impl Gate {
    fn wait(&self) {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cond.wait(open).unwrap();
        }
    }
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

/// Echoes every message through a job. The first byte of a message says
/// what the job does: `s` sleeps for the microseconds in bytes 1..5 (big
/// endian), `g` waits at the gate, `p` panics; anything else returns at
/// once.
#[derive(Default, Clone)]
struct JobEcho {
    gate: Arc<Gate>,
    messages: Arc<AtomicUsize>,
    applied_after_close: Arc<AtomicBool>,
    refused: Arc<Mutex<Vec<SubmitError>>>,
    in_flight_max: Arc<AtomicUsize>,
    ids: Arc<Mutex<Vec<ConnId>>>,
    reasons: Arc<Mutex<Vec<CloseReason>>>,
}

impl Handler for JobEcho {
    /// Closed: a result applied after `on_close` would see it.
    type State = bool;

    fn on_open(&self, conn: &mut Conn<'_, bool>) -> wharf::Accept {
        self.ids.lock().unwrap().push(conn.id());
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, bool>, msg: &[u8]) {
        self.messages.fetch_add(1, Ordering::SeqCst);
        let msg = msg.to_vec();
        let gate = self.gate.clone();
        let after_close = self.applied_after_close.clone();
        let submitted = conn.submit(move || {
            match msg.first() {
                Some(b's') => {
                    let us = u32::from_be_bytes(msg[1..5].try_into().unwrap());
                    std::thread::sleep(Duration::from_micros(us.into()));
                }
                Some(b'g') => gate.wait(),
                Some(b'p') => panic!("a job that panics"),
                _ => {}
            }
            move |conn: &mut Conn<'_, bool>| {
                if *conn.state() {
                    after_close.store(true, Ordering::SeqCst);
                }
                let _ = conn.send(&msg);
            }
        });
        self.in_flight_max
            .fetch_max(conn.jobs_in_flight(), Ordering::SeqCst);
        if let Err(e) = submitted {
            self.refused.lock().unwrap().push(e);
            let _ = conn.send(b"busy");
        }
    }

    fn on_close(&self, conn: &mut Conn<'_, bool>, reason: CloseReason) {
        *conn.state() = true;
        self.reasons.lock().unwrap().push(reason);
    }
}

fn sleep_msg(us: u32, tag: &[u8]) -> Vec<u8> {
    let mut m = vec![b's'];
    m.extend_from_slice(&us.to_be_bytes());
    m.extend_from_slice(tag);
    m
}

/// A small deterministic generator, so that a failure can be re-run.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn results_keep_submission_order_with_random_job_durations() {
    each_backend(|b| {
        let server = b
            .threads(2)
            .workers(4)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(JobEcho::default())
            .unwrap();
        let addr = server.local_addr();
        let conns = 24;
        let per_conn = 250;
        let clients: Vec<_> = (0..conns)
            .map(|c| {
                std::thread::spawn(move || {
                    let mut s = connect(addr);
                    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ c as u64;
                    let msgs: Vec<Vec<u8>> = (0..per_conn)
                        .map(|i| {
                            let us = (xorshift(&mut seed) % 400) as u32;
                            sleep_msg(us, format!("{c}:{i}").as_bytes())
                        })
                        .collect();
                    // Pipelined: every request goes out before any reply is
                    // read, so jobs of one connection overlap on the pool.
                    let mut wire = Vec::new();
                    for m in &msgs {
                        wire.extend(frame(m));
                    }
                    let mut w = s.try_clone().unwrap();
                    let writer = std::thread::spawn(move || w.write_all(&wire).unwrap());
                    for (i, m) in msgs.iter().enumerate() {
                        let got = read_frame(&mut s).unwrap();
                        assert!(&got == m, "connection {c}: reply {i} out of order");
                    }
                    writer.join().unwrap();
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        // Counters are published once per loop turn: they may lag the replies.
        let want = (conns * per_conn) as u64;
        wait_until(10, "the counter", || {
            server.handle().stats().jobs_done == want
        });
        assert_eq!(server.handle().stats().handler_panics, 0);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn a_slow_job_does_not_hold_up_another_connection() {
    each_backend(|b| {
        let h = JobEcho::default();
        let server = b
            .threads(1)
            .workers(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let mut slow = connect(server.local_addr());
        write_frame(&mut slow, b"g-slow");
        wait_until(10, "the slow job", || {
            h.messages.load(Ordering::SeqCst) == 1
        });
        // The other connection is served by the second worker while the
        // first waits at the gate, and its loop is the same as the slow one's.
        let mut quick = connect(server.local_addr());
        for i in 0..50 {
            let m = format!("q{i}");
            write_frame(&mut quick, m.as_bytes());
            assert_eq!(read_frame(&mut quick).unwrap(), m.as_bytes());
        }
        slow.set_nonblocking(true).unwrap();
        let mut b1 = [0u8; 1];
        assert!(
            matches!(slow.read(&mut b1), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the slow job answered before its gate opened"
        );
        slow.set_nonblocking(false).unwrap();
        h.gate.open();
        assert_eq!(read_frame(&mut slow).unwrap(), b"g-slow");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn a_connection_at_its_job_limit_pauses_and_loses_nothing() {
    each_backend(|b| {
        let h = JobEcho::default();
        let server = b
            .threads(1)
            .workers(2)
            .jobs_per_connection(3)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let mut client = connect(server.local_addr());
        let msgs: Vec<Vec<u8>> = (0..40).map(|i| format!("g{i}").into_bytes()).collect();
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(frame(m));
        }
        client.write_all(&wire).unwrap();
        wait_until(10, "three jobs", || h.messages.load(Ordering::SeqCst) == 3);
        // The rest arrived but is held: no more messages while 3 are out.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            h.messages.load(Ordering::SeqCst),
            3,
            "read past the job limit"
        );
        h.gate.open();
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(&read_frame(&mut client).unwrap(), m, "reply {i}");
        }
        assert_eq!(h.in_flight_max.load(Ordering::SeqCst), 3);
        assert!(h.refused.lock().unwrap().is_empty());
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn a_full_pool_refuses_submits_with_saturated() {
    each_backend(|b| {
        let h = JobEcho::default();
        let server = b
            .threads(1)
            .workers(1)
            .job_queue(4)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        // One job runs (at the gate), four wait: the sixth is refused. Each
        // from its own connection, so no connection's job limit applies.
        let mut clients: Vec<_> = (0..7).map(|_| connect(server.local_addr())).collect();
        for (i, c) in clients.iter_mut().enumerate() {
            write_frame(c, format!("g{i}").as_bytes());
            wait_until(10, "the message", || {
                h.messages.load(Ordering::SeqCst) == i + 1
            });
            if i == 0 {
                wait_until(10, "the first job to run", || {
                    server.handle().stats().jobs_queued == 0
                });
            }
        }
        assert_eq!(
            *h.refused.lock().unwrap(),
            vec![SubmitError::Saturated, SubmitError::Saturated]
        );
        assert_eq!(server.handle().stats().jobs_refused, 2);
        // The refused ones heard at once; the others are answered in time.
        assert_eq!(read_frame(&mut clients[5]).unwrap(), b"busy");
        assert_eq!(read_frame(&mut clients[6]).unwrap(), b"busy");
        h.gate.open();
        for (i, c) in clients.iter_mut().enumerate().take(5) {
            assert_eq!(read_frame(c).unwrap(), format!("g{i}").as_bytes());
        }
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn a_panicking_job_closes_only_its_connection() {
    each_backend(|b| {
        let h = JobEcho::default();
        let server = b
            .threads(1)
            .workers(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let mut bad = connect(server.local_addr());
        let mut good = connect(server.local_addr());
        write_frame(&mut good, b"before");
        assert_eq!(read_frame(&mut good).unwrap(), b"before");
        write_frame(&mut bad, b"ok-1");
        write_frame(&mut bad, b"panic");
        write_frame(&mut bad, b"ok-2");
        // The result before the panic is applied, the ones after it never.
        assert_eq!(read_frame(&mut bad).unwrap(), b"ok-1");
        assert!(read_frame(&mut bad).is_err(), "the connection stays open");
        write_frame(&mut good, b"after");
        assert_eq!(read_frame(&mut good).unwrap(), b"after");
        wait_until(10, "the panic counted", || {
            server.handle().stats().handler_panics == 1
        });
        assert_eq!(
            h.reasons.lock().unwrap().as_slice(),
            [CloseReason::HandlerPanic]
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn results_for_a_closed_connection_are_dropped() {
    each_backend(|b| {
        let h = JobEcho::default();
        let server = b
            .threads(1)
            .workers(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let handle = server.handle();
        let mut client = connect(server.local_addr());
        write_frame(&mut client, b"g-1");
        write_frame(&mut client, b"g-2");
        wait_until(10, "two jobs", || h.messages.load(Ordering::SeqCst) == 2);
        let id = h.ids.lock().unwrap()[0];
        handle.disconnect(id).unwrap();
        wait_until(10, "closed", || !handle.is_open(id));
        // A new connection may take the same slot: it must not get them.
        let mut next = connect(server.local_addr());
        wait_until(10, "the second open", || h.ids.lock().unwrap().len() == 2);
        h.gate.open();
        wait_until(10, "the results to come back", || {
            handle.stats().jobs_discarded == 2
        });
        assert!(!h.applied_after_close.load(Ordering::SeqCst));
        write_frame(&mut next, b"fresh");
        assert_eq!(read_frame(&mut next).unwrap(), b"fresh");
        // Counters are published once per loop turn: they may lag the reply.
        wait_until(10, "the counter", || handle.stats().jobs_done == 1);
        assert_eq!(handle.stats().jobs_discarded, 2);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn half_close_and_shutdown_wait_for_the_jobs_answers() {
    each_backend(|b| {
        let h = JobEcho::default();
        let server = b
            .threads(1)
            .workers(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        // Requests then EOF: every one is answered before the close.
        let mut client = connect(server.local_addr());
        let msgs: Vec<Vec<u8>> = (0..100)
            .map(|i| sleep_msg(200, format!("{i}").as_bytes()))
            .collect();
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend(frame(m));
        }
        client.write_all(&wire).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(&read_frame(&mut client).unwrap(), m, "reply {i}");
        }
        assert!(read_frame(&mut client).is_err(), "closed after the replies");
        // Shutdown with a job still running: its answer goes out first.
        let mut late = connect(server.local_addr());
        write_frame(&mut late, &sleep_msg(300_000, b"late"));
        wait_until(10, "the late job", || {
            h.messages.load(Ordering::SeqCst) == 101
        });
        let reader = std::thread::spawn(move || read_frame(&mut late));
        server.shutdown(Duration::from_secs(5)).unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), sleep_msg(300_000, b"late"));
        assert_eq!(
            h.reasons.lock().unwrap().as_slice(),
            [CloseReason::PeerClosed, CloseReason::Shutdown]
        );
    });
}
