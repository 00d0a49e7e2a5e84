//! The table a person reads: one block per scenario, one row per server,
//! medians and their ratios to wharf.

use std::fmt::Write;

use super::results::{count_label, Results, Scenario, ScenarioResult, Summary};
use crate::peers::ServerKind;

/// The whole table, as printed at the end of `wharf bench`.
pub fn render(results: &Results) -> String {
    let m = &results.meta;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "wharf bench ({}): median of {} interleaved round{}, {:.1} s windows after {:.1} s warm-up",
        m.preset,
        m.rounds,
        if m.rounds == 1 { "" } else { "s" },
        m.duration_secs,
        m.warmup_secs
    );
    let pin = match m.pinning {
        Some(p) => format!(
            "server pinned to CPU {}, load generator to CPU {}",
            p.server_cpu, p.load_cpu
        ),
        None => "not pinned: server and load generator share the CPUs".to_string(),
    };
    let threads = if m.servers.contains(&ServerKind::WharfUring2) {
        "every server on 1 thread but wharf-uring-2 (2 loops, not pinned: one shares the load generator's CPU)"
    } else {
        "every server on 1 thread"
    };
    let _ = writeln!(
        out,
        "{} CPUs, kernel {}; {pin}; {threads}",
        m.cpus,
        m.kernel.as_deref().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "×wharf: the server's median over wharf-uring's (msg/s: higher is better; CPU/msg, memory, time: lower is better)"
    );
    for note in &m.notes {
        let _ = writeln!(out, "note: {note}");
    }
    for s in &results.scenarios {
        out.push('\n');
        scenario(&mut out, s);
    }
    out
}

fn scenario(out: &mut String, s: &ScenarioResult) {
    let _ = writeln!(out, "{}: {}", s.scenario.label(), s.scenario.describe());
    match s.scenario {
        Scenario::Echo { .. } => {
            let _ = writeln!(
                out,
                "  {:<19} {:>5} {:>10} {:>7} {:>9} {:>10} {:>7} {:>6} {:>6} {:>7}",
                "server",
                "",
                "msg/s",
                "×wharf",
                "p99 µs",
                "CPU µs/msg",
                "×wharf",
                "srv%",
                "load%",
                "RSS MiB"
            );
            for x in &s.summary {
                let m = &x.median;
                let _ = write!(
                    out,
                    "  {:<19} {:>5} {:>10} {:>7} {:>9} {:>10} {:>7} {:>6} {:>6} {:>7}",
                    x.server.name(),
                    x.server.framing(),
                    num(m.messages_per_sec, 0),
                    ratio(x.ratio.messages_per_sec),
                    num(m.p99_us, 1),
                    num(m.cpu_us_per_msg, 2),
                    ratio(x.ratio.cpu_us_per_msg),
                    num(m.server_cpu_pct, 0),
                    num(m.load_cpu_pct, 0),
                    num(m.rss_mib, 1),
                );
                failures(out, x);
            }
            limit(out, s);
            let client_bound = s
                .summary
                .iter()
                .any(|x| x.median.load_cpu_pct.is_some_and(|p| p >= 90.0));
            if client_bound {
                let _ = writeln!(
                    out,
                    "  (load% near 100: the load generator's core is the limit there; compare CPU µs/msg)"
                );
            }
        }
        Scenario::Idle { connections } => {
            let _ = writeln!(
                out,
                "  {:<19} {:>12} {:>7} {:>12}",
                "server", "B/conn", "×wharf", "RSS MiB"
            );
            for x in &s.summary {
                let _ = write!(
                    out,
                    "  {:<19} {:>12} {:>7} {:>12}",
                    x.server.name(),
                    num(x.median.bytes_per_conn, 0),
                    ratio(x.ratio.bytes_per_conn),
                    num(x.median.rss_mib, 1),
                );
                failures(out, x);
            }
            let _ = writeln!(
                out,
                "  (B/conn = (RSS with {} idle connections − RSS after the active connection alone warmed the server) / {}; kernel socket memory is not in RSS)",
                count_label(connections),
                count_label(connections)
            );
        }
        Scenario::CrossNode { .. } => {
            let _ = writeln!(
                out,
                "  {:<19} {:>9} {:>9} {:>13} {:>16} {:>9}",
                "server", "p50 µs", "p99 µs", "deliveries/s", "B+C CPU µs/del.", "Redis µs"
            );
            for x in &s.summary {
                let m = &x.median;
                let _ = write!(
                    out,
                    "  {:<19} {:>9} {:>9} {:>13} {:>16} {:>9}",
                    x.server.name(),
                    num(m.p50_us, 0),
                    num(m.p99_us, 0),
                    num(m.deliveries_per_sec, 0),
                    num(m.cpu_us_per_msg, 3),
                    num(m.broker_cpu_us_per_msg, 1),
                );
                failures(out, x);
            }
            let _ = writeln!(
                out,
                "  (latency: publish on A to receipt by each member on B or C, paced; deliveries/s: A publishing with 32 KiB per member in flight;\n   Redis µs: the broker's CPU per message published; all three nodes share the server CPU)"
            );
        }
        Scenario::Broadcast { .. } | Scenario::Group { .. } => {
            let _ = writeln!(
                out,
                "  {:<19} {:>12} {:>7} {:>14} {:>7} {:>7}",
                "server", "ms to all", "×wharf", "CPU µs/deliv.", "×wharf", "RSS MiB"
            );
            for x in &s.summary {
                let m = &x.median;
                let _ = write!(
                    out,
                    "  {:<19} {:>12} {:>7} {:>14} {:>7} {:>7}",
                    x.server.name(),
                    num(m.fanout_ms, 2),
                    ratio(x.ratio.fanout_ms),
                    num(m.cpu_us_per_msg, 3),
                    ratio(x.ratio.cpu_us_per_msg),
                    num(m.rss_mib, 1),
                );
                failures(out, x);
            }
        }
    }
}

/// The line that sets wharf against the limit (uring-best): its CPU per
/// message over the limit's, when both ran.
fn limit(out: &mut String, s: &ScenarioResult) {
    let cpu = |kind| {
        s.summary
            .iter()
            .find(|x| x.server == kind)
            .and_then(|x| x.median.cpu_us_per_msg)
    };
    let Some(best) = cpu(ServerKind::UringBest).filter(|&v| v > 0.0) else {
        return;
    };
    let ratios: Vec<String> = [ServerKind::WharfUring, ServerKind::WharfPoll]
        .into_iter()
        .filter_map(|k| cpu(k).map(|v| format!("{} {:.2}×", k.name(), v / best)))
        .collect();
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "  against the limit (uring-best), CPU µs/msg: {}",
            ratios.join(", ")
        );
    }
}

/// Ends a row, saying how many runs failed and why.
fn failures(out: &mut String, x: &Summary) {
    if x.runs_ok < x.runs {
        let why = x.error.as_deref().unwrap_or("?");
        let _ = write!(
            out,
            "  [{} of {} runs failed: {why}]",
            x.runs - x.runs_ok,
            x.runs
        );
    }
    out.push('\n');
}

/// A figure with thousands separators (for whole numbers) or `decimals`
/// places; "n/a" when missing.
fn num(v: Option<f64>, decimals: usize) -> String {
    match v {
        None => "n/a".to_string(),
        Some(v) if decimals == 0 && v >= 0.0 => count_label(v.round() as usize),
        Some(v) => format!("{v:.decimals$}"),
    }
}

fn ratio(v: Option<f64>) -> String {
    match v {
        None => "n/a".to_string(),
        Some(v) => format!("{v:.2}"),
    }
}
