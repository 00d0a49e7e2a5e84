//! Line framing: a message is a line ended by LF or CRLF, handed over
//! without its terminator, with a maximum length checked as the bytes
//! arrive (a peer that sends a line longer than that is disconnected
//! before more of it is buffered), for protocols people type: chat over
//! `nc` or telnet, inline Redis commands, text control ports.

use bytes::BytesMut;

use super::{Decoded, FrameError};

/// Settings of the line framing (`Framing::lines`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lines {
    pub(crate) max_line: usize,
    crlf: bool,
}

impl Default for Lines {
    /// Lines of at most 8 KiB, written with LF.
    fn default() -> Self {
        Lines {
            max_line: 8 * 1024,
            crlf: false,
        }
    }
}

impl Lines {
    /// The longest line accepted, terminator not counted (default 8 KiB).
    pub fn max_line(self, max: usize) -> Self {
        Lines {
            max_line: max.min(isize::MAX as usize - 2),
            ..self
        }
    }

    /// Ends written lines with CRLF, as telnet expects (default: LF).
    /// Either is accepted when reading.
    pub fn crlf(self, on: bool) -> Self {
        Lines { crlf: on, ..self }
    }

    fn too_large(&self, len: usize) -> FrameError {
        FrameError::TooLarge {
            len,
            max: self.max_line,
        }
    }

    /// Appends `msg` and the terminator; a message holding a line break
    /// would be read back as two, so it is refused.
    pub(crate) fn encode(&self, msg: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        if msg.len() > self.max_line {
            return Err(self.too_large(msg.len()));
        }
        if msg.contains(&b'\n') {
            return Err(FrameError::Invalid("a line cannot hold a line feed".into()));
        }
        dst.reserve(msg.len() + 2);
        dst.extend_from_slice(msg);
        dst.extend_from_slice(if self.crlf { b"\r\n" } else { b"\n" });
        Ok(())
    }
}

/// A connection's line decoder: `scanned` bytes at the start of the
/// buffer are known to hold no LF, so that a line arriving in many small
/// pieces is searched once, not once per piece. The buffer the reader
/// passes after `Incomplete` always extends the previous one (see
/// `FrameReader::feed_until`); after a frame the next starts afresh.
#[derive(Debug)]
pub(crate) struct LineReader {
    lines: Lines,
    scanned: usize,
}

impl LineReader {
    pub(crate) fn new(lines: Lines) -> Self {
        LineReader { lines, scanned: 0 }
    }

    pub(crate) fn decode(&mut self, buf: &[u8]) -> Result<Decoded, FrameError> {
        let max = self.lines.max_line;
        // A line of `max` bytes may be followed by CR and LF: look no
        // further than that.
        let window = buf.len().min(max.saturating_add(2));
        let from = self.scanned.min(window);
        match buf[from..window].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let lf = from + i;
                let end = if lf > 0 && buf[lf - 1] == b'\r' {
                    lf - 1
                } else {
                    lf
                };
                self.scanned = 0;
                if end > max {
                    return Err(self.lines.too_large(end));
                }
                Ok(Decoded::Frame {
                    start: 0,
                    end,
                    consumed: lf + 1,
                })
            }
            None => {
                // No LF yet. Over the limit once the bytes could no longer
                // be a line of `max` plus a CR.
                let over = buf.len() > max.saturating_add(1)
                    || (buf.len() == max + 1 && buf[max] != b'\r');
                if over {
                    self.scanned = 0;
                    return Err(self.lines.too_large(buf.len()));
                }
                self.scanned = window;
                Ok(Decoded::Incomplete(None))
            }
        }
    }
}
