//! Arbitrary bytes fed to a length-prefixed reader.
//!
//! The first four input bytes choose the framing and the feeding:
//! byte 0 bit 0 the header size (2 or 4), bit 1 little-endian; bytes 1-2 the
//! maximum body (0..=4096); byte 3 the chunk size (0: one chunk). The rest is
//! the byte stream.
//!
//! Checked against a reference decoder of the whole stream: the frames
//! delivered are exactly the reference's, in order, each at most the maximum;
//! a `TooLarge` error comes exactly where the reference finds a declared
//! length over the maximum, and names that length; and the reader never
//! holds more heap than one header plus the maximum body (a counting
//! allocator measures what is live while the reader runs).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::ops::ControlFlow;
use wharf::fuzzing::Reader;
use wharf::{FrameError, Framing};

#[path = "common/counting.rs"]
mod counting;

#[global_allocator]
static ALLOC: counting::Counting = counting::Counting;

/// What the reference decoder makes of the whole stream.
struct Expected<'a> {
    frames: Vec<&'a [u8]>,
    /// The declared length that exceeds the maximum, if any.
    too_large: Option<usize>,
}

fn reference(stream: &[u8], header: usize, little: bool, max: usize) -> Expected<'_> {
    let mut frames = Vec::new();
    let mut pos = 0;
    while stream.len() - pos >= header {
        let h = &stream[pos..pos + header];
        let len = match (header, little) {
            (2, false) => u16::from_be_bytes([h[0], h[1]]) as usize,
            (2, true) => u16::from_le_bytes([h[0], h[1]]) as usize,
            (_, false) => u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize,
            (_, true) => u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize,
        };
        if len > max {
            return Expected {
                frames,
                too_large: Some(len),
            };
        }
        if stream.len() - pos - header < len {
            break;
        }
        frames.push(&stream[pos + header..pos + header + len]);
        pos += header + len;
    }
    Expected {
        frames,
        too_large: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let [cfg, m0, m1, chunk, stream @ ..] = data else {
        return;
    };
    let header = if cfg & 1 == 0 { 2 } else { 4 };
    let little = cfg & 2 != 0;
    let max = usize::from(u16::from_le_bytes([*m0, *m1])) % 4097;
    let mut lp = Framing::length_prefixed().header_len(header).max_frame(max);
    if little {
        lp = lp.little_endian();
    }
    let framing: Framing = lp.into();
    assert_eq!(framing.max_frame(), max);

    let expected = reference(stream, header, little, max);
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
                |msg| {
                    assert!(msg.len() <= max, "frame of {} > max {max}", msg.len());
                    assert!(
                        delivered < expected.frames.len(),
                        "more frames than the stream holds"
                    );
                    assert_eq!(msg, expected.frames[delivered], "frame {delivered}");
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
    assert!(
        peak <= (header + max) as isize,
        "reader held {peak} heap bytes, more than header {header} + max {max}"
    );
    assert_eq!(delivered, expected.frames.len(), "frames delivered");
    match (error, expected.too_large) {
        (None, None) => {}
        (Some(FrameError::TooLarge { len, max: m }), Some(declared)) => {
            assert_eq!(m, max);
            assert_eq!(len, declared);
            assert!(len > max);
        }
        (got, want) => panic!("error {got:?}, expected a TooLarge for {want:?}"),
    }
    drop(reader);
});
