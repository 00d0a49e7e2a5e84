//! A connection's outgoing bytes, waiting for the next gathered send.
//!
//! Small messages sent from a callback are copied, header and all, into one
//! growing `tail` buffer, so a burst of them becomes one iovec; shared
//! `Bytes` (broadcasts, large messages) are queued by reference. Order is
//! kept: the tail is sealed into the queue before any shared buffer joins it.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::codec::{FrameError, FrameReader};
use crate::sys::SendBatch;

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
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    /// Bytes in `chunks`, kept so that `len` costs nothing per send.
    in_chunks: usize,
}

impl OutQueue {
    /// Encodes `msg` with `writer` and queues a copy; returns the bytes
    /// added.
    pub(crate) fn push_copy(
        &mut self,
        writer: &mut FrameReader,
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
        writer: &mut FrameReader,
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
            self.chunks.push_back(body);
        }
        Ok(self.len() - before)
    }

    /// Queues bytes that are already in wire form (an encoded broadcast).
    pub(crate) fn push_encoded(&mut self, wire: Bytes) {
        self.seal();
        self.in_chunks += wire.len();
        self.chunks.push_back(wire);
    }

    fn seal(&mut self) {
        if self.tail.is_empty() {
            return;
        }
        self.in_chunks += self.tail.len();
        let chunk = self.take_tail();
        self.chunks.push_back(chunk);
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

    /// Moves queued buffers into `batch`, in order.
    pub(crate) fn fill(&mut self, batch: &mut SendBatch) {
        if self.chunks.is_empty() {
            // Copied messages alone: the tail goes straight to the batch.
            if !self.tail.is_empty() && batch.bufs.len() < BATCH_BUFS {
                batch.bufs.push(self.take_tail());
            }
            return;
        }
        self.seal();
        while batch.bufs.len() < BATCH_BUFS {
            match self.chunks.pop_front() {
                Some(b) => {
                    self.in_chunks -= b.len();
                    if !b.is_empty() {
                        batch.bufs.push(b);
                    }
                }
                None => break,
            }
        }
    }

    /// Takes the next queued buffer, or its first `max` bytes (`max` > 0),
    /// for a TLS session to encrypt.
    pub(crate) fn pop_upto(&mut self, max: usize) -> Option<Bytes> {
        if self.chunks.is_empty() {
            self.seal();
        }
        let front = self.chunks.front_mut()?;
        let chunk = if front.len() > max {
            front.split_to(max)
        } else {
            self.chunks.pop_front().expect("a front chunk")
        };
        self.in_chunks -= chunk.len();
        Some(chunk)
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
            q.fill(&mut batch);
            for b in batch.bufs.drain(..) {
                out.extend_from_slice(&b);
            }
        }
        out
    }

    #[test]
    fn copies_and_shared_bodies_keep_their_order() {
        let framing = Framing::default();
        let mut w = framing.reader();
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

    #[test]
    fn raw_framing_adds_no_header() {
        let framing = Framing::raw();
        let mut w = framing.reader();
        let mut q = OutQueue::default();
        q.push_copy(&mut w, b"xy").unwrap();
        q.push_shared(&mut w, Bytes::from_static(b"z")).unwrap();
        assert_eq!(drain(&mut q), b"xyz");
    }

    #[test]
    fn a_big_message_leaves_no_memory_behind_once_sent() {
        let framing: Framing = Framing::length_prefixed().max_frame(2 << 20).into();
        let mut w = framing.reader();
        let mut q = OutQueue::default();
        q.push_copy(&mut w, &vec![1u8; 1_000_000]).unwrap();
        let mut batch = SendBatch::default();
        q.fill(&mut batch);
        assert_eq!(q.held(), 0, "the big tail went out whole, not shared");
        let sent = batch.bufs.pop().unwrap();
        assert!(sent.is_unique(), "nothing else refers to its allocation");
        drop(sent);
        // Small messages reuse a small tail; when quiet it stays small.
        q.push_copy(&mut w, b"hi").unwrap();
        q.fill(&mut batch);
        batch.bufs.clear();
        q.shrink_idle();
        assert!(q.held() <= TAIL_KEEP);
        // A burst that grew the tail past the limit is given back when quiet.
        for _ in 0..100 {
            q.push_copy(&mut w, &[0u8; 100]).unwrap();
        }
        assert!(q.held() > TAIL_KEEP);
        q.fill(&mut batch);
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
        let mut w = framing.reader();
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
        let mut w = framing.reader();
        let mut q = OutQueue::default();
        assert!(q.push_shared(&mut w, Bytes::from_static(b"12345")).is_err());
        assert!(q.is_empty());
    }
}
