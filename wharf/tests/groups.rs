//! Groups end to end, on every backend: members get every message
//! published to their groups exactly once, in order per publisher, from
//! callbacks and from other threads; non-members get none; membership is
//! gone when a connection closes (however it closes); slow members are
//! skipped and counted, as `broadcast` does.

mod util;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;
use wharf::{Accept, Conn, ConnId, Handler, Server};

/// Speaks a small command language: `J:g` joins g, `L:g` leaves it (both
/// answered `ok`), `P:g:body` publishes body to g, `X` panics.
#[derive(Default, Clone)]
struct Rooms {
    /// Joins `auto` in `on_open`, and refuses the connection if `refuse`.
    auto: Option<&'static str>,
    refuse: bool,
    closed: Arc<AtomicUsize>,
    ids: Arc<Mutex<Vec<ConnId>>>,
}

impl Handler for Rooms {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> Accept {
        self.ids.lock().unwrap().push(conn.id());
        if let Some(g) = self.auto {
            assert!(conn.join(g));
            assert!(!conn.join(g), "a second join of the same group");
        }
        if self.refuse {
            Accept::No
        } else {
            Accept::Yes
        }
    }
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        let text = std::str::from_utf8(msg).unwrap();
        let (cmd, rest) = text.split_once(':').unwrap_or((text, ""));
        match cmd {
            "J" => {
                assert!(conn.join(rest));
                assert!(conn.in_group(rest));
                conn.send(b"ok").unwrap();
            }
            "L" => {
                assert!(conn.leave(rest));
                assert!(!conn.leave(rest));
                conn.send(b"ok").unwrap();
            }
            "P" => {
                let (group, body) = rest.split_once(':').unwrap();
                conn.publish(group, body.as_bytes()).unwrap();
            }
            "G" => {
                let mut groups: Vec<&str> = conn.groups().collect();
                groups.sort();
                conn.send(groups.join(",").as_bytes()).unwrap();
            }
            "X" => panic!("a handler panic (on purpose)"),
            other => panic!("unknown command {other}"),
        }
    }
    fn on_close(&self, _conn: &mut Conn<'_, ()>, _reason: wharf::CloseReason) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

fn ask(c: &mut std::net::TcpStream, cmd: &str) -> Vec<u8> {
    write_frame(c, cmd.as_bytes());
    read_frame(c).unwrap()
}

#[test]
fn members_get_each_publish_once_in_order() {
    each_backend(|b| {
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Rooms::default())
            .unwrap();
        let handle = server.handle();
        const CLIENTS: usize = 30;
        const EACH: usize = 25;
        let rooms = ["r0", "r1", "r2"];
        // Client i is in room i%3, and the even ones in (i+1)%3 too.
        let member_of = |i: usize| -> Vec<usize> {
            let mut v = vec![i % 3];
            if i % 2 == 0 {
                v.push((i + 1) % 3);
            }
            v
        };
        let mut clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let mut c = connect(server.local_addr());
                for r in member_of(i) {
                    assert_eq!(ask(&mut c, &format!("J:{}", rooms[r])), b"ok");
                }
                c
            })
            .collect();
        let mut want = [0; 3];
        for i in 0..CLIENTS {
            for r in member_of(i) {
                want[r] += 1;
            }
        }
        for r in 0..3 {
            assert_eq!(handle.group_size(rooms[r]), want[r], "{}", rooms[r]);
        }
        assert_eq!(ask(&mut clients[0], "G"), b"r0,r1");
        // Every client publishes to its first room, in one burst; the
        // test thread publishes to every room between them.
        for (i, c) in clients.iter_mut().enumerate() {
            let mut burst = Vec::new();
            for k in 0..EACH {
                burst.extend(frame(format!("P:{}:c{i}.{k}", rooms[i % 3]).as_bytes()));
            }
            std::io::Write::write_all(c, &burst).unwrap();
        }
        for k in 0..EACH {
            for (r, room) in rooms.iter().enumerate() {
                handle
                    .publish(room, format!("h{r}.{k}").as_bytes())
                    .unwrap();
            }
        }
        // An end marker per room, after everything else from this thread.
        for r in rooms {
            handle.publish(r, b"end").unwrap();
        }
        for (i, c) in clients.iter_mut().enumerate() {
            let mine = member_of(i);
            // Who this client must hear, EACH times each, in order.
            let mut publishers: Vec<String> = (0..CLIENTS)
                .filter(|p| mine.contains(&(p % 3)))
                .map(|p| format!("c{p}"))
                .collect();
            publishers.extend(mine.iter().map(|r| format!("h{r}")));
            // What each publisher should be heard saying, in order.
            let mut next: HashMap<String, usize> = HashMap::new();
            let mut ends = 0;
            let mut got = 0;
            // Every client's burst must be in before the last end marker:
            // read until every publisher is complete and every end seen.
            while ends < mine.len()
                || publishers
                    .iter()
                    .any(|p| next.get(p).copied().unwrap_or(0) < EACH)
            {
                let m = String::from_utf8(read_frame(c).unwrap()).unwrap();
                got += 1;
                if m == "end" {
                    ends += 1;
                    continue;
                }
                let (who, k) = m.split_once('.').unwrap();
                let k: usize = k.parse().unwrap();
                assert!(
                    publishers.iter().any(|p| p == who),
                    "client {i} is not in {who}'s room"
                );
                let n = next.entry(who.to_string()).or_default();
                assert_eq!(k, *n, "client {i}: {who} out of order or twice");
                *n += 1;
            }
            assert_eq!(got, publishers.len() * EACH + mine.len(), "client {i}");
        }
        // Nothing more arrives (no duplicate was late), and a group with no
        // members takes a publish and drops it.
        handle.publish("nobody", b"x").unwrap();
        for c in &mut clients {
            c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            assert!(read_frame(c).is_err(), "an extra message");
        }
        drop(clients);
        wait_until(10, "every membership gone", || handle.groups().is_empty());
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn joins_from_other_threads_come_before_later_publishes() {
    each_backend(|b| {
        let h = Rooms::default();
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let handle = server.handle();
        let mut c = connect(server.local_addr());
        assert_eq!(ask(&mut c, "G"), b"");
        let id = h.ids.lock().unwrap()[0];
        // Join, publish at once from this thread: the join comes first.
        for k in 0..50 {
            let g = format!("t{k}");
            handle.join(id, &g).unwrap();
            handle.publish(&g, g.as_bytes()).unwrap();
            assert_eq!(read_frame(&mut c).unwrap(), g.as_bytes());
            handle.leave(id, &g).unwrap();
            handle.publish(&g, b"not for you").unwrap();
        }
        // Joining twice counts once; a stale id is refused.
        handle.join(id, "twice").unwrap();
        handle.join(id, "twice").unwrap();
        wait_until(10, "the joins carried out", || ask(&mut c, "G") == b"twice");
        assert_eq!(handle.group_size("twice"), 1);
        drop(c);
        wait_until(10, "the connection gone", || handle.stats().closed == 1);
        assert!(handle.join(id, "late").is_err());
        wait_until(10, "every membership gone", || handle.groups().is_empty());
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn closing_in_any_way_leaves_every_group() {
    each_backend_kind(|backend| {
        // Joined in on_open, then refused: the membership goes with it.
        let refusing = Rooms {
            auto: Some("lobby"),
            refuse: true,
            ..Rooms::default()
        };
        let server = Server::builder()
            .backend(backend)
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(refusing)
            .unwrap();
        let handle = server.handle();
        for _ in 0..5 {
            let mut c = connect(server.local_addr());
            let mut buf = [0u8; 1];
            assert_eq!(std::io::Read::read(&mut c, &mut buf).unwrap_or(0), 0);
        }
        wait_until(10, "refused connections uncounted", || {
            handle.stats().closed == 5 && handle.group_size("lobby") == 0
        });
        server.shutdown(Duration::from_secs(2)).unwrap();

        // Joined, then: a panic, a peer reset, a peer close, a shutdown.
        let h = Rooms {
            auto: Some("lobby"),
            ..Rooms::default()
        };
        let server = Server::builder()
            .backend(backend)
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let handle = server.handle();
        let mut cs: Vec<_> = (0..4).map(|_| connect(server.local_addr())).collect();
        for c in &mut cs {
            assert_eq!(ask(c, "J:extra"), b"ok");
        }
        assert_eq!(handle.group_size("lobby"), 4);
        write_frame(&mut cs[0], b"X");
        socket2::SockRef::from(&cs[1])
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let reset = cs.remove(1);
        drop(reset);
        let closed = cs.remove(1);
        drop(closed);
        wait_until(10, "three members gone", || {
            handle.group_size("lobby") == 1 && handle.group_size("extra") == 1
        });
        // The one left still hears the group.
        handle.publish("lobby", b"still here").unwrap();
        assert_eq!(read_frame(&mut cs[1]).unwrap(), b"still here");
        assert_eq!(handle.stats().handler_panics, 1);
        let handle2 = handle.clone();
        server.shutdown(Duration::from_secs(2)).unwrap();
        assert!(handle2.groups().is_empty(), "{:?}", handle2.groups());
        assert_eq!(h.closed.load(Ordering::SeqCst), 4);
    });
}

#[test]
fn slow_members_are_skipped_and_counted() {
    each_backend(|b| {
        let server = b
            .threads(1)
            .send_water_marks(16 * 1024, 8 * 1024)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Rooms {
                auto: Some("feed"),
                ..Rooms::default()
            })
            .unwrap();
        let handle = server.handle();
        let reader = connect(server.local_addr());
        let stalled = connect(server.local_addr());
        wait_until(10, "both members", || handle.group_size("feed") == 2);
        // Reads until the server has been quiet for a second.
        let read_all = |mut c: std::net::TcpStream| {
            c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut n = 0;
            while let Ok(m) = read_frame(&mut c) {
                assert_eq!(m.len(), 8 * 1024);
                n += 1;
            }
            n
        };
        let reading = std::thread::spawn(move || read_all(reader));
        // The stalled member does not read until the end: once the
        // kernel's buffers and its queue are full it misses messages,
        // instead of holding them all.
        let body = vec![7u8; 8 * 1024];
        let n = 2000;
        for _ in 0..n {
            handle.publish("feed", &body).unwrap();
            std::thread::sleep(Duration::from_micros(20));
        }
        wait_until(10, "skips counted", || handle.stats().broadcast_skipped > 0);
        let got = reading.join().unwrap() + read_all(stalled);
        // Every message went to both members or was counted as skipped.
        wait_until(10, "the count to settle", || {
            handle.stats().broadcast_skipped == 2 * n - got
        });
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
