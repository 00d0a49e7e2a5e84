//! Handler callbacks run behind `catch_unwind`: a panic is contained to
//! its connection (closed with `CloseReason::HandlerPanic`, logged once,
//! counted) and the loop, its listeners and every other connection go on.
//!
//! The connection's `State` may be left half-updated by the panic; it is
//! still handed to `on_close`, which is the handler's chance to clean up.
//! Nothing of the loop's own state is touched inside a callback except
//! through `Conn`, whose every method leaves it consistent.

use std::panic::{catch_unwind, AssertUnwindSafe};

use super::Core;
use crate::connect::ConnectFailure;
use crate::error::panic_message;
use crate::handler::Handler;

/// Runs `f`, turning a panic into `Err` with its message.
pub(super) fn contain<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(&*payload))
}

impl<H: Handler> Core<H> {
    /// Counts and logs a contained panic of `callback`.
    pub(super) fn panicked(&mut self, callback: &str, who: &dyn std::fmt::Display, why: &str) {
        self.counters.handler_panics += 1;
        tracing::error!(
            loop_index = self.index,
            conn = %who,
            callback,
            panic = why,
            "a handler callback panicked; closing its connection"
        );
    }

    /// `on_connect_failed`, contained.
    pub(super) fn guard_connect_failed(&mut self, failure: ConnectFailure) {
        let handler = self.handler.clone();
        let token = failure.token;
        if let Err(why) = contain(|| handler.on_connect_failed(failure)) {
            self.panicked("on_connect_failed", &format_args!("token {token}"), &why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::contain;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(contain(|| 7), Ok(7));
        assert_eq!(
            contain(|| panic!("boom {}", 1)),
            Err::<(), _>("boom 1".into())
        );
        assert_eq!(
            contain(|| std::panic::panic_any(3u8)),
            Err::<(), _>("a panic with a non-string payload".into())
        );
    }
}
