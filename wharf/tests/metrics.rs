//! The Prometheus endpoint, on every backend: scraped over HTTP and parsed
//! with an OpenMetrics parser (`openmetrics-parser`, which checks the
//! exposition against the format's grammar), its counters equal the
//! traffic the test made: messages in and out exactly, closes by reason,
//! refusals by cause. Built with the `prometheus` feature (as
//! `cargo test --workspace` builds it); without it one test says so.

#[cfg(not(feature = "prometheus"))]
#[test]
fn the_endpoint_needs_the_prometheus_feature() {
    eprintln!(
        "SKIPPED: the metrics tests need `--features prometheus` (cargo test --workspace has it)"
    );
}

#[cfg(feature = "prometheus")]
mod util;
#[cfg(feature = "prometheus")]
mod with_the_feature {
    use super::util;

    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    use openmetrics_parser::{MetricFamily, OpenMetricsType, OpenMetricsValue};
    use util::*;
    use wharf::{Conn, Framing, Handler, IpRules};

    /// Echoes, except "close" (it closes) and "panic" (it panics).
    #[derive(Clone, Default)]
    struct Mixed;

    impl Handler for Mixed {
        type State = ();
        fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
            match msg {
                b"close" => conn.close(),
                b"panic" => panic!("a handler panics, as the test asks"),
                _ => conn.send(msg).expect("echo"),
            }
        }
    }

    /// GET `path`: the status line, the content type and the body.
    fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        let (head, body) = all.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.lines().next().unwrap().to_owned();
        let kind = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Type: "))
            .unwrap_or("")
            .to_owned();
        (status, kind, body.to_owned())
    }

    type Family = MetricFamily<OpenMetricsType, OpenMetricsValue>;

    fn value(v: &OpenMetricsValue) -> u64 {
        let n = match v {
            OpenMetricsValue::Counter(c) => &c.value,
            OpenMetricsValue::Gauge(g) => g,
            other => panic!("not a counter or gauge: {other:?}"),
        };
        n.as_i64().expect("a whole number") as u64
    }

    /// The sum of a family's samples (over its `loop` label, say).
    fn total(f: &Family) -> u64 {
        f.iter_samples().map(|s| value(&s.value)).sum()
    }

    /// The sample of a family with one label, by that label's value.
    fn by(f: &Family, label: &str) -> u64 {
        let s = f
            .get_sample_by_label_values(&[label.to_owned()])
            .unwrap_or_else(|| panic!("{} has no sample {label}", f.family_name));
        value(&s.value)
    }

    #[test]
    fn scraped_counters_equal_the_traffic() {
        if cfg!(target_os = "macos") {
            eprintln!("SKIPPED: needs 127.0.0.2 and 127.0.0.3 as loopback sources (not on macOS)");
            return;
        }
        each_backend(|b| {
            let server = b
                .threads(2)
                .framing(Framing::length_prefixed().max_frame(1024))
                .ip_rules(IpRules::default().deny("127.0.0.2").unwrap())
                .bind("127.0.0.1:0")
                .unwrap()
                .start(Mixed)
                .unwrap();
            let (addr, handle) = (server.local_addr(), server.handle());
            let endpoint = wharf::metrics::Endpoint::start(handle.clone(), "127.0.0.1:0").unwrap();
            // Five clients echo 20 messages each, then close.
            for c in 0..5 {
                let mut s = connect(addr);
                for i in 0..20 {
                    let msg = pattern(c * 100 + i, 1 + i * 7);
                    write_frame(&mut s, &msg);
                    assert_eq!(read_frame(&mut s).unwrap(), msg);
                }
            }
            // One asks to be closed, one makes its handler panic, one sends a
            // frame over the maximum.
            for (body, what) in [(&b"close"[..], "close"), (b"panic", "panic")] {
                let mut s = connect(addr);
                write_frame(&mut s, body);
                assert!(read_frame(&mut s).is_err(), "{what}: closed");
            }
            let mut s = connect(addr);
            s.write_all(&frame(&[0u8; 2000])[..4]).unwrap();
            assert!(read_frame(&mut s).is_err(), "oversized: closed");
            // Two denied, one banned.
            let from = |ip: [u8; 4]| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                s.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
                s.connect(&addr.into()).unwrap();
                let mut s: TcpStream = s.into();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                assert!(matches!(s.read(&mut [0u8; 8]), Ok(0) | Err(_)));
            };
            from([127, 0, 0, 2]);
            from([127, 0, 0, 2]);
            handle.ban("127.0.0.3", Duration::from_secs(60)).unwrap();
            from([127, 0, 0, 3]);
            wait_until(10, "every close and refusal counted", || {
                let s = handle.stats();
                s.closed == 8 && s.denied == 2 && s.banned == 1
            });

            let (status, kind, body) = get(endpoint.local_addr(), "/metrics");
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert_eq!(kind, wharf::metrics::CONTENT_TYPE);
            let parsed = openmetrics_parser::openmetrics::parse_openmetrics(&body)
                .unwrap_or_else(|e| panic!("not OpenMetrics: {e:?}\n{body}"));
            let f = |name: &str| {
                parsed
                    .families
                    .get(name)
                    .unwrap_or_else(|| panic!("no {name} in\n{body}"))
            };
            // Messages: 100 echoed, plus "close" and "panic" received.
            assert_eq!(total(f("wharf_messages_received")), 102);
            assert_eq!(total(f("wharf_messages_sent")), 100);
            assert_eq!(
                f("wharf_messages_received").iter_samples().count(),
                2,
                "one per loop"
            );
            assert_eq!(total(f("wharf_connections_opened")), 8);
            assert_eq!(total(f("wharf_connections_open")), 0);
            let closed = f("wharf_connections_closed");
            assert_eq!(by(closed, "peer_closed"), 5);
            assert_eq!(by(closed, "local"), 1);
            assert_eq!(by(closed, "handler_panic"), 1);
            assert_eq!(by(closed, "frame_too_large"), 1);
            assert_eq!(by(closed, "idle_timeout"), 0);
            assert_eq!(total(closed), 8);
            let refused = f("wharf_connections_refused");
            assert_eq!(by(refused, "denied"), 2);
            assert_eq!(by(refused, "banned"), 1);
            assert_eq!(by(refused, "rate_limited"), 0);
            assert_eq!(total(f("wharf_handler_panics")), 1);
            assert_eq!(total(f("wharf_loops")), 2);
            assert_eq!(total(f("wharf_bans")), 1);
            assert_eq!(total(f("wharf_queued_bytes")), 0);
            let stats = handle.stats();
            assert_eq!(total(f("wharf_received_bytes")), stats.bytes_in);
            assert_eq!(total(f("wharf_sent_bytes")), stats.bytes_out);
            assert_eq!(
                f("wharf_connections_closed").family_type,
                OpenMetricsType::Counter
            );

            let (status, _, _) = get(endpoint.local_addr(), "/nothing");
            assert_eq!(status, "HTTP/1.1 404 Not Found");
            drop(endpoint);
            server.shutdown(Duration::from_secs(2)).unwrap();
        });
    }

    #[test]
    fn silent_clients_do_not_hold_up_a_scrape_and_an_endpoint_on_every_address_stops() {
        each_backend(|b| {
            let server = b
                .threads(1)
                .bind("127.0.0.1:0")
                .unwrap()
                .start(Mixed)
                .unwrap();
            let endpoint = wharf::metrics::Endpoint::start(server.handle(), "127.0.0.1:0").unwrap();
            // Two clients connect and say nothing; a half-sent request too.
            let silent: Vec<TcpStream> = (0..2)
                .map(|_| TcpStream::connect(endpoint.local_addr()).unwrap())
                .collect();
            let mut half = TcpStream::connect(endpoint.local_addr()).unwrap();
            half.write_all(b"GET /metr").unwrap();
            let started = std::time::Instant::now();
            let (status, _, body) = get(endpoint.local_addr(), "/metrics");
            assert_eq!(status, "HTTP/1.1 200 OK");
            assert!(body.ends_with("# EOF\n"));
            if timing_bounds_apply("a scrape beside silent clients") {
                assert!(
                    started.elapsed() < Duration::from_millis(1500),
                    "{:?}",
                    started.elapsed()
                );
            }
            // The silent ones are closed by their deadline, unanswered.
            let mut buf = Vec::new();
            half.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            assert!(matches!(half.read_to_end(&mut buf), Ok(_) | Err(_)) && buf.is_empty());
            drop((silent, endpoint));
            // On every address: dropping it returns (it wakes itself on
            // loopback, which Windows needs).
            let everywhere = wharf::metrics::Endpoint::start(server.handle(), "0.0.0.0:0").unwrap();
            drop(everywhere);
            server.shutdown(Duration::from_secs(2)).unwrap();
        });
    }
}
