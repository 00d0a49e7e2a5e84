//! Writing to a reset peer never raises SIGPIPE, even when the host program
//! has put SIGPIPE back to its default action (which kills the process).
//! (One test in this file: it changes the process's signal disposition.)

mod util;

use std::io::Write;
use std::time::Duration;

use util::*;
use wharf::{Conn, Handler};

/// Answers every message with 1 MiB, or with a file of 8 MiB (sent
/// with `sendfile` where the backend has it, which takes no
/// `MSG_NOSIGNAL`).
struct Flood(Option<std::path::PathBuf>);

impl Handler for Flood {
    type State = ();
    fn on_message(&self, conn: &mut Conn<'_, ()>, _msg: &[u8]) {
        match &self.0 {
            Some(path) => {
                let _ = conn.send_file(wharf::FileRange::open(path).unwrap());
            }
            None => {
                let _ = conn.send(&vec![1u8; 1 << 20]);
            }
        }
    }
}

#[test]
fn writes_to_reset_peers_do_not_raise_sigpipe() {
    // SAFETY: sets the default disposition for SIGPIPE; no handler code.
    // (Windows has no SIGPIPE: there the test checks only that writes to
    // reset peers leave the server serving.)
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL)
    };
    let file = std::env::temp_dir().join(format!("wharf-sigpipe-{}", std::process::id()));
    std::fs::write(&file, vec![2u8; 8 << 20]).unwrap();
    for path in [None, Some(file.clone())] {
        each_backend(|b| {
            let server = b
                .threads(2)
                .framing(wharf::Framing::length_prefixed().max_frame(16 << 20))
                .zero_copy_files(true)
                .bind("127.0.0.1:0")
                .unwrap()
                .start(Flood(path.clone()))
                .unwrap();
            let addr = server.local_addr();
            for _ in 0..50 {
                let mut s = connect(addr);
                write_frame(&mut s, b"go");
                std::thread::sleep(Duration::from_millis(2));
                let sock = socket2::Socket::from(s);
                sock.set_linger(Some(Duration::ZERO)).unwrap();
                drop(sock); // RST while the server is still writing
            }
            std::thread::sleep(Duration::from_millis(200));
            // Still alive, still serving.
            let mut s = connect(addr);
            s.write_all(&frame(b"go")).unwrap();
            let want = if path.is_some() { 8 << 20 } else { 1 << 20 };
            assert_eq!(read_frame(&mut s).unwrap().len(), want);
            drop(s);
            server.shutdown(Duration::from_secs(2)).unwrap();
        });
    }
    let _ = std::fs::remove_file(&file);
}
