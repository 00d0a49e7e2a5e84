//! A connection's outgoing bytes, waiting for the next gathered send.
//!
//! Small messages sent from a callback are copied, header and all, into one
//! growing `tail` buffer, so a burst of them becomes one iovec; shared
//! `Bytes` (broadcasts, large messages) are queued by reference. Order is
//! kept: the tail is sealed into the queue before any shared buffer joins it.
//! A file is queued as a range of an open file, and read (or handed to the
//! kernel whole) only when its turn comes.

use std::collections::VecDeque;
use std::io;

use bytes::{Bytes, BytesMut};

use crate::codec::{FrameError, FrameWriter};
use crate::file::{FileChunk, FileRange, READ_PIECE};
use crate::sys::SendBatch;

/// Files up to this size are read and sent as bytes even where the
/// backend sends files without copying: one read beats the extra send.
const SMALL_FILE: u64 = 16 * 1024;

/// One queued piece: bytes, or a range of a file.
enum Chunk {
    Bytes(Bytes),
    File(FileChunk),
}

/// Most buffers moved into one send batch (the backend may gather fewer).
const BATCH_BUFS: usize = 64;

/// Capacity up to which the tail buffer is kept for reuse. A tail that grew
/// past it (a big message, a burst) is handed over whole when sealed and
/// not kept, so an idle connection never holds the memory of the largest
/// thing it once sent.
const TAIL_KEEP: usize = 4 * 1024;

/// Above this capacity an empty chunk list is freed when the queue goes
/// quiet.
const CHUNKS_KEEP: usize = 8;

#[derive(Default)]
pub(crate) struct OutQueue {
    chunks: VecDeque<Chunk>,
    tail: BytesMut,
    /// Bytes in `chunks`, kept so that `len` costs nothing per send.
    in_chunks: usize,
}

impl OutQueue {
    /// Encodes `msg` with `writer` and queues a copy; returns the bytes
    /// added.
    pub(crate) fn push_copy(
        &mut self,
        writer: &mut FrameWriter,
        msg: &[u8],
    ) -> Result<usize, FrameError> {
        let before = self.len();
        let tail = self.tail.len();
        if let Err(e) = writer.encode(msg, &mut self.tail) {
            // A codec that failed part-way leaves nothing behind.
            self.tail.truncate(tail);
            return Err(e);
        }
        Ok(self.len() - before)
    }

    /// Queues `body` without copying it, after the framing's header;
    /// returns the bytes added.
    pub(crate) fn push_shared(
        &mut self,
        writer: &mut FrameWriter,
        body: Bytes,
    ) -> Result<usize, FrameError> {
        if writer.is_custom() {
            return self.push_copy(writer, &body);
        }
        let before = self.len();
        if let Some((header, n)) = writer.shared_header(body.len())? {
            self.tail.extend_from_slice(&header[..n]);
        }
        if body.len() < 256 {
            // Small bodies are cheaper to copy than to gather.
            self.tail.extend_from_slice(&body);
        } else {
            self.seal();
            self.in_chunks += body.len();
            self.chunks.push_back(Chunk::Bytes(body));
        }
        Ok(self.len() - before)
    }

    /// Queues a file's range, after the framing's header unless it is
    /// raw; returns the bytes added. A framing without a shared header
    /// (lines, custom codecs) takes files only raw.
    pub(crate) fn push_file(
        &mut self,
        writer: &mut FrameWriter,
        file: FileRange,
    ) -> Result<usize, FrameError> {
        let before = self.len();
        if !file.raw && writer.is_custom() {
            return Err(FrameError::Invalid(
                "a file goes out as a message only with length-prefixed or raw framing: \
                 send it with FileRange::raw"
                    .into(),
            ));
        }
        if !file.raw {
            let len = usize::try_from(file.body_len()).unwrap_or(usize::MAX);
            if let Some((header, n)) = writer.shared_header(len)? {
                self.tail.extend_from_slice(&header[..n]);
            }
        }
        if file.prefix.len() < 256 {
            self.tail.extend_from_slice(&file.prefix);
        } else {
            self.seal();
            self.in_chunks += file.prefix.len();
            self.chunks.push_back(Chunk::Bytes(file.prefix));
        }
        if file.len > 0 {
            self.seal();
            self.in_chunks += file.len as usize;
            self.chunks.push_back(Chunk::File(FileChunk {
                file: file.file,
                offset: file.offset,
                len: file.len,
            }));
        }
        Ok(self.len() - before)
    }

    /// Queues bytes that are already in wire form (an encoded broadcast).
    pub(crate) fn push_encoded(&mut self, wire: Bytes) {
        self.seal();
        self.in_chunks += wire.len();
        self.chunks.push_back(Chunk::Bytes(wire));
    }

    fn seal(&mut self) {
        if self.tail.is_empty() {
            return;
        }
        self.in_chunks += self.tail.len();
        let chunk = self.take_tail();
        self.chunks.push_back(Chunk::Bytes(chunk));
    }

    /// The tail's bytes as one buffer. `split` leaves the tail sharing the
    /// allocation (to reuse it once the chunk is sent): only for a small
    /// one.
    fn take_tail(&mut self) -> Bytes {
        let chunk = if self.tail.capacity() > TAIL_KEEP {
            std::mem::take(&mut self.tail)
        } else {
            self.tail.split()
        };
        chunk.freeze()
    }

    /// The queue is empty and nothing is in flight: give back a tail that
    /// grew past what is worth keeping.
    pub(crate) fn shrink_idle(&mut self) {
        if self.tail.capacity() > TAIL_KEEP {
            self.tail = BytesMut::new();
        }
        if self.chunks.is_empty() && self.chunks.capacity() > CHUNKS_KEEP {
            // Grown by messages sent without copying (large, shared or
            // broadcast): a small list is kept, so that a connection
            // receiving broadcasts does not allocate one per message.
            self.chunks = VecDeque::new();
        }
    }

    /// The capacity held by the tail buffer (what an idle queue costs).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.tail.capacity()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.tail.is_empty()
    }

    /// Bytes queued and not yet handed to a send.
    pub(crate) fn len(&self) -> usize {
        self.in_chunks + self.tail.len()
    }

    /// Moves queued buffers into `batch`, in order. With `files` (the
    /// backend sends files itself), a file's range goes into the batch
    /// whole and alone; without, a piece of it is read. A batch that
    /// carries a file takes nothing more. Fails if a file could not be
    /// read (it shrank, or the read failed): the message it began cannot
    /// be completed.
    pub(crate) fn fill(&mut self, batch: &mut SendBatch, files: bool) -> io::Result<()> {
        if batch.file.is_some() {
            return Ok(());
        }
        if self.chunks.is_empty() {
            // Copied messages alone: the tail goes straight to the batch.
            if !self.tail.is_empty() && batch.bufs.len() < BATCH_BUFS {
                batch.bufs.push(self.take_tail());
            }
            return Ok(());
        }
        self.seal();
        while batch.bufs.len() < BATCH_BUFS {
            match self.chunks.front_mut() {
                None => break,
                Some(Chunk::Bytes(_)) => {
                    let Some(Chunk::Bytes(b)) = self.chunks.pop_front() else {
                        unreachable!("the front was bytes");
                    };
                    self.in_chunks -= b.len();
                    if !b.is_empty() {
                        batch.bufs.push(b);
                    }
                }
                Some(Chunk::File(f)) if files && f.len > SMALL_FILE => {
                    if batch.bufs.is_empty() {
                        let Some(Chunk::File(f)) = self.chunks.pop_front() else {
                            unreachable!("the front was a file");
                        };
                        self.in_chunks -= f.len as usize;
                        batch.file = Some(f);
                    }
                    break;
                }
                Some(Chunk::File(f)) => {
                    // One piece per batch: a file is never all in memory.
                    let piece = f.read_front(READ_PIECE)?;
                    self.in_chunks -= piece.len();
                    if f.len == 0 {
                        self.chunks.pop_front();
                    }
                    batch.bufs.push(piece);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Takes the next queued buffer, or its first `max` bytes (`max` > 0),
    /// for a TLS session to encrypt; a file's bytes are read. Fails as
    /// [`fill`](Self::fill) does.
    pub(crate) fn pop_upto(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        if self.chunks.is_empty() {
            self.seal();
        }
        let chunk = match self.chunks.front_mut() {
            None => return Ok(None),
            Some(Chunk::Bytes(front)) if front.len() > max => front.split_to(max),
            Some(Chunk::Bytes(_)) => match self.chunks.pop_front() {
                Some(Chunk::Bytes(b)) => b,
                _ => unreachable!("the front was bytes"),
            },
            Some(Chunk::File(f)) => {
                let piece = f.read_front(max.min(READ_PIECE))?;
                if f.len == 0 {
                    self.chunks.pop_front();
                }
                piece
            }
        };
        self.in_chunks -= chunk.len();
        Ok(Some(chunk))
    }

    /// Drops everything queued (the connection failed).
    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.in_chunks = 0;
        self.tail = BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Framing;

    fn drain(q: &mut OutQueue) -> Vec<u8> {
        let mut batch = SendBatch::default();
        let mut out = Vec::new();
        while !q.is_empty() {
            q.fill(&mut batch, false).unwrap();
            for b in batch.bufs.drain(..) {
                out.extend_from_slice(&b);
            }
        }
        out
    }

    #[test]
    fn copies_and_shared_bodies_keep_their_order() {
        let framing = Framing::default();
        let mut w = framing.writer();
        let mut q = OutQueue::default();
        q.push_copy(&mut w, b"ab").unwrap();
        let big = Bytes::from(vec![7u8; 300]);
        q.push_shared(&mut w, big.clone()).unwrap();
        q.push_copy(&mut w, b"c").unwrap();
        q.push_encoded(Bytes::from_static(b"\0\0\0\x01z"));
        assert_eq!(q.len(), 6 + 304 + 5 + 5);
        let mut want = b"\0\0\0\x02ab\0\0\x01\x2c".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"\0\0\0\x01c\0\0\0\x01z");
        assert_eq!(drain(&mut q), want);
    }

    /// A temporary file holding `bytes`.
    fn file_of(bytes: &[u8]) -> (std::path::PathBuf, std::fs::File) {
        use std::io::Write;
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("wharf-sendq-{}-{n}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        (path.clone(), std::fs::File::open(&path).unwrap())
    }

    #[test]
    fn a_file_is_a_message_body_in_order_read_or_handed_over_whole() {
        let framing = Framing::default();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let (path, f) = file_of(&body);
        for files in [false, true] {
            let mut w = framing.writer();
            let mut q = OutQueue::default();
            q.push_copy(&mut w, b"before").unwrap();
            let range = FileRange::new(f.try_clone().unwrap())
                .unwrap()
                .range(10, 99_000)
                .unwrap()
                .prefix(&b"P"[..]);
            q.push_file(&mut w, range).unwrap();
            q.push_copy(&mut w, b"after").unwrap();
            assert_eq!(q.len(), 10 + 4 + 1 + 99_000 + 9);
            let mut want = b"\0\0\0\x06before".to_vec();
            want.extend_from_slice(&(99_001u32).to_be_bytes());
            want.push(b'P');
            want.extend_from_slice(&body[10..99_010]);
            want.extend_from_slice(b"\0\0\0\x05after");
            let mut out = Vec::new();
            let mut handed = 0;
            while !q.is_empty() {
                let mut batch = SendBatch::default();
                q.fill(&mut batch, files).unwrap();
                if let Some(mut chunk) = batch.file.take() {
                    assert!(batch.bufs.is_empty(), "a file goes alone");
                    handed += 1;
                    out.extend_from_slice(&chunk.read_front(chunk.len as usize).unwrap());
                }
                for b in batch.bufs.drain(..) {
                    out.extend_from_slice(&b);
                }
            }
            assert_eq!(handed, usize::from(files));
            assert!(out == want, "files {files}: the bytes differ");
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_file_that_shrank_fails_the_fill_and_a_lines_framing_refuses_files() {
        let (path, f) = file_of(&[7u8; 1000]);
        let range = FileRange::new(f).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(10)
            .unwrap();
        let framing = Framing::default();
        let mut w = framing.writer();
        let mut q = OutQueue::default();
        q.push_file(&mut w, range.clone()).unwrap();
        let e = q.fill(&mut SendBatch::default(), false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let lines: Framing = Framing::lines().into();
        let mut w = lines.writer();
        assert!(matches!(
            OutQueue::default().push_file(&mut w, range.clone()),
            Err(FrameError::Invalid(_))
        ));
        assert!(OutQueue::default().push_file(&mut w, range.raw()).is_ok());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn raw_framing_adds_no_header() {
        let framing = Framing::raw();
        let mut w = framing.writer();
        let mut q = OutQueue::default();
        q.push_copy(&mut w, b"xy").unwrap();
        q.push_shared(&mut w, Bytes::from_static(b"z")).unwrap();
        assert_eq!(drain(&mut q), b"xyz");
    }

    #[test]
    fn a_big_message_leaves_no_memory_behind_once_sent() {
        let framing: Framing = Framing::length_prefixed().max_frame(2 << 20).into();
        let mut w = framing.writer();
        let mut q = OutQueue::default();
        q.push_copy(&mut w, &vec![1u8; 1_000_000]).unwrap();
        let mut batch = SendBatch::default();
        q.fill(&mut batch, false).unwrap();
        assert_eq!(q.held(), 0, "the big tail went out whole, not shared");
        let sent = batch.bufs.pop().unwrap();
        assert!(sent.is_unique(), "nothing else refers to its allocation");
        drop(sent);
        // Small messages reuse a small tail; when quiet it stays small.
        q.push_copy(&mut w, b"hi").unwrap();
        q.fill(&mut batch, false).unwrap();
        batch.bufs.clear();
        q.shrink_idle();
        assert!(q.held() <= TAIL_KEEP);
        // A burst that grew the tail past the limit is given back when quiet.
        for _ in 0..100 {
            q.push_copy(&mut w, &[0u8; 100]).unwrap();
        }
        assert!(q.held() > TAIL_KEEP);
        q.fill(&mut batch, false).unwrap();
        q.shrink_idle();
        assert_eq!(q.held(), 0);
    }

    #[test]
    fn a_codec_failing_part_way_queues_nothing() {
        struct Half;
        impl crate::Codec for Half {
            fn decode(&mut self, _: &[u8]) -> Result<crate::Decoded, FrameError> {
                Ok(crate::Decoded::Incomplete(None))
            }
            fn encode(&mut self, msg: &[u8], dst: &mut BytesMut) -> Result<(), FrameError> {
                dst.extend_from_slice(&msg[..msg.len() / 2]);
                if msg.starts_with(b"bad") {
                    return Err(FrameError::Invalid("bad message".into()));
                }
                dst.extend_from_slice(&msg[msg.len() / 2..]);
                Ok(())
            }
        }
        let framing = Framing::custom(|| Half);
        let mut w = framing.writer();
        let mut q = OutQueue::default();
        q.push_copy(&mut w, b"good").unwrap();
        let e = q.push_copy(&mut w, b"bad one").unwrap_err();
        assert_eq!(e, FrameError::Invalid("bad message".into()));
        q.push_copy(&mut w, b"next").unwrap();
        assert_eq!(drain(&mut q), b"goodnext");
    }

    #[test]
    fn too_large_is_refused_and_queues_nothing() {
        let framing: Framing = Framing::length_prefixed().max_frame(4).into();
        let mut w = framing.writer();
        let mut q = OutQueue::default();
        assert!(q.push_shared(&mut w, Bytes::from_static(b"12345")).is_err());
        assert!(q.is_empty());
    }
}
