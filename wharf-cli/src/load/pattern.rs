//! The bytes of every message, derived from (connection, sequence), so that
//! an echo can be checked byte for byte without remembering what was sent.
//!
//! Message `seq` of connection `conn` is the first `size` bytes of
//!
//! ```text
//! conn: u32 LE | seq: u64 LE | mix(conn, seq): u32 LE | body
//! ```
//!
//! where `body` is a fixed block of random bytes rotated by an amount that
//! also depends on (conn, seq). A corrupted byte fails the comparison; a
//! dropped, duplicated or reordered message carries the wrong header; a
//! message that reaches the wrong connection carries the wrong `conn`.
//! Building a message is two copies and checking one is two comparisons, so
//! large messages cost about what `memcpy` and `memcmp` cost.
//!
//! Messages shorter than the 16-byte header carry only a prefix of it and
//! so are checked less strongly (a 4-byte message names only its
//! connection).

/// Length of the header that names the message.
const HEADER: usize = 16;

/// The payloads of one run (all connections share one message size).
#[derive(Debug)]
pub(crate) struct Pattern {
    size: usize,
    /// The body before rotation; empty when `size <= HEADER`.
    block: Box<[u8]>,
}

impl Pattern {
    /// Payloads of `size` bytes.
    pub(crate) fn new(size: usize) -> Pattern {
        let mut x = 0x243f_6a88_85a3_08d3u64; // any fixed non-zero seed
        let block = (0..size.saturating_sub(HEADER))
            .map(|_| {
                // xorshift64: cheap bytes that are not a simple ramp.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        Pattern { size, block }
    }

    /// Message length in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    /// Appends message `seq` of connection `conn` to `out`.
    pub(crate) fn fill(&self, conn: u32, seq: u64, out: &mut Vec<u8>) {
        let header = header(conn, seq);
        out.extend_from_slice(&header[..self.size.min(HEADER)]);
        if !self.block.is_empty() {
            let r = self.rotation(conn, seq);
            out.extend_from_slice(&self.block[r..]);
            out.extend_from_slice(&self.block[..r]);
        }
    }

    /// Whether `data` equals bytes `offset..offset + data.len()` of message
    /// `seq` of connection `conn` (a raw stream delivers messages in pieces).
    pub(crate) fn check(&self, conn: u32, seq: u64, offset: usize, data: &[u8]) -> bool {
        if offset + data.len() > self.size {
            return false;
        }
        let mut pos = offset;
        let mut rest = data;
        if pos < HEADER {
            let header = header(conn, seq);
            let n = rest.len().min(HEADER - pos);
            if rest[..n] != header[pos..pos + n] {
                return false;
            }
            pos += n;
            rest = &rest[n..];
        }
        if rest.is_empty() {
            return true;
        }
        // The body, rotated: byte `p` of it is block[(r + p) % len].
        let len = self.block.len();
        let start = (self.rotation(conn, seq) + (pos - HEADER)) % len;
        let first = rest.len().min(len - start);
        rest[..first] == self.block[start..start + first]
            && rest[first..] == self.block[..rest.len() - first]
    }

    fn rotation(&self, conn: u32, seq: u64) -> usize {
        ((mix(conn, seq) >> 32) % self.block.len() as u64) as usize
    }
}

fn header(conn: u32, seq: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&conn.to_le_bytes());
    h[4..12].copy_from_slice(&seq.to_le_bytes());
    h[12..].copy_from_slice(&(mix(conn, seq) as u32).to_le_bytes());
    h
}

/// splitmix64 of (conn, seq): every bit of both inputs moves every output bit.
fn mix(conn: u32, seq: u64) -> u64 {
    let mut z = seq
        .wrapping_add(u64::from(conn).wrapping_mul(0xd6e8_feb8_6659_fd93))
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(p: &Pattern, conn: u32, seq: u64) -> Vec<u8> {
        let mut v = Vec::new();
        p.fill(conn, seq, &mut v);
        v
    }

    #[test]
    fn a_message_checks_whole_and_in_every_split() {
        for size in [1, 4, 15, 16, 17, 64, 1000] {
            let p = Pattern::new(size);
            let m = message(&p, 7, 12345);
            assert_eq!(m.len(), size);
            assert!(p.check(7, 12345, 0, &m));
            for cut in 0..=size {
                assert!(p.check(7, 12345, 0, &m[..cut]), "size {size} cut {cut}");
                assert!(p.check(7, 12345, cut, &m[cut..]), "size {size} cut {cut}");
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let p = Pattern::new(300);
        let m = message(&p, 3, 99);
        for i in 0..m.len() {
            let mut bad = m.clone();
            bad[i] ^= 0x01;
            assert!(!p.check(3, 99, 0, &bad), "byte {i}");
            assert!(!p.check(3, 99, i, &bad[i..i + 1]), "byte {i} alone");
        }
    }

    #[test]
    fn another_sequence_or_connection_does_not_check() {
        let p = Pattern::new(64);
        let m = message(&p, 3, 99);
        assert!(!p.check(3, 100, 0, &m), "a duplicate or a skipped message");
        assert!(!p.check(3, 98, 0, &m), "a reordered message");
        assert!(!p.check(4, 99, 0, &m), "another connection's message");
        // The body alone also depends on the sequence.
        assert!(!p.check(3, 100, HEADER, &m[HEADER..]));
    }

    #[test]
    fn swapped_bytes_are_caught() {
        let p = Pattern::new(64);
        let mut m = message(&p, 1, 2);
        let (i, j) = (20, 40);
        assert_ne!(m[i], m[j], "the pattern has distinct bytes here");
        m.swap(i, j);
        assert!(!p.check(1, 2, 0, &m));
    }

    #[test]
    fn too_many_bytes_do_not_check() {
        let p = Pattern::new(32);
        let mut m = message(&p, 1, 2);
        m.push(0);
        assert!(!p.check(1, 2, 0, &m));
    }
}
