//! Files on a connection: a byte range of a file sent in order with the
//! messages around it (without passing through user space where the
//! backend can: `sendfile(2)` on the poll and io_uring backends,
//! `TransmitFile` on IOCP), and the next bytes of a connection's stream
//! written into a file.
//!
//! A file is queued as a reference (the open file and a range), never
//! read into memory ahead of its turn, and its bytes count against the
//! connection's back-pressure like any other queued bytes. Where no
//! zero-copy path applies (TLS, which must encrypt, and the fallback for a
//! backend without one) the loop reads the range a piece at a time, just
//! before sending it.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

/// A byte range of a file to send on a connection
/// ([`Conn::send_file`](crate::Conn::send_file),
/// [`Handle::send_file`](crate::Handle::send_file)).
///
/// With length-prefixed framing the range (after an optional
/// [`prefix`](Self::prefix)) is the body of one message: the header, then
/// the bytes, so the peer reads one message like any other. It must then
/// fit the framing's maximum frame, checked when it is queued: a larger
/// file is refused up front (`SendError::TooLarge`) rather than cut, since
/// a peer could not read it as one message anyway. With
/// [`raw`](Self::raw) the bytes go out as they are, with no header and no
/// limit, for a protocol that frames them itself (any framing; it is the
/// only way with lines or a custom codec).
///
/// The range is read when its turn comes: a file that shrinks before then
/// closes the connection (`CloseReason::Io(UnexpectedEof)`), since the
/// message it began can no longer be completed.
#[derive(Debug, Clone)]
pub struct FileRange {
    pub(crate) file: Arc<File>,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) prefix: Bytes,
    pub(crate) raw: bool,
}

impl FileRange {
    /// All of the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileRange> {
        FileRange::new(File::open(path)?)
    }

    /// All of `file` (from its start, whatever its cursor), at its length
    /// now.
    pub fn new(file: File) -> io::Result<FileRange> {
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(FileRange {
            file: Arc::new(file),
            offset: 0,
            len: meta.len(),
            prefix: Bytes::new(),
            raw: false,
        })
    }

    /// Only `len` bytes from `offset` (within the range so far).
    pub fn range(mut self, offset: u64, len: u64) -> io::Result<FileRange> {
        let end = offset.checked_add(len);
        if !matches!(end, Some(end) if end <= self.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bytes {offset}..+{len} are outside the file's {} bytes",
                    self.len
                ),
            ));
        }
        self.offset += offset;
        self.len = len;
        Ok(self)
    }

    /// Bytes sent just before the file's, inside the same message (a
    /// status byte, a name): the message is `prefix` then the range.
    pub fn prefix(mut self, prefix: impl Into<Bytes>) -> FileRange {
        self.prefix = prefix.into();
        self
    }

    /// Sends the bytes as they are: no frame header, no maximum.
    pub fn raw(mut self) -> FileRange {
        self.raw = true;
        self
    }

    /// The bytes of the file that will be sent.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty (the message may still carry a prefix).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes the message carries: prefix and range.
    pub(crate) fn body_len(&self) -> u64 {
        self.prefix.len() as u64 + self.len
    }
}

/// A range of a file in a send queue or a send in flight: what is left
/// of it.
#[derive(Debug, Clone)]
pub(crate) struct FileChunk {
    pub(crate) file: Arc<File>,
    pub(crate) offset: u64,
    pub(crate) len: u64,
}

/// The most a fallback read takes of a file at once.
pub(crate) const READ_PIECE: usize = 256 * 1024;

impl FileChunk {
    /// Drops `n` sent bytes from the front.
    pub(crate) fn advance(&mut self, n: u64) {
        debug_assert!(n <= self.len);
        self.offset += n;
        self.len -= n;
    }

    /// Reads up to `max` bytes from the front (and drops them from the
    /// chunk): the path for TLS and for backends without a zero-copy send.
    /// A file that ends early is an error: the message it is the body of
    /// could not be completed.
    pub(crate) fn read_front(&mut self, max: usize) -> io::Result<Bytes> {
        let want = (self.len.min(max as u64)) as usize;
        let buf = read_exact_at(&self.file, want, self.offset)?;
        self.advance(want as u64);
        Ok(Bytes::from(buf))
    }
}

/// Reads `want` bytes at `offset` into a new buffer, which is not zeroed
/// first (the read fills it: zeroing would be one more pass over every
/// byte sent).
#[cfg(unix)]
fn read_exact_at(file: &File, want: usize, offset: u64) -> io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf = Vec::<u8>::with_capacity(want);
    while buf.len() < want {
        let got = buf.len();
        // SAFETY: `pread` writes at most `want - got` bytes at the end of
        // what is filled, inside the capacity; no reference to the bytes
        // not yet written is made. The descriptor is open (`file`).
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(got).cast(),
                want - got,
                (offset + got as u64) as libc::off_t,
            )
        };
        match n {
            0 => return Err(shrunk()),
            n if n > 0 => {
                // SAFETY: the kernel wrote these `n` bytes just now.
                unsafe { buf.set_len(got + n as usize) };
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(buf)
}

#[cfg(windows)]
fn read_exact_at(file: &File, want: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match read_at(file, &mut buf[got..], offset + got as u64) {
            Ok(0) => return Err(shrunk()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// The error for a file that ended before its range did.
pub(crate) fn shrunk() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the file ended before the range being sent",
    )
}

#[cfg(windows)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // Moves the file's cursor, which nothing else here relies on.
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

/// The next bytes of a connection's stream, going into a file
/// (`Conn::receive_to_file`) instead of to the framing.
pub(crate) struct Sink {
    /// `None` once a write failed: the rest of the bytes are passed over,
    /// so that framing resumes where the sender meant it to.
    file: Option<File>,
    /// Bytes still to come.
    pub(crate) left: u64,
    written: u64,
    error: Option<io::Error>,
}

impl Sink {
    pub(crate) fn new(file: File, len: u64) -> Sink {
        Sink {
            file: Some(file),
            left: len,
            written: 0,
            error: None,
        }
    }

    /// Takes what of `data` belongs to the file (writing it, or passing
    /// over it after a failed write); returns the bytes taken.
    pub(crate) fn take(&mut self, data: &[u8]) -> usize {
        let n = (self.left.min(data.len() as u64)) as usize;
        if let Some(file) = &mut self.file {
            match io::Write::write_all(file, &data[..n]) {
                Ok(()) => self.written += n as u64,
                Err(e) => {
                    self.error = Some(e);
                    self.file = None;
                }
            }
        }
        self.left -= n as u64;
        n
    }

    /// The result for the handler: the bytes written, the write's error,
    /// or `ended` (the stream ended, or the connection closed, first).
    pub(crate) fn result(self, ended: Option<io::Error>) -> io::Result<u64> {
        match (self.error, ended) {
            (Some(e), _) | (None, Some(e)) => Err(e),
            (None, None) => Ok(self.written),
        }
    }
}
