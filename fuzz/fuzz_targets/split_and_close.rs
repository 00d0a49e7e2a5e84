//! The codec under arbitrary chunk splits, back-pressure breaks and closes.
//!
//! Messages are encoded into one wire stream, which arrives in the given
//! chunks. The reader is driven the way the engine drives it
//! (`event_loop::conn_life`): `on_message` answers `Break` after the chosen
//! frames (the send queue went over its high mark), the undelivered bytes go
//! to a stash, chunks that arrive while paused are appended to the stash, and
//! when the queue drains the stash is fed again. The stream may end early
//! (the peer closed mid-stream) or the handler may close after some frame.
//!
//! The frames delivered must be the messages, in order: all those wholly
//! received, or exactly up to the frame the handler closed on. Raw framing
//! must deliver the received bytes, in order, in non-empty messages.
#![no_main]

use arbitrary::Arbitrary;
use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use std::ops::ControlFlow;
use wharf::fuzzing::Reader;
use wharf::{Codec, Decoded, FrameError, Framing};

const MAX_MESSAGES: usize = 64;
const MAX_MESSAGE: usize = 600;

#[derive(Arbitrary, Debug)]
enum Kind {
    LengthPrefixed {
        four_byte_header: bool,
        little_endian: bool,
        /// Taken modulo 1024, so that some messages are over the maximum.
        max: u16,
    },
    Lines,
    Raw,
}

#[derive(Arbitrary, Debug)]
enum Close {
    /// The handler closes the connection in `on_message` of this frame.
    AfterFrame(u8),
    /// The peer closes after sending this many bytes of the wire stream.
    AtByte(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    kind: Kind,
    messages: Vec<Vec<u8>>,
    /// Chunk sizes; what is left after them arrives as one last chunk.
    chunks: Vec<u16>,
    /// Frames (counted from 0 over the whole connection) after which
    /// `on_message` answers `Break`.
    breaks: Vec<u8>,
    /// After each break, how many chunks (modulo 4) arrive before the queue
    /// drains, cycling through the list (none if empty).
    pauses: Vec<u8>,
    close: Option<Close>,
}

/// Newline-delimited messages.
struct Lines;

impl Codec for Lines {
    fn decode(&mut self, buf: &[u8]) -> Result<Decoded, FrameError> {
        Ok(match buf.iter().position(|&b| b == b'\n') {
            Some(i) => Decoded::Frame {
                start: 0,
                end: i,
                consumed: i + 1,
            },
            None => Decoded::Incomplete(None),
        })
    }

    fn encode(&mut self, msg: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        if msg.contains(&b'\n') {
            return Err(FrameError::Invalid("newline in a line".into()));
        }
        dst.extend_from_slice(msg);
        dst.put_u8(b'\n');
        Ok(())
    }
}

/// The engine's view of one connection.
struct Conn<'a> {
    input: &'a Input,
    reader: Reader,
    stash: Vec<u8>,
    delivered: Vec<Vec<u8>>,
    /// Chunks still to arrive before the queue drains; `Some` while paused.
    paused: Option<u8>,
    breaks_taken: usize,
    closed: bool,
}

impl Conn<'_> {
    /// `conn_life::received`: deliver, or stash while paused.
    fn received(&mut self, data: &[u8]) {
        if self.closed {
            return;
        }
        if self.paused.is_some() || !self.stash.is_empty() {
            self.stash.extend_from_slice(data);
        } else {
            self.deliver(data);
        }
    }

    /// `conn_life::deliver`: feed, with `Break` after the chosen frames.
    fn deliver(&mut self, data: &[u8]) {
        let Conn {
            input,
            reader,
            stash,
            delivered,
            closed,
            ..
        } = self;
        assert!(stash.is_empty());
        let mut broke = false;
        let result = reader.feed_until(
            data,
            |msg| {
                let k = delivered.len();
                delivered.push(msg.to_vec());
                let close_here =
                    matches!(input.close, Some(Close::AfterFrame(c)) if usize::from(c) == k);
                if close_here {
                    *closed = true;
                }
                if close_here || input.breaks.iter().any(|&b| usize::from(b) == k) {
                    broke = true;
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
            stash,
        );
        result.expect("a well-formed stream gave a framing error");
        if self.closed {
            self.stash = Vec::new();
        } else if broke {
            let pauses = &self.input.pauses;
            let n = match pauses.len() {
                0 => 0,
                len => pauses[self.breaks_taken % len] % 4,
            };
            self.breaks_taken += 1;
            self.paused = Some(n);
        } else {
            assert!(self.stash.is_empty(), "rest filled without a break");
        }
    }

    /// One chunk has arrived: count it against the pause, and drain if due.
    fn tick(&mut self) {
        if let Some(n) = self.paused {
            self.paused = Some(n.saturating_sub(1));
        }
        self.drain();
    }

    /// `conn_life` on a drained queue: once no more chunks are to arrive
    /// while paused, feed the stash again (it may break and pause again).
    fn drain(&mut self) {
        while matches!(self.paused, None | Some(0)) && !self.closed {
            self.paused = None;
            if self.stash.is_empty() {
                break;
            }
            let stash = std::mem::take(&mut self.stash);
            self.deliver(&stash);
        }
    }
}

fuzz_target!(|input: Input| {
    let framing: Framing = match input.kind {
        Kind::LengthPrefixed {
            four_byte_header,
            little_endian,
            max,
        } => {
            let lp = Framing::length_prefixed()
                .header_len(if four_byte_header { 4 } else { 2 })
                .max_frame(usize::from(max) % 1024);
            if little_endian {
                lp.little_endian().into()
            } else {
                lp.into()
            }
        }
        Kind::Lines => Framing::custom(|| Lines),
        Kind::Raw => Framing::raw(),
    };
    let lines = matches!(input.kind, Kind::Lines);
    let raw = matches!(input.kind, Kind::Raw);

    // Encode: `ends[i]` is where message i ends on the wire.
    let mut writer = Reader::new(&framing);
    let mut wire = Vec::new();
    let mut messages = Vec::new();
    let mut ends = Vec::new();
    for msg in input.messages.iter().take(MAX_MESSAGES) {
        let mut msg = msg[..msg.len().min(MAX_MESSAGE)].to_vec();
        if lines {
            msg.iter_mut()
                .filter(|b| **b == b'\n')
                .for_each(|b| *b = b' ');
        }
        match writer.encode(&msg, &mut wire) {
            Ok(()) => {
                messages.push(msg);
                ends.push(wire.len());
            }
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, msg.len());
                assert!(len > max && max == framing.max_frame());
            }
            Err(e) => panic!("encoding {} bytes: {e}", msg.len()),
        }
    }

    let received = match input.close {
        Some(Close::AtByte(n)) => usize::from(n).min(wire.len()),
        _ => wire.len(),
    };
    let mut conn = Conn {
        input: &input,
        reader: Reader::new(&framing),
        stash: Vec::new(),
        delivered: Vec::new(),
        paused: None,
        breaks_taken: 0,
        closed: false,
    };
    let mut at = 0;
    for &size in &input.chunks {
        let end = (at + usize::from(size)).min(received);
        conn.received(&wire[at..end]);
        conn.tick();
        at = end;
    }
    if at < received {
        conn.received(&wire[at..received]);
    }
    // The queue drains after the stream has ended.
    while conn.paused.is_some() {
        conn.paused = Some(0);
        conn.drain();
    }
    assert!(conn.closed || conn.stash.is_empty());

    let delivered = conn.delivered;
    if raw {
        assert!(delivered.iter().all(|m| !m.is_empty()), "empty raw message");
        let bytes = delivered.concat();
        if conn.closed {
            assert!(wire[..received].starts_with(&bytes));
        } else {
            assert_eq!(bytes, wire[..received]);
        }
        return;
    }
    let whole = ends.iter().take_while(|&&end| end <= received).count();
    let closed_at = match input.close {
        Some(Close::AfterFrame(k)) if usize::from(k) < whole => Some(usize::from(k)),
        _ => None,
    };
    assert_eq!(conn.closed, closed_at.is_some(), "closed by the handler");
    let want = closed_at.map_or(whole, |k| k + 1);
    assert_eq!(delivered.len(), want, "number of frames delivered");
    assert_eq!(delivered, messages[..want], "frames delivered");
});
