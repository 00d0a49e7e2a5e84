//! Scripted runs: fixed scenarios for the defects the outside probes found,
//! then seeded random plans through the same oracle.

use super::*;

fn quiet_panics() {
    let_handler_panics_unwind();
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
            Err(_) => {
                panic!("WHARF_SEED={seed} WHARF_SCRIPTED_RUNS=1: the run panicked\n{plan:#?}")
            }
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
            "Banned",
        ] {
            assert!(
                tally.get(kind).copied().unwrap_or(0) > 0,
                "no run closed a connection with {kind}"
            );
        }
    }
}

fn settings() -> Settings {
    Settings {
        max_frame: 64 * 1024,
        high_water: 64 * 1024,
        idle_timeout: None,
        write_stall: None,
        linger: Duration::from_millis(100),
        quirks: Quirks {
            chunk: 16 * 1024,
            max_write: usize::MAX,
            late_data: false,
            after_pause: 0,
        },
        panics: true,
        ended_siblings: 0,
    }
}

fn frames_of(client: usize, n: usize, len: usize, kind: u8) -> Step {
    Step::Frames {
        client,
        bodies: (0..n).map(|i| body(kind, i, len)).collect(),
    }
}

fn reason_of(run: &Run, client: usize) -> CloseReason {
    let c = &run.records.conns[&fake::client_addr(client)];
    c.close.clone().expect("closed").0
}

fn echoes_of(run: &Run, client: usize) -> usize {
    let world = run.world.borrow_mut();
    let peer = world.peer_by_addr(fake::client_addr(client)).unwrap();
    frames(&peer.received, usize::MAX).0.len()
}

/// The first outside probe: 400 pipelined 4 KiB requests in one write
/// (their echoes cross the 64 KiB mark), then the client's FIN, then it
/// reads. Every request must be answered before the close.
#[test]
fn half_close_under_back_pressure_answers_every_request() {
    // Buffer sizes that end the stream at different points of a frame,
    // and marks (a 64-byte mark: every message crosses it).
    let cases = [
        (16384, 65536, false),
        (16384, 65536, true),
        (4100, 65536, true),
        (999, 65536, true),
        (4100, 64, true),
        (16384, 64, false),
    ];
    // And stream lengths around 400 frames, so that the stream ends at
    // each point of a pause-and-resume cycle.
    for ((chunk, high_water, late_data), count) in cases
        .into_iter()
        .flat_map(|c| (400..404).map(move |n| (c, n)))
    {
        let mut s = settings();
        s.quirks.chunk = chunk;
        s.quirks.late_data = late_data;
        s.high_water = high_water;
        let mut steps = vec![Step::Connect, frames_of(0, count, 4096, b'e')];
        steps.push(Step::Write { client: 0, n: 0 });
        steps.push(Step::Eof { client: 0 });
        // Slowly: 6,000 bytes a turn (1.64 MB of echoes in all), so that
        // the stream's end comes while the connection is paused.
        for _ in 0..400 {
            steps.push(Step::Turn);
            steps.push(Step::Read {
                client: 0,
                n: 6_000,
            });
        }
        let run = run(&Plan { settings: s, steps });
        check(&run).unwrap();
        let case =
            format!("{count} frames, {chunk}-byte reads, mark {high_water}, late {late_data}");
        assert_eq!(reason_of(&run, 0), CloseReason::PeerClosed, "{case}");
        assert_eq!(echoes_of(&run, 0), count, "{case}");
    }
}

/// A loop with only an idle timer armed sleeps until it is due: a minute
/// of quiet takes a handful of waits, not one per tick; and the timeout
/// fires neither early nor more than two ticks late (the deadline rounds
/// up to a tick, and the wheel looks at a tick once it has begun).
#[test]
fn an_idle_timer_lets_the_loop_sleep_and_fires_on_time() {
    let mut s = settings();
    s.idle_timeout = Some(Duration::from_secs(60));
    let steps = vec![
        Step::Connect,
        Step::Turn,
        Step::Sleep(Duration::from_secs(59)),
        Step::Turn,
        Step::Sleep(Duration::from_secs(5)),
    ];
    let run = run(&Plan { settings: s, steps });
    check(&run).unwrap();
    let turns = run.world.borrow_mut().turns;
    assert!(turns < 20, "{turns} waits for a minute of quiet");
    assert_eq!(reason_of(&run, 0), CloseReason::IdleTimeout);
    let c = &run.records.conns[&fake::client_addr(0)];
    let at = c
        .close
        .as_ref()
        .unwrap()
        .2
        .saturating_duration_since(run.started);
    let (min, max) = (
        Duration::from_secs(60),
        Duration::from_secs(60) + 2 * crate::timer::TICK,
    );
    assert!(at >= min && at <= max, "closed as idle at {at:?}");
}

/// A client that keeps sending while wharf paused its reading (its echoes
/// are not being read) is not idle.
#[test]
fn a_connection_paused_by_back_pressure_is_not_idle() {
    let mut s = settings();
    s.idle_timeout = Some(Duration::from_secs(1));
    s.high_water = 8 * 1024;
    let mut steps = vec![Step::Connect, frames_of(0, 64, 1024, b'e')];
    for _ in 0..20 {
        steps.push(Step::Write { client: 0, n: 4096 });
        steps.push(Step::Sleep(Duration::from_millis(500)));
    }
    steps.push(Step::Read {
        client: 0,
        n: usize::MAX / 2,
    });
    steps.push(Step::Turn);
    steps.push(Step::Eof { client: 0 });
    let run = run(&Plan { settings: s, steps });
    check(&run).unwrap();
    assert_eq!(reason_of(&run, 0), CloseReason::PeerClosed);
    assert_eq!(echoes_of(&run, 0), 64);
}

/// A panic in one connection's `on_message` closes that connection alone,
/// after flushing what it had queued; the other keeps being served.
#[test]
fn a_handler_panic_closes_only_its_connection() {
    quiet_panics();
    let steps = vec![
        Step::Connect,
        Step::Connect,
        frames_of(0, 3, 10, b'e'),
        frames_of(0, 1, 10, b'P'),
        frames_of(0, 3, 10, b'e'),
        Step::Write { client: 0, n: 0 },
        Step::Turn,
        frames_of(1, 5, 10, b'e'),
        Step::Write { client: 1, n: 0 },
        Step::Eof { client: 1 },
    ];
    let run = run(&Plan {
        settings: settings(),
        steps,
    });
    check(&run).unwrap();
    assert_eq!(reason_of(&run, 0), CloseReason::HandlerPanic);
    assert_eq!(echoes_of(&run, 0), 3);
    assert_eq!(reason_of(&run, 1), CloseReason::PeerClosed);
    assert_eq!(echoes_of(&run, 1), 5);
    assert_eq!(run.handle.stats().handler_panics, 1);
}

/// A failed driver: every connection is closed with `LoopFailed`, none is
/// counted any more, and sends to them fail with `LoopFailed`.
#[test]
fn a_failed_driver_closes_its_connections_and_refuses_sends() {
    let steps = vec![
        Step::Connect,
        Step::Connect,
        frames_of(0, 2, 10, b'e'),
        Step::Write { client: 0, n: 0 },
        Step::Turn,
        Step::Fail,
    ];
    let run = run(&Plan {
        settings: settings(),
        steps,
    });
    check(&run).unwrap();
    for client in 0..2 {
        assert_eq!(reason_of(&run, client), CloseReason::LoopFailed);
        let id = run.records.conns[&fake::client_addr(client)].id;
        let sent = run.handle.send(id, Bytes::from_static(b"x"));
        assert_eq!(sent, Err(SendError::LoopFailed));
    }
    assert_eq!(run.handle.connections(), 0);
}

/// Messages the handler never saw are not framed from a stream it asked to
/// close: a close request in the middle of a buffer ends delivery there,
/// even when more buffers arrive in the same turn.
#[test]
fn nothing_is_delivered_after_a_close_request() {
    let mut s = settings();
    s.quirks.chunk = 7;
    let steps = vec![
        Step::Connect,
        frames_of(0, 1, 20, b'C'),
        frames_of(0, 8, 20, b'e'),
        Step::Write { client: 0, n: 0 },
    ];
    let run = run(&Plan { settings: s, steps });
    check(&run).unwrap();
    assert_eq!(reason_of(&run, 0), CloseReason::Local);
    assert_eq!(run.records.conns[&fake::client_addr(0)].delivered.len(), 1);
    assert_eq!(echoes_of(&run, 0), 1);
}

/// Accepts spread to a sibling loop that has ended come back and are
/// served here: none is left open and unserved.
#[test]
fn accepts_handed_to_an_ended_loop_are_served() {
    let mut s = settings();
    s.ended_siblings = 1;
    let mut steps = Vec::new();
    for client in 0..6 {
        steps.push(Step::Connect);
        steps.push(frames_of(client, 2, 10, b'e'));
        steps.push(Step::Write { client, n: 0 });
        steps.push(Step::Eof { client });
        steps.push(Step::Turn);
    }
    let run = run(&Plan { settings: s, steps });
    check(&run).unwrap();
    for client in 0..6 {
        assert_eq!(reason_of(&run, client), CloseReason::PeerClosed);
        assert_eq!(echoes_of(&run, client), 2);
    }
}
