//! Connection caps: the one too many is refused and counted; the others
//! never notice.

mod util;

use std::io::Read;
use std::time::Duration;

use util::*;

/// Whether the server closed or reset `s` (a refusal) rather than keep it
/// open: a read that times out means a served connection.
fn refused(s: &mut std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
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

/// IPv6 clients are counted by their /64 (`Builder::per_ip_ipv6_prefix`):
/// one host is given a whole /64 and may take a new address in it for
/// every connection. Loopback has one IPv6 address, so the test runs in a
/// network namespace of its own (root only) where a /48 is routed to `lo`
/// and the clients bind addresses in it.
#[cfg(target_os = "linux")]
#[test]
fn ipv6_clients_are_counted_by_their_64() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED ipv6_clients_are_counted_by_their_64: a network namespace needs root \
             (the prefix rule itself is unit-tested in limits.rs)"
        );
        return;
    }
    // A thread of its own: the namespace is the thread's, and so is every
    // thread and process it starts (the server's loops, `ip`).
    std::thread::spawn(|| {
        // SAFETY: unshare has no memory preconditions; CLONE_NEWNET moves
        // only this thread into a new network namespace.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
        ip(&["link", "set", "lo", "up"]);
        ip(&["-6", "route", "add", "local", "2001:db8::/48", "dev", "lo"]);
        each_backend_kind(|backend| {
            let server = wharf::Server::builder()
                .backend(backend)
                .threads(2)
                .max_connections_per_ip(2)
                .bind("[::1]:0")
                .unwrap()
                .start(Echo::default())
                .unwrap();
            let addr = server.local_addr();
            let handle = server.handle();
            let mut same: Vec<_> = ["2001:db8::a", "2001:db8::b"]
                .iter()
                .map(|ip| from_v6(ip, addr))
                .collect();
            wait_until(10, "2 open", || handle.connections() == 2);
            assert!(
                refused(&mut from_v6("2001:db8::c", addr)),
                "a third address of the same /64 was served"
            );
            wait_until(5, "the refusal counted", || {
                handle.stats().refused_per_ip == 1
            });
            let mut other = from_v6("2001:db8:0:1::a", addr);
            write_frame(&mut other, b"another /64");
            assert_eq!(read_frame(&mut other).unwrap(), b"another /64");
            for s in &mut same {
                write_frame(s, b"still here");
                assert_eq!(read_frame(s).unwrap(), b"still here");
            }
            server.shutdown(Duration::from_secs(2)).unwrap();

            // Counted by whole address (/128), the same three are three
            // clients, and each address has its own cap.
            let server = wharf::Server::builder()
                .backend(backend)
                .max_connections_per_ip(2)
                .per_ip_ipv6_prefix(128)
                .bind("[::1]:0")
                .unwrap()
                .start(Echo::default())
                .unwrap();
            let addr = server.local_addr();
            let mut each: Vec<_> = ["2001:db8::a", "2001:db8::b", "2001:db8::c", "2001:db8::a"]
                .iter()
                .map(|ip| from_v6(ip, addr))
                .collect();
            for s in &mut each {
                write_frame(s, b"own address");
                assert_eq!(read_frame(s).unwrap(), b"own address");
            }
            assert!(
                refused(&mut from_v6("2001:db8::a", addr)),
                "a third connection from one address was served"
            );
            server.shutdown(Duration::from_secs(2)).unwrap();
        });
    })
    .join()
    .unwrap();
}

#[cfg(target_os = "linux")]
fn ip(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (iproute2)");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// A client connected to `to` from `ip` (any address of the routed /48:
/// bound with IPV6_FREEBIND, as it is not assigned to an interface).
#[cfg(target_os = "linux")]
fn from_v6(ip: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    s.set_freebind_v6(true).unwrap();
    let local: std::net::SocketAddr = format!("[{ip}]:0").parse().unwrap();
    s.bind(&local.into()).unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}
