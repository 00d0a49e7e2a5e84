//! Helpers shared by the integration tests: servers on loopback, blocking
//! clients that speak the length-prefixed framing, and resource counters.
#![allow(dead_code, unreachable_pub)]

pub mod counting;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "tls")]
pub mod tls;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wharf::{Backend, Builder, CloseReason, Conn, ConnId, Handler, Server};

/// The backends this platform has. Every test runs against each of them
/// through [`each_backend`].
pub fn backends() -> Vec<Backend> {
    let mut v = if cfg!(target_os = "linux") {
        vec![Backend::Uring, Backend::Poll]
    } else if cfg!(windows) {
        vec![Backend::Iocp]
    } else {
        vec![Backend::Poll]
    };
    if let Ok(only) = std::env::var("WHARF_BACKEND") {
        v.retain(|b| format!("{b:?}").eq_ignore_ascii_case(&only));
    }
    v
}

/// Runs `test` once per backend, with a builder preset for it.
pub fn each_backend(test: impl Fn(Builder)) {
    for backend in backends() {
        eprintln!("-- backend {backend:?}");
        test(Server::builder().backend(backend));
    }
}

/// Runs `test` once per backend, given the backend (for tests that build
/// more than one server).
pub fn each_backend_kind(test: impl Fn(Backend)) {
    for backend in backends() {
        eprintln!("-- backend {backend:?}");
        test(backend);
    }
}

/// Echoes every message back; counts opens and closes.
#[derive(Default, Clone)]
pub struct Echo {
    pub opened: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
    pub reasons: Arc<Mutex<Vec<CloseReason>>>,
    pub ids: Arc<Mutex<Vec<ConnId>>>,
    /// The peer address of each id in `ids`, in the same order.
    pub peers: Arc<Mutex<Vec<std::net::SocketAddr>>>,
}

impl Handler for Echo {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.opened.fetch_add(1, Ordering::SeqCst);
        // Both under one lock order: ids first, then peers.
        let mut ids = self.ids.lock().unwrap();
        ids.push(conn.id());
        self.peers.lock().unwrap().push(conn.peer_addr());
        wharf::Accept::Yes
    }
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        conn.send(msg).expect("echo send");
    }
    fn on_close(&self, _conn: &mut Conn<'_, ()>, reason: CloseReason) {
        self.reasons.lock().unwrap().push(reason);
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

pub fn write_frame(s: &mut TcpStream, body: &[u8]) {
    s.write_all(&frame(body)).expect("write frame");
}

pub fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    let mut body = vec![0u8; u32::from_be_bytes(h) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// A recognisable payload: byte i of message `seed` is (seed * 31 + i) mod 251.
pub fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((seed * 31 + i) % 251) as u8).collect()
}

/// Waits until `cond` holds, or panics after `secs`.
pub fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends `msg` to `id` from another thread until back-pressure holds: a
/// send is refused and the connection stays unwritable for 200 ms. A
/// refusal alone is not enough: it can come from bytes still in transit
/// to the loop, which a slow loop (Wine, a loaded machine) then hands to
/// kernel buffers that still had room. Returns the bytes accepted; panics
/// if more than `bound` were taken from a peer that reads nothing.
pub fn fill_until_held(
    handle: &wharf::Handle,
    id: ConnId,
    msg: &wharf::Bytes,
    bound: usize,
) -> usize {
    let mut accepted = 0usize;
    loop {
        match handle.send(id, msg.clone()) {
            Ok(()) => accepted += msg.len(),
            Err(wharf::SendError::Backpressure) => {
                if handle.wait_writable(id, Duration::from_millis(200)) == Ok(false) {
                    return accepted;
                }
            }
            Err(e) => panic!("unexpected send error {e}"),
        }
        assert!(
            accepted < bound,
            "{accepted} bytes accepted for a peer that reads nothing"
        );
    }
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident set size of this process in KiB.
pub fn rss_kib() -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Threads of this process.
pub fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether time bounds mean anything in this run: not under Wine
/// (`scripts/test-windows.sh` sets `WHARF_UNDER_WINE`), skipped loudly.
pub fn timing_bounds_apply(what: &str) -> bool {
    // Set by scripts/test-windows.sh: Wine's heap and scheduling make a
    // debug build's loop turns much longer than Windows' or Linux's.
    if std::env::var_os("WHARF_UNDER_WINE").is_some() {
        eprintln!("SKIPPED the time bound of {what} under Wine: Wine's timings are not Windows'");
        return false;
    }
    true
}

/// Whether RSS bounds mean anything in this run: under AddressSanitizer
/// (`scripts/asan.sh` sets `WHARF_SANITIZER`) redzones, shadow memory and
/// the quarantine inflate RSS, so such bounds are skipped, loudly; and on
/// Windows there is no /proc to read RSS from.
pub fn memory_bounds_apply(what: &str) -> bool {
    if cfg!(windows) {
        eprintln!("SKIPPED the memory bound of {what} on Windows: it reads /proc/self/status");
        return false;
    }
    match std::env::var("WHARF_SANITIZER") {
        Ok(s) => {
            eprintln!("SKIPPED the memory bound of {what}: running under the {s} sanitizer");
            false
        }
        Err(_) => true,
    }
}
