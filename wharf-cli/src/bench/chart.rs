//! The chart: hand-written SVG, grouped bars (one group per scenario, one
//! bar per server) in stacked panels: messages per second, server CPU per
//! message, and, when they ran, memory per idle connection and broadcast
//! time.
//!
//! Scenarios differ by orders of magnitude, so each group is scaled to its
//! own largest bar (the y axis is "% of the scenario's largest") and every
//! bar carries its value. Each bar also carries `data-server`,
//! `data-scenario` and `data-value` attributes and a `<title>` tooltip.

use std::fmt::Write;

use super::results::{Metrics, Results, Scenario};
use crate::peers::ServerKind;

const BAR: f64 = 16.0;
const BAR_GAP: f64 = 2.0;
const GROUP_GAP: f64 = 34.0;
const LEFT: f64 = 74.0;
const RIGHT: f64 = 24.0;
/// Plot height of a panel; the tallest bar takes `FILL` of it, leaving
/// room for its rotated label.
const PLOT: f64 = 200.0;
const FILL: f64 = 0.72;
/// Panel title above, scenario labels below.
const PANEL_TOP: f64 = 34.0;
const PANEL_BOTTOM: f64 = 40.0;
const HEADER: f64 = 96.0;

/// One panel: a figure drawn for the scenarios that measure it.
struct Panel {
    title: &'static str,
    unit: &'static str,
    pick: fn(&Metrics) -> Option<f64>,
    applies: fn(&Scenario) -> bool,
}

const PANELS: [Panel; 4] = [
    Panel {
        title: "Messages per second (higher is better)",
        unit: "msg/s",
        pick: |m| m.messages_per_sec,
        applies: |s| matches!(s, Scenario::Echo { .. }),
    },
    Panel {
        title: "Server CPU time per message, µs (lower is better)",
        unit: "µs/msg",
        pick: |m| m.cpu_us_per_msg,
        applies: |s| matches!(s, Scenario::Echo { .. }),
    },
    Panel {
        title: "Server memory per idle connection, bytes (lower is better)",
        unit: "B/conn",
        pick: |m| m.bytes_per_conn,
        applies: |s| matches!(s, Scenario::Idle { .. }),
    },
    Panel {
        title: "Broadcast and group: ms until every connection has the message (lower is better)",
        unit: "ms",
        pick: |m| m.fanout_ms,
        applies: |s| matches!(s, Scenario::Broadcast { .. } | Scenario::Group { .. }),
    },
];

/// A colour per server: wharf in blues, the peers in other hues.
pub fn colour(kind: ServerKind) -> &'static str {
    match kind {
        ServerKind::WharfUring => "#1f4e9c",
        ServerKind::WharfPoll => "#6f9fe0",
        ServerKind::WharfUringMetrics => "#0b2a5c",
        ServerKind::WharfUringBasic => "#4a6a9c",
        ServerKind::TokioFramed => "#e07b1f",
        ServerKind::TokioRaw => "#f2b36f",
        ServerKind::StdThreads => "#8a8a8a",
        ServerKind::Monoio => "#3a9a4a",
        ServerKind::UringRaw => "#b03a48",
        ServerKind::UringBest => "#6a1f2c",
        ServerKind::WharfUring2 => "#2f7fbf",
    }
}

/// The chart of `results` as an SVG document.
pub fn render(results: &Results) -> String {
    let servers = &results.meta.servers;
    let panels: Vec<(&Panel, Vec<usize>)> = PANELS
        .iter()
        .map(|p| {
            let idx = (0..results.scenarios.len())
                .filter(|&i| (p.applies)(&results.scenarios[i].scenario))
                .collect();
            (p, idx)
        })
        .filter(|(_, idx): &(&Panel, Vec<usize>)| !idx.is_empty())
        .collect();
    let group_w = servers.len().max(1) as f64 * (BAR + BAR_GAP) - BAR_GAP;
    let most_groups = panels.iter().map(|(_, g)| g.len()).max().unwrap_or(1);
    let width = (LEFT + RIGHT + most_groups as f64 * (group_w + GROUP_GAP)).max(820.0);
    let panel_h = PANEL_TOP + PLOT + PANEL_BOTTOM;
    let height = HEADER + panels.len() as f64 * panel_h + 10.0;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(
        svg,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let m = &results.meta;
    let pin = match m.pinning {
        Some(p) => format!(
            "server on CPU {}, load generator on CPU {}",
            p.server_cpu, p.load_cpu
        ),
        None => "not pinned".to_string(),
    };
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="22" font-size="17" font-weight="bold">wharf bench ({}): wharf and its peers, one server thread each</text>"#,
        esc(&m.preset)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{LEFT}" y="42" font-size="12" fill="#444">median of {} interleaved rounds, {:.1} s windows after {:.1} s warm-up; {pin}; bar labels are the values</text>"##,
        m.rounds, m.duration_secs, m.warmup_secs
    );
    legend(&mut svg, servers, width);

    for (n, (panel, groups)) in panels.iter().enumerate() {
        let top = HEADER + n as f64 * panel_h;
        let base = top + PANEL_TOP + PLOT;
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{:.1}" font-size="14" font-weight="bold">{}</text>"#,
            top + 20.0,
            esc(panel.title)
        );
        axes(&mut svg, top + PANEL_TOP, base, width);
        for (g, &si) in groups.iter().enumerate() {
            let sc = &results.scenarios[si];
            let x0 = LEFT + GROUP_GAP / 2.0 + g as f64 * (group_w + GROUP_GAP);
            let values: Vec<Option<f64>> = servers
                .iter()
                .map(|k| {
                    sc.summary
                        .iter()
                        .find(|s| s.server == *k)
                        .and_then(|s| (panel.pick)(&s.median))
                })
                .collect();
            let max = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
            let label = sc.scenario.label();
            for (i, (kind, v)) in servers.iter().zip(&values).enumerate() {
                let x = x0 + i as f64 * (BAR + BAR_GAP);
                let cx = x + BAR / 2.0;
                match v {
                    Some(v) => {
                        let h = if max > 0.0 {
                            v / max * PLOT * FILL
                        } else {
                            0.0
                        };
                        let _ = writeln!(
                            svg,
                            r#"<rect x="{x:.1}" y="{:.1}" width="{BAR}" height="{h:.1}" fill="{}" data-server="{}" data-scenario="{}" data-value="{v}"><title>{} · {}: {} {}</title></rect>"#,
                            base - h,
                            colour(*kind),
                            kind.name(),
                            esc(&label),
                            kind.name(),
                            esc(&label),
                            short(*v),
                            esc(panel.unit)
                        );
                        let ty = base - h - 4.0;
                        let _ = writeln!(
                            svg,
                            r##"<text x="{:.1}" y="{ty:.1}" font-size="10" fill="#333" transform="rotate(-90 {:.1} {ty:.1})">{}</text>"##,
                            cx + 3.5,
                            cx + 3.5,
                            short(*v)
                        );
                    }
                    None => {
                        let ty = base - 4.0;
                        let _ = writeln!(
                            svg,
                            r##"<text x="{:.1}" y="{ty:.1}" font-size="9" fill="#999" transform="rotate(-90 {:.1} {ty:.1})" data-server="{}" data-scenario="{}">n/a</text>"##,
                            cx + 3.0,
                            cx + 3.0,
                            kind.name(),
                            esc(&label)
                        );
                    }
                }
            }
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
                x0 + group_w / 2.0,
                base + 18.0,
                esc(&label)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// The legend: a swatch and a name per server, in one row.
fn legend(svg: &mut String, servers: &[ServerKind], width: f64) {
    let (mut x, mut y) = (LEFT, 56.0);
    for kind in servers {
        let w = 30.0 + 8.0 * kind.name().len() as f64;
        if x + w > width - RIGHT {
            (x, y) = (LEFT, y + 20.0);
        }
        let _ = writeln!(
            svg,
            r#"<rect x="{x:.1}" y="{y:.1}" width="14" height="14" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="13">{}</text>"#,
            colour(*kind),
            x + 19.0,
            y + 12.0,
            kind.name()
        );
        x += w;
    }
}

/// The y axis of one panel: 0 to 100 % of each scenario's largest bar.
fn axes(svg: &mut String, top: f64, base: f64, width: f64) {
    for pct in [0, 25, 50, 75, 100] {
        let y = base - f64::from(pct) / 100.0 * PLOT * FILL;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="1"/><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end" fill="#555">{pct}%</text>"##,
            width - RIGHT,
            if pct == 0 { "#333" } else { "#e4e4e4" },
            LEFT - 5.0,
            y + 3.5
        );
    }
    let mid = (top + base) / 2.0;
    let _ = writeln!(
        svg,
        r##"<text x="16" y="{mid:.1}" font-size="11" fill="#555" text-anchor="middle" transform="rotate(-90 16 {mid:.1})">% of the scenario's largest</text>"##
    );
}

/// 312456 → "312k", 1234567 → "1.23M", 2.95 → "2.95".
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
