//! Connection caps: the one too many is refused and counted; the others
//! never notice.

mod util;

use std::io::Read;
use std::time::Duration;

use util::*;

fn refused(s: &mut std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn max_connections_refuses_one_more_and_the_rest_keep_echoing() {
    each_backend(|b| {
        let server = b
            .threads(2)
            .max_connections(50)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        let mut ok: Vec<_> = (0..50).map(|_| connect(addr)).collect();
        wait_until(10, "50 open", || handle.connections() == 50);
        let mut extra = connect(addr);
        assert!(refused(&mut extra), "the 51st connection was served");
        wait_until(5, "refusal counted", || handle.stats().refused == 1);
        for (i, s) in ok.iter_mut().enumerate() {
            write_frame(s, &pattern(i, 64));
            assert_eq!(read_frame(s).unwrap(), pattern(i, 64));
        }
        // A slot frees: a new client gets in.
        drop(ok.pop());
        wait_until(10, "49 open", || handle.connections() == 49);
        std::thread::sleep(Duration::from_millis(100));
        let mut late = connect(addr);
        write_frame(&mut late, b"in");
        assert_eq!(read_frame(&mut late).unwrap(), b"in");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn max_connections_per_ip_counts_each_address() {
    each_backend(|b| {
        let server = b
            .threads(2)
            .max_connections_per_ip(3)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let addr = server.local_addr();
        let from = |ip: &str| {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            let local: std::net::SocketAddr = format!("{ip}:0").parse().unwrap();
            s.bind(&local.into()).unwrap();
            s.connect(&addr.into()).unwrap();
            let s: std::net::TcpStream = s.into();
            s
        };
        let mut one: Vec<_> = (0..3).map(|_| from("127.0.0.1")).collect();
        let mut two: Vec<_> = (0..3).map(|_| from("127.0.0.2")).collect();
        wait_until(10, "6 open", || server.handle().connections() == 6);
        assert!(
            refused(&mut from("127.0.0.1")),
            "a 4th from 127.0.0.1 was served"
        );
        for s in one.iter_mut().chain(two.iter_mut()) {
            write_frame(s, b"still here");
            assert_eq!(read_frame(s).unwrap(), b"still here");
        }
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
