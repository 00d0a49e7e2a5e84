//! Echo is byte-exact across connection counts, frame sizes and splits.

mod util;

use std::io::Write;
use std::time::Duration;

use util::*;

const SIZES: [usize; 6] = [0, 1, 4095, 4097, 64 * 1024, 1 << 20];

fn echo_sizes(conns: usize, sizes: &[usize]) {
    each_backend(|b| {
        let server = b
            .threads(2)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let addr = server.local_addr();
        let workers: Vec<_> = (0..conns.min(50))
            .map(|w| {
                let sizes = sizes.to_vec();
                std::thread::spawn(move || {
                    let mut streams: Vec<_> =
                        (w..conns).step_by(50).map(|_| connect(addr)).collect();
                    for (i, s) in streams.iter_mut().enumerate() {
                        for (j, &size) in sizes.iter().enumerate() {
                            let body = pattern(w * 1000 + i * 10 + j, size);
                            write_frame(s, &body);
                            let back = read_frame(s).expect("echo reply");
                            assert_eq!(back.len(), size);
                            assert!(back == body, "echo of {size} bytes differs");
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn echo_one_connection_every_size() {
    echo_sizes(1, &SIZES);
}

#[test]
fn echo_ten_connections_every_size() {
    echo_sizes(10, &SIZES);
}

#[test]
fn echo_five_hundred_connections() {
    echo_sizes(500, &SIZES[..5]);
    echo_sizes(500, &[1 << 20]);
}

#[test]
fn echo_input_one_byte_at_a_time() {
    each_backend(|b| {
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let mut s = connect(server.local_addr());
        let mut wire = Vec::new();
        let bodies: Vec<Vec<u8>> = [0, 1, 3, 4095, 4097]
            .iter()
            .enumerate()
            .map(|(i, &n)| pattern(i, n))
            .collect();
        for b in &bodies {
            wire.extend(frame(b));
        }
        for byte in &wire {
            s.write_all(std::slice::from_ref(byte)).unwrap();
        }
        for b in &bodies {
            assert_eq!(&read_frame(&mut s).unwrap(), b);
        }
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn many_frames_in_one_write_echo_in_order() {
    each_backend(|b| {
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .start(Echo::default())
            .unwrap();
        let mut s = connect(server.local_addr());
        let mut wire = Vec::new();
        for i in 0..1000 {
            wire.extend(frame(&pattern(i, i % 97)));
        }
        s.write_all(&wire).unwrap();
        for i in 0..1000 {
            assert_eq!(
                read_frame(&mut s).unwrap(),
                pattern(i, i % 97),
                "message {i}"
            );
        }
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}
