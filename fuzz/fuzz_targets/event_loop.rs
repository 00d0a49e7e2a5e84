//! Arbitrary bytes as a script for the real event loop on the scripted
//! driver (`wharf::fuzzing::run_loop_script`): clients connecting, writing
//! frames in any split, half-closing, resetting, reading slowly; the host
//! sending, disconnecting, broadcasting, dialing, shutting down, breaking
//! the driver; time passing on a virtual clock. The oracle checks every
//! delivered message and echo byte, every close reason, the idle timer's
//! timing and the server's counts after the run.
//!
//! Handler panics are part of the scripts: libFuzzer's panic hook aborts
//! on any panic, so it is wrapped to let the handler's own panic unwind
//! (the loop contains it) and abort on every other.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wharf::fuzzing::let_handler_panics_unwind();
    wharf::fuzzing::run_loop_script(data, true);
});
