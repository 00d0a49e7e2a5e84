//! Scripted runs: fixed scenarios for the defects the outside probes found,
//! then seeded random plans through the same oracle.

use super::*;

fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info.payload().downcast_ref::<String>().map(String::as_str);
            if msg != Some(PANIC) {
                previous(info);
            }
        }));
    });
}

#[test]
fn random_plans_hold_the_oracle() {
    quiet_panics();
    let base: u64 = std::env::var("WHARF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let runs: u64 = std::env::var("WHARF_SCRIPTED_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let mut tally = std::collections::BTreeMap::new();
    for i in 0..runs {
        let seed = base.wrapping_add(i);
        let plan = Plan::random(seed, true);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let run = run(&plan);
            check(&run).map(|()| run.tally(&mut tally))
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("WHARF_SEED={seed} WHARF_SCRIPTED_RUNS=1: {e}\n{plan:#?}"),
            Err(_) => panic!("WHARF_SEED={seed} WHARF_SCRIPTED_RUNS=1: the run panicked\n{plan:#?}"),
        }
    }
    eprintln!("{runs} scripted runs from WHARF_SEED={base}: {tally:?}");
    if runs >= 1000 {
        // The plans reach every way a connection can end.
        for kind in [
            "PeerClosed",
            "FrameTooLarge",
            "Local",
            "HandlerPanic",
            "Io",
            "IdleTimeout",
            "WriteStalled",
            "Disconnected",
            "Shutdown",
            "LoopFailed",
        ] {
            assert!(tally.get(kind).copied().unwrap_or(0) > 0, "no run closed a connection with {kind}");
        }
    }
}
