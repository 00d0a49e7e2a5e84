//! The live progress line on stderr, once a second.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::shared::Run;

/// Prints one line per tick: rewritten in place (`\r`) on a terminal, one
/// line each otherwise (so logs stay readable).
pub(crate) struct Progress {
    enabled: bool,
    tty: bool,
    start: Instant,
    last: (Instant, u64),
    dirty: bool,
}

impl Progress {
    pub(crate) fn new(enabled: bool, start: Instant) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            start,
            last: (start, 0),
            dirty: false,
        }
    }

    /// Prints messages/s since the last tick and p99 so far (of the
    /// warm-up while in it, of the window after).
    pub(crate) fn tick(&mut self, run: &Run, in_window: bool) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let mut totals = run.totals(in_window);
        if in_window && totals.latency.is_empty() {
            // The window has just opened: show the warm-up's p99 a while longer.
            totals = run.totals(false);
        }
        let secs = now.duration_since(self.last.0).as_secs_f64().max(1e-3);
        let rate = totals.received.saturating_sub(self.last.1) as f64 / secs;
        self.last = (now, totals.received);
        let p99 = totals.latency.value_at_quantile(0.99) as f64 / 1e3;
        let open = run.opened.load(Ordering::Relaxed) - run.dropped.load(Ordering::Relaxed);
        let line = format!(
            "{:>6.1} s {:<7}| {:>10.0} msg/s | p99 {:>9.1} µs | errors {} | {} conns",
            now.duration_since(self.start).as_secs_f64(),
            if in_window { "" } else { "warm-up" },
            rate,
            p99,
            totals.corrupt + totals.unexpected,
            open,
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
            self.dirty = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Ends the rewritten line, so that what follows starts on its own.
    pub(crate) fn finish(&mut self) {
        if self.dirty {
            eprintln!();
            self.dirty = false;
        }
    }
}
