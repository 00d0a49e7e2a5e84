//! Framing: cutting a TCP byte stream into messages and writing messages in
//! wire form. Sans-IO: this module never sees a socket, only byte slices.
//!
//! Decoding is zero-copy whenever it can be: a frame that lies entirely inside
//! a received chunk is handed out as a slice of that chunk. Only a frame that
//! spans chunks is reassembled, in the reader's `pending` buffer, and each of
//! its bytes is copied exactly once.

mod lines;

pub use lines::Lines;

use bytes::{Bytes, BytesMut};
use lines::LineReader;
use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

/// Above this capacity an empty reassembly buffer is not kept by its
/// connection (the loop takes it back: `FrameReader::take_spare`), so that
/// an idle connection does not hold on to the memory of the largest
/// message it ever received.
const KEEP_PENDING_CAPACITY: usize = 4 * 1024;

/// How a connection's byte stream is cut into messages.
#[derive(Clone)]
pub enum Framing {
    /// A header holding the body length, then the body (the default: 4-byte
    /// big-endian, 1 MiB max).
    LengthPrefixed(LengthPrefixed),
    /// No framing: every received chunk is a message, every send is written
    /// as is.
    Raw,
    /// A message per line, ended by LF or CRLF (see [`Lines`]).
    Lines(Lines),
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
            Framing::Lines(l) => f.debug_tuple("Lines").field(l).finish(),
            Framing::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl From<LengthPrefixed> for Framing {
    fn from(lp: LengthPrefixed) -> Self {
        Framing::LengthPrefixed(lp)
    }
}

impl From<Lines> for Framing {
    fn from(lines: Lines) -> Self {
        Framing::Lines(lines)
    }
}

impl Framing {
    /// A message per line (LF or CRLF, handed over without it), at most
    /// 8 KiB by default; refine with the methods of [`Lines`] and turn into
    /// a `Framing` with `.into()`.
    pub fn lines() -> Lines {
        Lines::default()
    }

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
            Framing::Lines(l) => l.max_line,
            Framing::Raw | Framing::Custom(_) => usize::MAX,
        }
    }

    /// Whether a file's range of `len` bytes (with its prefix) can go out
    /// as one message of this framing, or raw (`raw`): checked before a
    /// file is queued, so that nothing of a refused one goes out.
    pub(crate) fn check_file(&self, len: u64, raw: bool) -> Result<(), FrameError> {
        if raw {
            return Ok(());
        }
        match self {
            Framing::LengthPrefixed(lp) => {
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                lp.header(len).map(drop)
            }
            Framing::Raw => Ok(()),
            Framing::Lines(_) | Framing::Custom(_) => Err(FrameError::Invalid(
                "a file goes out as a message only with length-prefixed or raw framing: \
                 send it with FileRange::raw"
                    .into(),
            )),
        }
    }

    /// A fresh encoding state, one per connection.
    pub(crate) fn writer(&self) -> FrameWriter {
        let codec = match self {
            Framing::LengthPrefixed(lp) => WriterCodec::LengthPrefixed(*lp),
            Framing::Raw => WriterCodec::Raw,
            Framing::Lines(l) => WriterCodec::Lines(*l),
            Framing::Custom(make) => WriterCodec::Custom(make()),
        };
        FrameWriter { codec }
    }

    /// A fresh decoding state, one per connection.
    pub(crate) fn reader(&self) -> FrameReader {
        let codec = match self {
            Framing::LengthPrefixed(lp) => ReaderCodec::LengthPrefixed(*lp),
            Framing::Raw => ReaderCodec::Raw,
            Framing::Lines(l) => ReaderCodec::Lines(LineReader::new(*l)),
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
        self.writer().encode(msg, &mut dst)?;
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
    Lines(LineReader),
    Custom(Box<dyn Codec>),
}

impl ReaderCodec {
    /// Decodes at the start of a non-empty `buf`, rejecting answers of a
    /// custom codec that would make the reader loop or index out of bounds.
    fn decode(&mut self, buf: &[u8]) -> Result<Decoded, FrameError> {
        let decoded = match self {
            ReaderCodec::LengthPrefixed(lp) => return lp.decode(buf),
            ReaderCodec::Lines(l) => return l.decode(buf),
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
    /// (the handler closed the connection, or its send queue is full); every
    /// byte not yet delivered is then appended to `rest`, so the caller can
    /// feed it again later (or drop it), and the reader is left empty. On
    /// error, frames before the bad one have been delivered.
    pub(crate) fn feed_until(
        &mut self,
        input: &[u8],
        mut on_frame: impl FnMut(&[u8]) -> ControlFlow<()>,
        rest: &mut Vec<u8>,
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
                            rest.extend_from_slice(chunk);
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
                } else {
                    pending.drain(..consumed);
                }
                if flow.is_break() {
                    rest.extend_from_slice(pending);
                    rest.extend_from_slice(chunk);
                    pending.clear();
                    *need = None;
                    return Ok(());
                }
            }
        }
    }

    /// `feed_until` that drops what a `Break` leaves, and then gives back a
    /// large empty buffer (as the loop does with `take_spare`).
    #[cfg(test)]
    pub(crate) fn feed(
        &mut self,
        input: &[u8],
        on_frame: impl FnMut(&[u8]) -> ControlFlow<()>,
    ) -> Result<(), FrameError> {
        let result = self.feed_until(input, on_frame, &mut Vec::new());
        self.take_spare();
        result
    }

    #[cfg(test)]
    /// Bytes held for an incomplete frame.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Takes the bytes held for an incomplete frame (the stream goes
    /// elsewhere from them on: a receive into a file), leaving the reader
    /// as if it had seen none.
    pub(crate) fn take_pending(&mut self) -> Vec<u8> {
        self.need = None;
        std::mem::take(&mut self.pending)
    }

    /// Whether the reader has a reassembly buffer (empty or not).
    pub(crate) fn has_buffer(&self) -> bool {
        self.pending.capacity() > 0
    }

    /// Gives a reader without a buffer an empty one to reassemble into.
    pub(crate) fn lend(&mut self, buffer: Vec<u8>) {
        debug_assert!(buffer.is_empty());
        if self.pending.capacity() == 0 {
            self.pending = buffer;
        }
    }

    /// Takes back an empty reassembly buffer larger than a connection
    /// keeps: the caller frees it or lends it to the next reader that
    /// needs one. Called after each `feed`.
    pub(crate) fn take_spare(&mut self) -> Option<Vec<u8>> {
        (self.pending.is_empty() && self.pending.capacity() > KEEP_PENDING_CAPACITY)
            .then(|| std::mem::take(&mut self.pending))
    }
}

/// A connection's encoding: the framing's settings, or the connection's
/// own codec for a custom framing (whose encoding may keep state). Apart
/// from the reader, so that a connection keeps no decoding state twice.
pub(crate) struct FrameWriter {
    codec: WriterCodec,
}

enum WriterCodec {
    LengthPrefixed(LengthPrefixed),
    Raw,
    Lines(Lines),
    Custom(Box<dyn Codec>),
}

impl FrameWriter {
    /// Encodes one message into `dst` (header + body copy).
    pub(crate) fn encode(&mut self, msg: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        match &mut self.codec {
            WriterCodec::LengthPrefixed(lp) => {
                let (hdr, n) = lp.header(msg.len())?;
                dst.reserve(n + msg.len());
                dst.extend_from_slice(&hdr[..n]);
                dst.extend_from_slice(msg);
                Ok(())
            }
            WriterCodec::Raw => {
                dst.extend_from_slice(msg);
                Ok(())
            }
            WriterCodec::Lines(l) => l.encode(msg, dst),
            WriterCodec::Custom(codec) => codec.encode(msg, dst),
        }
    }

    /// For a zero-copy send of a shared body of `len` bytes: the header to
    /// write before it. `Ok(None)` for raw framing (no header). A custom codec
    /// has no separate header: callers check [`is_custom`](Self::is_custom)
    /// and copy through [`encode`](Self::encode) instead; asking anyway gives
    /// `Invalid`.
    pub(crate) fn shared_header(&self, len: usize) -> Result<Option<([u8; 4], usize)>, FrameError> {
        match &self.codec {
            WriterCodec::LengthPrefixed(lp) => lp.header(len).map(Some),
            WriterCodec::Raw => Ok(None),
            WriterCodec::Custom(_) | WriterCodec::Lines(_) => Err(FrameError::Invalid(
                "this framing has no shared header".into(),
            )),
        }
    }

    /// Whether messages must go through [`encode`](Self::encode): a custom
    /// codec, or lines (whose terminator follows the body).
    pub(crate) fn is_custom(&self) -> bool {
        matches!(self.codec, WriterCodec::Custom(_) | WriterCodec::Lines(_))
    }
}

#[cfg(test)]
mod tests;
