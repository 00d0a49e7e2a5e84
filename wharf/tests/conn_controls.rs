//! The controls a handler has over its connection besides sending and
//! closing: an abortive close (reset), half-close, pausing and resuming
//! reading, and the local address.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;
use wharf::{CloseReason, Conn, Handler};

#[derive(Default, Clone)]
struct Controls {
    messages: Arc<AtomicUsize>,
    locals: Arc<Mutex<Vec<SocketAddr>>>,
    reasons: Arc<Mutex<Vec<CloseReason>>>,
}

impl Handler for Controls {
    type State = ();

    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.locals.lock().unwrap().push(conn.local_addr().unwrap());
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        self.messages.fetch_add(1, Ordering::SeqCst);
        match msg {
            b"abort" => {
                // Queued, then dropped by the abort: the peer gets a reset.
                let _ = conn.send(b"never sent");
                conn.abort();
            }
            b"half" => {
                conn.send(b"bye").unwrap();
                conn.shutdown_write();
                assert_eq!(conn.send(b"late"), Err(wharf::SendError::Closed));
            }
            b"join" => {
                assert!(conn.join("room"));
                conn.send(b"joined").unwrap();
            }
            b"half and publish" => {
                conn.send(b"bye").unwrap();
                conn.shutdown_write();
                // Its own copy is not queued after the FIN; the call itself
                // succeeds (the group has other members).
                conn.publish("room", b"to the room").unwrap();
            }
            b"pause" => {
                conn.pause_reading();
                conn.set_timer(1, Duration::from_millis(300));
            }
            _ => {
                let _ = conn.send(msg);
            }
        }
    }

    fn on_timer(&self, conn: &mut Conn<'_, ()>, _token: u64) {
        conn.resume_reading();
    }

    fn on_close(&self, _conn: &mut Conn<'_, ()>, reason: CloseReason) {
        self.reasons.lock().unwrap().push(reason);
    }
}

fn start(b: wharf::Builder, h: &Controls) -> wharf::Server {
    b.threads(1)
        .bind("127.0.0.1:0")
        .unwrap()
        .start(h.clone())
        .unwrap()
}

#[test]
fn abort_resets_the_connection_and_drops_what_was_queued() {
    each_backend(|b| {
        let h = Controls::default();
        let server = start(b, &h);
        let mut c = connect(server.local_addr());
        write_frame(&mut c, b"abort");
        let mut buf = [0u8; 64];
        let got = c.read(&mut buf);
        assert!(
            matches!(&got, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "expected a reset, got {got:?}"
        );
        wait_until(10, "on_close", || h.reasons.lock().unwrap().len() == 1);
        assert_eq!(h.reasons.lock().unwrap()[0], CloseReason::Local);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn shutdown_write_sends_eof_and_keeps_reading() {
    each_backend(|b| {
        let h = Controls::default();
        let server = start(b, &h);
        let mut c = connect(server.local_addr());
        write_frame(&mut c, b"half");
        assert_eq!(read_frame(&mut c).unwrap(), b"bye");
        let mut buf = [0u8; 16];
        assert_eq!(c.read(&mut buf).unwrap(), 0, "EOF after the queued reply");
        // The server still reads: these arrive as messages.
        write_frame(&mut c, b"one");
        write_frame(&mut c, b"two");
        wait_until(10, "the messages after the half-close", || {
            h.messages.load(Ordering::SeqCst) == 3
        });
        assert!(h.reasons.lock().unwrap().is_empty(), "closed too soon");
        c.shutdown(std::net::Shutdown::Write).unwrap();
        wait_until(10, "on_close", || h.reasons.lock().unwrap().len() == 1);
        assert_eq!(h.reasons.lock().unwrap()[0], CloseReason::PeerClosed);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Nothing reaches a connection's queue after it half-closed: a
/// broadcast or a group message queued behind the FIN would fail the
/// connection (a send after the FIN is a broken pipe), so it is skipped
/// for that connection, and the connection stays usable for reading.
#[test]
fn fanout_skips_a_half_closed_connection() {
    each_backend(|b| {
        let h = Controls::default();
        let server = start(b, &h);
        let addr = server.local_addr();
        let mut member = connect(addr);
        write_frame(&mut member, b"join");
        assert_eq!(read_frame(&mut member).unwrap(), b"joined");
        let mut half = connect(addr);
        write_frame(&mut half, b"join");
        assert_eq!(read_frame(&mut half).unwrap(), b"joined");
        write_frame(&mut half, b"half and publish");
        assert_eq!(read_frame(&mut half).unwrap(), b"bye");
        let mut buf = [0u8; 16];
        assert_eq!(
            half.read(&mut buf).unwrap(),
            0,
            "EOF after the queued reply"
        );
        assert_eq!(read_frame(&mut member).unwrap(), b"to the room");
        // From another thread: a broadcast, and a publish to the group.
        server
            .handle()
            .broadcast(bytes::Bytes::from_static(b"to all"))
            .unwrap();
        server.handle().publish("room", b"again").unwrap();
        assert_eq!(read_frame(&mut member).unwrap(), b"to all");
        assert_eq!(read_frame(&mut member).unwrap(), b"again");
        // The half-closed one still reads, and ends as its peer ends it.
        write_frame(&mut half, b"still read");
        wait_until(10, "the message after the half-close", || {
            h.messages.load(Ordering::SeqCst) == 4
        });
        assert!(
            h.reasons.lock().unwrap().is_empty(),
            "closed: {:?}",
            h.reasons.lock().unwrap()
        );
        half.shutdown(std::net::Shutdown::Write).unwrap();
        wait_until(10, "on_close", || h.reasons.lock().unwrap().len() == 1);
        assert_eq!(h.reasons.lock().unwrap()[0], CloseReason::PeerClosed);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn paused_reading_holds_messages_until_resumed() {
    each_backend(|b| {
        let h = Controls::default();
        let server = start(b, &h);
        let mut c = connect(server.local_addr());
        let mut wire = frame(b"pause");
        for i in 0..5 {
            wire.extend(frame(format!("m{i}").as_bytes()));
        }
        c.write_all(&wire).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            h.messages.load(Ordering::SeqCst),
            1,
            "a message was delivered while reading was paused"
        );
        // The timer resumes reading at 300 ms: everything, in order.
        for i in 0..5 {
            assert_eq!(read_frame(&mut c).unwrap(), format!("m{i}").as_bytes());
        }
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn local_addr_is_the_listening_address() {
    each_backend(|b| {
        let h = Controls::default();
        let server = start(b, &h);
        let mut c = connect(server.local_addr());
        write_frame(&mut c, b"x");
        assert_eq!(read_frame(&mut c).unwrap(), b"x");
        assert_eq!(h.locals.lock().unwrap().as_slice(), [server.local_addr()]);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
