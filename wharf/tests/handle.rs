//! The `Handle`: sends from other threads, broadcast, stale ids, clients.

mod util;

use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;
use wharf::{Bytes, Conn, ConnId, Handler, SendError};

/// The (slot, generation) of an id, from its debug form
/// `ConnId(server:loop:slot:generation)`.
fn slot_and_generation(id: ConnId) -> (u64, u64) {
    let s = format!("{id:?}");
    let parts: Vec<u64> = s
        .trim_start_matches("ConnId(")
        .trim_end_matches(')')
        .split(':')
        .map(|p| p.parse().unwrap())
        .collect();
    (parts[2], parts[3])
}

#[test]
fn send_from_another_thread_arrives_once() {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        let mut clients: Vec<_> = (0..20).map(|_| connect(server.local_addr())).collect();
        wait_until(10, "20 opens", || echo.ids.lock().unwrap().len() == 20);
        let ids = echo.ids.lock().unwrap().clone();
        let handle = server.handle();
        std::thread::spawn(move || {
            for (i, id) in ids.iter().enumerate() {
                handle.send(*id, Bytes::from(format!("to {i}"))).unwrap();
                handle.send(*id, Bytes::from_static(b"end")).unwrap();
            }
        })
        .join()
        .unwrap();
        // Which client got which id is unknown: each must see exactly one
        // "to N" followed by "end", and the N must all differ.
        let mut seen = Vec::new();
        for c in &mut clients {
            let m = read_frame(c).unwrap();
            assert!(m.starts_with(b"to "), "unexpected {m:?}");
            assert_eq!(read_frame(c).unwrap(), b"end");
            seen.push(m);
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 20, "every message reached exactly one client");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn broadcast_reaches_a_thousand_connections_exactly_once() {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        let addr = server.local_addr();
        let mut clients: Vec<_> = (0..1000).map(|_| connect(addr)).collect();
        let handle = server.handle();
        wait_until(20, "1000 connections", || handle.connections() == 1000);
        let body = pattern(7, 1024);
        handle.broadcast(Bytes::from(body.clone())).unwrap();
        handle.broadcast(Bytes::from_static(b"end")).unwrap();
        for c in &mut clients {
            assert_eq!(read_frame(c).unwrap(), body);
            assert_eq!(read_frame(c).unwrap(), b"end", "a duplicate or a loss");
        }
        server.shutdown(Duration::from_secs(5)).unwrap();
    });
}

#[test]
fn stale_id_never_reaches_the_next_connection_in_its_slot() {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        let handle = server.handle();
        let a = connect(server.local_addr());
        wait_until(10, "A open", || echo.ids.lock().unwrap().len() == 1);
        let id_a = echo.ids.lock().unwrap()[0];
        drop(a);
        wait_until(10, "A closed", || echo.closed.load(Ordering::SeqCst) == 1);
        assert_eq!(
            handle.send(id_a, Bytes::from_static(b"for A")),
            Err(SendError::Closed)
        );
        // B takes A's slot once it is free (slots are reused newest first).
        let mut b_conn = None;
        for attempt in 0..20 {
            let c = connect(server.local_addr());
            wait_until(10, "B open", || {
                echo.ids.lock().unwrap().len() == 2 + attempt
            });
            let id_b = *echo.ids.lock().unwrap().last().unwrap();
            if slot_and_generation(id_b).0 == slot_and_generation(id_a).0 {
                b_conn = Some((c, id_b));
                break;
            }
            drop(c);
            wait_until(10, "retry closed", || {
                echo.closed.load(Ordering::SeqCst) == 2 + attempt
            });
        }
        let (mut c, id_b) = b_conn.expect("B was accepted into A's slot");
        assert_ne!(id_a, id_b);
        assert_ne!(slot_and_generation(id_a).1, slot_and_generation(id_b).1);
        assert_eq!(
            handle.send(id_a, Bytes::from_static(b"for A")),
            Err(SendError::Closed)
        );
        assert_eq!(handle.disconnect(id_a), Err(SendError::Closed));
        handle.send(id_b, Bytes::from_static(b"for B")).unwrap();
        assert_eq!(read_frame(&mut c).unwrap(), b"for B");
        // Nothing else is waiting for B.
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8; 1];
        assert!(c.read(&mut byte).is_err(), "B received bytes meant for A");
        drop(c);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// A client-mode handler: counts replies on outbound connections.
#[derive(Default, Clone)]
struct Client {
    replies: Arc<Mutex<Vec<Vec<u8>>>>,
    failed: Arc<AtomicUsize>,
}

impl Handler for Client {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        assert!(conn.is_outbound());
        conn.send(b"hello from a client").unwrap();
        wharf::Accept::Yes
    }
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        self.replies.lock().unwrap().push(msg.to_vec());
        conn.close();
    }
    fn on_connect_failed(&self, _failure: wharf::ConnectFailure) {
        self.failed.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn outbound_connections_use_the_same_loops_and_callbacks() {
    each_backend(|b| {
        let server = wharf::Server::builder()
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let client_handler = Client::default();
        let client = b.threads(2).start(client_handler.clone()).unwrap();
        for _ in 0..10 {
            client.handle().connect(server.local_addr()).unwrap();
        }
        // A port nobody listens on: the connect fails and is reported.
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        client.handle().connect(closed_port).unwrap();
        wait_until(10, "10 replies", || {
            client_handler.replies.lock().unwrap().len() == 10
        });
        wait_until(10, "1 failure", || {
            client_handler.failed.load(Ordering::SeqCst) == 1
        });
        for r in client_handler.replies.lock().unwrap().iter() {
            assert_eq!(r, b"hello from a client");
        }
        client.shutdown(Duration::from_secs(2)).unwrap();
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
