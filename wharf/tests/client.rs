//! Client mode: outbound connections named by a token from the connect to
//! every callback, a connect timeout, each address tried in turn, and
//! reconnects with back-off through a server that goes down, comes up and
//! goes down again.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use util::*;
use wharf::{CloseReason, Conn, Connect, ConnectFailure, Handler, Opening, Reconnect, Server};

#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// token, peer, the state new_state made from the token
    Opened(u64, SocketAddr, u64),
    Message(u64, Vec<u8>),
    Closed(u64),
    Failed(u64, Option<SocketAddr>, ErrorKind, bool),
    Reconnect(u64, u32),
}

#[derive(Default, Clone)]
struct Client {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Client {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    fn count(&self, f: impl Fn(&Seen) -> bool) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| f(s)).count()
    }
}

impl Handler for Client {
    /// Made from the connect's token.
    type State = u64;

    fn new_state(&self, opening: &Opening) -> u64 {
        opening.token.expect("only outbound connections here") * 100
    }

    fn on_open(&self, conn: &mut Conn<'_, u64>) -> wharf::Accept {
        assert!(conn.is_outbound());
        let token = conn.token().unwrap();
        let state = *conn.state();
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Opened(token, conn.peer_addr(), state));
        conn.send(b"hello").unwrap();
        wharf::Accept::Yes
    }

    fn on_message(&self, conn: &mut Conn<'_, u64>, msg: &[u8]) {
        let token = conn.token().unwrap();
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Message(token, msg.to_vec()));
    }

    fn on_close(&self, conn: &mut Conn<'_, u64>, _reason: CloseReason) {
        let token = conn.token().unwrap();
        self.seen.lock().unwrap().push(Seen::Closed(token));
    }

    fn on_connect_failed(&self, f: ConnectFailure) {
        self.seen.lock().unwrap().push(Seen::Failed(
            f.token,
            f.addr,
            f.error.kind(),
            f.retry_in.is_some(),
        ));
    }

    fn on_reconnect(&self, token: u64, attempt: u32) {
        self.seen
            .lock()
            .unwrap()
            .push(Seen::Reconnect(token, attempt));
    }
}

/// A blocking echo server of length-prefixed frames that can be taken
/// down (its listener and every connection closed) and brought up again
/// on the same port.
struct Peer {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl Peer {
    fn up(addr: SocketAddr) -> Peer {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // The port may still have connections in TIME_WAIT from the last run.
        sock.set_reuse_address(true).unwrap();
        sock.bind(&addr.into()).unwrap();
        sock.listen(64).unwrap();
        let listener: TcpListener = sock.into();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let join = std::thread::spawn(move || {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((c, _)) => {
                        let s = s.clone();
                        conns.push(std::thread::spawn(move || echo_until(c, &s)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            drop(listener);
            for c in conns {
                c.join().unwrap();
            }
        });
        Peer {
            stop,
            join: Some(join),
        }
    }

    fn down(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.join.take().unwrap().join().unwrap();
    }
}

fn echo_until(mut c: TcpStream, stop: &AtomicBool) {
    c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match c.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        while buf.len() >= 4 {
            let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() < 4 + len {
                break;
            }
            let _ = c.write_all(&buf[..4 + len]);
            buf.drain(..4 + len);
        }
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A listener whose accept queue is full, so that a connect to it hangs
/// (the kernel drops the SYN) until the connector gives up.
fn black_hole() -> (socket2::Socket, Vec<socket2::Socket>) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap();
    let fill: Vec<_> = (0..3)
        .map(|_| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let _ = s.connect(&addr);
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    (l, fill)
}

#[test]
fn tokens_name_outbound_connections_and_their_failures() {
    each_backend(|b| {
        let h = Client::default();
        let client = b.threads(2).start(h.clone()).unwrap();
        let up = free_port();
        let peer = Peer::up(up);
        let down = free_port();
        for token in 1..=4 {
            client
                .handle()
                .connect(Connect::addrs([up]).token(token))
                .unwrap();
        }
        client
            .handle()
            .connect(Connect::addrs([down]).token(77))
            .unwrap();
        wait_until(10, "four echoes and a failure", || {
            h.count(|s| matches!(s, Seen::Message(..))) == 4
                && h.count(|s| matches!(s, Seen::Failed(..))) == 1
        });
        let seen = h.seen();
        for token in 1..=4 {
            assert!(
                seen.contains(&Seen::Opened(token, up, token * 100)),
                "{seen:?}"
            );
            assert!(seen.contains(&Seen::Message(token, b"hello".to_vec())));
        }
        assert!(seen.contains(&Seen::Failed(
            77,
            Some(down),
            ErrorKind::ConnectionRefused,
            false
        )));
        // A name, resolved off the loop: `localhost` reaches the peer.
        client
            .handle()
            .connect(Connect::to(&format!("localhost:{}", up.port())).token(5))
            .unwrap();
        wait_until(10, "the named connect", || {
            h.count(|s| matches!(s, Seen::Message(5, _))) == 1
                || h.count(|s| matches!(s, Seen::Failed(5, ..))) == 1
        });
        // localhost may resolve to ::1 first, where nobody listens: then
        // 127.0.0.1 is tried next, and the connect still succeeds.
        assert_eq!(
            h.count(|s| matches!(s, Seen::Message(5, _))),
            1,
            "{:?}",
            h.seen()
        );
        client.shutdown(Duration::from_secs(2)).unwrap();
        peer.down();
    });
}

#[test]
fn a_connect_times_out_and_the_next_address_is_tried() {
    each_backend(|b| {
        let h = Client::default();
        let client = b.threads(1).start(h.clone()).unwrap();
        let (hole, _fill) = black_hole();
        let hole_addr = hole.local_addr().unwrap().as_socket().unwrap();
        client
            .handle()
            .connect(
                Connect::addrs([hole_addr])
                    .token(1)
                    .timeout(Duration::from_millis(300)),
            )
            .unwrap();
        wait_until(10, "the timeout", || {
            h.count(|s| matches!(s, Seen::Failed(1, ..))) == 1
        });
        assert!(h.seen().contains(&Seen::Failed(
            1,
            Some(hole_addr),
            ErrorKind::TimedOut,
            false
        )));
        // A dead address, then one that hangs, then one that works.
        let good = free_port();
        let peer = Peer::up(good);
        let refused = free_port();
        client
            .handle()
            .connect(
                Connect::addrs([refused, hole_addr, good])
                    .token(2)
                    .timeout(Duration::from_millis(300)),
            )
            .unwrap();
        wait_until(10, "the third address", || {
            h.count(|s| matches!(s, Seen::Message(2, _))) == 1
        });
        assert!(h.seen().contains(&Seen::Opened(2, good, 200)));
        assert_eq!(h.count(|s| matches!(s, Seen::Failed(2, ..))), 0);
        client.shutdown(Duration::from_secs(2)).unwrap();
        peer.down();
    });
}

#[test]
fn reconnect_follows_a_server_down_up_down_up_until_stopped() {
    each_backend(|b| {
        let h = Client::default();
        let client = b.threads(1).start(h.clone()).unwrap();
        let addr = free_port();
        let policy = Reconnect::new()
            .initial(Duration::from_millis(20))
            .max(Duration::from_millis(80));
        client
            .handle()
            .connect(Connect::addrs([addr]).token(9).reconnect(policy))
            .unwrap();
        // Down: attempts fail and are retried, each announced.
        wait_until(10, "three failed attempts", || {
            h.count(|s| matches!(s, Seen::Failed(9, _, _, true))) >= 3
        });
        let attempts: Vec<u32> = h
            .seen()
            .iter()
            .filter_map(|s| match s {
                Seen::Reconnect(9, a) => Some(*a),
                _ => None,
            })
            .collect();
        assert_eq!(attempts[..2], [1, 2], "{attempts:?}");
        // Up: it connects.
        let peer = Peer::up(addr);
        wait_until(10, "the first echo", || {
            h.count(|s| matches!(s, Seen::Message(9, _))) == 1
        });
        // Down again: closed, then retried.
        peer.down();
        wait_until(10, "the close", || {
            h.count(|s| matches!(s, Seen::Closed(9))) == 1
        });
        let failed_before = h.count(|s| matches!(s, Seen::Failed(9, ..)));
        wait_until(10, "failures after the close", || {
            h.count(|s| matches!(s, Seen::Failed(9, ..))) >= failed_before + 2
        });
        // Up again: connected again, the back-off started over.
        let peer = Peer::up(addr);
        wait_until(10, "the second echo", || {
            h.count(|s| matches!(s, Seen::Message(9, _))) == 2
        });
        assert_eq!(h.count(|s| matches!(s, Seen::Opened(9, _, 900))), 2);
        // Stopped: the next close is the last word.
        client.handle().stop_reconnect(9);
        std::thread::sleep(Duration::from_millis(50));
        peer.down();
        wait_until(10, "the second close", || {
            h.count(|s| matches!(s, Seen::Closed(9))) == 2
        });
        let settled = h.seen().len();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            h.seen().len(),
            settled,
            "attempts after stop_reconnect: {:?}",
            &h.seen()[settled..]
        );
        client.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn connect_options_reject_nothing_silently() {
    let h = Client::default();
    let client = Server::builder().threads(1).start(h.clone()).unwrap();
    // A name that cannot resolve fails through the callback, with its token.
    client
        .handle()
        .connect(Connect::to("name.invalid:80").token(3))
        .unwrap();
    wait_until(20, "the resolution failure", || {
        h.count(|s| matches!(s, Seen::Failed(3, None, _, false))) == 1
    });
    client.shutdown(Duration::from_secs(2)).unwrap();
}
