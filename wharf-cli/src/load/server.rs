//! The server's side of a run (`wharf load --metrics ADDR`): its Prometheus
//! endpoint scraped when the window opens and when it closes, parsed as
//! OpenMetrics, and the difference shown next to the client's figures.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use openmetrics_parser::{OpenMetricsType, OpenMetricsValue};
use serde::{Deserialize, Serialize};

/// One scrape: every sample, by family name and label values (joined by
/// `,`), summed over the `loop` label.
#[derive(Debug, Default, Clone)]
pub(crate) struct Scrape(BTreeMap<(String, String), f64>);

/// Reads `http://ADDR/metrics`.
pub(crate) fn scrape(addr: SocketAddr) -> Result<Scrape, String> {
    let fail = |e: std::io::Error| format!("cannot scrape {addr}: {e}");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(fail)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(fail)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut all = String::new();
    s.read_to_string(&mut all).map_err(fail)?;
    let (head, body) = all
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr} sent no HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        let line = head.lines().next().unwrap_or("");
        return Err(format!("{addr} answered {line:?}"));
    }
    let parsed = openmetrics_parser::openmetrics::parse_openmetrics(body)
        .map_err(|e| format!("{addr} sent no OpenMetrics: {e:?}"))?;
    let mut out = BTreeMap::new();
    for (name, family) in &parsed.families {
        let by_loop = family.get_label_names().iter().position(|l| l == "loop");
        for sample in family.iter_samples() {
            let v = match &sample.value {
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                OpenMetricsValue::Gauge(g) | OpenMetricsValue::Unknown(g) => g.as_f64(),
                _ => continue,
            };
            // Summed over loops: what the server did, not each loop.
            let labels = match (by_loop, family.family_type) {
                (Some(_), _) => String::new(),
                (None, OpenMetricsType::Counter | OpenMetricsType::Gauge) => label_values(sample),
                _ => continue,
            };
            *out.entry((name.clone(), labels)).or_insert(0.0) += v;
        }
    }
    Ok(Scrape(out))
}

/// A sample's label values, joined by `,`.
fn label_values(sample: &openmetrics_parser::Sample<OpenMetricsValue>) -> String {
    sample.get_labelset().map_or(String::new(), |set| {
        set.iter_values().cloned().collect::<Vec<_>>().join(",")
    })
}

impl Scrape {
    fn get(&self, name: &str, labels: &str) -> f64 {
        self.0
            .get(&(name.to_owned(), labels.to_owned()))
            .copied()
            .unwrap_or(0.0)
    }

    fn labelled<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0
            .iter()
            .filter(move |((n, l), _)| n == name && !l.is_empty())
            .map(|((_, l), v)| (l.as_str(), *v))
    }
}

/// What the server did during the window, from its own counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerFigures {
    /// Messages the server received.
    pub messages_in: u64,
    /// Messages it queued for sending.
    pub messages_out: u64,
    /// Connections it opened.
    pub opened: u64,
    /// Connections it closed, by reason (only those with some).
    pub closed: BTreeMap<String, u64>,
    /// Connections it refused, by cause (only those with some).
    pub refused: BTreeMap<String, u64>,
    /// Its CPU seconds (user + system), where it reports them.
    pub cpu_secs: Option<f64>,
    /// Its CPU per message received, in microseconds.
    pub cpu_us_per_message: Option<f64>,
}

impl ServerFigures {
    pub(crate) fn between(a: &Scrape, b: &Scrape) -> ServerFigures {
        let d = |name: &str, labels: &str| (b.get(name, labels) - a.get(name, labels)).max(0.0);
        let by = |name: &str| -> BTreeMap<String, u64> {
            b.labelled(name)
                .map(|(l, _)| (l.to_owned(), d(name, l) as u64))
                .filter(|(_, n)| *n > 0)
                .collect()
        };
        let messages_in = d("wharf_messages_received", "") as u64;
        let cpu =
            b.0.contains_key(&("process_cpu_seconds".to_owned(), String::new()))
                .then(|| d("process_cpu_seconds", ""));
        ServerFigures {
            messages_in,
            messages_out: d("wharf_messages_sent", "") as u64,
            opened: d("wharf_connections_opened", "") as u64,
            closed: by("wharf_connections_closed"),
            refused: by("wharf_connections_refused"),
            cpu_secs: cpu,
            cpu_us_per_message: cpu
                .filter(|_| messages_in > 0)
                .map(|c| c * 1e6 / messages_in as f64),
        }
    }
}
