//! A connect flood (`wharf load --flood N/s`): connections opened from one
//! source address at a fixed rate during the window, each closed with a
//! reset 100 ms later (no TIME_WAIT left), to show what a server that
//! refuses them at accept pays, and that the load's own clients are
//! served meanwhile.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long each flood connection is held before its reset.
const HOLD: Duration = Duration::from_millis(100);

/// What the flood did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloodReport {
    /// Its source address.
    pub source: String,
    /// The rate asked for, per second.
    pub rate: u32,
    /// Connects tried.
    pub tried: u64,
    /// Connects that completed (a refusal may reset one before its
    /// connect has seen it complete).
    pub connected: u64,
    /// Connects per second achieved.
    pub per_sec: f64,
}

/// Floods `to` from `source` at `rate` per second from `start` to `end`.
pub(crate) fn spawn(
    source: IpAddr,
    to: SocketAddr,
    rate: u32,
    start: Instant,
    end: Instant,
) -> std::io::Result<JoinHandle<FloodReport>> {
    thread::Builder::new()
        .name("wharf-load-flood".into())
        .spawn(move || {
            thread::sleep(start.saturating_duration_since(Instant::now()));
            let began = Instant::now();
            let mut open = VecDeque::new();
            let (mut tried, mut connected) = (0u64, 0u64);
            while Instant::now() < end {
                // Catch up with the schedule, then sleep a little.
                let due = (began.elapsed().as_secs_f64() * f64::from(rate)) as u64;
                while tried < due {
                    tried += 1;
                    let Ok(s) = socket2::Socket::new(
                        socket2::Domain::for_address(to),
                        socket2::Type::STREAM,
                        None,
                    ) else {
                        continue;
                    };
                    if s.bind(&SocketAddr::new(source, 0).into()).is_err() {
                        continue;
                    }
                    if s.connect_timeout(&to.into(), Duration::from_secs(1))
                        .is_ok()
                    {
                        connected += 1;
                    }
                    let _ = s.set_linger(Some(Duration::ZERO));
                    open.push_back((Instant::now(), s));
                }
                while open.front().is_some_and(|(at, _)| at.elapsed() >= HOLD) {
                    open.pop_front();
                }
                thread::sleep(Duration::from_millis(1));
            }
            let took = began.elapsed().as_secs_f64();
            FloodReport {
                source: source.to_string(),
                rate,
                tried,
                connected,
                per_sec: tried as f64 / took.max(1e-9),
            }
        })
}
