//! `wharf bench`: its writers (table, JSON, SVG) on a made-up result set,
//! and one tiny real run against two servers.

use std::path::PathBuf;
use std::time::Duration;

use wharf_cli::bench::ScenarioResult;
use wharf_cli::bench::{self, median, Meta, Metrics, Pinning, Plan, Results, Run, Scenario};
use wharf_cli::peers::ServerKind;

const ECHO: Scenario = Scenario::Echo {
    size: 64,
    connections: 100,
};
const IDLE: Scenario = Scenario::Idle { connections: 1000 };

fn echo_run(server: ServerKind, round: usize, msgs: f64, cpu: f64) -> Run {
    Run {
        server,
        round,
        error: None,
        metrics: Metrics {
            messages_per_sec: Some(msgs),
            p99_us: Some(100.0 + round as f64),
            cpu_us_per_msg: Some(cpu),
            server_cpu_pct: Some(95.0),
            load_cpu_pct: Some(99.0),
            rss_mib: Some(5.0),
            ..Metrics::default()
        },
    }
}

/// wharf-uring: 5 runs (odd), tokio-raw: 4 ok runs (even) and one failed
/// run whose outlying numbers must not count.
fn synthetic() -> Results {
    let servers = vec![ServerKind::WharfUring, ServerKind::TokioRaw];
    let mut runs = Vec::new();
    let wharf = [
        (90.0, 3.0),
        (110.0, 2.0),
        (100.0, 2.5),
        (95.0, 4.0),
        (120.0, 1.0),
    ];
    let tokio = [(40.0, 5.0), (60.0, 6.0), (50.0, 4.0), (70.0, 7.0)];
    for (round, &(m, c)) in wharf.iter().enumerate() {
        runs.push(echo_run(ServerKind::WharfUring, round, m * 1000.0, c));
        let mut t = match tokio.get(round) {
            Some(&(m, c)) => echo_run(ServerKind::TokioRaw, round, m * 1000.0, c),
            None => echo_run(ServerKind::TokioRaw, round, 1e9, 1e9),
        };
        if round == 4 {
            t.error = Some("the server died".into());
        }
        runs.push(t);
    }
    let idle = vec![
        Run {
            server: ServerKind::WharfUring,
            round: 0,
            error: None,
            metrics: Metrics {
                bytes_per_conn: Some(2000.0),
                ..Metrics::default()
            },
        },
        Run {
            server: ServerKind::TokioRaw,
            round: 0,
            error: None,
            metrics: Metrics {
                bytes_per_conn: Some(16000.0),
                ..Metrics::default()
            },
        },
    ];
    Results {
        meta: Meta {
            preset: "test".into(),
            rounds: 5,
            warmup_secs: 0.5,
            duration_secs: 3.0,
            pinning: Some(Pinning {
                server_cpu: 0,
                load_cpu: 1,
            }),
            cpus: 2,
            kernel: Some("6.0".into()),
            started_unix: 0,
            elapsed_secs: 1.0,
            servers: servers.clone(),
            notes: vec![],
        },
        scenarios: vec![
            ScenarioResult::new(ECHO, &servers, runs),
            ScenarioResult::new(IDLE, &servers, idle),
        ],
    }
}

#[test]
fn medians_of_odd_and_even_counts() {
    assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    assert_eq!(median(&[7.0]), Some(7.0));
    assert_eq!(median(&[]), None);
}

#[test]
fn summary_takes_medians_of_ok_runs_and_ratios_to_wharf() {
    let r = synthetic();
    let s = &r.scenarios[0];
    assert_eq!(s.baseline, Some(ServerKind::WharfUring));
    let wharf = &s.summary[0];
    let tokio = &s.summary[1];
    assert_eq!((wharf.runs_ok, wharf.runs), (5, 5));
    assert_eq!((tokio.runs_ok, tokio.runs), (4, 5));
    assert_eq!(wharf.median.messages_per_sec, Some(100_000.0));
    assert_eq!(wharf.median.cpu_us_per_msg, Some(2.5));
    // Even count: the mean of the middle two; the failed run is left out.
    assert_eq!(tokio.median.messages_per_sec, Some(55_000.0));
    assert_eq!(tokio.median.cpu_us_per_msg, Some(5.5));
    assert_eq!(tokio.error.as_deref(), Some("the server died"));
    assert_eq!(wharf.ratio.messages_per_sec, Some(1.0));
    assert_eq!(tokio.ratio.messages_per_sec, Some(0.55));
    assert_eq!(tokio.ratio.cpu_us_per_msg, Some(2.2));
    assert_eq!(r.scenarios[1].summary[1].ratio.bytes_per_conn, Some(8.0));
    // Figures the scenario does not measure stay absent.
    assert_eq!(r.scenarios[1].summary[0].median.messages_per_sec, None);
}

#[test]
fn table_shows_medians_ratios_and_pinning() {
    let t = bench::table(&synthetic());
    println!("{t}");
    assert!(t.contains("server pinned to CPU 0, load generator to CPU 1"));
    let row = t
        .lines()
        .find(|l| l.trim_start().starts_with("tokio-raw") && l.contains("55,000"))
        .expect("tokio-raw's echo row");
    assert!(
        row.contains("0.55") && row.contains("5.50") && row.contains("2.20"),
        "{row}"
    );
    assert!(row.contains("1 of 5 runs failed"), "{row}");
    assert!(t.contains("16,000"), "idle bytes per connection");
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wharf-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn json_holds_the_same_results() {
    let r = synthetic();
    let dir = out_dir("json");
    bench::write(&r, &dir).expect("written");
    let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json");
    let back: Results = serde_json::from_str(&text).expect("parses");
    same_results(&back, &r);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tokio = &v["scenarios"][0]["summary"][1];
    assert_eq!(tokio["server"], "tokio-raw");
    assert_eq!(tokio["median"]["messages_per_sec"], 55_000.0);
    assert_eq!(v["scenarios"][0]["scenario"]["kind"], "echo");
    assert!(dir.join("chart.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Equal, figures to 1e-12 relative (JSON may move a float's last bit).
fn same_results(a: &Results, b: &Results) {
    assert_eq!(a.meta, b.meta);
    assert_eq!(a.scenarios.len(), b.scenarios.len());
    let close = |x: &Metrics, y: &Metrics| {
        for ((name, p), (_, q)) in x.fields().iter().zip(y.fields()) {
            match (p, q) {
                (Some(p), Some(q)) => assert!((p - q).abs() <= 1e-12 * q.abs(), "{name}: {p} {q}"),
                _ => assert_eq!(*p, q, "{name}"),
            }
        }
    };
    for (x, y) in a.scenarios.iter().zip(&b.scenarios) {
        assert_eq!((x.scenario, x.baseline), (y.scenario, y.baseline));
        assert_eq!(x.runs.len(), y.runs.len());
        for (p, q) in x.runs.iter().zip(&y.runs) {
            assert_eq!((p.server, p.round, &p.error), (q.server, q.round, &q.error));
            close(&p.metrics, &q.metrics);
        }
        assert_eq!(x.summary.len(), y.summary.len());
        for (p, q) in x.summary.iter().zip(&y.summary) {
            assert_eq!(
                (p.server, p.runs_ok, p.runs, &p.error),
                (q.server, q.runs_ok, q.runs, &q.error)
            );
            close(&p.median, &q.median);
            close(&p.ratio, &q.ratio);
        }
    }
}

/// Every `<rect …>` bar of the chart: (server, scenario, value).
fn bars(svg: &str) -> Vec<(String, String, f64)> {
    let attr = |tag: &str, name: &str| -> Option<String> {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        Some(tag[start..start + tag[start..].find('"')?].to_string())
    };
    svg.split("<rect")
        .skip(1)
        .filter_map(|tag| {
            let tag = &tag[..tag.find('>')?];
            Some((
                attr(tag, "data-server")?,
                attr(tag, "data-scenario")?,
                attr(tag, "data-value")?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn chart_bars_carry_the_medians() {
    let r = synthetic();
    let svg = bench::chart_svg(&r);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    let bars = bars(&svg);
    // msg/s and CPU/msg for 2 servers in the echo scenario, B/conn in idle.
    assert_eq!(bars.len(), 6, "{bars:?}");
    let label = ECHO.label();
    let values: Vec<f64> = bars
        .iter()
        .filter(|(s, sc, _)| s == "tokio-raw" && *sc == label)
        .map(|b| b.2)
        .collect();
    assert_eq!(values, vec![55_000.0, 5.5]);
    assert!(bars.contains(&("wharf-uring".into(), IDLE.label(), 2000.0)));
    for word in [
        "Messages per second",
        "CPU time per message",
        "wharf-uring",
        "tokio-raw",
    ] {
        assert!(svg.contains(word), "{word}");
    }
}

#[test]
fn a_tiny_run_measures_two_servers() {
    let first = if ServerKind::WharfUring.available() {
        ServerKind::WharfUring
    } else {
        ServerKind::WharfPoll
    };
    let mut plan = Plan::quick(PathBuf::from(env!("CARGO_BIN_EXE_wharf")));
    plan.preset = "test".into();
    plan.scenarios = vec![Scenario::Echo {
        size: 64,
        connections: 4,
    }];
    plan.servers = vec![first, ServerKind::TokioRaw];
    plan.rounds = 1;
    plan.warmup = Duration::from_millis(200);
    plan.duration = Duration::from_secs(1);
    plan.progress = false;
    let results = bench::run(&plan);
    let dir = out_dir("e2e");
    bench::write(&results, &dir).expect("written");
    let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json");
    let back: Results = serde_json::from_str(&text).expect("parses");
    println!("{}", bench::table(&back));
    let summary = &back.scenarios[0].summary;
    assert_eq!(summary.len(), 2);
    for s in summary {
        assert_eq!(s.error, None, "{}", s.server.name());
        let rate = s.median.messages_per_sec.unwrap_or(0.0);
        assert!(rate > 0.0, "{}: {rate} msg/s", s.server.name());
        if cfg!(target_os = "linux") {
            assert!(s.median.cpu_us_per_msg.is_some_and(|c| c > 0.0));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_group_and_cross_node_scenarios_run_end_to_end() {
    // The cross-node scenario starts its own redis-server: install it if
    // it is missing, as the project's other Redis tests do.
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/need-redis.sh");
        let ok = std::process::Command::new("bash").arg(script).status();
        assert!(ok.is_ok_and(|s| s.success()), "{script} failed");
    }
    let first = if ServerKind::WharfUring.available() {
        ServerKind::WharfUring
    } else {
        ServerKind::WharfPoll
    };
    let mut plan = Plan::quick(PathBuf::from(env!("CARGO_BIN_EXE_wharf")));
    plan.preset = "test".into();
    plan.scenarios = vec![
        Scenario::Group {
            size: 256,
            connections: 40,
        },
        Scenario::CrossNode {
            size: 256,
            members: 10,
        },
    ];
    plan.servers = vec![first, ServerKind::TokioRaw];
    plan.rounds = 1;
    plan.progress = false;
    let results = bench::run(&plan);
    println!("{}", bench::table(&results));
    // The group scenario runs every server; the peers relay instead.
    let group = &results.scenarios[0].summary;
    assert_eq!(group.len(), 2);
    for s in group {
        assert_eq!(s.error, None, "{}", s.server.name());
        assert!(s.median.fanout_ms.is_some_and(|ms| ms > 0.0));
    }
    // The cross-node one runs wharf only, and measures what it says.
    let nodes = &results.scenarios[1].summary;
    assert_eq!(nodes.len(), 1, "only wharf has groups across nodes");
    let m = &nodes[0].median;
    assert_eq!(nodes[0].error, None);
    assert!(m.p50_us.is_some_and(|v| v > 0.0) && m.p99_us >= m.p50_us);
    assert!(m.deliveries_per_sec.is_some_and(|v| v > 0.0));
    if cfg!(target_os = "linux") {
        assert!(m.broker_cpu_us_per_msg.is_some_and(|v| v > 0.0));
    }
}

#[test]
fn the_limit_and_the_two_loop_server_echo_and_relay() {
    if !ServerKind::UringBest.available() {
        eprintln!("SKIPPED: uring-best and wharf-uring-2 need Linux");
        return;
    }
    let mut plan = Plan::quick(PathBuf::from(env!("CARGO_BIN_EXE_wharf")));
    plan.preset = "test".into();
    plan.scenarios = vec![
        // 16 KiB + 4 bytes: one 32 KiB provided buffer, or two receives.
        Scenario::Echo {
            size: 16 * 1024,
            connections: 8,
        },
        Scenario::Broadcast {
            size: 256,
            connections: 40,
        },
    ];
    plan.servers = vec![
        ServerKind::WharfUring,
        ServerKind::UringBest,
        ServerKind::WharfUring2,
    ];
    plan.rounds = 1;
    plan.warmup = Duration::from_millis(200);
    plan.duration = Duration::from_secs(1);
    plan.progress = false;
    let results = bench::run(&plan);
    let table = bench::table(&results);
    println!("{table}");
    for s in &results.scenarios[0].summary {
        assert_eq!(s.error, None, "{}", s.server.name());
        let rate = s.median.messages_per_sec.unwrap_or(0.0);
        assert!(rate > 0.0, "{}: {rate} msg/s", s.server.name());
    }
    for s in &results.scenarios[1].summary {
        assert_eq!(s.error, None, "{}", s.server.name());
        assert!(s.median.fanout_ms.is_some_and(|ms| ms > 0.0));
    }
    assert!(
        table.contains("against the limit (uring-best), CPU µs/msg: wharf-uring "),
        "{table}"
    );
    assert!(table.contains("wharf-uring-2 (2 loops"), "{table}");
}
