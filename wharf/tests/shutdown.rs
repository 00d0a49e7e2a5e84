//! Graceful shutdown: queued data arrives, then FIN; nothing runs after.
//! (One test in this file: it counts the process's threads.)

mod util;

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use util::*;
use wharf::{CloseReason, Conn, Handler};

const FRAMES: usize = 200;
const FRAME: usize = 64 * 1024;

#[derive(Default, Clone)]
struct Flood {
    stopped: Arc<AtomicBool>,
    late_callbacks: Arc<AtomicUsize>,
    closes: Arc<AtomicUsize>,
}

impl Flood {
    fn check(&self) {
        if self.stopped.load(Ordering::SeqCst) {
            self.late_callbacks.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Handler for Flood {
    type State = ();
    fn on_message(&self, conn: &mut Conn<'_, ()>, _msg: &[u8]) {
        self.check();
        for i in 0..FRAMES {
            conn.send(&pattern(i, FRAME)).unwrap();
        }
    }
    fn on_close(&self, _conn: &mut Conn<'_, ()>, reason: CloseReason) {
        self.check();
        assert_eq!(reason, CloseReason::Shutdown);
        self.closes.fetch_add(1, Ordering::SeqCst);
    }
}

/// The running loop threads, from /proc (`None` where there is none).
fn loop_threads() -> Option<usize> {
    if cfg!(windows) {
        eprintln!("SKIPPED the loop-thread count on Windows: it reads /proc/self/task");
        return None;
    }
    let count = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("wharf-loop"))
        .count();
    Some(count)
}

#[test]
fn shutdown_delivers_queued_data_then_closes_and_joins() {
    each_backend(|b| {
        let flood = Flood::default();
        let server = b
            .threads(2)
            .send_water_marks(64 << 20, 32 << 20)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(flood.clone())
            .unwrap();
        if let Some(n) = loop_threads() {
            assert_eq!(n, 2);
        }
        let handle = server.handle();
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let mut s = connect(server.local_addr());
                write_frame(&mut s, b"go");
                s
            })
            .collect();
        // Every client's 12.5 MiB is queued before shutdown starts; the
        // clients have not read a byte yet.
        wait_until(10, "all queued", || {
            handle.stats().messages_out == (4 * FRAMES) as u64
        });
        let readers: Vec<_> = readers
            .into_iter()
            .map(|mut s| {
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    for i in 0..FRAMES {
                        let got = read_frame(&mut s).expect("queued frame");
                        assert!(got == pattern(i, FRAME), "frame {i} differs");
                    }
                    let t = std::time::Instant::now();
                    let mut rest = Vec::new();
                    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "FIN after the data");
                    eprintln!("FIN {:?} after the last frame", t.elapsed());
                })
            })
            .collect();
        let t = std::time::Instant::now();
        server.shutdown(Duration::from_secs(20)).unwrap();
        eprintln!("shutdown took {:?}", t.elapsed());
        flood.stopped.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(flood.closes.load(Ordering::SeqCst), 4);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(flood.late_callbacks.load(Ordering::SeqCst), 0);
        if let Some(n) = loop_threads() {
            assert_eq!(n, 0, "every loop thread joined");
        }
        assert_eq!(
            handle.broadcast(wharf::Bytes::from_static(b"late")),
            Err(wharf::SendError::Stopped)
        );
    });
}
