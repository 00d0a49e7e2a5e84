//! What an idle connection costs on the heap, measured exactly: this test
//! binary counts every byte allocated and not yet freed, so the cost of
//! `n` connections is the growth of that count, with none of the page
//! granularity or allocator caching that blurs a resident-size reading.
//!
//! An idle connection that once echoed a 1,000,000-byte message must cost
//! what a fresh one costs (within 10%): the send queue's tail, the
//! reassembly buffer and the held input it grew for that message are given
//! back when it goes quiet.
//!
//! Any send also leaves a cost that has nothing to do with its size: the
//! write-stall timer armed while it was in flight stays on the loop's timer
//! wheel (24 bytes, in a bucket that grows by doubling) until its tick comes
//! round, up to the stall timeout later, and the emptied bucket then gives
//! its room back. The test shortens that timeout and waits it out, so it
//! measures the message and not the timeout.

mod util;

use std::time::Duration;

use util::counting::{live, Counting};
use util::*;
use wharf::{Conn, Framing, Handler, Server};

/// Echoes; records nothing (a record would be heap of its own).
struct Plain;

impl Handler for Plain {
    type State = ();
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        conn.send(msg).expect("an echo");
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The write-stall timeout of the measured servers.
const STALL: Duration = Duration::from_millis(300);

/// The heap growth per connection of `n` idle connections, each of which
/// first echoed one message of `size` bytes (0: none).
fn heap_per_idle_connection(backend: wharf::Backend, n: usize, size: usize) -> f64 {
    let server = Server::builder()
        .backend(backend)
        .threads(1)
        .framing(Framing::length_prefixed().max_frame(2 << 20))
        .write_stall_timeout(Some(STALL))
        .bind("127.0.0.1:0")
        .unwrap()
        .start(Plain)
        .unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    // Warm up: the loop's first big buffers and the slab's first growth
    // are not any one connection's.
    let mut warm: Vec<_> = (0..4).map(|_| connect(addr)).collect();
    for (i, s) in warm.iter_mut().enumerate() {
        let body = pattern(i, size.max(1));
        write_frame(s, &body);
        assert_eq!(read_frame(s).unwrap(), body);
    }
    wait_until(10, "warm-up", || handle.connections() == 4);
    std::thread::sleep(Duration::from_millis(200));
    // The clients' own vector, made before the count starts too.
    let mut conns = Vec::with_capacity(n);
    let before = live();
    for i in 0..n {
        let mut s = connect(addr);
        if size > 0 {
            let body = pattern(i, size);
            write_frame(&mut s, &body);
            let got = read_frame(&mut s).unwrap();
            assert!(got == body, "echo {i} is corrupt");
        }
        conns.push(s);
    }
    wait_until(10, "every connection open", || {
        handle.connections() == n + 4
    });
    // The loop settles: a send's completion frees its batch's buffers, and
    // the stall timers the sends armed come due and leave the wheel.
    std::thread::sleep(STALL * 2 + Duration::from_millis(300));
    let after = live();
    drop(conns);
    drop(warm);
    server.shutdown(Duration::from_secs(2)).unwrap();
    (after - before) as f64 / n as f64
}

#[test]
fn an_idle_connection_costs_the_same_after_a_big_message() {
    each_backend_kind(|backend| {
        // Interleaved, and the median of three of each: the slab and the
        // id table grow in steps that one run may or may not cross.
        let mut fresh = Vec::new();
        let mut after_big = Vec::new();
        for _ in 0..3 {
            fresh.push(heap_per_idle_connection(backend, 200, 0));
            after_big.push(heap_per_idle_connection(backend, 200, 1_000_000));
        }
        fresh.sort_by(f64::total_cmp);
        after_big.sort_by(f64::total_cmp);
        let (fresh, after_big) = (fresh[1], after_big[1]);
        eprintln!(
            "{backend:?}: heap bytes per idle connection: fresh {fresh:.0}, \
             after a 1,000,000-byte echo {after_big:.0}"
        );
        assert!(
            fresh > 0.0,
            "a connection that costs nothing was not measured"
        );
        assert!(
            fresh < 1024.0,
            "{backend:?}: an idle connection costs {fresh:.0} heap bytes"
        );
        assert!(
            after_big <= fresh * 1.10,
            "{backend:?}: an idle connection keeps {after_big:.0} heap bytes after one big \
             message, {fresh:.0} when fresh"
        );
    });
}
