//! Arbitrary bytes fed to a line reader.
//!
//! The first three input bytes choose the framing and the feeding: bytes
//! 0-1 the maximum line (0..=4096), byte 2 the chunk size (0: one chunk).
//! The rest is the byte stream.
//!
//! Checked against a reference that splits the whole stream at LF: the
//! lines delivered are exactly the reference's, in order, without LF or a
//! CR before it, each at most the maximum; a `TooLarge` comes exactly when
//! the reference finds a line over the maximum (or an unended one that can
//! no longer fit); and the reader never holds more heap than the maximum
//! line plus one chunk (a counting allocator measures what is live, and
//! a `Vec` may hold up to twice what it holds).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::ops::ControlFlow;
use wharf::fuzzing::Reader;
use wharf::{FrameError, Framing};

#[path = "common/counting.rs"]
mod counting;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

/// The lines of the whole stream up to the first one over `max`, and
/// whether there is one.
fn reference(stream: &[u8], max: usize) -> (Vec<&[u8]>, bool) {
    let mut lines = Vec::new();
    let mut rest = stream;
    while let Some(lf) = rest.iter().position(|&b| b == b'\n') {
        let mut line = &rest[..lf];
        if line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        if line.len() > max {
            return (lines, true);
        }
        lines.push(line);
        rest = &rest[lf + 1..];
    }
    // An unended line is over the limit once it could not be one of `max`
    // bytes plus a CR.
    let over = rest.len() > max + 1 || (rest.len() == max + 1 && rest[max] != b'\r');
    (lines, over)
}

fuzz_target!(|data: &[u8]| {
    let [m0, m1, chunk, stream @ ..] = data else {
        return;
    };
    let max = usize::from(u16::from_le_bytes([*m0, *m1])) % 4097;
    let framing: Framing = Framing::lines().max_line(max).into();
    assert_eq!(framing.max_frame(), max);
    let (expected, too_large) = reference(stream, max);
    let chunk = if *chunk == 0 {
        stream.len().max(1)
    } else {
        usize::from(*chunk)
    };

    let mut reader = Reader::new(&framing);
    let mut rest = Vec::new();
    let mut delivered = 0;
    let mut error = None;
    counting::reset();
    for piece in stream.chunks(chunk) {
        let result = counting::measure(|| {
            reader.feed_until(
                piece,
                |line| {
                    assert!(line.len() <= max, "line of {} > max {max}", line.len());
                    assert!(
                        delivered < expected.len(),
                        "more lines than the stream holds"
                    );
                    assert_eq!(line, expected[delivered], "line {delivered}");
                    delivered += 1;
                    ControlFlow::Continue(())
                },
                &mut rest,
            )
        });
        assert!(rest.is_empty(), "rest filled without a break");
        if let Err(e) = result {
            error = Some(e);
            break; // the engine closes the connection
        }
    }
    let peak = counting::peak();
    // (A small `Vec` starts at 8 bytes of capacity.)
    let bound = 2 * (max + 2 + chunk.min(stream.len())) as isize + 8;
    assert!(
        peak <= bound,
        "reader held {peak} heap bytes, over {bound} (max {max}, chunk {chunk})"
    );
    assert_eq!(delivered, expected.len(), "lines delivered");
    match (error, too_large) {
        (None, false) => {}
        (Some(FrameError::TooLarge { len, max: m }), true) => {
            assert_eq!(m, max);
            assert!(len > max, "TooLarge of {len} for max {max}");
        }
        (got, want) => panic!("error {got:?}, expected a TooLarge: {want}"),
    }
    drop(reader);
});
