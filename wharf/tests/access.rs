//! Who may connect, on every backend: a peer in a denied network, or in
//! none of an allow list's, is closed at accept (no `on_open`, counted in
//! `Stats::denied`); rules replaced at runtime apply from the next accept;
//! bans refuse at accept, close what is open and expire by themselves; a
//! handler bans its peer; accept rates hold. Clients bind 127.0.0.1,
//! 127.0.0.2 or 127.0.0.3 as their source: several peers on one machine.

mod util;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use util::*;
use wharf::{AcceptRate, CloseReason, Conn, Handler, IpRules};

/// The second and third loopback sources are missing on macOS (unless
/// aliased): say so and skip.
fn several_sources() -> bool {
    if cfg!(target_os = "macos") {
        eprintln!("SKIPPED: needs 127.0.0.2 and 127.0.0.3 as loopback sources (not on macOS)");
        return false;
    }
    true
}

/// A client whose source address is `from`.
fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
    s.connect(&to.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The server closes `s` without a word (EOF or a reset), rather than
/// keeping it open (a read timeout is not a refusal).
fn refused(mut s: TcpStream) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset};
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if matches!(e.kind(), ConnectionReset | ConnectionAborted) => {}
        Ok(n) => panic!("a refused peer read {n} bytes"),
        Err(e) => panic!("a refused peer was not closed: {e}"),
    }
}

#[test]
fn denied_and_unlisted_peers_are_closed_at_accept() {
    if !several_sources() {
        return;
    }
    each_backend(|b| {
        let h = Echo::default();
        let rules = IpRules::default()
            .allow("127.0.0.0/8")
            .unwrap()
            .deny("127.0.0.2")
            .unwrap();
        let server = b
            .threads(2)
            .ip_rules(rules)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        // 127.0.0.1 is allowed: a full echo.
        let mut ok = connect_from([127, 0, 0, 1], addr);
        write_frame(&mut ok, b"hello");
        assert_eq!(read_frame(&mut ok).unwrap(), b"hello");
        // 127.0.0.2 is denied: closed before on_open, counted.
        for _ in 0..5 {
            refused(connect_from([127, 0, 0, 2], addr));
        }
        wait_until(10, "the denials counted", || handle.stats().denied == 5);
        assert_eq!(
            h.opened.load(Ordering::SeqCst),
            1,
            "no on_open for a denied peer"
        );
        // Replaced at runtime: now only 127.0.0.2 may connect.
        handle.set_ip_rules(IpRules::default().allow("127.0.0.2/32").unwrap());
        assert!(!handle.ip_rules().permits("127.0.0.1".parse().unwrap()));
        refused(connect_from([127, 0, 0, 1], addr));
        let mut two = connect_from([127, 0, 0, 2], addr);
        write_frame(&mut two, b"now me");
        assert_eq!(read_frame(&mut two).unwrap(), b"now me");
        wait_until(10, "the new denial counted", || handle.stats().denied == 6);
        // The connection open before the change is not touched.
        write_frame(&mut ok, b"still here");
        assert_eq!(read_frame(&mut ok).unwrap(), b"still here");
        assert_eq!(h.opened.load(Ordering::SeqCst), 2);
        drop((ok, two));
        server.shutdown(Duration::from_secs(2)).unwrap();
        assert_eq!(handle.stats().connections, 0);
    });
}

/// Reads until the server closes `s`; what it read.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn bans_refuse_at_accept_close_what_is_open_and_expire() {
    if !several_sources() {
        return;
    }
    each_backend(|b| {
        let h = Echo::default();
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let (addr, handle) = (server.local_addr(), server.handle());
        let mut one = connect_from([127, 0, 0, 1], addr);
        let mut two = connect_from([127, 0, 0, 2], addr);
        for s in [&mut one, &mut two] {
            write_frame(s, b"before");
            assert_eq!(read_frame(s).unwrap(), b"before");
        }
        let ban = Instant::now();
        handle.ban("127.0.0.2", Duration::from_secs(3)).unwrap();
        // Its open connection is closed, with the reason.
        assert!(read_to_close(&mut two).is_empty());
        wait_until(10, "the banned connection's on_close", || {
            h.reasons.lock().unwrap().contains(&CloseReason::Banned)
        });
        // New ones are refused before on_open, and counted.
        let opened = h.opened.load(Ordering::SeqCst);
        for _ in 0..3 {
            refused(connect_from([127, 0, 0, 2], addr));
        }
        wait_until(10, "the refusals counted", || handle.stats().banned == 3);
        assert_eq!(h.opened.load(Ordering::SeqCst), opened);
        let bans = handle.bans();
        assert_eq!(bans.len(), 1);
        assert_eq!(bans[0].network, "127.0.0.2/32");
        assert!(bans[0].remaining <= Duration::from_secs(3));
        // Another address is not touched.
        write_frame(&mut one, b"still");
        assert_eq!(read_frame(&mut one).unwrap(), b"still");
        // The ban expires by itself.
        wait_until(10, "the ban to expire", || handle.bans().is_empty());
        assert!(ban.elapsed() >= Duration::from_secs(3), "expired early");
        let mut again = connect_from([127, 0, 0, 2], addr);
        write_frame(&mut again, b"after");
        assert_eq!(read_frame(&mut again).unwrap(), b"after");
        // Unban lifts one at once; a malformed network says why.
        handle
            .ban("127.0.0.0/30", Duration::from_secs(3600))
            .unwrap();
        refused(connect_from([127, 0, 0, 3], addr));
        assert!(handle.unban("127.0.0.0/30").unwrap());
        let mut three = connect_from([127, 0, 0, 3], addr);
        write_frame(&mut three, b"unbanned");
        assert_eq!(read_frame(&mut three).unwrap(), b"unbanned");
        assert!(handle.ban("127.0.0.300", Duration::from_secs(1)).is_err());
        drop((one, again, three));
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Bans its peer after three messages that are not "ok".
#[derive(Clone, Default)]
struct Strict {
    opened: Arc<AtomicUsize>,
}

impl Handler for Strict {
    type State = u32;
    fn on_open(&self, _conn: &mut Conn<'_, u32>) -> wharf::Accept {
        self.opened.fetch_add(1, Ordering::SeqCst);
        wharf::Accept::Yes
    }
    fn on_message(&self, conn: &mut Conn<'_, u32>, msg: &[u8]) {
        if msg == b"ok" {
            let _ = conn.send(b"ok");
            return;
        }
        *conn.state() += 1;
        if *conn.state() == 3 {
            let _ = conn.send(b"banned");
            conn.ban_peer(Duration::from_secs(60));
        }
    }
}

#[test]
fn a_handler_bans_the_peer_it_is_talking_to() {
    if !several_sources() {
        return;
    }
    each_backend(|b| {
        let h = Strict::default();
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let (addr, handle) = (server.local_addr(), server.handle());
        let mut other = connect_from([127, 0, 0, 2], addr);
        let mut same_host = connect_from([127, 0, 0, 3], addr);
        // Open on the server's side before the ban (a connect completes
        // in the kernel's backlog before the server has accepted it).
        write_frame(&mut same_host, b"ok");
        assert_eq!(read_frame(&mut same_host).unwrap(), b"ok");
        let mut bad = connect_from([127, 0, 0, 3], addr);
        for _ in 0..3 {
            write_frame(&mut bad, b"garbage");
        }
        // Its last message goes out before the close.
        assert_eq!(read_to_close(&mut bad), frame(b"banned"));
        // The peer's other connection is closed too; new ones are refused.
        assert!(read_to_close(&mut same_host).is_empty());
        refused(connect_from([127, 0, 0, 3], addr));
        wait_until(10, "the refusal counted", || handle.stats().banned == 1);
        assert_eq!(handle.stats().closed_with("banned"), 2);
        assert_eq!(handle.bans()[0].network, "127.0.0.3/32");
        write_frame(&mut other, b"ok");
        assert_eq!(read_frame(&mut other).unwrap(), b"ok");
        assert_eq!(h.opened.load(Ordering::SeqCst), 3);
        drop(other);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Connects from `from` to `to` about `per_second` times a second for
/// `run`, and closes each connection 300 ms later (the server has seen it
/// by then) with a reset, so that no TIME_WAIT is left. Returns the
/// connects tried and those that succeeded (a refusal can reset one before
/// the connect has seen it complete), and how long the flood lasted.
fn flood(from: [u8; 4], to: SocketAddr, per_second: u32, run: Duration) -> (Flood, Duration) {
    let start = Instant::now();
    let gap = Duration::from_secs(1) / per_second;
    let hold = Duration::from_millis(300);
    let mut open = std::collections::VecDeque::new();
    let mut made = 0u64;
    let mut i = 0u32;
    while start.elapsed() < run {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
        if s.connect_timeout(&to.into(), Duration::from_secs(5))
            .is_ok()
        {
            made += 1;
            let _ = s.set_linger(Some(Duration::ZERO));
            open.push_back((Instant::now(), s));
        }
        while open.front().is_some_and(|(at, _)| at.elapsed() >= hold) {
            open.pop_front();
        }
        i += 1;
        if let Some(wait) = (gap * i).checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let took = start.elapsed();
    std::thread::sleep(hold);
    (
        Flood {
            tried: u64::from(i),
            made,
        },
        took,
    )
}

#[derive(Clone, Copy)]
struct Flood {
    tried: u64,
    made: u64,
}

/// The server saw every connect that succeeded, and no more than were
/// tried.
fn all_seen(seen: u64, floods: &[Flood]) -> bool {
    let tried: u64 = floods.iter().map(|f| f.tried).sum();
    let made: u64 = floods.iter().map(|f| f.made).sum();
    (made..=tried).contains(&seen)
}

/// `got` is within 10% of `want`. Never more is the limit's promise and
/// always holds; not much less depends on the server taking each connect
/// before the flood resets it (a server slower than the hold never sees
/// some), which is a time bound and skipped under Wine.
fn within_ten_percent(what: &str, got: u64, want: f64) {
    let off = (got as f64 - want) / want;
    eprintln!(
        "{what}: {got} accepted, {want:.0} expected ({:+.1}%)",
        off * 100.0
    );
    assert!(
        off <= 0.10,
        "{what}: {got} accepted, over {want:.0} by more than 10%"
    );
    if timing_bounds_apply(what) {
        assert!(
            off >= -0.10,
            "{what}: {got} accepted, under {want:.0} by more than 10%"
        );
    }
}

#[test]
fn accept_rates_hold_within_ten_percent_over_five_seconds() {
    if !several_sources() {
        return;
    }
    each_backend_kind(|backend| {
        // One server limits each client, the other everyone together.
        let per_ip = Echo::default();
        let p = wharf::Server::builder()
            .backend(backend)
            .threads(2)
            .accept_rate_per_ip(AcceptRate::per_second(100).burst(10))
            .bind("127.0.0.1:0")
            .unwrap()
            .start(per_ip.clone())
            .unwrap();
        let global = Echo::default();
        let g = wharf::Server::builder()
            .backend(backend)
            .threads(2)
            .accept_rate(AcceptRate::per_second(100).burst(10))
            .bind("127.0.0.1:0")
            .unwrap()
            .start(global.clone())
            .unwrap();
        let run = Duration::from_secs(5);
        let (pa, ga) = (p.local_addr(), g.local_addr());
        // 1,000 connects a second each: ten times the limit.
        let floods = [
            ([127, 0, 0, 1], pa),
            ([127, 0, 0, 2], ga),
            ([127, 0, 0, 3], ga),
        ]
        .map(|(from, to)| std::thread::spawn(move || flood(from, to, 1000, run)));
        let [(p_flood, p_took), (g2, g_took), (g3, _)] = floods.map(|t| t.join().unwrap());
        let (ph, gh) = (p.handle(), g.handle());
        // Every connect was either opened or refused over the rate. (A
        // server that takes longer than the 100 ms a flood connection is
        // held may never see it: under Wine that is a time bound too.)
        let seen = || {
            let (ps, gs) = (ph.stats(), gh.stats());
            (ps.accepted + ps.rate_limited, gs.accepted + gs.rate_limited)
        };
        if timing_bounds_apply("every flood connect seen") {
            wait_until(10, "every connect seen", || {
                let (p_seen, g_seen) = seen();
                all_seen(p_seen, &[p_flood]) && all_seen(g_seen, &[g2, g3])
            });
        } else {
            std::thread::sleep(Duration::from_secs(1));
        }
        let (p_seen, g_seen) = seen();
        assert!(
            p_seen <= p_flood.tried && g_seen <= g2.tried + g3.tried,
            "more seen than tried"
        );
        if timing_bounds_apply("the floods' connect rates") {
            assert!(
                p_flood.tried > 2000 && g2.tried + g3.tried > 4000,
                "the floods ran short"
            );
        }
        within_ten_percent(
            "per client, 100/s",
            per_ip.opened.load(Ordering::SeqCst) as u64,
            10.0 + 100.0 * p_took.as_secs_f64(),
        );
        within_ten_percent(
            "global, 100/s from two clients",
            global.opened.load(Ordering::SeqCst) as u64,
            10.0 + 100.0 * g_took.as_secs_f64(),
        );
        p.shutdown(Duration::from_secs(2)).unwrap();
        g.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn ipv6_clients_are_banned_by_prefix() {
    each_backend(|b| {
        let Ok(b) = b.threads(1).bind("[::1]:0") else {
            eprintln!("SKIPPED: no IPv6 loopback here");
            return;
        };
        let h = Echo::default();
        let server = b.start(h.clone()).unwrap();
        let (addr, handle) = (server.local_addr(), server.handle());
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write_frame(&mut s, b"v6");
        assert_eq!(read_frame(&mut s).unwrap(), b"v6");
        // ::1 is banned as its whole /64 (the default prefix).
        handle.ban_ip("::1".parse().unwrap(), Duration::from_secs(60));
        assert_eq!(handle.bans()[0].network, "::/64");
        assert!(read_to_close(&mut s).is_empty());
        let again = TcpStream::connect(addr).unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        refused(again);
        wait_until(10, "the refusal counted", || handle.stats().banned == 1);
        assert_eq!(h.opened.load(Ordering::SeqCst), 1);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
