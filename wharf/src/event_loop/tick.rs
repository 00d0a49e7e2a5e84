//! The loop's periodic tick (`Builder::tick`): `Handler::on_tick` with
//! every connection of the loop at hand, for game-style servers that
//! advance a world at a fixed rate.
//!
//! The tick is not on the wheel: it has its own due time, which the loop's
//! wait honours to the millisecond. A tick that comes late (a long turn)
//! is not made up for: the next one is due a whole period after it ran.

use std::time::Instant;

use super::guard::contain;
use super::slot::Phase;
use super::Core;
use crate::conn::Conn;
use crate::error::CloseReason;
use crate::handler::Handler;

/// One loop at its periodic tick: what [`Handler::on_tick`] gets.
pub struct Tick<'a, H: Handler> {
    core: &'a mut Core<H>,
    keys: Vec<u32>,
}

impl<H: Handler> Tick<'_, H> {
    /// The index of this loop (0 to `Builder::threads` − 1).
    pub fn loop_index(&self) -> usize {
        self.core.index
    }

    /// The time this tick runs at (the loop's clock for this turn).
    pub fn now(&self) -> Instant {
        self.core.now.at
    }

    /// Open connections on this loop.
    pub fn connections(&self) -> usize {
        self.core.counters.open as usize
    }

    /// Calls `f` with every open connection of this loop. A panic in `f`
    /// closes that connection (`CloseReason::HandlerPanic`), and the
    /// others are still visited.
    pub fn for_each(&mut self, mut f: impl FnMut(&mut Conn<'_, H::State>)) {
        let core = &mut *self.core;
        self.keys.clear();
        self.keys.extend(
            core.conns
                .iter()
                .filter(|(_, s)| {
                    matches!(s.phase, Phase::Open(_)) && s.ctl.open && s.ctl.close_request.is_none()
                })
                .map(|(k, _)| k as u32),
        );
        for &key in &self.keys {
            let id = core.id_of(key);
            if let Err(why) = core.with_conn(key, |conn| contain(|| f(conn))) {
                core.panicked("on_tick", &id, &why);
                core.conns[key as usize].ctl.close_request = Some(CloseReason::HandlerPanic);
            }
            core.touch(key);
        }
    }
}

impl<H: Handler> Core<H> {
    /// Runs `on_tick` if it is due (never once a shutdown began).
    pub(super) fn run_tick(&mut self) {
        let Some((every, at)) = self.tick else {
            return;
        };
        if self.now.at < at || self.shutdown.is_some() {
            return;
        }
        self.tick = Some((every, crate::timer::deadline(self.now.at, every)));
        let handler = self.handler.clone();
        let keys = std::mem::take(&mut self.tick_keys);
        let mut tick = Tick { core: self, keys };
        let result = contain(|| handler.on_tick(&mut tick));
        self.tick_keys = tick.keys;
        if let Err(why) = result {
            let index = self.index;
            self.panicked("on_tick", &format_args!("loop {index}"), &why);
        }
    }
}
