//! `wharf kv` from outside, with clients nobody on the team wrote:
//! `redis-cli` round trips for every command, the `redis` crate, 1,000
//! pipelined commands in one write, two loops sharing the data, keys that
//! expire, and malformed and oversized requests (a RESP error, then a
//! close) — on io_uring and poll.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `wharf kv` process, killed when dropped.
struct Kv {
    child: Child,
    port: u16,
}

impl Kv {
    fn start(backend: &str, args: &[&str]) -> Kv {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args([
                "kv",
                "--addr",
                "127.0.0.1:0",
                "--backend",
                backend,
                "--duration",
                "120",
            ])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start wharf kv");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let addr = first
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {first:?}"));
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Kv { child, port }
    }

    /// `redis-cli ARGS...` against it: its output, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim_end().to_owned()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn backends() -> Vec<&'static str> {
    if cfg!(target_os = "linux") {
        vec!["uring", "poll"]
    } else {
        vec!["poll"]
    }
}

/// redis-cli and redis-benchmark, installed by the project's script if
/// they are missing.
fn need_redis_tools() {
    if Command::new("redis-cli").arg("--version").output().is_err() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/need-redis.sh");
        let ok = Command::new("bash")
            .arg(script)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "redis-cli is missing and scripts/need-redis.sh could not install it"
        );
    }
}

/// Reads until `s` closes; what came.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

#[test]
fn redis_cli_round_trips_every_command() {
    need_redis_tools();
    for backend in backends() {
        eprintln!("-- backend {backend}");
        let kv = Kv::start(backend, &["--threads", "2"]);
        let cases: &[(&[&str], &str)] = &[
            (&["PING"], "PONG"),
            (&["PING", "hello"], "hello"),
            (&["ECHO", "a b"], "a b"),
            (&["SET", "k", "v1"], "OK"),
            (&["GET", "k"], "v1"),
            (&["SET", "k", "v2", "NX"], ""),
            (&["SET", "k", "v2", "XX"], "OK"),
            (&["SET", "new", "x", "XX"], ""),
            (&["SET", "new", "x", "NX"], "OK"),
            (&["GET", "k"], "v2"),
            (&["GET", "missing"], ""),
            (&["SET", "t", "1", "EX", "100"], "OK"),
            (&["TTL", "t"], "100"),
            (&["SET", "p", "1", "PX", "50000"], "OK"),
            (&["TTL", "p"], "50"),
            (&["TTL", "k"], "-1"),
            (&["TTL", "missing"], "-2"),
            (&["EXPIRE", "k", "30"], "1"),
            (&["TTL", "k"], "30"),
            (&["EXPIRE", "missing", "30"], "0"),
            (&["INCR", "n"], "1"),
            (&["INCR", "n"], "2"),
            (&["DECR", "n"], "1"),
            (&["DECR", "m"], "-1"),
            (
                &["INCR", "k"],
                "ERR value is not an integer or out of range",
            ),
            (&["MSET", "a", "1", "b", "2"], "OK"),
            (&["MGET", "a", "nope", "b"], "1\n\n2"),
            (&["EXISTS", "a", "b", "nope"], "2"),
            (&["DEL", "a", "b", "nope"], "2"),
            (&["EXISTS", "a"], "0"),
            (&["DBSIZE"], "6"),
            (&["CONFIG", "GET", "appendonly"], "appendonly\nno"),
            (&["CLIENT", "SETNAME", "me"], "OK"),
            (
                &["NOSUCH", "x"],
                "ERR unknown command 'NOSUCH', with args beginning with: 'x'",
            ),
            (&["GET"], "ERR wrong number of arguments for 'get' command"),
            (
                &["SET", "k", "v", "EX", "0"],
                "ERR invalid expire time in 'set' command",
            ),
            (&["SET", "k", "v", "BOGUS"], "ERR syntax error"),
            (&["FLUSHALL"], "OK"),
            (&["DBSIZE"], "0"),
        ];
        for (args, want) in cases {
            assert_eq!(kv.cli(args), *want, "{backend}: redis-cli {args:?}");
        }
        // A value with every byte, through a pipe (redis-cli -x).
        let mut child = Command::new("redis-cli")
            .args(["-p", &kv.port.to_string(), "-x", "SET", "bin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait_with_output().unwrap().status.success());
        let mut s = kv.connect();
        s.write_all(b"*2\r\n$3\r\nGET\r\n$3\r\nbin\r\n").unwrap();
        let mut got = vec![0u8; 9 + bytes.len() + 2];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got[..9], b"$100000\r\n");
        assert!(
            got[9..9 + bytes.len()] == bytes[..],
            "the value came back changed"
        );
        assert_eq!(&got[9 + bytes.len()..], b"\r\n");
    }
}

#[test]
fn the_redis_crate_works_against_it_across_two_loops() {
    for backend in backends() {
        let kv = Kv::start(backend, &["--threads", "2"]);
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", kv.port)).unwrap();
        // Connections land on both loops; what one sets, every one sees.
        let mut conns: Vec<redis::Connection> =
            (0..4).map(|_| client.get_connection().unwrap()).collect();
        for (i, c) in conns.iter_mut().enumerate() {
            let _: () = redis::cmd("SET")
                .arg(format!("key{i}"))
                .arg(i)
                .query(c)
                .unwrap();
        }
        for c in conns.iter_mut() {
            let all: Vec<u32> = redis::cmd("MGET")
                .arg(&["key0", "key1", "key2", "key3"])
                .query(c)
                .unwrap();
            assert_eq!(all, vec![0, 1, 2, 3], "{backend}");
        }
        let c = &mut conns[0];
        let n: i64 = redis::cmd("INCR").arg("counter").query(c).unwrap();
        assert_eq!(n, 1);
        // A key with a deadline goes by itself.
        let _: () = redis::cmd("SET")
            .arg("brief")
            .arg("x")
            .arg("PX")
            .arg(100)
            .query(c)
            .unwrap();
        std::thread::sleep(Duration::from_millis(400));
        let gone: Option<String> = redis::cmd("GET").arg("brief").query(c).unwrap();
        assert_eq!(gone, None);
        let n: usize = redis::cmd("DBSIZE").query(c).unwrap();
        assert_eq!(n, 5, "{backend}: expired keys are removed, not only hidden");
        // Pipelined through the crate, answered in order.
        let mut pipe = redis::pipe();
        for i in 0..100 {
            pipe.cmd("SET").arg(format!("p{i}")).arg(i).ignore();
            pipe.cmd("GET").arg(format!("p{i}"));
        }
        let got: Vec<u32> = pipe.query(c).unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }
}

#[test]
fn a_thousand_pipelined_commands_in_one_write_are_answered_in_order() {
    for backend in backends() {
        let kv = Kv::start(backend, &["--threads", "1"]);
        let mut s = kv.connect();
        let mut batch = Vec::new();
        let mut want = Vec::new();
        for i in 0..500 {
            let (k, v) = (format!("key{i}"), format!("value-{i}"));
            batch.extend_from_slice(
                format!(
                    "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                    k.len(),
                    v.len()
                )
                .as_bytes(),
            );
            // Inline commands too, as redis-benchmark's PING_INLINE.
            batch.extend_from_slice(format!("GET {k}\r\n").as_bytes());
            want.extend_from_slice(b"+OK\r\n");
            want.extend_from_slice(format!("${}\r\n{v}\r\n", v.len()).as_bytes());
        }
        s.write_all(&batch).unwrap();
        let mut got = vec![0u8; want.len()];
        s.read_exact(&mut got).unwrap();
        assert!(
            got == want,
            "{backend}: the replies differ from the requests' order"
        );
    }
}

#[test]
fn malformed_and_oversized_requests_get_an_error_and_a_close() {
    for backend in backends() {
        let kv = Kv::start(backend, &["--threads", "1", "--max-request", "1024"]);
        let cases: &[(&[u8], &str)] = &[
            (
                b"*x\r\n",
                "-ERR Protocol error: invalid multibulk length\r\n",
            ),
            (b"*1\r\n:5\r\n", "-ERR Protocol error: expected '$'\r\n"),
            (
                b"*1\r\n$-3\r\n",
                "-ERR Protocol error: invalid bulk length\r\n",
            ),
            // 1 GB announced with a 1 KiB maximum: refused on the header.
            (
                b"*1\r\n$1000000000\r\n",
                "-ERR Protocol error: request too large\r\n",
            ),
            (
                b"*1\r\n$3\r\nabcXX",
                "-ERR Protocol error: a bulk string does not end with \\r\\n\r\n",
            ),
        ];
        for (bad, want) in cases {
            let mut s = kv.connect();
            // A good request first: it is answered before the bad one.
            s.write_all(b"PING\r\n").unwrap();
            s.write_all(bad).unwrap();
            let got = read_to_close(&mut s);
            assert_eq!(
                String::from_utf8_lossy(&got),
                format!("+PONG\r\n{want}"),
                "{backend}: {bad:?}"
            );
        }
        // An inline request over 64 KiB (the maximum is 1 KiB here).
        let mut s = kv.connect();
        s.write_all(&vec![b'a'; 2000]).unwrap();
        let got = read_to_close(&mut s);
        assert_eq!(got, b"-ERR Protocol error: too big inline request\r\n");
        // An unknown command is an error, and the connection stays.
        let mut s = kv.connect();
        s.write_all(b"FROB\r\nPING\r\n").unwrap();
        let mut buf = vec![0u8; 128];
        let mut got = Vec::new();
        while !got.ends_with(b"+PONG\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed after an unknown command");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"-ERR unknown command 'FROB'"));
        // Still serving others.
        let mut other = kv.connect();
        other.write_all(b"PING\r\n").unwrap();
        let mut pong = [0u8; 7];
        other.read_exact(&mut pong).unwrap();
        assert_eq!(&pong, b"+PONG\r\n");
    }
}
