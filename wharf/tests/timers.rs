//! The handler's timers: per-connection timers armed, re-armed and
//! cancelled from callbacks, fired on the connection's loop, never after
//! it closed; the loop's periodic tick; and memory that stays flat under
//! many timers armed and cancelled.

mod util;

#[global_allocator]
static ALLOC: Counting = Counting;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use util::counting::{live, Counting};
use util::*;
use wharf::{Conn, Handler, Tick};

/// Commands in messages: `arm TOKEN MS`, `cancel TOKEN`, `many N` (arm N
/// timers of an hour), `unmany N` (cancel them), `close`.
#[derive(Default, Clone)]
struct Timed {
    /// (token, when armed, when fired)
    fired: Arc<Mutex<Vec<(u64, Duration, Instant)>>>,
    armed_at: Arc<Mutex<Vec<(u64, Instant, Duration)>>>,
    ticks: Arc<AtomicUsize>,
    after_close: Arc<AtomicUsize>,
}

impl Handler for Timed {
    type State = bool;

    fn on_message(&self, conn: &mut Conn<'_, bool>, msg: &[u8]) {
        let text = std::str::from_utf8(msg).unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            ["arm", token, ms] => {
                let (token, after) = (token.parse().unwrap(), ms.parse().unwrap());
                let after = Duration::from_millis(after);
                self.armed_at
                    .lock()
                    .unwrap()
                    .push((token, Instant::now(), after));
                conn.set_timer(token, after);
            }
            ["cancel", token] => {
                let was = conn.cancel_timer(token.parse().unwrap());
                let _ = conn.send(if was { b"cancelled" } else { b"not armed" });
            }
            ["many", n] => {
                for t in 0..n.parse::<u64>().unwrap() {
                    conn.set_timer(1_000_000 + t, Duration::from_secs(3600));
                }
                let _ = conn.send(b"armed");
            }
            ["unmany", n] => {
                for t in 0..n.parse::<u64>().unwrap() {
                    assert!(conn.cancel_timer(1_000_000 + t));
                }
                let _ = conn.send(b"cancelled");
            }
            ["close"] => conn.close(),
            _ => panic!("unknown command {text:?}"),
        }
    }

    fn on_timer(&self, conn: &mut Conn<'_, bool>, token: u64) {
        if *conn.state() {
            self.after_close.fetch_add(1, Ordering::SeqCst);
        }
        let now = Instant::now();
        let armed = self.armed_at.lock().unwrap();
        let (_, at, after) = *armed.iter().rev().find(|(t, _, _)| *t == token).unwrap();
        self.fired.lock().unwrap().push((token, after, now));
        drop(armed);
        let _ = conn.send(format!("fired {token} {}", (now - at).as_millis()).as_bytes());
        let _ = at;
    }

    fn on_tick(&self, tick: &mut Tick<'_, Self>) {
        self.ticks.fetch_add(1, Ordering::SeqCst);
        tick.for_each(|conn| {
            let _ = conn.send(b"tick");
        });
    }

    fn on_close(&self, conn: &mut Conn<'_, bool>, _reason: wharf::CloseReason) {
        *conn.state() = true;
        // Ignored: the connection is closing.
        conn.set_timer(99, Duration::ZERO);
    }
}

/// The tests of this binary run one at a time: the memory test counts the
/// whole process's heap.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn fired_ms(reply: &[u8]) -> (u64, u128) {
    let text = std::str::from_utf8(reply).unwrap();
    let mut w = text.split_whitespace();
    assert_eq!(w.next(), Some("fired"), "got {text:?}");
    (
        w.next().unwrap().parse().unwrap(),
        w.next().unwrap().parse().unwrap(),
    )
}

#[test]
fn timers_fire_on_time_in_order_and_can_be_cancelled_or_moved() {
    let _serial = serial();
    each_backend(|b| {
        let h = Timed::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let mut c = connect(server.local_addr());
        write_frame(&mut c, b"arm 3 300");
        write_frame(&mut c, b"arm 1 100");
        write_frame(&mut c, b"arm 2 200");
        write_frame(&mut c, b"arm 4 150");
        // Cancelled: never fires. Re-armed: fires at its new time only.
        write_frame(&mut c, b"cancel 4");
        assert_eq!(read_frame(&mut c).unwrap(), b"cancelled");
        write_frame(&mut c, b"cancel 4");
        assert_eq!(read_frame(&mut c).unwrap(), b"not armed");
        write_frame(&mut c, b"arm 2 400");
        let mut order = Vec::new();
        for _ in 0..3 {
            let (token, ms) = fired_ms(&read_frame(&mut c).unwrap());
            order.push(token);
            let due = match token {
                1 => 100,
                2 => 400,
                3 => 300,
                t => panic!("timer {t} fired"),
            };
            assert!(ms >= due, "timer {token} fired after {ms} ms, due at {due}");
            // One wheel tick (50 ms) late at most, and a margin for a
            // shared machine's scheduling.
            if timing_bounds_apply("a timer") {
                assert!(
                    ms <= due + 50 + 100,
                    "timer {token} fired {ms} ms after arming, due {due}"
                );
            }
        }
        assert_eq!(order, [1, 3, 2]);
        // Nothing else fires.
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(read_frame(&mut c).is_err(), "a fourth timer fired");
        assert_eq!(h.fired.lock().unwrap().len(), 3);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn no_timer_fires_after_its_connection_closed() {
    let _serial = serial();
    each_backend(|b| {
        let h = Timed::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let handle = server.handle();
        // One closed by the peer, one by the handler, each with timers due
        // soon after; and a new connection in the freed slot.
        let mut a = connect(server.local_addr());
        write_frame(&mut a, b"arm 1 150");
        write_frame(&mut a, b"arm 2 0");
        assert_eq!(fired_ms(&read_frame(&mut a).unwrap()).0, 2);
        drop(a);
        let mut b2 = connect(server.local_addr());
        write_frame(&mut b2, b"arm 3 150");
        write_frame(&mut b2, b"close");
        assert!(read_frame(&mut b2).is_err());
        wait_until(10, "both closed", || handle.connections() == 0);
        let mut fresh = connect(server.local_addr());
        write_frame(&mut fresh, b"arm 5 400");
        std::thread::sleep(Duration::from_millis(300));
        let fired: Vec<u64> = h.fired.lock().unwrap().iter().map(|f| f.0).collect();
        assert_eq!(fired, [2], "a timer of a closed connection fired");
        assert_eq!(fired_ms(&read_frame(&mut fresh).unwrap()).0, 5);
        assert_eq!(h.after_close.load(Ordering::SeqCst), 0);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn the_tick_reaches_every_connection_of_its_loop() {
    let _serial = serial();
    each_backend(|b| {
        let h = Timed::default();
        let server = b
            .threads(2)
            .tick(Duration::from_millis(20))
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let mut clients: Vec<_> = (0..6).map(|_| connect(server.local_addr())).collect();
        wait_until(10, "opens", || server.handle().connections() == 6);
        for c in &mut clients {
            for _ in 0..5 {
                assert_eq!(read_frame(c).unwrap(), b"tick");
            }
        }
        // Both loops tick: at least 5 ticks each by now.
        assert!(h.ticks.load(Ordering::SeqCst) >= 10);
        drop(clients);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn a_hundred_thousand_timers_armed_and_cancelled_keep_memory_flat() {
    let _serial = serial();
    each_backend(|b| {
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Timed::default())
            .unwrap();
        let mut clients: Vec<_> = (0..100).map(|_| connect(server.local_addr())).collect();
        let round = |clients: &mut Vec<std::net::TcpStream>| {
            for c in clients.iter_mut() {
                write_frame(c, b"many 1000");
            }
            for c in clients.iter_mut() {
                assert_eq!(read_frame(c).unwrap(), b"armed");
            }
            for c in clients.iter_mut() {
                write_frame(c, b"unmany 1000");
            }
            for c in clients.iter_mut() {
                assert_eq!(read_frame(c).unwrap(), b"cancelled");
            }
        };
        let t0 = Instant::now();
        round(&mut clients);
        eprintln!("round 1 took {:?}", t0.elapsed());
        let after_one = live();
        for _ in 0..4 {
            round(&mut clients);
        }
        let after_five = live();
        let grown = after_five - after_one;
        eprintln!("heap after 1 round {after_one} B, after 5 rounds {after_five} B");
        // 400,000 more timers armed and cancelled: a few KiB of noise
        // (buffers of the test's own sockets), not bytes per timer.
        assert!(
            grown < 64 * 1024,
            "heap grew {grown} B over 400,000 timers armed and cancelled"
        );
        drop(clients);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
