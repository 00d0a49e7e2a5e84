//! A seeded randomized test with an oracle: many clients with random
//! behaviour against a server doing random things, every reply byte and
//! every close accounted for.
//!
//! Clients pipeline random frames (empty, small, large, the maximum) with
//! random write splits, half-close, reset, read slowly or stop reading for
//! a while, send oversized headers, and reconnect. Each request asks the
//! server for something: an echo, an echo then `Conn::close`, an echo
//! sent from another thread through `Handle::send`, a `Handle::disconnect`
//! from another thread, a broadcast. At a random moment near the end the
//! server shuts down. The oracle:
//! - every reply is byte-exact and in order; broadcasts are whole frames;
//! - a connection that ends early ends for a reason the test asked for
//!   (its close, reset, oversized frame, disconnect) or the shutdown;
//! - a half-closed connection gets every reply before its EOF;
//! - `shutdown` returns within its deadline (plus slack for the join);
//! - descriptors and memory come back to where they were.
//!
//! The short run goes again with TLS on for part of its time (the server
//! with `Builder::tls`, the clients with rustls; a half-close is then
//! close_notify and a FIN).
//!
//! `WHARF_SEED=N` replays a run (the seed is printed); `WHARF_TORTURE_SECS`
//! sets its length per backend (default 12 s; the ignored long version
//! runs 10 minutes per backend).

mod util;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use util::*;
use wharf::{Backend, Bytes, CloseReason, Conn, ConnId, Framing, Handler, SendError, Server};

const MAX_FRAME: usize = 256 * 1024;

/// A small xorshift generator: the whole run follows from the seed.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What a request asks of the server: its first byte.
const ECHO: u8 = b'e';
const CLOSE: u8 = b'c';
const FROM_THREAD: u8 = b't';
const DISCONNECT: u8 = b'd';
const BROADCAST: u8 = b'b';

/// Replies start with `r`, broadcasts with `B`.
const REPLY: u8 = b'r';
const CAST: u8 = b'B';

enum Job {
    Send(ConnId, Bytes),
    Disconnect(ConnId),
}

#[derive(Default)]
struct Tally {
    opened: AtomicU64,
    messages: AtomicU64,
    reasons: Mutex<HashMap<String, u64>>,
}

struct Torture {
    jobs: Mutex<mpsc::Sender<Job>>,
    tally: Arc<Tally>,
}

impl Handler for Torture {
    type State = ();
    fn on_open(&self, _conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.tally.opened.fetch_add(1, Ordering::Relaxed);
        wharf::Accept::Yes
    }
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        self.tally.messages.fetch_add(1, Ordering::Relaxed);
        let mut reply = Vec::with_capacity(msg.len());
        reply.push(REPLY);
        reply.extend_from_slice(msg.get(1..).unwrap_or_default());
        match msg.first().copied() {
            Some(FROM_THREAD) => {
                let job = Job::Send(conn.id(), Bytes::from(reply));
                let _ = self.jobs.lock().unwrap().send(job);
            }
            Some(DISCONNECT) => {
                let _ = self.jobs.lock().unwrap().send(Job::Disconnect(conn.id()));
            }
            Some(BROADCAST) => {
                let _ = conn.send(&reply);
                let mut cast = reply.clone();
                cast[0] = CAST;
                let _ = conn.handle().broadcast(Bytes::from(cast));
            }
            Some(CLOSE) => {
                let _ = conn.send(&reply);
                conn.close();
            }
            _ => {
                // Over the mark the reply is refused: the client sees the
                // gap, and only clients that stop reading get there.
                if conn.send(&reply).is_err() {
                    conn.close();
                }
            }
        }
    }
    fn on_close(&self, _conn: &mut Conn<'_, ()>, reason: CloseReason) {
        let key = match reason {
            CloseReason::FrameTooLarge { .. } => "FrameTooLarge".to_string(),
            CloseReason::Io(kind) => format!("Io({kind:?})"),
            other => format!("{other:?}"),
        };
        *self.tally.reasons.lock().unwrap().entry(key).or_default() += 1;
    }
}

/// What one client connection did, for the totals.
#[derive(Default)]
struct ClientTally {
    connections: u64,
    requests: u64,
    replies: u64,
    broadcasts: u64,
    half_closes: u64,
    resets: u64,
    oversized: u64,
    closes: u64,
    disconnects: u64,
    cut_by_shutdown: u64,
}

/// A client's connection: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<wharf::tls::rustls::StreamOwned<wharf::tls::rustls::ClientConnection, TcpStream>>),
}

/// What the clients connect with.
#[derive(Clone)]
enum Client {
    Plain,
    #[cfg(feature = "tls")]
    Tls(Arc<wharf::tls::rustls::ClientConfig>),
}

impl Stream {
    fn connect(addr: SocketAddr, client: &Client) -> io::Result<Stream> {
        let tcp = TcpStream::connect(addr)?;
        Ok(match client {
            Client::Plain => Stream::Plain(tcp),
            #[cfg(feature = "tls")]
            Client::Tls(config) => {
                let name = "localhost".try_into().unwrap();
                let conn = wharf::tls::rustls::ClientConnection::new(config.clone(), name)
                    .map_err(io::Error::other)?;
                Stream::Tls(Box::new(wharf::tls::rustls::StreamOwned::new(conn, tcp)))
            }
        })
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            #[cfg(feature = "tls")]
            Stream::Tls(s) => &s.sock,
        }
    }

    /// Ends the write side: the FIN (after close_notify, with TLS).
    fn half_close(&mut self) {
        #[cfg(feature = "tls")]
        if let Stream::Tls(s) = self {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.tcp().shutdown(Shutdown::Write);
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Reads one frame; `Ok(None)` at a clean EOF between frames.
fn read_one(s: &mut Stream) -> io::Result<Option<Vec<u8>>> {
    let mut h = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match s.read(&mut h[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    let len = u32::from_be_bytes(h) as usize;
    assert!(
        len <= MAX_FRAME,
        "a frame of {len} bytes came from the server"
    );
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(Some(body))
}

/// One client connection's life. Returns an error string on an oracle
/// violation.
fn one_connection(
    addr: SocketAddr,
    client: &Client,
    rng: &mut Rng,
    stopping: &AtomicBool,
    t: &mut ClientTally,
) -> Result<(), String> {
    let mut s = match Stream::connect(addr, client) {
        Ok(s) => s,
        Err(_) if stopping.load(Ordering::SeqCst) => return Ok(()),
        Err(e) => return Err(format!("connect: {e}")),
    };
    s.tcp()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    s.tcp().set_nodelay(rng.chance(50)).unwrap();
    t.connections += 1;
    let n = 1 + rng.below(40) as usize;
    // The requests, and how the connection ends.
    let mut requests = Vec::new();
    let mut ending = None;
    // The client writes everything before it reads: past what the socket
    // buffers and the server's queue hold, it would deadlock itself.
    let mut budget = 512 * 1024;
    for i in 0..n {
        let size = match rng.below(20) {
            0 => 0,
            1 => MAX_FRAME - 1,
            2..=4 => rng.below(64 * 1024) as usize,
            _ => rng.below(600) as usize,
        };
        let size = if size > budget {
            rng.below(100) as usize
        } else {
            size
        };
        budget = budget.saturating_sub(size);
        let kind = match rng.below(100) {
            0..=2 if i == n - 1 => CLOSE,
            3..=5 if i == n - 1 => DISCONNECT,
            6..=8 => BROADCAST,
            9..=14 => FROM_THREAD,
            _ => ECHO,
        };
        let mut body = vec![kind];
        body.extend(pattern(rng.below(1000) as usize, size));
        if kind == CLOSE || kind == DISCONNECT {
            ending = Some(kind);
        }
        requests.push(body);
    }
    let behaviour = rng.below(100);
    let oversized = ending.is_none() && behaviour < 5;
    let reset = ending.is_none() && (5..12).contains(&behaviour);
    let half_close = ending.is_none() && (12..40).contains(&behaviour);
    let stall = (40..50).contains(&behaviour);
    // `FROM_THREAD` replies may overtake or trail the loop's own: a
    // request of that kind goes alone (wait for its reply first).
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    let mut batches: Vec<(Vec<u8>, usize)> = Vec::new();
    for body in &requests {
        wire.extend(frame(body));
        let mut reply = vec![REPLY];
        reply.extend_from_slice(&body[1..]);
        if body[0] != DISCONNECT {
            expected.push(reply);
        }
        if body[0] == FROM_THREAD {
            batches.push((std::mem::take(&mut wire), expected.len()));
        }
    }
    if oversized {
        wire.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        wire.extend_from_slice(b"and some of the body");
    }
    batches.push((wire, expected.len()));
    t.requests += requests.len() as u64;

    let mut next_reply = 0;
    let mut eof = false;
    let last = batches.len() - 1;
    for (b, (wire, upto)) in batches.into_iter().enumerate() {
        // Random write splits.
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let cut = if rng.chance(30) {
                1 + rng.below(rest.len() as u64) as usize
            } else {
                rest.len()
            };
            if let Err(e) = s.write_all(&rest[..cut]) {
                if stopping.load(Ordering::SeqCst) {
                    t.cut_by_shutdown += 1;
                    return Ok(());
                }
                // The server may have closed on our oversized header or a
                // close request while we were still writing.
                if b == last && (oversized || ending.is_some()) {
                    break;
                }
                return Err(format!("write: {e}"));
            }
            rest = &rest[cut..];
        }
        if b == last {
            if reset {
                t.resets += 1;
                let sock = socket2::SockRef::from(s.tcp());
                sock.set_linger(Some(Duration::ZERO)).unwrap();
                return Ok(());
            }
            if half_close {
                t.half_closes += 1;
                s.half_close();
            }
            if stall {
                std::thread::sleep(Duration::from_millis(rng.below(300)));
            }
        }
        while next_reply < upto && !eof {
            match read_one(&mut s) {
                Ok(Some(f)) if f.first() == Some(&CAST) => t.broadcasts += 1,
                Ok(Some(f)) => {
                    if f != expected[next_reply] {
                        return Err(format!(
                            "reply {next_reply} of {}: {} bytes, expected {}",
                            expected.len(),
                            f.len(),
                            expected[next_reply].len()
                        ));
                    }
                    next_reply += 1;
                    t.replies += 1;
                }
                Ok(None) => eof = true,
                Err(_) if stopping.load(Ordering::SeqCst) => {
                    t.cut_by_shutdown += 1;
                    return Ok(());
                }
                Err(e) => return Err(format!("read reply {next_reply}: {e}")),
            }
        }
        if eof {
            break;
        }
    }
    if eof && next_reply < expected.len() && !stopping.load(Ordering::SeqCst) {
        return Err(format!(
            "EOF after {next_reply} of {} replies (half-close {half_close}, ending {:?})",
            expected.len(),
            ending.map(char::from)
        ));
    }
    // Every reply is in: what follows is broadcasts, then the end the
    // connection asked for.
    let ends = half_close || oversized || ending.is_some();
    if !ends {
        return Ok(()); // dropping the socket closes it
    }
    loop {
        match read_one(&mut s) {
            Ok(Some(f)) if f.first() == Some(&CAST) => t.broadcasts += 1,
            Ok(Some(f)) => return Err(format!("an extra reply of {} bytes", f.len())),
            Ok(None) => break,
            Err(_) if oversized || stopping.load(Ordering::SeqCst) => break,
            Err(e) => return Err(format!("waiting for the end: {e}")),
        }
    }
    match ending {
        Some(CLOSE) => t.closes += 1,
        Some(DISCONNECT) => t.disconnects += 1,
        _ if oversized => t.oversized += 1,
        _ => {}
    }
    Ok(())
}

fn run(backend: Backend, seed: u64, secs: u64) {
    run_with(backend, seed, secs, false)
}

fn run_with(backend: Backend, seed: u64, secs: u64, tls: bool) {
    eprintln!("torture on {backend:?}: WHARF_SEED={seed} for {secs} s, TLS {tls}");
    let fds_before = open_fds();
    let rss_before = rss_kib();
    let tally = Arc::new(Tally::default());
    let (tx, rx) = mpsc::channel::<Job>();
    let mut rng = Rng(seed | 1);
    let builder = Server::builder()
        .backend(backend)
        .threads(1 + rng.below(3) as usize)
        .framing(Framing::length_prefixed().max_frame(MAX_FRAME))
        .reuse_port(rng.chance(50))
        .bind("127.0.0.1:0")
        .unwrap();
    let (builder, client) = with_tls(builder, tls);
    let server = builder
        .start(Torture {
            jobs: Mutex::new(tx),
            tally: tally.clone(),
        })
        .unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    // Other threads' sends and disconnects, a little late on purpose.
    let held_back = Arc::new(AtomicU64::new(0));
    let worker = {
        let handle = handle.clone();
        let held_back = held_back.clone();
        let mut rng = Rng(rng.next() | 1);
        std::thread::spawn(move || {
            for job in rx {
                if rng.chance(20) {
                    std::thread::sleep(Duration::from_micros(rng.below(2000)));
                }
                match job {
                    Job::Send(id, reply) => {
                        // Over the connection's mark: wait until it drains,
                        // as a user's thread would. Refused otherwise only
                        // for a closed connection (the client then sees a
                        // missing reply: a failure).
                        for _ in 0..100 {
                            match handle.send(id, reply.clone()) {
                                Err(SendError::Backpressure) => {
                                    held_back.fetch_add(1, Ordering::Relaxed);
                                    let _ = handle.wait_writable(id, Duration::from_millis(200));
                                }
                                _ => break,
                            }
                        }
                    }
                    Job::Disconnect(id) => {
                        let _ = handle.disconnect(id);
                    }
                }
            }
        })
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let totals = Arc::new(Mutex::new(ClientTally::default()));
    let end = Instant::now() + Duration::from_secs(secs);
    let clients: Vec<_> = (0..12)
        .map(|c| {
            let mut rng = Rng(rng.next() | 1);
            let client = client.clone();
            let (stopping, failures, totals) = (stopping.clone(), failures.clone(), totals.clone());
            std::thread::spawn(move || {
                let mut t = ClientTally::default();
                while !stopping.load(Ordering::SeqCst) {
                    if let Err(e) = one_connection(addr, &client, &mut rng, &stopping, &mut t) {
                        if !stopping.load(Ordering::SeqCst) {
                            failures.lock().unwrap().push(format!("client {c}: {e}"));
                        }
                    }
                }
                let mut all = totals.lock().unwrap();
                all.connections += t.connections;
                all.requests += t.requests;
                all.replies += t.replies;
                all.broadcasts += t.broadcasts;
                all.half_closes += t.half_closes;
                all.resets += t.resets;
                all.oversized += t.oversized;
                all.closes += t.closes;
                all.disconnects += t.disconnects;
                all.cut_by_shutdown += t.cut_by_shutdown;
            })
        })
        .collect();
    while Instant::now() < end && failures.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Shut down at a random moment while the clients are busy.
    std::thread::sleep(Duration::from_millis(rng.below(200)));
    stopping.store(true, Ordering::SeqCst);
    let deadline = Duration::from_millis(200 + rng.below(800));
    let t0 = Instant::now();
    server.shutdown(deadline).unwrap();
    let took = t0.elapsed();
    for c in clients {
        c.join().unwrap();
    }
    worker.join().unwrap();
    let failures = failures.lock().unwrap().clone();
    let t = totals.lock().unwrap();
    let reasons = tally.reasons.lock().unwrap().clone();
    eprintln!(
        "  {} connections ({} opened on the server), {} requests, {} replies, {} broadcasts \
         received; client ends: {} half-closes, {} resets, {} oversized, {} closes, {} \
         disconnects, {} cut by the shutdown",
        t.connections,
        tally.opened.load(Ordering::Relaxed),
        t.requests,
        t.replies,
        t.broadcasts,
        t.half_closes,
        t.resets,
        t.oversized,
        t.closes,
        t.disconnects,
        t.cut_by_shutdown
    );
    eprintln!(
        "  server close reasons: {reasons:?}; shutdown took {took:?} (deadline {deadline:?}); \
         {} sends from the worker thread waited for a drain",
        held_back.load(Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "WHARF_SEED={seed} on {backend:?}: {} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(t.replies > 0 && t.connections > 10, "the run did nothing");
    assert!(
        took < deadline + Duration::from_secs(2),
        "WHARF_SEED={seed}: shutdown took {took:?} with a deadline of {deadline:?}"
    );
    let opened = tally.opened.load(Ordering::Relaxed);
    let closed: u64 = reasons.values().sum();
    assert_eq!(
        opened, closed,
        "WHARF_SEED={seed}: every open connection gets on_close"
    );
    if cfg!(target_os = "linux") {
        let end = Instant::now() + Duration::from_secs(10);
        while open_fds() > fds_before + 2 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let fds = open_fds();
        if fds > fds_before + 2 {
            let names: Vec<String> = std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .collect();
            panic!("WHARF_SEED={seed}: {fds} descriptors open, {fds_before} before: {names:?}");
        }
    }
    if memory_bounds_apply("torture") {
        let grown = rss_kib().saturating_sub(rss_before);
        assert!(
            grown < 64 * 1024,
            "WHARF_SEED={seed}: RSS grew by {grown} KiB"
        );
    }
}

/// TLS on the server (a certificate made for the run) and its clients.
#[cfg(feature = "tls")]
fn with_tls(builder: wharf::Builder, tls: bool) -> (wharf::Builder, Client) {
    if !tls {
        return (builder, Client::Plain);
    }
    let ca = util::tls::Ca::new("torture CA");
    let leaf = ca.issue(&["localhost"]);
    let config = wharf::tls::ServerTlsConfig::new()
        .cert(leaf.chain.clone(), leaf.key())
        .unwrap()
        .build()
        .unwrap();
    let client = Client::Tls(Arc::new(util::tls::client_config(&ca)));
    (builder.tls(wharf::tls::ServerTls::new(config)), client)
}

#[cfg(not(feature = "tls"))]
fn with_tls(builder: wharf::Builder, tls: bool) -> (wharf::Builder, Client) {
    if tls {
        eprintln!("SKIPPED the TLS part of the torture run: built without the tls feature");
    }
    (builder, Client::Plain)
}

fn seed() -> u64 {
    match std::env::var("WHARF_SEED") {
        Ok(s) => s.parse().expect("WHARF_SEED is a number"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

fn secs(default: u64) -> u64 {
    std::env::var("WHARF_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn torture_short() {
    let seed = seed();
    each_backend_kind(|backend| run(backend, seed, secs(12)));
    if cfg!(feature = "tls") {
        each_backend_kind(|backend| run_with(backend, seed, secs(12) / 2, true));
    }
}

#[test]
#[ignore = "long version: cargo test --release --test torture -- --ignored (10 min per backend)"]
fn torture_long() {
    let seed = seed();
    each_backend_kind(|backend| {
        let mut rng = Rng(seed | 1);
        let end = Instant::now() + Duration::from_secs(secs(600));
        while Instant::now() < end {
            run(backend, rng.next(), 30);
        }
    });
}
