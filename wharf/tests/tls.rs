//! TLS on every backend: echo byte-exact, independent clients (Python's
//! `ssl`, `openssl s_client`), ALPN and SNI, client certificates, a
//! certificate replaced while running, a client connection, and bad input
//! of every kind closing only its own connection.
#![cfg(feature = "tls")]

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use util::tls::*;
use util::*;
use wharf::tls::{ClientTls, ServerTls, ServerTlsConfig};
use wharf::{Builder, CloseReason, Conn, Connect, ConnectFailure, Handler, Server, TlsError};

/// What one connection's TLS looked like from `on_open`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Seen {
    alpn: Option<Vec<u8>>,
    sni: Option<String>,
    peer_cert: bool,
}

/// Echoes; `close` closes after the reply. Records each connection's TLS
/// and each close.
#[derive(Clone, Default)]
struct TlsEcho {
    seen: Arc<Mutex<Vec<Seen>>>,
    closes: Arc<Mutex<Vec<CloseReason>>>,
}

impl Handler for TlsEcho {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        let tls = conn.tls().expect("a TLS connection has its TLS");
        self.seen.lock().unwrap().push(Seen {
            alpn: tls.alpn().map(<[u8]>::to_vec),
            sni: tls.server_name().map(str::to_owned),
            peer_cert: tls.peer_certificates().is_some_and(|c| !c.is_empty()),
        });
        wharf::Accept::Yes
    }
    fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
        if let Some(path) = msg.strip_prefix(b"file ") {
            // A file's bytes: read and encrypted a piece at a time.
            let path = std::str::from_utf8(path).unwrap();
            conn.send_file(wharf::FileRange::open(path).unwrap())
                .expect("a file");
            return;
        }
        conn.send(msg).expect("echo");
        if msg == b"close" {
            conn.close();
        }
    }
    fn on_close(&self, _: &mut Conn<'_, ()>, reason: CloseReason) {
        self.closes.lock().unwrap().push(reason);
    }
}

struct Fixture {
    ca: Ca,
    dir: TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let ca = Ca::new("wharf test CA");
    let dir = TempDir::new("tls");
    let (cert, key) = ca
        .issue(&["localhost", "127.0.0.1"])
        .write(&dir.0, "server");
    Fixture { ca, dir, cert, key }
}

fn start(b: Builder, tls: ServerTls, h: TlsEcho) -> Server {
    b.threads(2)
        .bind("127.0.0.1:0")
        .unwrap()
        .tls(tls)
        .start(h)
        .unwrap()
}

fn echo_once(addr: SocketAddr, config: wharf::tls::rustls::ClientConfig, name: &str) -> TlsStream {
    let mut s = connect_tls(addr, config, name).expect("handshake");
    write_frame_tls(&mut s, b"hello over tls").unwrap();
    assert_eq!(read_frame_tls(&mut s).unwrap(), b"hello over tls");
    s
}

#[test]
fn echo_is_byte_exact_over_tls_12_and_13() {
    let f = fixture();
    for version in ["1.3", "1.2"] {
        each_backend(|b| {
            let config = ServerTlsConfig::new()
                .cert_pem_files(&f.cert, &f.key)
                .unwrap();
            let config = if version == "1.2" {
                config.tls12_only()
            } else {
                config
            };
            let server = start(
                b,
                ServerTls::new(config.build().unwrap()),
                TlsEcho::default(),
            );
            let addr = server.local_addr();
            let workers: Vec<_> = (0..10)
                .map(|w| {
                    let config = client_config(&f.ca);
                    std::thread::spawn(move || {
                        let mut s = connect_tls(addr, config, "localhost").expect("handshake");
                        let want = if version == "1.2" {
                            wharf::tls::rustls::ProtocolVersion::TLSv1_2
                        } else {
                            wharf::tls::rustls::ProtocolVersion::TLSv1_3
                        };
                        assert_eq!(s.conn.protocol_version(), Some(want));
                        for (j, size) in [0, 1, 4095, 16 * 1024 + 1, 64 * 1024, 1 << 20]
                            .into_iter()
                            .enumerate()
                        {
                            let body = pattern(w * 100 + j, size);
                            write_frame_tls(&mut s, &body).unwrap();
                            let back = read_frame_tls(&mut s).unwrap();
                            assert!(back == body, "echo of {size} bytes differs");
                        }
                        // Pipelined: many frames in one write, replies in order.
                        let mut burst = Vec::new();
                        for i in 0..200 {
                            burst.extend_from_slice(&frame(&pattern(i, 100 + i)));
                        }
                        s.write_all(&burst).unwrap();
                        for i in 0..200 {
                            assert_eq!(read_frame_tls(&mut s).unwrap(), pattern(i, 100 + i));
                        }
                    })
                })
                .collect();
            for w in workers {
                w.join().unwrap();
            }
            let stats = server.handle().stats();
            assert_eq!(stats.tls_handshakes, 10);
            assert_eq!(stats.tls_handshake_failures, 0);
            server.shutdown(Duration::from_secs(2)).unwrap();
        });
    }
}

/// A file on a TLS connection is read and encrypted a piece at a time
/// (no `sendfile`: the bytes must pass through rustls), in order with the
/// messages around it.
#[test]
fn a_file_goes_out_encrypted_in_order() {
    let f = fixture();
    let body = pattern(11, 3 * 256 * 1024 + 5);
    let path = f.dir.0.join("body.bin");
    std::fs::write(&path, &body).unwrap();
    each_backend(|b| {
        let tls = ServerTls::from_pem_files(&f.cert, &f.key).unwrap();
        let server = b
            .threads(1)
            .framing(wharf::Framing::length_prefixed().max_frame(4 << 20))
            .bind("127.0.0.1:0")
            .unwrap()
            .tls(tls)
            .start(TlsEcho::default())
            .unwrap();
        let mut s = connect_tls(server.local_addr(), client_config(&f.ca), "localhost").unwrap();
        write_frame_tls(&mut s, b"before").unwrap();
        write_frame_tls(&mut s, format!("file {}", path.display()).as_bytes()).unwrap();
        write_frame_tls(&mut s, b"after").unwrap();
        assert_eq!(read_frame_tls(&mut s).unwrap(), b"before");
        assert!(read_frame_tls(&mut s).unwrap() == body, "the file differs");
        assert_eq!(read_frame_tls(&mut s).unwrap(), b"after");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn a_close_sends_close_notify_after_the_last_reply() {
    let f = fixture();
    each_backend(|b| {
        let tls = ServerTls::from_pem_files(&f.cert, &f.key).unwrap();
        let server = start(b, tls, TlsEcho::default());
        let mut s = echo_once(server.local_addr(), client_config(&f.ca), "localhost");
        write_frame_tls(&mut s, b"close").unwrap();
        assert_eq!(read_frame_tls(&mut s).unwrap(), b"close");
        // rustls reports a close without close_notify as UnexpectedEof.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .expect("a clean TLS close (close_notify), not a truncation");
        assert!(rest.is_empty());
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Runs a Python `ssl` client: handshake against the CA, echo a frame.
#[test]
fn python_ssl_client_completes_a_handshake_and_echoes() {
    if cfg!(windows) {
        eprintln!(
            "SKIPPED: Python's ssl client is a Linux program; this Windows build has none to run"
        );
        return;
    }
    let f = fixture();
    let ca = f.ca.write(&f.dir.0);
    each_backend(|b| {
        let tls = ServerTls::from_pem_files(&f.cert, &f.key).unwrap();
        let server = start(b, tls, TlsEcho::default());
        let port = server.local_addr().port();
        let script = r#"
import socket, ssl, struct, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
with socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        for body in [b"from python", b"", bytes(range(256)) * 300]:
            s.sendall(struct.pack(">I", len(body)) + body)
            head = b""
            while len(head) < 4:
                head += s.recv(4 - len(head))
            (n,) = struct.unpack(">I", head)
            got = b""
            while len(got) < n:
                got += s.recv(n - len(got))
            assert got == body, (len(got), len(body))
        print(s.version(), "ok")
"#;
        let out = Command::new("python3")
            .args(["-c", script, ca.to_str().unwrap(), &port.to_string()])
            .output()
            .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("ok"),
            "python ssl client: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.starts_with("TLSv1.3"), "{stdout}");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// `openssl s_client` (installed by scripts/need-tls-tools.sh when
/// missing) verifies the chain, sends a frame and reads its echo.
#[test]
fn openssl_s_client_completes_a_handshake_and_echoes() {
    if cfg!(windows) {
        eprintln!(
            "SKIPPED: openssl s_client is a Linux program; this Windows build has none to run"
        );
        return;
    }
    if Command::new("openssl").arg("version").output().is_err() {
        let ok = Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../scripts/need-tls-tools.sh"
            ))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "openssl is missing and could not be installed");
    }
    let f = fixture();
    let ca = f.ca.write(&f.dir.0);
    each_backend(|b| {
        let tls = ServerTls::from_pem_files(&f.cert, &f.key).unwrap();
        let server = start(b, tls, TlsEcho::default());
        for version in ["-tls1_3", "-tls1_2"] {
            let mut child = Command::new("openssl")
                .args(["s_client", "-quiet", "-verify_return_error", version])
                .args(["-connect", &server.local_addr().to_string()])
                .args(["-servername", "localhost", "-CAfile", ca.to_str().unwrap()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("openssl runs");
            let body = pattern(7, 5000);
            child
                .stdin
                .as_mut()
                .unwrap()
                .write_all(&frame(&body))
                .unwrap();
            let mut stdout = child.stdout.take().unwrap();
            let reader = std::thread::spawn(move || {
                let mut got = vec![0u8; 4 + body.len()];
                let r = stdout.read_exact(&mut got);
                (r.map(|_| got), body)
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !reader.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            let (got, body) = reader.join().unwrap();
            let got = got.unwrap_or_else(|e| {
                panic!(
                    "openssl s_client {version}: no echo ({e}): {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
            assert_eq!(
                &got[4..],
                &body[..],
                "openssl s_client {version}: echo differs"
            );
        }
        assert_eq!(server.handle().stats().tls_handshakes, 2);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn alpn_and_sni_choose_the_protocol_and_the_certificate() {
    let ca = Ca::new("wharf test CA");
    let default = ca.issue(&["localhost"]);
    let a = ca.issue(&["a.test"]);
    let star = ca.issue(&["*.b.test"]);
    each_backend(|b| {
        let config = ServerTlsConfig::new()
            .cert(default.chain.clone(), default.key())
            .unwrap()
            .sni_cert("a.test", a.chain.clone(), a.key())
            .unwrap()
            .sni_cert("*.b.test", star.chain.clone(), star.key())
            .unwrap()
            .alpn(["wharf/2", "wharf/1"])
            .build()
            .unwrap();
        let h = TlsEcho::default();
        let server = start(b, ServerTls::new(config), h.clone());
        let addr = server.local_addr();
        let cases = [
            (
                "a.test",
                vec![b"wharf/1".to_vec()],
                &a,
                Some(b"wharf/1".to_vec()),
            ),
            (
                "x.b.test",
                vec![b"wharf/2".to_vec(), b"wharf/1".to_vec()],
                &star,
                Some(b"wharf/2".to_vec()),
            ),
            ("localhost", vec![], &default, None),
        ];
        for (name, offer, cert, agreed) in &cases {
            let mut config = client_config(&ca);
            config.alpn_protocols = offer.clone();
            let s = echo_once(addr, config, name);
            let presented = &s.conn.peer_certificates().unwrap()[0];
            assert_eq!(presented, &cert.chain[0], "the certificate for {name}");
            assert_eq!(s.conn.alpn_protocol().map(<[u8]>::to_vec), *agreed);
        }
        let seen = h.seen.lock().unwrap().clone();
        let sni: Vec<_> = seen.iter().map(|s| s.sni.clone().unwrap()).collect();
        assert_eq!(sni, ["a.test", "x.b.test", "localhost"]);
        assert_eq!(seen[0].alpn.as_deref(), Some(&b"wharf/1"[..]));
        // A client that offers only protocols the server lacks is refused
        // (RFC 7301), and never opens.
        let mut config = client_config(&ca);
        config.alpn_protocols = vec![b"h2".to_vec()];
        assert!(connect_tls(addr, config, "localhost").is_err());
        wait_until(10, "the refusal to be counted", || {
            server.handle().stats().tls_handshake_failures == 1
        });
        assert_eq!(
            h.seen.lock().unwrap().len(),
            3,
            "the refused client never opened"
        );
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

#[test]
fn client_certificates_required_accepted_and_refused() {
    let ca = Ca::new("wharf test CA");
    let other = Ca::new("someone else's CA");
    let server_cert = ca.issue(&["localhost"]);
    let good = ca.issue(&["client.test"]);
    let bad = other.issue(&["client.test"]);
    let with_cert = |issued: &Issued| {
        ClientTls::with_roots(ca.roots())
            .client_cert(issued.chain.clone(), issued.key())
            .unwrap()
            .config()
            .as_ref()
            .clone()
    };
    each_backend_kind(|backend| {
        for required in [true, false] {
            let config = ServerTlsConfig::new()
                .cert(server_cert.chain.clone(), server_cert.key())
                .unwrap()
                .client_auth(ca.roots(), required)
                .build()
                .unwrap();
            let h = TlsEcho::default();
            let b = Server::builder().backend(backend);
            let server = start(b, ServerTls::new(config), h.clone());
            let addr = server.local_addr();
            echo_once(addr, with_cert(&good), "localhost");
            let mut failures = 0;
            // TLS 1.3: the client learns of the refusal on its first read.
            let refused = |config| match connect_tls(addr, config, "localhost") {
                Err(_) => true,
                Ok(mut s) => {
                    let _ = write_frame_tls(&mut s, b"x");
                    read_frame_tls(&mut s).is_err()
                }
            };
            assert!(refused(with_cert(&bad)), "a certificate from another CA");
            failures += 1;
            if required {
                assert!(
                    refused(client_config(&ca)),
                    "no certificate where one is required"
                );
                failures += 1;
            } else {
                echo_once(addr, client_config(&ca), "localhost");
            }
            wait_until(10, "the refusals to be counted", || {
                server.handle().stats().tls_handshake_failures == failures
            });
            let seen = h.seen.lock().unwrap().clone();
            let certs: Vec<bool> = seen.iter().map(|s| s.peer_cert).collect();
            let want: &[bool] = if required { &[true] } else { &[true, false] };
            assert_eq!(certs, want, "who opened, with a certificate or without");
            server.shutdown(Duration::from_secs(2)).unwrap();
        }
    });
}

#[test]
fn a_certificate_replaced_at_runtime_serves_new_connections() {
    let ca = Ca::new("wharf test CA");
    let first = ca.issue(&["localhost"]);
    let second = ca.issue(&["localhost"]);
    each_backend(|b| {
        let config = |i: &Issued| {
            ServerTlsConfig::new()
                .cert(i.chain.clone(), i.key())
                .unwrap()
                .build()
                .unwrap()
        };
        let tls = ServerTls::new(config(&first));
        let server = start(b, tls.clone(), TlsEcho::default());
        let addr = server.local_addr();
        let mut old = echo_once(addr, client_config(&ca), "localhost");
        assert_eq!(old.conn.peer_certificates().unwrap()[0], first.chain[0]);
        tls.replace(config(&second));
        let new = echo_once(addr, client_config(&ca), "localhost");
        assert_eq!(new.conn.peer_certificates().unwrap()[0], second.chain[0]);
        // The connection opened before the change goes on as it was.
        write_frame_tls(&mut old, b"still here").unwrap();
        assert_eq!(read_frame_tls(&mut old).unwrap(), b"still here");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Sends from another thread until the connection is held at its mark.
#[derive(Clone, Default)]
struct Ids(Arc<Mutex<Vec<wharf::ConnId>>>);

impl Handler for Ids {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.0.lock().unwrap().push(conn.id());
        wharf::Accept::Yes
    }
    fn on_message(&self, _: &mut Conn<'_, ()>, _: &[u8]) {}
}

#[test]
fn a_peer_that_stops_reading_holds_the_queue_at_its_mark_and_loses_nothing() {
    let f = fixture();
    each_backend(|b| {
        let h = Ids::default();
        let server = b
            .threads(1)
            .send_water_marks(256 * 1024, 128 * 1024)
            .bind("127.0.0.1:0")
            .unwrap()
            .tls(ServerTls::from_pem_files(&f.cert, &f.key).unwrap())
            .start(h.clone())
            .unwrap();
        let mut s = connect_tls(server.local_addr(), client_config(&f.ca), "localhost").unwrap();
        wait_until(10, "the connection to open", || {
            !h.0.lock().unwrap().is_empty()
        });
        let id = h.0.lock().unwrap()[0];
        let msg = wharf::Bytes::from(pattern(5, 16 * 1024 - 4));
        // The peer reads nothing: sends are refused once the mark (counted
        // in ciphertext) is crossed, and what was accepted stays bounded.
        let accepted = fill_until_held(&server.handle(), id, &msg, 32 << 20);
        let n = accepted / msg.len();
        assert!(n > 0);
        let queued = server.handle().stats().queued_bytes;
        assert!(
            queued < 4 << 20,
            "{queued} bytes queued for a peer that reads nothing"
        );
        // Then it reads: every message, byte-exact and in order.
        for i in 0..n {
            let got = read_frame_tls(&mut s).unwrap();
            assert!(got[..] == msg[..], "message {i} of {n} differs");
        }
        wait_until(10, "the queue to drain", || {
            server.handle().stats().queued_bytes == 0
        });
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Records each connection's id and each close.
#[derive(Clone, Default)]
struct Held {
    ids: Arc<Mutex<Vec<wharf::ConnId>>>,
    closes: Arc<Mutex<Vec<CloseReason>>>,
}

impl Handler for Held {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        self.ids.lock().unwrap().push(conn.id());
        wharf::Accept::Yes
    }
    fn on_message(&self, _: &mut Conn<'_, ()>, _: &[u8]) {}
    fn on_close(&self, _: &mut Conn<'_, ()>, reason: CloseReason) {
        self.closes.lock().unwrap().push(reason);
    }
}

/// The inode of the socket of this process bound to `local` and connected
/// to `remote` (IPv4 loopback), from /proc/net/tcp: `Some(0)` once the
/// process has closed it and only the kernel still holds it, `None` when
/// it is gone.
#[cfg(target_os = "linux")]
fn socket_inode(local: u16, remote: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (port(f[1]) == local && port(f[2]) == remote).then(|| f[9].parse().unwrap())
    })
}

/// A TLS failure while ciphertext is still on its way to a peer that
/// stopped reading (below the mark, so the server still reads): the
/// plaintext waiting is dropped, the records already made (and the
/// alert) go on flushing, and the write-stall timeout still cuts the
/// flush short, so the connection is released rather than kept for as
/// long as the peer keeps its window shut.
#[test]
fn a_tls_failure_behind_a_stalled_send_is_cut_off_by_the_stall_timeout() {
    let f = fixture();
    each_backend(|b| {
        let h = Held::default();
        let server = b
            .threads(1)
            .send_water_marks(64 << 20, 32 << 20)
            .write_stall_timeout(Some(Duration::from_secs(2)))
            .bind("127.0.0.1:0")
            .unwrap()
            .tls(ServerTls::from_pem_files(&f.cert, &f.key).unwrap())
            .start(h.clone())
            .unwrap();
        let addr = server.local_addr();
        let (mut conn, mut tcp) = handshaken(addr, &f.ca);
        wait_until(10, "the connection to open", || {
            !h.ids.lock().unwrap().is_empty()
        });
        let id = h.ids.lock().unwrap()[0];
        // The peer reads nothing: 16 MiB, more than the kernel's buffers
        // hold, so a send sticks in flight; below the mark, so the server
        // goes on reading.
        let msg = wharf::Bytes::from(pattern(6, 512 * 1024 - 4));
        for _ in 0..32 {
            server.handle().send(id, msg.clone()).unwrap();
        }
        wait_until(10, "the queue to stop moving", || {
            let q = server.handle().stats().queued_bytes;
            std::thread::sleep(Duration::from_millis(200));
            q > 0 && q == server.handle().stats().queued_bytes
        });
        #[cfg(target_os = "linux")]
        let ports = (addr.port(), tcp.local_addr().unwrap().port());
        #[cfg(target_os = "linux")]
        assert!(
            socket_inode(ports.0, ports.1).is_some_and(|i| i != 0),
            "the server's socket is not in /proc/net/tcp"
        );
        // Then a record that fails to decrypt.
        conn.writer().write_all(&frame(b"tampered")).unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 0x55;
        tcp.write_all(&wire).unwrap();
        wait_until(10, "the TLS close", || !h.closes.lock().unwrap().is_empty());
        assert_eq!(
            h.closes.lock().unwrap()[..],
            [CloseReason::Tls(TlsError::Decrypt)]
        );
        #[cfg(target_os = "linux")]
        wait_until(10, "the stalled flush to be cut off", || {
            socket_inode(ports.0, ports.1).map_or(true, |i| i == 0)
        });
        #[cfg(not(target_os = "linux"))]
        eprintln!("SKIPPED the check that the socket was released: it reads /proc/net/tcp");
        wait_until(10, "nothing queued", || {
            server.handle().stats().queued_bytes == 0
        });
        drop(tcp);
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

type Opened = (u64, Option<Vec<u8>>);

/// A TLS client connection from `Handle::connect`, to a wharf TLS server.
#[derive(Clone, Default)]
struct Dialer {
    /// Token and ALPN protocol of each connection opened.
    opened: Arc<Mutex<Vec<Opened>>>,
    got: Arc<Mutex<Vec<Vec<u8>>>>,
    failed: Arc<Mutex<Vec<(u64, String)>>>,
    /// The delays announced by the failures of the reconnecting connect
    /// (token 5).
    retries: Arc<Mutex<Vec<Option<Duration>>>>,
}

impl Handler for Dialer {
    type State = ();
    fn on_open(&self, conn: &mut Conn<'_, ()>) -> wharf::Accept {
        let alpn = conn.tls().and_then(|t| t.alpn().map(<[u8]>::to_vec));
        self.opened
            .lock()
            .unwrap()
            .push((conn.token().unwrap(), alpn));
        conn.send(b"from a wharf client").unwrap();
        wharf::Accept::Yes
    }
    fn on_message(&self, _: &mut Conn<'_, ()>, msg: &[u8]) {
        self.got.lock().unwrap().push(msg.to_vec());
    }
    fn on_connect_failed(&self, failure: ConnectFailure) {
        if failure.token == 5 {
            self.retries.lock().unwrap().push(failure.retry_in);
            return;
        }
        let why = failure.error.to_string();
        self.failed.lock().unwrap().push((failure.token, why));
    }
}

#[test]
fn a_client_connection_speaks_tls_and_verifies_the_server() {
    let f = fixture();
    let ca_file = f.ca.write(&f.dir.0);
    each_backend_kind(|backend| {
        let config = ServerTlsConfig::new()
            .cert_pem_files(&f.cert, &f.key)
            .unwrap()
            .alpn(["wharf/1"])
            .build()
            .unwrap();
        let server = start(
            Server::builder().backend(backend),
            ServerTls::new(config),
            TlsEcho::default(),
        );
        let port = server.local_addr().port();
        let d = Dialer::default();
        let client = Server::builder()
            .backend(backend)
            .threads(1)
            .start(d.clone())
            .unwrap();
        let trusted = ClientTls::with_ca_pem_file(&ca_file)
            .unwrap()
            .alpn(["wharf/1"]);
        // By name: the name is the host of the target.
        client
            .handle()
            .connect(
                Connect::to(&format!("localhost:{port}"))
                    .token(1)
                    .tls(trusted.clone()),
            )
            .unwrap();
        // By address, with the name given.
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let named = trusted.clone().server_name("localhost").unwrap();
        client
            .handle()
            .connect(Connect::from(addr).token(2).tls(named))
            .unwrap();
        // A name the certificate does not carry, and a CA not trusted.
        let wrong = trusted.server_name("elsewhere.test").unwrap();
        client
            .handle()
            .connect(Connect::from(addr).token(3).tls(wrong))
            .unwrap();
        let untrusted = ClientTls::with_roots(Ca::new("not the CA").roots());
        client
            .handle()
            .connect(Connect::from(addr).token(4).tls(untrusted))
            .unwrap();
        // A wrong name again, reconnecting: each failed handshake is a
        // failed attempt, so the delays grow as for failed connects.
        let policy = wharf::Reconnect::new()
            .initial(Duration::from_millis(50))
            .jitter(0.0);
        let wrong = ClientTls::with_ca_pem_file(&ca_file)
            .unwrap()
            .server_name("elsewhere.test")
            .unwrap();
        client
            .handle()
            .connect(Connect::from(addr).token(5).tls(wrong).reconnect(policy))
            .unwrap();
        wait_until(20, "three failed handshakes in a row", || {
            d.retries.lock().unwrap().len() >= 3
        });
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(d.retries.lock().unwrap()[..3], [ms(50), ms(100), ms(200)]);
        wait_until(20, "two echoes and two failures", || {
            d.got.lock().unwrap().len() == 2 && d.failed.lock().unwrap().len() == 2
        });
        let mut opened = d.opened.lock().unwrap().clone();
        opened.sort();
        assert_eq!(
            opened,
            [
                (1, Some(b"wharf/1".to_vec())),
                (2, Some(b"wharf/1".to_vec()))
            ]
        );
        assert!(d
            .got
            .lock()
            .unwrap()
            .iter()
            .all(|m| m == b"from a wharf client"));
        let mut failed = d.failed.lock().unwrap().clone();
        failed.sort();
        assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), [3, 4]);
        assert!(
            failed.iter().all(|f| f.1.contains("ertificate")),
            "{failed:?}"
        );
        client.shutdown(Duration::from_secs(2)).unwrap();
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// Reads until EOF or an error (the server closed on us).
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return true,
            Ok(_) => {}
        }
    }
}

#[test]
fn bad_input_closes_only_its_own_connection_and_is_counted() {
    let f = fixture();
    each_backend(|b| {
        let tls = ServerTls::from_pem_files(&f.cert, &f.key).unwrap();
        let h = TlsEcho::default();
        let server = b
            .threads(1)
            .bind("127.0.0.1:0")
            .unwrap()
            .tls(tls)
            .tls_handshake_timeout(Duration::from_millis(500))
            .start(h.clone())
            .unwrap();
        let addr = server.local_addr();
        // A good connection that must survive all of it.
        let mut good = echo_once(addr, client_config(&f.ca), "localhost");

        // Plaintext on the TLS port.
        let mut plain = connect(addr);
        plain.write_all(&frame(b"plaintext hello")).unwrap();
        assert!(closed_by_server(&mut plain), "plaintext");
        // An HTTP request.
        let mut http = connect(addr);
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        assert!(closed_by_server(&mut http), "http");
        // A handshake record of garbage.
        let mut garbage = connect(addr);
        let mut rec = vec![22, 3, 1, 0, 200];
        rec.extend(pattern(3, 200));
        garbage.write_all(&rec).unwrap();
        assert!(closed_by_server(&mut garbage), "garbage handshake");
        // Half a ClientHello, then gone.
        let hello = client_hello(&f.ca);
        let mut half = connect(addr);
        half.write_all(&hello[..hello.len() / 2]).unwrap();
        half.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(closed_by_server(&mut half), "truncated handshake");
        // Connects and says nothing: the handshake timeout.
        let mut silent = connect(addr);
        assert!(closed_by_server(&mut silent), "silent client");
        wait_until(10, "five failed handshakes", || {
            server.handle().stats().tls_handshake_failures == 5
        });
        assert_eq!(h.seen.lock().unwrap().len(), 1, "only the good one opened");

        // After the handshake: a record that fails to decrypt.
        let (mut conn, mut tcp) = handshaken(addr, &f.ca);
        conn.writer().write_all(&frame(b"tampered")).unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 0x55;
        tcp.write_all(&wire).unwrap();
        assert!(closed_by_server(&mut tcp), "a tampered record");
        // A peer that leaves in the middle of a record.
        let (mut conn, mut tcp) = handshaken(addr, &f.ca);
        conn.writer().write_all(&frame(&pattern(1, 1000))).unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        tcp.write_all(&wire[..wire.len() / 2]).unwrap();
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(closed_by_server(&mut tcp), "a truncated record");
        wait_until(10, "two TLS closes", || h.closes.lock().unwrap().len() == 2);
        let closes = h.closes.lock().unwrap().clone();
        assert_eq!(
            closes,
            [
                CloseReason::Tls(TlsError::Decrypt),
                CloseReason::Tls(TlsError::Truncated)
            ]
        );
        // Stats are published once a turn: they may lag the callbacks.
        wait_until(10, "two TLS closes counted", || {
            server.handle().stats().closed_with("tls") == 2
        });

        // The good connection never noticed.
        write_frame_tls(&mut good, b"still fine").unwrap();
        assert_eq!(read_frame_tls(&mut good).unwrap(), b"still fine");
        server.shutdown(Duration::from_secs(2)).unwrap();
    });
}

/// The bytes of a real ClientHello.
fn client_hello(ca: &Ca) -> Vec<u8> {
    let name = wharf::tls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn =
        wharf::tls::rustls::ClientConnection::new(Arc::new(client_config(ca)), name).unwrap();
    let mut wire = Vec::new();
    conn.write_tls(&mut wire).unwrap();
    wire
}

/// A handshake done by hand, so that the test can write raw records.
fn handshaken(addr: SocketAddr, ca: &Ca) -> (wharf::tls::rustls::ClientConnection, TcpStream) {
    let s = connect_tls(addr, client_config(ca), "localhost").expect("handshake");
    let StreamOwned { conn, sock } = s;
    (conn, sock)
}

use wharf::tls::rustls::StreamOwned;
