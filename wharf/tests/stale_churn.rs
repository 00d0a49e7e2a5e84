//! Stale ids under churn: connections close and their slots are reused over
//! and over while another thread keeps sending to recent ids, old and new.
//! Not one byte meant for an old connection may reach a new one.

mod util;

use std::collections::VecDeque;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;
use wharf::{Bytes, Conn, ConnId, Handler, SendError};

/// Greets each connection with its own id and remembers recent ids.
#[derive(Default, Clone)]
struct Tagger {
    recent: Arc<Mutex<VecDeque<ConnId>>>,
}

impl Handler for Tagger {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        conn.send(&conn.id().as_u128().to_be_bytes()).unwrap();
        let mut recent = self.recent.lock().unwrap();
        recent.push_back(conn.id());
        if recent.len() > 32 {
            recent.pop_front();
        }
        wharf::Accept::Yes
    }
    fn on_message(&self, _conn: &mut Conn<'_, ()>, _msg: &[u8]) {}
}

fn stale_churn(cycles: usize) {
    each_backend(|b| {
        let tagger = Tagger::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(tagger.clone())
            .unwrap();
        let addr = server.local_addr();
        let handle = server.handle();
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let racer = {
            let (stop, sent, refused, recent) = (
                stop.clone(),
                sent.clone(),
                refused.clone(),
                tagger.recent.clone(),
            );
            let handle = handle.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ids: Vec<ConnId> = recent.lock().unwrap().iter().copied().collect();
                    for id in ids {
                        match handle.send(id, Bytes::copy_from_slice(&id.as_u128().to_be_bytes())) {
                            Ok(()) => sent.fetch_add(1, Ordering::Relaxed),
                            Err(SendError::Closed) => refused.fetch_add(1, Ordering::Relaxed),
                            // A client that has stopped reading (it reads
                            // once, then closes) may be over its high-water
                            // mark while a slow machine (Wine) has not run
                            // its close yet: a legitimate answer, not a
                            // stale delivery.
                            Err(SendError::Backpressure) => 0,
                            Err(e) => panic!("unexpected {e}"),
                        };
                    }
                    std::thread::yield_now();
                }
            })
        };
        let checked = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let checked = checked.clone();
                std::thread::spawn(move || {
                    for _ in 0..cycles / 4 {
                        let mut s = connect(addr);
                        let me = read_frame(&mut s).unwrap();
                        // Whatever else has arrived must be addressed to me.
                        s.set_nonblocking(true).unwrap();
                        let mut rest = Vec::new();
                        let _ = s.read_to_end(&mut rest);
                        let mut at = 0;
                        while rest.len() >= at + 20 {
                            let body = &rest[at + 4..at + 20];
                            assert_eq!(body, &me[..], "a message for another connection arrived");
                            at += 20;
                            checked.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        let (sent, refused, checked) = (
            sent.load(Ordering::SeqCst),
            refused.load(Ordering::SeqCst),
            checked.load(Ordering::SeqCst),
        );
        eprintln!("{cycles} cycles: {sent} racing sends accepted, {refused} refused as stale, {checked} delivered and checked");
        assert!(refused > 0 && checked > 0, "the race was not exercised");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn stale_ids_under_churn_twenty_thousand_cycles() {
    stale_churn(20_000);
}

#[test]
#[ignore = "long version: cargo test --test stale_churn -- --ignored"]
fn stale_ids_under_churn_hundred_thousand_cycles() {
    stale_churn(100_000);
}
