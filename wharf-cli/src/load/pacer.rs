//! Rate mode: one thread hands every message to its connection's loop when
//! it is due.
//!
//! Message `k` of the run goes to connection `k % connections` as its
//! message `k / connections`, and is due `k / rate` seconds after the
//! start. Its latency is measured from that due time, not from when it
//! actually left: a server that stalls cannot make the generator wait and
//! so hide the stall ("coordinated omission"). A late pacer sends what is
//! due at once, in one batch per loop turn of its own.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use wharf::{Bytes, ConnId, Handle, SendError};

use super::shared::Run;

/// Most messages built in one allocation.
const BATCH: u64 = 1024;

/// What the pacer is told.
pub(crate) struct Plan {
    /// The active connections by index (`None`: failed to open).
    pub(crate) ids: Vec<Option<ConnId>>,
    /// When message 0 is due.
    pub(crate) start: Instant,
    /// Messages due at or after this are not sent.
    pub(crate) end: Instant,
    /// Messages per second over all connections.
    pub(crate) rate: f64,
}

/// Starts the pacer; joining it gives the number of messages it sent.
pub(crate) fn spawn(run: Arc<Run>, handle: Handle, plan: Plan) -> std::io::Result<JoinHandle<u64>> {
    thread::Builder::new()
        .name("wharf-load-pacer".into())
        .spawn(move || pace(&run, &handle, plan))
}

fn pace(run: &Run, handle: &Handle, mut plan: Plan) -> u64 {
    let size = run.pattern.size();
    let conns = plan.ids.len() as u64;
    let span = plan.end.saturating_duration_since(plan.start).as_secs_f64();
    let total = (span * plan.rate).ceil() as u64;
    let mut next = 0u64; // the next message to hand out
    let mut sent = 0u64;
    let mut buf = Vec::new();
    while next < total {
        let elapsed = Instant::now()
            .saturating_duration_since(plan.start)
            .as_secs_f64();
        // Message k is due once k / rate <= elapsed.
        let due = ((elapsed * plan.rate).floor() as u64 + 1)
            .min(total)
            .min(next + BATCH);
        if due > next {
            buf.clear();
            for k in next..due {
                run.pattern.fill((k % conns) as u32, k / conns, &mut buf);
            }
            let batch = Bytes::from(std::mem::take(&mut buf));
            for (i, k) in (next..due).enumerate() {
                let slot = &mut plan.ids[(k % conns) as usize];
                let Some(id) = *slot else { continue };
                match handle.send(id, batch.slice(i * size..(i + 1) * size)) {
                    Ok(()) => sent += 1,
                    Err(SendError::Stopped) => return sent,
                    // Closed (counted as dropped by the handler): skip it
                    // from now on. Backpressure cannot happen (the client's
                    // water marks are out of reach), and skipping one
                    // message would break the sequence, so a congested
                    // connection is given up the same way.
                    Err(_) => *slot = None,
                }
            }
            next = due;
            continue; // catch up before sleeping
        }
        let at = plan.start + Duration::from_secs_f64(next as f64 / plan.rate);
        thread::sleep(at.saturating_duration_since(Instant::now()));
    }
    sent
}
