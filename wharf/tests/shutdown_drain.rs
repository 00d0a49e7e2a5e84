//! Shutdown with a lot queued: every reading client gets all of it, in
//! order, then FIN; a client that never reads cannot hold shutdown past its
//! deadline.

mod util;

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use util::*;
use wharf::Bytes;

const READERS: usize = 100;
const MESSAGES: usize = 10_000;

fn message(client: usize, seq: usize) -> Vec<u8> {
    let mut m = (client as u32).to_be_bytes().to_vec();
    m.extend_from_slice(&(seq as u32).to_be_bytes());
    m.extend_from_slice(&pattern(client ^ seq, 8));
    m
}

#[test]
fn shutdown_drains_to_readers_and_keeps_its_deadline() {
    each_backend(|b| {
        let echo = Echo::default();
        let server = b
            .threads(2)
            .send_water_marks(64 << 20, 32 << 20)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(echo.clone())
            .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        let readers: Vec<TcpStream> = (0..READERS).map(|_| connect(addr)).collect();
        let never =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        never.set_recv_buffer_size(4096).unwrap();
        never.connect(&addr.into()).unwrap();
        wait_until(10, "all open", || handle.connections() == READERS + 1);
        // Queue MESSAGES to every reader (and to the one that never reads)
        // before anyone reads them.
        let ids = echo.ids.lock().unwrap().clone();
        let order = echo.peers.lock().unwrap().clone();
        let id_of =
            |peer: std::net::SocketAddr| ids[order.iter().position(|p| *p == peer).unwrap()];
        let peers: Vec<std::net::SocketAddr> =
            readers.iter().map(|r| r.local_addr().unwrap()).collect();
        let never_port = never.local_addr().unwrap().as_socket().unwrap();
        for (i, peer) in peers.iter().enumerate() {
            for seq in 0..MESSAGES {
                handle
                    .send(id_of(*peer), Bytes::from(message(i, seq)))
                    .unwrap();
            }
        }
        // 10 MiB for the one that never reads: more than the kernel's
        // buffers hold, so its flush can only end at the deadline.
        let big = Bytes::from(vec![0x5A; 1024]);
        for _ in 0..MESSAGES {
            handle.send(id_of(never_port), big.clone()).unwrap();
        }
        let reading: Vec<_> = readers
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    let mut r = std::io::BufReader::with_capacity(1 << 16, r);
                    let mut m = [0u8; 20];
                    for seq in 0..MESSAGES {
                        r.read_exact(&mut m).expect("queued message");
                        assert_eq!(&m[..4], &16u32.to_be_bytes());
                        assert!(
                            m[4..] == message(i, seq)[..],
                            "reader {i} message {seq} differs"
                        );
                    }
                    let mut rest = Vec::new();
                    assert_eq!(
                        r.read_to_end(&mut rest).unwrap(),
                        0,
                        "FIN right after the data"
                    );
                })
            })
            .collect();
        let t = Instant::now();
        let deadline = Duration::from_secs(5);
        server.shutdown(deadline).unwrap();
        let took = t.elapsed();
        for r in reading {
            r.join().unwrap();
        }
        eprintln!("shutdown with {READERS} x {MESSAGES} queued and one peer that never reads took {took:?}");
        if timing_bounds_apply("shutdown with a peer that never reads") {
            assert!(
                took < deadline + Duration::from_secs(1),
                "shutdown overran its deadline: {took:?}"
            );
        }
        drop(never);
    });
}
