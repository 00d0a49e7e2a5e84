//! The defects outside probes found, each as the probe that found it:
//! requests lost on a half-close under back-pressure, one handler panic
//! taking down its loop, timeouts that fire early or while wharf itself
//! paused reading, connects that vanish in a shutdown, and a codec failing
//! part-way through an encode. (Idle connections keeping the memory of
//! their largest message: `idle_heap.rs`, which counts the heap exactly.)

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use util::*;
use wharf::{Bytes, CloseReason, Conn, Framing, Handler, SendError, Server};

/// 400 frames of 4 KiB pipelined in one write (their echoes are far over
/// the 64 KiB high-water mark), then the write side shut: every request
/// the server received is answered before it closes.
#[test]
fn half_close_under_backpressure_answers_every_request() {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        for round in 0..3 {
            let mut s = connect(server.local_addr());
            let bodies: Vec<Vec<u8>> = (0..400).map(|i| pattern(round * 1000 + i, 4096)).collect();
            let mut wire = Vec::new();
            for body in &bodies {
                wire.extend(frame(body));
            }
            // Written from a thread: the server stops reading while its
            // replies are unread, so one write of 1.6 MB can block.
            let mut w = s.try_clone().unwrap();
            let writer = std::thread::spawn(move || {
                w.write_all(&wire).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            });
            for (i, body) in bodies.iter().enumerate() {
                match read_frame(&mut s) {
                    Ok(got) => assert!(&got == body, "round {round}: reply {i} is corrupt"),
                    Err(e) => panic!("round {round}: only {i} of 400 answered ({e})"),
                }
            }
            writer.join().unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "bytes after the last reply");
        }
        wait_until(10, "three closes", || {
            echo.closed.load(Ordering::SeqCst) == 3
        });
        let reasons = echo.reasons.lock().unwrap().clone();
        assert!(
            reasons.iter().all(|r| *r == CloseReason::PeerClosed),
            "{reasons:?}"
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Panics in `on_message` for messages that say "panic", echoes the rest.
#[derive(Default, Clone)]
struct Panicky {
    reasons: Arc<Mutex<Vec<CloseReason>>>,
}

impl Handler for Panicky {
    type State = ();
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        if msg == b"panic" {
            panic!("a handler bug");
        }
        if msg == b"panic after send" {
            conn.send(b"partial").unwrap();
            panic!("a handler bug after a send");
        }
        conn.send(msg).unwrap();
    }
    fn on_close(&self, _conn: &mut Conn<'_, ()>, reason: CloseReason) {
        self.reasons.lock().unwrap().push(reason);
    }
}

/// A handler panic closes its own connection (HandlerPanic, counted), and
/// the loop, its listener and its other connections go on.
#[test]
fn a_handler_panic_is_contained_to_its_connection() {
    each_backend(|b| {
        let h = Panicky::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let addr = server.local_addr();
        let mut bystander = connect(addr);
        write_frame(&mut bystander, b"before");
        assert_eq!(read_frame(&mut bystander).unwrap(), b"before");
        for (i, trigger) in [&b"panic"[..], b"panic after send"].iter().enumerate() {
            let mut victim = connect(addr);
            write_frame(&mut victim, b"hello");
            assert_eq!(read_frame(&mut victim).unwrap(), b"hello");
            write_frame(&mut victim, trigger);
            write_frame(&mut victim, b"never answered");
            // What was queued before the panic still goes out; then EOF.
            let mut rest = Vec::new();
            victim.read_to_end(&mut rest).unwrap();
            if i == 1 {
                assert_eq!(rest, frame(b"partial"));
            } else {
                assert!(rest.is_empty(), "{rest:?}");
            }
            wait_until(5, "the panic counted", || {
                server.handle().stats().handler_panics == i as u64 + 1
            });
        }
        // The bystander on the same loop is still served; new ones too.
        write_frame(&mut bystander, b"after");
        assert_eq!(read_frame(&mut bystander).unwrap(), b"after");
        let mut late = connect(addr);
        write_frame(&mut late, b"late");
        assert_eq!(read_frame(&mut late).unwrap(), b"late");
        assert_eq!(
            h.reasons.lock().unwrap().clone(),
            vec![CloseReason::HandlerPanic, CloseReason::HandlerPanic]
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Remembers each connection's id so other threads can use it.
#[derive(Default, Clone)]
struct Ids(Arc<Mutex<Vec<wharf::ConnId>>>);

impl Handler for Ids {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.0.lock().unwrap().push(conn.id());
        wharf::Accept::Yes
    }
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        if msg == b"panic" {
            panic!("boom");
        }
        let _ = conn.send(msg);
    }
}

/// After a panic closed a connection, its id is closed to `Handle::send`.
#[test]
fn the_id_of_a_connection_closed_by_a_panic_is_closed() {
    each_backend(|b| {
        let ids = Ids::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(ids.clone())
            .unwrap();
        let mut s = connect(server.local_addr());
        wait_until(5, "open", || ids.0.lock().unwrap().len() == 1);
        let id = ids.0.lock().unwrap()[0];
        write_frame(&mut s, b"panic");
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        wait_until(5, "the id closed", || !server.handle().is_open(id));
        assert_eq!(
            server.handle().send(id, Bytes::from_static(b"x")),
            Err(SendError::Closed)
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// An idle timeout counts from the last byte received, never less: the
/// tick a stamp falls in is rounded up, not down.
#[test]
fn an_idle_timeout_never_fires_early() {
    each_backend(|b| {
        let server = b
            .threads(1)
            .idle_timeout(Duration::from_millis(120))
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        for i in 0..8 {
            let mut s = connect(server.local_addr());
            // Land the last activity at a different place in a tick each time.
            std::thread::sleep(Duration::from_millis(7 * i));
            write_frame(&mut s, b"ping");
            assert_eq!(read_frame(&mut s).unwrap(), b"ping");
            let sent = Instant::now();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            let idle = sent.elapsed();
            assert!(
                idle >= Duration::from_millis(115),
                "closed as idle after {idle:?}, under the 120 ms timeout"
            );
        }
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Durations too long to ever pass (`Duration::MAX`, as a user writes
/// "never") are taken as never: a timeout's tick count saturates rather
/// than wrapping round to a tick that is due at once, and no deadline made
/// from one overflows `Instant` (a panic, in the loop or in `shutdown`).
#[test]
fn durations_of_duration_max_mean_never() {
    each_backend(|b| {
        let server = b
            .threads(1)
            .idle_timeout(Duration::MAX)
            .first_message_timeout(Duration::MAX)
            .write_stall_timeout(Some(Duration::MAX))
            .close_linger(Duration::MAX)
            .tick(Duration::MAX)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let addr = server.local_addr();
        // A connect (to this server itself) with a timeout of MAX.
        server
            .handle()
            .connect(wharf::Connect::from(addr).timeout(Duration::MAX))
            .unwrap();
        let mut silent = connect(addr);
        let mut s = connect(addr);
        write_frame(&mut s, b"ping");
        assert_eq!(read_frame(&mut s).unwrap(), b"ping");
        // Several ticks (50 ms each) of idleness, for both.
        std::thread::sleep(Duration::from_millis(400));
        for c in [&mut s, &mut silent] {
            c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut buf = [0u8; 1];
            match c.read(&mut buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                other => panic!("closed by a timeout of Duration::MAX: {other:?}"),
            }
        }
        write_frame(&mut s, b"still here");
        s.set_read_timeout(None).unwrap();
        assert_eq!(read_frame(&mut s).unwrap(), b"still here");
        // A shutdown with no deadline: the connections close (lingering,
        // without end, for their peers' FIN), and it returns once they have.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || done_tx.send(server.shutdown(Duration::MAX)).unwrap());
        for mut c in [s, silent] {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).expect("the server's FIN");
        }
        let result = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("shutdown(Duration::MAX) returned once every connection closed");
        result.unwrap();
    });
}

/// A peer that keeps sending while wharf paused its reading (its replies
/// are unread) is not idle: it is not closed by the idle timeout.
#[test]
fn a_connection_paused_by_backpressure_is_not_closed_as_idle() {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(1)
            .idle_timeout(Duration::from_millis(300))
            .write_stall_timeout(None)
            .socket_send_buffer(16 * 1024)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        // A small receive buffer on our side, so the replies back up into
        // the server's queue at once and keep it over its mark.
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect(&server.local_addr().into()).unwrap();
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        let bodies: Vec<Vec<u8>> = (0..300).map(|i| pattern(i, 4096)).collect();
        let mut wire = Vec::new();
        for body in &bodies {
            wire.extend(frame(body));
        }
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || w.write_all(&wire).unwrap());
        // Not reading for three idle timeouts: the server is paused.
        std::thread::sleep(Duration::from_millis(1000));
        let reasons = echo.reasons.lock().unwrap().clone();
        assert!(reasons.is_empty(), "closed while paused: {reasons:?}");
        for (i, body) in bodies.iter().enumerate() {
            let got = read_frame(&mut s).unwrap_or_else(|e| panic!("reply {i}: {e}"));
            assert!(&got == body, "reply {i} is corrupt");
        }
        writer.join().unwrap();
        assert_eq!(echo.closed.load(Ordering::SeqCst), 0);
        let reasons = echo.reasons.lock().unwrap().clone();
        assert!(reasons.is_empty(), "{reasons:?}");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Counts connects that opened and that failed.
#[derive(Default, Clone)]
struct Connects {
    opened: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl Handler for Connects {
    type State = ();
    fn on_open(&self, _conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.opened.fetch_add(1, Ordering::SeqCst);
        wharf::Accept::Yes
    }
    fn on_message(&self, _conn: &mut Conn<'_, ()>, _msg: &[u8]) {}
    fn on_connect_failed(&self, _failure: wharf::ConnectFailure) {
        self.failed.fetch_add(1, Ordering::SeqCst);
    }
}

/// Every connect that `Handle::connect` accepted ends in `on_open` or
/// `on_connect_failed`, even when a shutdown overtakes it.
#[test]
fn connects_during_shutdown_are_answered() {
    each_backend_kind(|backend| {
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = target.local_addr().unwrap();
        // Nobody listens here: half the connects fail on it first and go
        // on to `addr`, so some are between addresses when the shutdown
        // comes.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        for _ in 0..5 {
            let h = Connects::default();
            let client = Server::builder()
                .backend(backend)
                .threads(2)
                .start(h.clone())
                .unwrap();
            let handle = client.handle();
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let poster = {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // Before, during and after the shutdown; bounded, as
                    // each is a descriptor of this process for a while.
                    let mut accepted = 0;
                    let mut tries = 0;
                    while !stop.load(Ordering::SeqCst) && tries < 2000 {
                        tries += 1;
                        let to = if tries % 2 == 0 {
                            wharf::Connect::addrs([dead, addr])
                        } else {
                            wharf::Connect::addrs([addr])
                        };
                        if handle.connect(to).is_ok() {
                            accepted += 1;
                        }
                        if tries % 50 == 0 {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    accepted
                })
            };
            std::thread::sleep(Duration::from_millis(10));
            client.shutdown(Duration::from_secs(1)).unwrap();
            stop.store(true, Ordering::SeqCst);
            let accepted = poster.join().unwrap();
            let answered = h.opened.load(Ordering::SeqCst) + h.failed.load(Ordering::SeqCst);
            assert_eq!(
                answered, accepted,
                "{accepted} connects accepted, {answered} answered"
            );
        }
        drop(target);
    });
}

/// A codec that writes half a message and then fails.
struct Halfway;

impl wharf::Codec for Halfway {
    fn decode(&mut self, buf: &[u8]) -> Result<wharf::Decoded, wharf::FrameError> {
        // A line per message.
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => Ok(wharf::Decoded::Frame {
                start: 0,
                end: i,
                consumed: i + 1,
            }),
            None => Ok(wharf::Decoded::Incomplete(None)),
        }
    }
    fn encode(&mut self, msg: &[u8], dst: &mut bytes::BytesMut) -> Result<(), wharf::FrameError> {
        dst.extend_from_slice(&msg[..msg.len() / 2]);
        if msg.starts_with(b"bad") {
            return Err(wharf::FrameError::Invalid("no bad words".into()));
        }
        dst.extend_from_slice(&msg[msg.len() / 2..]);
        dst.extend_from_slice(b"\n");
        Ok(())
    }
}

/// Echoes, and reports the error of each refused send as a line.
struct EchoErrors;

impl Handler for EchoErrors {
    type State = ();
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        if let Err(e) = conn.send(msg) {
            conn.send(format!("error: {e}").as_bytes()).unwrap();
        }
    }
}

/// A codec failing part-way through `encode` queues nothing of that
/// message and says why.
#[test]
fn a_codec_failing_part_way_leaves_nothing_queued() {
    each_backend(|b| {
        let server = b
            .framing(Framing::custom(|| Halfway))
            .bind("127.0.0.1:0")
            .unwrap()
            .start(EchoErrors)
            .unwrap();
        let mut s = TcpStream::connect(server.local_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"good\nbad words\nnext\n").unwrap();
        let want = "good\nerror: the codec refused the message: no bad words\nnext\n";
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), want);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
