//! Arbitrary bytes as a script for the real event loop on the scripted
//! driver (`wharf::fuzzing::run_loop_script`): clients connecting, writing
//! frames in any split, half-closing, resetting, reading slowly; the host
//! sending, disconnecting, broadcasting, dialing, shutting down, breaking
//! the driver; time passing on a virtual clock. The oracle checks every
//! delivered message and echo byte, every close reason, the idle timer's
//! timing and the server's counts after the run.
//!
//! Handler panics are part of the scripts: libFuzzer's panic hook aborts
//! on any panic, so the hook is wrapped to let the handler's own panic
//! unwind (the loop contains it) and abort on every other.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Once;

fn let_handler_panics_unwind() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            if msg != Some(wharf::fuzzing::HANDLER_PANIC) {
                abort(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    let_handler_panics_unwind();
    wharf::fuzzing::run_loop_script(data, true);
});
