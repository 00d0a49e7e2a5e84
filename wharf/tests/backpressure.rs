//! Back-pressure: send queues are bounded, slow peers pause, drains resume.

mod util;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::*;
use wharf::{Bytes, Conn, ConnId, Handler};

#[derive(Default, Clone)]
struct Drains {
    ids: Arc<Mutex<Vec<ConnId>>>,
    drained: Arc<AtomicUsize>,
}

impl Handler for Drains {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.ids.lock().unwrap().push(conn.id());
        wharf::Accept::Yes
    }
    fn on_message(&self, _conn: &mut Conn<'_, ()>, _msg: &[u8]) {}
    fn on_drain(&self, _conn: &mut Conn<'_, ()>) {
        self.drained.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn handle_send_refuses_over_the_high_mark_and_drain_resumes() {
    each_backend(|b| {
        let h = Drains::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let handle = server.handle();
        let mut client = connect(server.local_addr());
        wait_until(10, "open", || h.ids.lock().unwrap().len() == 1);
        let id = h.ids.lock().unwrap()[0];
        // The client does not read: the kernel's buffers fill, then the
        // queue passes 64 KiB and sends are refused.
        let chunk = Bytes::from(vec![7u8; 16 * 1024]);
        let sent = fill_until_held(&handle, id, &chunk, 64 << 20) / chunk.len();
        eprintln!("refused after {sent} × 16 KiB (most sit in kernel buffers)");
        // The kernel may have taken more meanwhile (its buffers grow), so
        // drains before the client reads are possible; one more must follow.
        let drained_before = h.drained.load(Ordering::SeqCst);
        // Reading drains it: on_drain runs and sending works again.
        let reader = std::thread::spawn(move || {
            let mut got = 0usize;
            let mut buf = vec![0u8; 1 << 16];
            while got < sent * (16 * 1024 + 4) {
                got += client.read(&mut buf).unwrap();
            }
            client
        });
        wait_until(10, "on_drain", || {
            h.drained.load(Ordering::SeqCst) > drained_before
        });
        let mut client = reader.join().unwrap();
        handle.send(id, Bytes::from_static(b"again")).unwrap();
        assert_eq!(read_frame(&mut client).unwrap(), b"again");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn a_peer_that_stops_reading_pauses_its_own_reading_and_loses_nothing() {
    each_backend(|b| {
        // `Echo` panics if a send is ever refused: pausing must stop the
        // flow of messages before the queue can pass its mark.
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let client = connect(server.local_addr());
        let mut writer = client.try_clone().unwrap();
        let total = 32 << 20;
        let written = Arc::new(AtomicUsize::new(0));
        let w = written.clone();
        let writing = std::thread::spawn(move || {
            let mut wire = Vec::new();
            for i in 0..total / 1024 {
                wire.extend(frame(&pattern(i, 1020)));
                if wire.len() >= 64 * 1024 {
                    writer.write_all(&wire).unwrap();
                    w.fetch_add(wire.len(), Ordering::SeqCst);
                    wire.clear();
                }
            }
            writer.write_all(&wire).unwrap();
            w.fetch_add(wire.len(), Ordering::SeqCst);
        });
        // Nobody reads for a second: the writer must stall far short of the
        // total (kernel buffers plus the server's high mark, not 32 MiB).
        std::thread::sleep(Duration::from_secs(1));
        let stalled_at = written.load(Ordering::SeqCst);
        eprintln!(
            "writer stalled at {} KiB of {} KiB",
            stalled_at >> 10,
            total >> 10
        );
        assert!(
            stalled_at < total / 2,
            "the server kept reading a peer that does not read"
        );
        let mut client = client;
        for i in 0..total / 1024 {
            let got = read_frame(&mut client).unwrap();
            assert!(got == pattern(i, 1020), "echo {i} differs");
        }
        writing.join().unwrap();
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
