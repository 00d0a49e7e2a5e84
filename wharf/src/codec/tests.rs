//! Unit tests of the framing layer (no sockets).
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
    let mut writer = framing.writer();
    for f in &frames {
        writer.encode(f, &mut wire).unwrap();
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
        let mut writer = framing.writer();
        let mut wire = BytesMut::new();
        for m in msgs {
            let before = wire.len();
            writer.encode(m, &mut wire).unwrap();
            assert_eq!(framing.encode_shared(m).unwrap(), wire[before..]);
        }
        assert_eq!(collect(framing, &[&wire]), msgs, "{framing:?}");
    }
    // Raw: encoding is the identity, and every non-empty chunk is a message.
    let raw = Framing::raw();
    let mut wire = BytesMut::new();
    raw.writer().encode(b"abc", &mut wire).unwrap();
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

    let writer = Framing::from(lp).writer();
    assert_eq!(writer.shared_header(4), Ok(Some((4u32.to_be_bytes(), 4))));
    assert!(writer.shared_header(11).is_err());
    assert_eq!(Framing::raw().writer().shared_header(1 << 30), Ok(None));
    let custom = Framing::custom(|| Lines).writer();
    assert!(custom.is_custom() && !writer.is_custom());
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

/// A break (the handler's queue is full) hands back every undelivered
/// byte; feeding those later yields exactly the frames not yet delivered,
/// wherever the stream was split.
#[test]
fn break_hands_back_the_undelivered_rest() {
    for framing in [Framing::default(), Framing::custom(|| Lines)] {
        let bodies: Vec<Vec<u8>> = (0..6).map(|i| vec![b'a' + i as u8; i * 3]).collect();
        let mut wire = Vec::new();
        let mut writer = framing.writer();
        for b in &bodies {
            let mut dst = bytes::BytesMut::new();
            writer.encode(b, &mut dst).unwrap();
            wire.extend_from_slice(&dst);
        }
        for split in 0..=wire.len() {
            let mut reader = framing.reader();
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut rest = Vec::new();
            // Break after every second frame, then resume from the rest.
            let mut input: Vec<Vec<u8>> = vec![wire[..split].to_vec(), wire[split..].to_vec()];
            while let Some(chunk) = input.first().cloned() {
                input.remove(0);
                reader
                    .feed_until(
                        &chunk,
                        |m| {
                            got.push(m.to_vec());
                            if got.len() % 2 == 0 {
                                ControlFlow::Break(())
                            } else {
                                ControlFlow::Continue(())
                            }
                        },
                        &mut rest,
                    )
                    .unwrap();
                if !rest.is_empty() {
                    input.insert(0, std::mem::take(&mut rest));
                }
            }
            assert_eq!(got, bodies, "split at {split}");
        }
    }
}

fn lines() -> [Framing; 2] {
    [
        Framing::lines().max_line(5000).into(),
        Framing::lines().max_line(5000).crlf(true).into(),
    ]
}

#[test]
fn lines_every_split_gives_the_same_lines() {
    for framing in lines() {
        check_every_split(&framing, &SIZES, &SHORT);
    }
}

#[test]
fn lines_end_with_lf_or_crlf_and_lose_it() {
    let f: Framing = Framing::lines().into();
    let chunks: [&[u8]; 1] = [b"one\ntwo\r\n\r\nthree\rx\n\n"];
    assert_eq!(
        collect(&f, &chunks),
        [&b"one"[..], b"two", b"", b"three\rx", b""]
    );
    let mut wire = BytesMut::new();
    f.writer().encode(b"hi", &mut wire).unwrap();
    assert_eq!(&wire[..], b"hi\n");
    let crlf: Framing = Framing::lines().crlf(true).into();
    let mut wire = BytesMut::new();
    crlf.writer().encode(b"hi", &mut wire).unwrap();
    assert_eq!(&wire[..], b"hi\r\n");
    assert!(matches!(
        f.writer().encode(b"a\nb", &mut BytesMut::new()),
        Err(FrameError::Invalid(_))
    ));
}

#[test]
fn a_line_over_the_maximum_is_refused_before_more_is_buffered() {
    let f: Framing = Framing::lines().max_line(10).into();
    // Exactly the maximum passes, with LF or CRLF, in any split.
    let ok = b"0123456789\r\n0123456789\n";
    for i in 0..=ok.len() {
        assert_eq!(
            collect(&f, &[&ok[..i], &ok[i..]]),
            [&b"0123456789"[..], b"0123456789"],
            "split at {i}"
        );
    }
    // One more byte is refused as soon as it is there, whether or not the
    // terminator came, and nothing past the limit is kept.
    for wire in [&b"0123456789a\n"[..], b"0123456789ab", b"0123456789\r\r"] {
        for step in [1, 3, wire.len()] {
            let mut reader = f.reader();
            let mut err = None;
            for chunk in wire.chunks(step) {
                match reader.feed(chunk, |_| panic!("no line here")) {
                    Ok(()) => assert!(reader.pending_len() <= 11, "{} held", reader.pending_len()),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            assert!(
                matches!(err, Some(FrameError::TooLarge { max: 10, len }) if len >= 11),
                "{wire:?} in steps of {step}: {err:?}"
            );
        }
    }
    // A hostile peer that never sends LF costs the limit, not its stream.
    let mut reader = f.reader();
    let flood = vec![b'x'; 1 << 20];
    assert!(reader.feed(&flood, |_| panic!("no line")).is_err());
}

/// A frame split across receives is reassembled in a buffer that the
/// reader gives back once empty (`take_spare`) and that a reader lent it
/// reuses: a stream of such frames allocates once, not once per frame, and
/// the reader keeps nothing large between frames.
#[test]
fn a_reassembly_buffer_is_given_back_and_reused() {
    let framing = Framing::default();
    let (wire, frames) = stream(&framing, &[16 * 1024]);
    let (first, second) = wire.split_at(10 * 1024);
    let mut reader = framing.reader();
    let mut got = Vec::new();
    let feed = |reader: &mut FrameReader, chunk: &[u8], got: &mut Vec<Vec<u8>>| {
        reader
            .feed_until(
                chunk,
                |m| {
                    got.push(m.to_vec());
                    ControlFlow::Continue(())
                },
                &mut Vec::new(),
            )
            .unwrap();
    };
    feed(&mut reader, first, &mut got);
    assert!(
        reader.take_spare().is_none(),
        "a frame in progress keeps its buffer"
    );
    feed(&mut reader, second, &mut got);
    assert_eq!(got, frames);
    let spare = reader.take_spare().expect("the empty buffer comes back");
    assert!(spare.capacity() >= 16 * 1024);
    assert!(!reader.has_buffer(), "the reader keeps nothing large");
    let at = spare.as_ptr();
    let mut next = framing.reader();
    next.lend(spare);
    feed(&mut next, first, &mut got);
    feed(&mut next, second, &mut got);
    let again = next.take_spare().expect("given back again");
    assert_eq!(again.as_ptr(), at, "the lent buffer was reassembled into");
    assert_eq!(got.len(), 2);
}
