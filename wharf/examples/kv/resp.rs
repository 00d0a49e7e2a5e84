//! RESP2, the Redis protocol: requests as multibulk arrays
//! (`*2\r\n$3\r\nGET\r\n$1\r\nk\r\n`) or inline lines (`PING\r\n`), and
//! replies.
//!
//! `RespCodec` finds where each request ends, checking every announced
//! length against the maximum before the bytes are buffered, so a hostile
//! header cannot make the server wait for (and hold) more than that. A
//! malformed request is handed to the handler as it is, whole: `parse`
//! then says what is wrong, and the handler answers with a RESP error and
//! closes, as Redis does.

use bytes::BytesMut;
use wharf::{Codec, Decoded, FrameError};

/// The longest inline request (Redis's limit too).
pub const MAX_INLINE: usize = 64 * 1024;
/// Most arguments in one request.
pub const MAX_ARGS: usize = 1024 * 1024;

/// Where a request ends, or why it is not one.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// A whole request of this many bytes.
    Whole(usize),
    /// More bytes are needed (at least this many, when known).
    Need(Option<usize>),
    /// Not a request.
    Bad(&'static str),
}

/// The position just past the `\r\n` that ends the line starting at `at`,
/// looking no further than `limit` bytes.
fn line_end(buf: &[u8], at: usize, limit: usize) -> Result<Option<usize>, &'static str> {
    let window = &buf[at..buf.len().min(at + limit)];
    match window.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && window[i - 1] == b'\r' => Ok(Some(at + i + 1)),
        Some(_) => Err("a line ends without \\r"),
        None if window.len() >= limit => Err("a line is too long"),
        None => Ok(None),
    }
}

/// The integer of a `*N` or `$N` line (without its marker and `\r\n`).
fn number(digits: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(digits).ok()?;
    if s.is_empty() || s.len() > 20 {
        return None;
    }
    s.parse().ok()
}

/// Scans one request at the start of `buf`, at most `max` bytes long.
fn scan(buf: &[u8], max: usize) -> Scan {
    if buf.is_empty() {
        return Scan::Need(Some(1));
    }
    if buf[0] != b'*' {
        // An inline line ends with LF, CRLF or not (as typed into nc).
        let limit = MAX_INLINE.min(max);
        return match buf[..buf.len().min(limit)].iter().position(|&b| b == b'\n') {
            Some(i) => Scan::Whole(i + 1),
            None if buf.len() >= limit => Scan::Bad("too big inline request"),
            None => Scan::Need(None),
        };
    }
    let Ok(header) = line_end(buf, 0, 32) else {
        return Scan::Bad("invalid multibulk length");
    };
    let Some(mut at) = header else {
        return Scan::Need(None);
    };
    let count = match number(&buf[1..at - 2]) {
        Some(n) if n > MAX_ARGS as i64 => return Scan::Bad("invalid multibulk length"),
        Some(n) if n <= 0 => return Scan::Whole(at),
        Some(n) => n as usize,
        None => return Scan::Bad("invalid multibulk length"),
    };
    for _ in 0..count {
        if buf.len() <= at {
            return Scan::Need(Some(at + 1));
        }
        if buf[at] != b'$' {
            return Scan::Bad("expected '$'");
        }
        let Ok(line) = line_end(buf, at, 32) else {
            return Scan::Bad("invalid bulk length");
        };
        let Some(body) = line else {
            return Scan::Need(None);
        };
        let len = match number(&buf[at + 1..body - 2]) {
            Some(n) if n >= 0 => n as usize,
            _ => return Scan::Bad("invalid bulk length"),
        };
        // Checked before a byte of it is waited for.
        let end = match body.checked_add(len).and_then(|e| e.checked_add(2)) {
            Some(end) if end <= max => end,
            _ => return Scan::Bad("request too large"),
        };
        if buf.len() < end {
            return Scan::Need(Some(end));
        }
        if &buf[end - 2..end] != b"\r\n" {
            return Scan::Bad("a bulk string does not end with \\r\\n");
        }
        at = end;
    }
    Scan::Whole(at)
}

/// Frames RESP requests (see the module). Replies are written as they are.
pub struct RespCodec {
    max: usize,
}

impl RespCodec {
    /// Requests of at most `max` bytes.
    pub fn new(max: usize) -> RespCodec {
        RespCodec { max }
    }
}

impl Codec for RespCodec {
    fn decode(&mut self, buf: &[u8]) -> Result<Decoded, FrameError> {
        Ok(match scan(buf, self.max) {
            Scan::Whole(n) => Decoded::Frame {
                start: 0,
                end: n,
                consumed: n,
            },
            Scan::Need(n) => Decoded::Incomplete(n),
            // Handed over whole, for `parse` to name and the handler to
            // answer; nothing after it is read.
            Scan::Bad(_) => Decoded::Frame {
                start: 0,
                end: buf.len(),
                consumed: buf.len(),
            },
        })
    }

    fn encode(&mut self, msg: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.extend_from_slice(msg);
        Ok(())
    }
}

/// The arguments of one request the codec framed, or what is wrong with
/// it (as Redis words it, after "ERR Protocol error: "). An empty inline
/// line has no arguments.
pub fn parse(msg: &[u8], max: usize) -> Result<Vec<&[u8]>, &'static str> {
    match scan(msg, max) {
        Scan::Whole(n) if n == msg.len() => {}
        Scan::Bad(why) => return Err(why),
        _ => return Err("unbalanced request"),
    }
    if msg[0] != b'*' {
        let line = msg.strip_suffix(b"\n").unwrap_or(msg);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        return Ok(line
            .split(|b| b.is_ascii_whitespace())
            .filter(|a| !a.is_empty())
            .collect());
    }
    let mut at = msg.iter().position(|&b| b == b'\n').unwrap() + 1;
    let mut args = Vec::new();
    while at < msg.len() {
        let body = at + msg[at..].iter().position(|&b| b == b'\n').unwrap() + 1;
        let len = number(&msg[at + 1..body - 2]).unwrap() as usize;
        args.push(&msg[body..body + len]);
        at = body + len + 2;
    }
    Ok(args)
}

/// Writes replies in RESP2.
pub mod reply {
    /// `+OK` and the like.
    pub fn simple(out: &mut Vec<u8>, s: &str) {
        out.push(b'+');
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// `-ERR ...`.
    pub fn error(out: &mut Vec<u8>, s: &str) {
        out.push(b'-');
        // An error is one line: no CR or LF may end it early.
        out.extend(
            s.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }

    /// `:N`.
    pub fn int(out: &mut Vec<u8>, n: i64) {
        out.push(b':');
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    /// `$N` and the bytes, or `$-1` for none.
    pub fn bulk(out: &mut Vec<u8>, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                out.push(b'$');
                out.extend_from_slice(b.len().to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            None => out.extend_from_slice(b"$-1\r\n"),
        }
    }

    /// `*N`, followed by N replies.
    pub fn array(out: &mut Vec<u8>, n: usize) {
        out.push(b'*');
        out.extend_from_slice(n.to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_in_both_forms() {
        let get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        assert_eq!(scan(get, 1024), Scan::Whole(get.len()));
        assert_eq!(parse(get, 1024).unwrap(), vec![&b"GET"[..], b"k"]);
        for cut in 1..get.len() {
            assert!(matches!(scan(&get[..cut], 1024), Scan::Need(_)), "{cut}");
        }
        assert_eq!(scan(b"PING\r\n*1", 1024), Scan::Whole(6));
        assert_eq!(
            parse(b"SET  a  b\r\n", 1024).unwrap(),
            vec![&b"SET"[..], b"a", b"b"]
        );
        assert!(parse(b"\r\n", 1024).unwrap().is_empty());
        assert_eq!(
            parse(b"GET k\n", 1024).unwrap(),
            vec![&b"GET"[..], b"k"],
            "LF alone"
        );
        // A bulk string may hold anything, CR and LF included.
        let bin = b"*1\r\n$4\r\n\r\n\r\n\r\n";
        assert_eq!(parse(bin, 1024).unwrap(), vec![&b"\r\n\r\n"[..]]);
    }

    #[test]
    fn bad_and_oversized_requests_are_named_before_they_are_buffered() {
        assert_eq!(scan(b"*x\r\n", 1024), Scan::Bad("invalid multibulk length"));
        assert_eq!(scan(b"*1\r\n:1\r\n", 1024), Scan::Bad("expected '$'"));
        assert_eq!(
            scan(b"*1\r\n$-5\r\n", 1024),
            Scan::Bad("invalid bulk length")
        );
        // 1 GB announced: refused on the header, not waited for.
        assert_eq!(
            scan(b"*1\r\n$1000000000\r\n", 1024),
            Scan::Bad("request too large")
        );
        assert_eq!(
            scan(b"*1\r\n$3\r\nabcXY", 1024),
            Scan::Bad("a bulk string does not end with \\r\\n")
        );
        assert_eq!(
            scan(&vec![b'a'; MAX_INLINE + 1], usize::MAX),
            Scan::Bad("too big inline request")
        );
        assert_eq!(
            scan(b"*99999999999\r\n", 1024),
            Scan::Bad("invalid multibulk length")
        );
        assert_eq!(parse(b"*1\r\n$-5\r\n", 1024), Err("invalid bulk length"));
    }
}
