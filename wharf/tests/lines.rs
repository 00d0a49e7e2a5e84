//! Line framing end to end: what a person types into `nc` or telnet (LF or
//! CRLF, split anywhere) arrives as lines without their terminators, and a
//! line over the maximum closes the connection with `FrameTooLarge`.

mod util;

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use util::*;
use wharf::{CloseReason, Framing};

#[test]
fn typed_lines_come_back_as_lines() {
    each_backend(|b| {
        let h = Echo::default();
        let server = b
            .threads(1)
            .framing(Framing::lines().max_line(64))
            .bind("127.0.0.1:0")
            .unwrap()
            .start(h.clone())
            .unwrap();
        let mut c = connect(server.local_addr());
        // Typed in pieces, with both terminators.
        for piece in [&b"hel"[..], b"lo\r", b"\nwor", b"ld\n\n", b"last\r\n"] {
            c.write_all(piece).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut r = BufReader::new(c.try_clone().unwrap());
        for want in ["hello", "world", "", "last"] {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, format!("{want}\n"));
        }
        // 65 bytes with no end in sight: closed, reason recorded.
        c.write_all(&[b'x'; 65]).unwrap();
        let mut rest = String::new();
        assert_eq!(r.read_line(&mut rest).unwrap_or(0), 0, "got {rest:?}");
        wait_until(10, "on_close", || h.reasons.lock().unwrap().len() == 1);
        let reason = h.reasons.lock().unwrap()[0].clone();
        assert!(
            matches!(reason, CloseReason::FrameTooLarge { len, max: 64 } if len > 64),
            "{reason:?}"
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
