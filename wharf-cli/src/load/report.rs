//! The outcome of a run: the numbers, the table a person reads, and the
//! JSON a script reads (the same numbers).

use std::fmt;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::{Framing, Mode};

/// What a run measured. Counts are over the measuring window (after the
/// warm-up) unless they say otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The server driven.
    pub addr: String,
    /// Active connections asked for.
    pub connections: usize,
    /// Idle connections asked for.
    pub idle: usize,
    /// Message size in bytes.
    pub size: usize,
    /// How load was offered.
    pub mode: Mode,
    /// How messages were framed.
    pub framing: Framing,
    /// Client event loops.
    pub threads: usize,
    /// Warm-up before the window, in seconds.
    pub warmup_secs: f64,
    /// Length of the measuring window, in seconds.
    pub duration_secs: f64,
    /// Replies received inside the window.
    pub messages: u64,
    /// `messages` per second of window.
    pub messages_per_sec: f64,
    /// Echoed payload per second of window, in MB (10^6 bytes), one way.
    pub mb_per_sec: f64,
    /// Latency of the replies received inside the window: send (in rate
    /// mode: due) time to the time the whole reply was in.
    pub latency_us: Latency,
    /// Messages sent during the whole run (warm-up and window).
    pub sent: u64,
    /// Replies received whole during the whole run, right or wrong.
    pub received: u64,
    /// `corrupt + lost + unexpected`: non-zero means the server under test
    /// (or the network) broke the echo.
    pub errors: u64,
    /// Replies whose bytes were not the ones sent (a corrupted, dropped,
    /// duplicated or reordered byte or message).
    pub corrupt: u64,
    /// Messages sent that were never answered by the end of the run.
    pub lost: u64,
    /// Messages received on idle connections, which sent nothing.
    pub unexpected: u64,
    /// Connections opened (active and idle).
    pub connections_opened: usize,
    /// Connections that could not be opened.
    pub connections_failed: usize,
    /// Connections closed by the server or the network during the run.
    pub connections_dropped: usize,
    /// The first connect failure or drop, if any.
    pub first_failure: Option<String>,
    /// CPU time this process (the load generator) used during the window,
    /// user plus system, in seconds (Linux only).
    pub client_cpu_secs: Option<f64>,
    /// What the server's own metrics say it did in the window
    /// (`--metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<super::ServerFigures>,
    /// The connect flood run alongside (`--flood`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flood: Option<super::FloodReport>,
    /// No errors, and every connection opened and stayed open.
    pub ok: bool,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// From a histogram of nanoseconds (all zero when it is empty).
    pub(crate) fn from_nanos(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Latency {
            min: us(h.min()),
            mean: h.mean() / 1e3,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

impl fmt::Display for Report {
    /// The final table.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            Mode::Closed { inflight } => format!("closed loop, {inflight} in flight"),
            Mode::Rate { per_sec } => format!("fixed rate {per_sec} msg/s"),
        };
        let framing = match self.framing {
            Framing::LengthPrefixed => "length-prefixed",
            Framing::Raw => "raw",
        };
        writeln!(
            f,
            "wharf load {}: {} connections (+{} idle), {} B, {mode}, {framing}, {} thread(s)",
            self.addr, self.connections, self.idle, self.size, self.threads
        )?;
        writeln!(
            f,
            "  window          {:.1} s after {:.1} s warm-up",
            self.duration_secs, self.warmup_secs
        )?;
        writeln!(f, "  messages/s      {:.0}", self.messages_per_sec)?;
        writeln!(f, "  MB/s            {:.2}", self.mb_per_sec)?;
        let l = &self.latency_us;
        writeln!(
            f,
            "  latency (µs)    p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.max
        )?;
        writeln!(
            f,
            "  errors          {} (corrupt {}, lost {}, unexpected {})",
            self.errors, self.corrupt, self.lost, self.unexpected
        )?;
        writeln!(
            f,
            "  connections     {} opened, {} failed, {} dropped",
            self.connections_opened, self.connections_failed, self.connections_dropped
        )?;
        if let Some(cpu) = self.client_cpu_secs {
            writeln!(
                f,
                "  client CPU      {cpu:.2} s ({:.0}% of one core)",
                100.0 * cpu / self.duration_secs.max(1e-9)
            )?;
        }
        if let Some(why) = &self.first_failure {
            writeln!(f, "  first failure   {why}")?;
        }
        if let Some(fl) = &self.flood {
            writeln!(
                f,
                "  flood           {} connects tried from {} ({:.0}/s), {} completed",
                fl.tried, fl.source, fl.per_sec, fl.connected
            )?;
        }
        if let Some(s) = &self.server {
            let list = |m: &std::collections::BTreeMap<String, u64>| {
                if m.is_empty() {
                    return "none".to_owned();
                }
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            writeln!(
                f,
                "  server          {} messages in, {} out, {} connections opened",
                s.messages_in, s.messages_out, s.opened
            )?;
            writeln!(f, "  server closed   {}", list(&s.closed))?;
            writeln!(f, "  server refused  {}", list(&s.refused))?;
            if let Some(cpu) = s.cpu_secs {
                write!(
                    f,
                    "  server CPU      {cpu:.2} s ({:.0}% of one core)",
                    100.0 * cpu / self.duration_secs.max(1e-9)
                )?;
                match s.cpu_us_per_message {
                    Some(us) => writeln!(f, ", {us:.2} µs per message")?,
                    None => writeln!(f)?,
                }
            }
        }
        write!(
            f,
            "  result          {}",
            if self.ok { "ok" } else { "FAILED" }
        )
    }
}

/// CPU time (user + system) of this process so far, in seconds, from
/// `/proc/self/stat` (Linux only). Ticks are USER_HZ, 100 per second on
/// every Linux ABI.
pub(crate) fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Field 3 is the first after ')': utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_reads_on_linux() {
        if cfg!(target_os = "linux") {
            let t = process_cpu_secs().expect("/proc/self/stat parses");
            assert!(t >= 0.0);
        }
    }

    #[test]
    fn percentiles_come_out_in_microseconds() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 1_000_000_000, 3).unwrap();
        for ns in 1..=1000u64 {
            h.record(ns * 1000).unwrap();
        }
        let l = Latency::from_nanos(&h);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0, "{l:?}");
        assert_eq!(
            Latency::from_nanos(&Histogram::new(3).unwrap()),
            Latency::default()
        );
    }
}
