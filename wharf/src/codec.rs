//! Framing: cutting a TCP byte stream into messages and writing messages in
//! wire form. Sans-IO: this module never sees a socket, only byte slices.
//!
//! Decoding is zero-copy whenever it can be: a frame that lies entirely inside
//! a received chunk is handed out as a slice of that chunk. Only a frame that
//! spans chunks is reassembled, in the reader's `pending` buffer, and each of
//! its bytes is copied exactly once.

use bytes::{Bytes, BytesMut};
use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

/// Above this capacity an empty reassembly buffer is freed rather than kept
/// for the next frame, so that an idle connection does not hold on to the
/// memory of the largest message it ever received.
const KEEP_PENDING_CAPACITY: usize = 64 * 1024;

/// How a connection's byte stream is cut into messages.
#[derive(Clone)]
pub enum Framing {
    /// A header holding the body length, then the body (the default: 4-byte
    /// big-endian, 1 MiB max).
    LengthPrefixed(LengthPrefixed),
    /// No framing: every received chunk is a message, every send is written
    /// as is.
    Raw,
    /// The user's own codec; the function makes one codec per connection.
    Custom(Arc<dyn Fn() -> Box<dyn Codec> + Send + Sync>),
}

impl Default for Framing {
    fn default() -> Self {
        Framing::LengthPrefixed(LengthPrefixed::default())
    }
}

impl fmt::Debug for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Framing::LengthPrefixed(lp) => f.debug_tuple("LengthPrefixed").field(lp).finish(),
            Framing::Raw => f.write_str("Raw"),
            Framing::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl From<LengthPrefixed> for Framing {
    fn from(lp: LengthPrefixed) -> Self {
        Framing::LengthPrefixed(lp)
    }
}

impl Framing {
    /// Length-prefixed framing with the default settings, to be refined with
    /// the builder methods of [`LengthPrefixed`] and turned into a `Framing`
    /// with `.into()`.
    pub fn length_prefixed() -> LengthPrefixed {
        LengthPrefixed::default()
    }

    /// No framing: every received chunk is a message.
    pub fn raw() -> Framing {
        Framing::Raw
    }

    /// The user's own framing; `make` is called once per connection.
    pub fn custom<C: Codec, F: Fn() -> C + Send + Sync + 'static>(make: F) -> Framing {
        Framing::Custom(Arc::new(move || Box::new(make()) as Box<dyn Codec>))
    }

    /// Largest message this framing accepts (`usize::MAX` for raw and custom).
    pub fn max_frame(&self) -> usize {
        match self {
            Framing::LengthPrefixed(lp) => lp.max_frame,
            Framing::Raw | Framing::Custom(_) => usize::MAX,
        }
    }

    /// A fresh decoding state, one per connection.
    pub(crate) fn reader(&self) -> FrameReader {
        let codec = match self {
            Framing::LengthPrefixed(lp) => ReaderCodec::LengthPrefixed(*lp),
            Framing::Raw => ReaderCodec::Raw,
            Framing::Custom(make) => ReaderCodec::Custom(make()),
        };
        FrameReader {
            codec,
            pending: Vec::new(),
            need: None,
        }
    }

    /// Encodes a message once, for sending the same bytes to many connections
    /// (broadcast). A custom framing encodes with a fresh codec, so a codec
    /// whose encoding depends on per-connection state must not be broadcast.
    pub(crate) fn encode_shared(&self, msg: &[u8]) -> Result<Bytes, FrameError> {
        let mut dst = BytesMut::new();
        self.reader().encode(msg, &mut dst)?;
        Ok(dst.freeze())
    }
}

/// Settings of the length-prefixed framing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LengthPrefixed {
    header_len: usize,
    little_endian: bool,
    max_frame: usize,
}

impl Default for LengthPrefixed {
    /// A 4-byte big-endian header and a 1 MiB maximum body.
    fn default() -> Self {
        LengthPrefixed {
            header_len: 4,
            little_endian: false,
            max_frame: 1 << 20,
        }
    }
}

impl LengthPrefixed {
    /// Sets the largest body accepted, clamped to what the header can express
    /// (65 535 for a 2-byte header, `u32::MAX` for a 4-byte one). A peer that
    /// announces a larger body is disconnected before anything is allocated.
    pub fn max_frame(self, max: usize) -> Self {
        LengthPrefixed {
            max_frame: max.min(self.header_limit()),
            ..self
        }
    }

    /// Writes and reads the length in little-endian order (big-endian otherwise).
    pub fn little_endian(self) -> Self {
        LengthPrefixed {
            little_endian: true,
            ..self
        }
    }

    /// Sets the header size in bytes; the maximum body is clamped to what the
    /// new header can express.
    ///
    /// # Panics
    ///
    /// If `n` is neither 2 nor 4.
    pub fn header_len(self, n: usize) -> Self {
        assert!(
            n == 2 || n == 4,
            "LengthPrefixed::header_len must be 2 or 4, not {n}"
        );
        let lp = LengthPrefixed {
            header_len: n,
            ..self
        };
        lp.max_frame(lp.max_frame)
    }

    /// The header size in bytes (2 or 4).
    pub fn header_size(&self) -> usize {
        self.header_len
    }

    /// The largest body the header can express; on 32-bit targets also what
    /// a `Vec` can hold with the header, so `header + body` cannot overflow.
    fn header_limit(&self) -> usize {
        let limit = if self.header_len == 2 {
            u32::from(u16::MAX)
        } else {
            u32::MAX
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        limit.min(isize::MAX as usize - 4)
    }

    fn too_large(&self, len: usize) -> FrameError {
        FrameError::TooLarge {
            len,
            max: self.max_frame,
        }
    }

    /// The header for a body of `len` bytes: the bytes to write are
    /// `hdr[..used_len]`.
    pub(crate) fn header(&self, len: usize) -> Result<([u8; 4], usize), FrameError> {
        if len > self.max_frame {
            return Err(self.too_large(len));
        }
        let mut hdr = [0; 4];
        // `len <= max_frame`, which `max_frame()` clamps to the header's range,
        // so these casts do not truncate.
        match (self.header_len, self.little_endian) {
            (2, false) => hdr[..2].copy_from_slice(&(len as u16).to_be_bytes()),
            (2, true) => hdr[..2].copy_from_slice(&(len as u16).to_le_bytes()),
            (_, false) => hdr = (len as u32).to_be_bytes(),
            (_, true) => hdr = (len as u32).to_le_bytes(),
        }
        Ok((hdr, self.header_len))
    }

    fn decode(&self, buf: &[u8]) -> Result<Decoded, FrameError> {
        let h = self.header_len;
        let Some(hdr) = buf.get(..h) else {
            return Ok(Decoded::Incomplete(Some(h)));
        };
        let declared = match (h, self.little_endian) {
            (2, false) => u32::from(u16::from_be_bytes([hdr[0], hdr[1]])),
            (2, true) => u32::from(u16::from_le_bytes([hdr[0], hdr[1]])),
            (_, false) => u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
            (_, true) => u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]),
        };
        // Checked here, before the caller reserves room for the body: a
        // hostile header must not make us allocate what it announces.
        let len = usize::try_from(declared).unwrap_or(usize::MAX);
        if len > self.max_frame {
            return Err(self.too_large(len));
        }
        let end = h + len; // no overflow: see `header_limit`
        if buf.len() < end {
            Ok(Decoded::Incomplete(Some(end)))
        } else {
            Ok(Decoded::frame(h, end, end))
        }
    }
}

/// The user's own framing. `decode` is called with bytes that start at a
/// frame boundary.
pub trait Codec: Send + 'static {
    /// Looks for one frame at the start of `buf`.
    fn decode(&mut self, buf: &[u8]) -> Result<Decoded, FrameError>;
    /// Appends `msg` in wire form to `dst`.
    fn encode(&mut self, msg: &[u8], dst: &mut BytesMut) -> Result<(), FrameError>;
}

/// What `Codec::decode` found at the start of the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole frame: the message is `buf[start..end]`; `consumed` (>= end,
    /// > 0) bytes of `buf` belong to it.
    Frame {
        /// Where the message starts in `buf`.
        start: usize,
        /// Where the message ends in `buf` (exclusive).
        end: usize,
        /// How many bytes of `buf` the frame takes, header and trailer included.
        consumed: usize,
    },
    /// Not enough bytes yet. `Some(n)`: nothing can be decided before `buf`
    /// holds at least `n` bytes (for a length prefix: the header size while
    /// the header is incomplete, then header+body). `None`: unknown; the
    /// engine buffers everything it has.
    Incomplete(Option<usize>),
}

impl Decoded {
    const fn frame(start: usize, end: usize, consumed: usize) -> Decoded {
        Decoded::Frame {
            start,
            end,
            consumed,
        }
    }
}

/// Why a byte stream could not be framed (the connection is then closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A message is larger than the framing allows.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// The message length, as announced or as given to send.
        len: usize,
        /// The framing's maximum.
        max: usize,
    },
    /// The bytes (or a custom codec's answer) make no sense.
    #[error("invalid frame: {0}")]
    Invalid(String),
}

enum ReaderCodec {
    LengthPrefixed(LengthPrefixed),
    Raw,
    Custom(Box<dyn Codec>),
}

impl ReaderCodec {
    /// Decodes at the start of a non-empty `buf`, rejecting answers of a
    /// custom codec that would make the reader loop or index out of bounds.
    fn decode(&mut self, buf: &[u8]) -> Result<Decoded, FrameError> {
        let decoded = match self {
            ReaderCodec::LengthPrefixed(lp) => return lp.decode(buf),
            // Raw is never asked to decode an empty buffer: the whole chunk is the message.
            ReaderCodec::Raw => {
                let len = buf.len();
                return Ok(Decoded::frame(0, len, len));
            }
            ReaderCodec::Custom(codec) => codec.decode(buf)?,
        };
        match decoded {
            Decoded::Frame {
                start,
                end,
                consumed,
            } if consumed == 0 || start > end || end > consumed || consumed > buf.len() => {
                Err(FrameError::Invalid(format!(
                    "codec returned Frame {{ start: {start}, end: {end}, consumed: {consumed} }} \
                     for a buffer of {} bytes",
                    buf.len()
                )))
            }
            Decoded::Incomplete(Some(n)) if n <= buf.len() => Err(FrameError::Invalid(format!(
                "codec asked for {n} bytes but already had {}",
                buf.len()
            ))),
            ok => Ok(ok),
        }
    }
}

/// Per-connection decoding state.
pub(crate) struct FrameReader {
    codec: ReaderCodec,
    /// The start of a frame that spans chunks. Outside `feed` it always holds
    /// an incomplete frame (or nothing).
    pending: Vec<u8>,
    /// What decoding `pending` last answered, while `pending` is not empty.
    need: Option<usize>,
}

impl FrameReader {
    /// Feeds one received chunk and calls `on_frame` for every complete
    /// message, in order. `on_frame` returns `ControlFlow::Break(())` to stop
    /// (the connection was closed by the handler); the rest of the input is
    /// then dropped. On error, frames before the bad one have been delivered.
    pub(crate) fn feed(
        &mut self,
        input: &[u8],
        mut on_frame: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), FrameError> {
        let FrameReader {
            codec,
            pending,
            need,
        } = self;
        // Always a suffix of `input`: what has not been delivered nor copied.
        let mut chunk = input;
        // How many bytes at the end of `pending` were copied from `input`
        // just before `chunk`, so that they can be given back to `chunk`.
        let mut copied = 0;
        loop {
            if chunk.is_empty() && pending.is_empty() {
                return Ok(());
            }
            if pending.is_empty() {
                match codec.decode(chunk)? {
                    Decoded::Frame {
                        start,
                        end,
                        consumed,
                    } => {
                        let msg = &chunk[start..end];
                        chunk = &chunk[consumed..];
                        if on_frame(msg).is_break() {
                            return Ok(());
                        }
                    }
                    Decoded::Incomplete(n) => {
                        // The frame needs more than `chunk` holds (checked by
                        // `decode`), so all of `chunk` belongs to it.
                        if let Some(n) = n {
                            pending.reserve_exact(n);
                        }
                        pending.extend_from_slice(chunk);
                        *need = n;
                        return Ok(());
                    }
                }
                continue;
            }

            // `pending` holds an incomplete frame: top it up with only the
            // bytes that frame still needs, if known, so that the frames after
            // it take the zero-copy path again.
            if chunk.is_empty() {
                return Ok(());
            }
            let take = match *need {
                Some(n) => {
                    pending.reserve_exact(n - pending.len());
                    (n - pending.len()).min(chunk.len())
                }
                None => chunk.len(),
            };
            pending.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            copied += take;
            if need.is_some_and(|n| pending.len() < n) {
                return Ok(()); // `chunk` is used up
            }
            while !pending.is_empty() {
                let (start, end, consumed) = match codec.decode(pending)? {
                    Decoded::Frame {
                        start,
                        end,
                        consumed,
                    } => (start, end, consumed),
                    Decoded::Incomplete(n) => {
                        *need = n;
                        break;
                    }
                };
                let flow = on_frame(&pending[start..end]);
                let extra = pending.len() - consumed;
                if extra <= copied {
                    // The bytes after the frame are still in `input`: read
                    // them from there, without copying.
                    chunk = &input[input.len() - chunk.len() - extra..];
                    copied = 0;
                    pending.clear();
                    if pending.capacity() > KEEP_PENDING_CAPACITY {
                        *pending = Vec::new();
                    }
                } else {
                    pending.drain(..consumed);
                }
                if flow.is_break() {
                    pending.clear();
                    return Ok(());
                }
            }
        }
    }

    #[cfg(test)]
    /// Bytes held for an incomplete frame.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Encodes one message into `dst` (header + body copy).
    pub(crate) fn encode(&mut self, msg: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        match &mut self.codec {
            ReaderCodec::LengthPrefixed(lp) => {
                let (hdr, n) = lp.header(msg.len())?;
                dst.reserve(n + msg.len());
                dst.extend_from_slice(&hdr[..n]);
                dst.extend_from_slice(msg);
                Ok(())
            }
            ReaderCodec::Raw => {
                dst.extend_from_slice(msg);
                Ok(())
            }
            ReaderCodec::Custom(codec) => codec.encode(msg, dst),
        }
    }

    /// For a zero-copy send of a shared body of `len` bytes: the header to
    /// write before it. `Ok(None)` for raw framing (no header). A custom codec
    /// has no separate header: callers check [`is_custom`](Self::is_custom)
    /// and copy through [`encode`](Self::encode) instead; asking anyway gives
    /// `Invalid`.
    pub(crate) fn shared_header(&self, len: usize) -> Result<Option<([u8; 4], usize)>, FrameError> {
        match &self.codec {
            ReaderCodec::LengthPrefixed(lp) => lp.header(len).map(Some),
            ReaderCodec::Raw => Ok(None),
            ReaderCodec::Custom(_) => Err(FrameError::Invalid(
                "a custom codec has no shared header".into(),
            )),
        }
    }

    /// Whether messages must go through [`encode`](Self::encode) (custom codec).
    pub(crate) fn is_custom(&self) -> bool {
        matches!(self.codec, ReaderCodec::Custom(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    const SIZES: [usize; 10] = [0, 1, 2, 3, 5, 100, 4095, 4097, 0, 7];
    const SHORT: [usize; 5] = [0, 1, 3, 0, 5];

    /// Frame `i`'s body: letters in a per-frame pattern (never a newline,
    /// so the line codec can carry it too).
    fn body(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| b'a' + ((i * 7 + j) % 26) as u8).collect()
    }

    /// The wire bytes of frames of the given sizes, and the frames.
    fn stream(framing: &Framing, sizes: &[usize]) -> (Vec<u8>, Vec<Vec<u8>>) {
        let frames: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| body(i, n)).collect();
        let mut wire = BytesMut::new();
        let mut reader = framing.reader();
        for f in &frames {
            reader.encode(f, &mut wire).unwrap();
        }
        (wire.to_vec(), frames)
    }

    fn collect(framing: &Framing, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut reader = framing.reader();
        let mut out = Vec::new();
        for chunk in chunks {
            reader
                .feed(chunk, |m| {
                    out.push(m.to_vec());
                    ControlFlow::Continue(())
                })
                .unwrap();
        }
        assert_eq!(reader.pending_len(), 0);
        out
    }

    /// Every 2-way split of the long stream, every 3-way split of the short
    /// one and byte-by-byte feeding all give the frames of a single feed.
    fn check_every_split(framing: &Framing, sizes: &[usize], short: &[usize]) {
        let (wire, frames) = stream(framing, sizes);
        assert_eq!(collect(framing, &[&wire]), frames);
        for i in 0..=wire.len() {
            assert_eq!(
                collect(framing, &[&wire[..i], &wire[i..]]),
                frames,
                "split at {i}"
            );
        }
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(collect(framing, &bytes), frames);

        let (wire, frames) = stream(framing, short);
        for i in 0..=wire.len() {
            for j in i..=wire.len() {
                let chunks = [&wire[..i], &wire[i..j], &wire[j..]];
                assert_eq!(collect(framing, &chunks), frames, "split at {i}, {j}");
            }
        }
    }

    fn length_prefixed() -> [Framing; 3] {
        [
            Framing::default(),
            Framing::length_prefixed().little_endian().into(),
            Framing::length_prefixed().header_len(2).into(),
        ]
    }

    /// Newline-delimited lines.
    struct Lines;

    impl Codec for Lines {
        fn decode(&mut self, buf: &[u8]) -> Result<Decoded, FrameError> {
            Ok(match buf.iter().position(|&b| b == b'\n') {
                Some(i) => Decoded::frame(0, i, i + 1),
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

    #[test]
    fn every_split_gives_the_same_frames() {
        for framing in length_prefixed() {
            check_every_split(&framing, &SIZES, &SHORT);
        }
    }

    #[test]
    fn custom_codec_every_split() {
        let framing = Framing::custom(|| Lines);
        let (wire, _) = stream(&framing, &SIZES);
        assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), SIZES.len());
        check_every_split(&framing, &SIZES, &SHORT);
    }

    fn contains(chunk: &[u8], msg: &[u8]) -> bool {
        chunk.as_ptr_range().contains(&msg.as_ptr())
    }

    #[test]
    fn frames_inside_a_chunk_are_not_copied() {
        let framing = Framing::default();
        let (wire, _) = stream(&framing, &[3, 1000, 5000]);
        // Split inside the middle frame: the first and last frames lie inside
        // their chunks; the middle one is reassembled.
        let (a, b) = wire.split_at(100);
        let mut reader = framing.reader();
        let mut seen = 0;
        reader
            .feed(a, |m| {
                assert!(contains(a, m));
                seen += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(reader.pending_len(), 100 - 7);
        reader
            .feed(b, |m| {
                assert_eq!(contains(b, m), m.len() == 5000, "frame of {}", m.len());
                seen += 1;
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(seen, 3);
        assert_eq!(reader.pending_len(), 0);
        // Only the spanning frame went through `pending`, not the one after it.
        assert!(reader.pending.capacity() < 2000);
    }

    #[test]
    fn custom_codec_returns_to_zero_copy_after_a_spanning_frame() {
        let mut reader = Framing::custom(|| Lines).reader();
        let mut out = Vec::new();
        reader.feed(b"ab", |_| unreachable!()).unwrap();
        let chunk = b"c\nde\nf";
        reader
            .feed(chunk, |m| {
                out.push((m.to_vec(), contains(chunk, m)));
                ControlFlow::Continue(())
            })
            .unwrap();
        assert_eq!(out, [(b"abc".to_vec(), false), (b"de".to_vec(), true)]);
        assert_eq!(reader.pending, b"f");
    }

    #[test]
    fn spanning_frame_reserves_once() {
        let framing = Framing::default();
        let (wire, frames) = stream(&framing, &[100_000]);
        let mut reader = framing.reader();
        let mut out = Vec::new();
        let mut push = |m: &[u8]| {
            out.push(m.to_vec());
            ControlFlow::Continue(())
        };
        reader.feed(&wire[..10], &mut push).unwrap();
        let capacity = reader.pending.capacity();
        assert!(capacity >= 100_004, "capacity {capacity}");
        let mut rest = wire[10..].chunks(1000).peekable();
        while let Some(chunk) = rest.next() {
            reader.feed(chunk, &mut push).unwrap();
            if rest.peek().is_some() {
                assert_eq!(reader.pending.capacity(), capacity);
            }
        }
        assert_eq!(out, frames);
        // The big buffer is not kept by an idle connection.
        assert_eq!(reader.pending.capacity(), 0);
    }

    #[test]
    fn oversized_header_is_rejected_before_allocating() {
        let small = Framing::length_prefixed().max_frame(1000);
        let cases = [
            (Framing::default(), 0xFFFF_FFFF_u32, 1 << 20),
            (Framing::default(), 0x8000_0000, 1 << 20),
            (small.into(), 1001, 1000),
        ];
        for (framing, len, max) in cases {
            let hdr = len.to_be_bytes();
            let too_large = FrameError::TooLarge {
                len: len as usize,
                max,
            };
            let mut whole = framing.reader();
            let err = whole.feed(&hdr, |_| unreachable!()).unwrap_err();
            assert_eq!(err, too_large);
            assert!(whole.pending.capacity() < 64);

            let mut split = framing.reader();
            split.feed(&hdr[..1], |_| unreachable!()).unwrap();
            split.feed(&hdr[1..3], |_| unreachable!()).unwrap();
            assert_eq!(split.feed(&hdr[3..], |_| unreachable!()), Err(too_large));
            assert!(split.pending.capacity() < 64);
        }
    }

    #[test]
    fn frames_before_a_bad_header_are_delivered() {
        let framing = Framing::default();
        let (mut wire, frames) = stream(&framing, &[2, 0, 9]);
        wire.extend_from_slice(&[0xFF; 4]);
        let mut out = Vec::new();
        let err = framing.reader().feed(&wire, |m| {
            out.push(m.to_vec());
            ControlFlow::Continue(())
        });
        assert!(matches!(err, Err(FrameError::TooLarge { .. })));
        assert_eq!(out, frames);
    }

    #[test]
    fn break_stops_delivery() {
        let framing = Framing::default();
        let (wire, _) = stream(&framing, &[2, 3, 4, 5]);
        for split in [0, 8] {
            // split 8: the first frame (4 + 2 bytes) and 2 bytes of the second.
            let mut reader = framing.reader();
            let mut seen = 0;
            let mut stop_after_two = |_: &[u8]| {
                seen += 1;
                if seen == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            };
            reader.feed(&wire[..split], &mut stop_after_two).unwrap();
            reader.feed(&wire[split..], &mut stop_after_two).unwrap();
            assert_eq!(seen, 2, "split at {split}");
        }
    }

    #[test]
    fn round_trip_and_encode_shared() {
        let msgs: [&[u8]; 4] = [b"hello", b"", b"x", &[7; 300]];
        let mut framings = length_prefixed().to_vec();
        framings.push(Framing::custom(|| Lines));
        for framing in &framings {
            let mut reader = framing.reader();
            let mut wire = BytesMut::new();
            for m in msgs {
                let before = wire.len();
                reader.encode(m, &mut wire).unwrap();
                assert_eq!(framing.encode_shared(m).unwrap(), wire[before..]);
            }
            assert_eq!(collect(framing, &[&wire]), msgs, "{framing:?}");
        }
        // Raw: encoding is the identity, and every non-empty chunk is a message.
        let raw = Framing::raw();
        let mut wire = BytesMut::new();
        raw.reader().encode(b"abc", &mut wire).unwrap();
        assert_eq!(&wire[..], b"abc");
        assert_eq!(raw.encode_shared(b"abc").unwrap(), &b"abc"[..]);
        let chunk = b"abcdef";
        let mut reader = raw.reader();
        let mut n = 0;
        for c in [&chunk[..], b"", &chunk[2..]] {
            reader
                .feed(c, |m| {
                    assert_eq!(m.as_ptr_range(), c.as_ptr_range());
                    n += 1;
                    ControlFlow::Continue(())
                })
                .unwrap();
            assert_eq!(reader.pending_len(), 0);
        }
        assert_eq!(n, 2);
    }

    #[test]
    fn headers_and_limits() {
        let lp = Framing::length_prefixed().max_frame(10);
        assert_eq!(lp.header(10), Ok((10u32.to_be_bytes(), 4)));
        assert_eq!(lp.little_endian().header(3), Ok(([3, 0, 0, 0], 4)));
        assert_eq!(
            lp.header_len(2).header(258),
            Err(FrameError::TooLarge { len: 258, max: 10 })
        );
        assert_eq!(lp.header_len(2).header(5).unwrap().0[..2], [0, 5]);
        assert_eq!(
            lp.header(11),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );

        let two = Framing::length_prefixed().header_len(2);
        assert_eq!(two.header_size(), 2);
        assert_eq!(Framing::from(two).max_frame(), 65_535);
        assert_eq!(Framing::from(two.max_frame(1 << 30)).max_frame(), 65_535);
        assert_eq!(Framing::default().max_frame(), 1 << 20);
        assert_eq!(Framing::raw().max_frame(), usize::MAX);

        let reader = Framing::from(lp).reader();
        assert_eq!(reader.shared_header(4), Ok(Some((4u32.to_be_bytes(), 4))));
        assert!(reader.shared_header(11).is_err());
        assert_eq!(Framing::raw().reader().shared_header(1 << 30), Ok(None));
        let custom = Framing::custom(|| Lines).reader();
        assert!(custom.is_custom() && !reader.is_custom());
        assert_eq!(format!("{:?}", Framing::custom(|| Lines)), "Custom");
    }

    #[test]
    #[should_panic(expected = "must be 2 or 4")]
    fn header_len_must_be_2_or_4() {
        let _ = Framing::length_prefixed().header_len(3);
    }

    #[test]
    fn buggy_custom_codecs_are_rejected() {
        struct Fixed(Decoded);
        impl Codec for Fixed {
            fn decode(&mut self, _: &[u8]) -> Result<Decoded, FrameError> {
                Ok(self.0)
            }
            fn encode(&mut self, _: &[u8], _: &mut BytesMut) -> Result<(), FrameError> {
                Ok(())
            }
        }
        let bad = [
            Decoded::frame(0, 0, 0),
            Decoded::frame(0, 3, 2),
            Decoded::frame(2, 1, 3),
            Decoded::frame(0, 9, 9),
            Decoded::Incomplete(Some(4)),
        ];
        for answer in bad {
            let framing = Framing::custom(move || Fixed(answer));
            let err = framing
                .reader()
                .feed(b"abcd", |_| ControlFlow::Continue(()));
            assert!(matches!(err, Err(FrameError::Invalid(_))), "{answer:?}");
        }
    }
}
