//! The oracle of the scripted runs: what must hold of every run, whatever
//! its plan (see the module above for the list).

use bytes::Bytes;

use super::Run;
use crate::error::{CloseReason, SendError};
use crate::sys::fake;

/// The whole frames of a client's stream, and the oversized length that
/// ends it, if one does.
pub(super) fn frames(stream: &[u8], max: usize) -> (Vec<&[u8]>, Option<usize>) {
    let mut out = Vec::new();
    let mut at = 0;
    while stream.len() - at >= 4 {
        let len = u32::from_be_bytes(stream[at..at + 4].try_into().unwrap()) as usize;
        if len > max {
            return (out, Some(len));
        }
        if stream.len() - at - 4 < len {
            break;
        }
        out.push(&stream[at + 4..at + 4 + len]);
        at += 4 + len;
    }
    (out, None)
}

/// Checks a run against the oracle; the error says what broke.
pub(crate) fn check(run: &Run) -> Result<(), String> {
    let s = run.plan.settings;
    let r = &run.records;
    if let Some(v) = r.violations.first() {
        return Err(v.clone());
    }
    let world = run.world.borrow_mut();
    // Without a shutdown step or a failure, the loop runs the whole script
    // and takes every client it was handed.
    if !run.shut_in_script && !run.failed {
        if !world.ended {
            return Err("the loop finished before its script did".into());
        }
        // A peer accepted without on_open was refused, which only a ban
        // does here; and every such refusal is counted.
        let mut refused = 0;
        for (i, p) in world.peers.iter().enumerate() {
            if p.accepted && p.addr.is_some_and(|a| !r.conns.contains_key(&a)) {
                let client = p
                    .addr
                    .and_then(|a| (0..run.clients.len()).find(|&j| fake::client_addr(j) == a));
                let banned = client.is_some_and(|j| run.clients[j].banned);
                if !banned {
                    return Err(format!("peer {i} was accepted, but on_open never ran"));
                }
                refused += 1;
            }
        }
        let counted = run.handle.stats().banned;
        if counted != refused {
            return Err(format!(
                "{refused} peers refused at accept, {counted} counted as banned"
            ));
        }
    }
    // Flushes that nothing may cut: no write-stall timeout, no shutdown
    // deadline but the final hour's, no failed driver.
    let strict_flush = s.write_stall.is_none() && !run.shut_in_script && !run.failed;
    let mut panics = 0;
    for (i, client) in run.clients.iter().enumerate() {
        let addr = fake::client_addr(i);
        let Some(c) = r.conns.get(&addr) else {
            continue; // never accepted (the server stopped first)
        };
        let what = |e: String| format!("client {i} ({addr}): {e}");
        let peer = world
            .peer_by_addr(addr)
            .ok_or_else(|| what("unknown to the driver".into()))?;
        if c.closes != 1 {
            return Err(what(format!("on_close ran {} times", c.closes)));
        }
        let (reason, close_turn, closed_at) = c.close.clone().unwrap();
        let (whole, oversized) = frames(&client.written, s.max_frame);
        if c.delivered.len() > whole.len() || c.delivered.iter().zip(&whole).any(|(a, b)| a != b) {
            return Err(what(format!(
                "delivered {} messages that are not a prefix of the {} written",
                c.delivered.len(),
                whole.len()
            )));
        }
        let enders = |m: &Vec<u8>| {
            matches!(m.first(), Some(b'C' | b'B')) || (s.panics && m.first() == Some(&b'P'))
        };
        if let Some(k) = c.delivered.iter().position(enders) {
            if k + 1 != c.delivered.len() {
                return Err(what(format!("message {k} closed, yet more were delivered")));
            }
        }
        let last = c.delivered.last().and_then(|m| m.first().copied());
        panics += (s.panics && last == Some(b'P')) as u64;
        let reason_ok = match &reason {
            CloseReason::PeerClosed => {
                client.closed && c.delivered.len() == whole.len() && oversized.is_none()
            }
            CloseReason::FrameTooLarge { len, max } => {
                Some(*len) == oversized && *max == s.max_frame && c.delivered.len() == whole.len()
            }
            CloseReason::Local => last == Some(b'C'),
            CloseReason::HandlerPanic => s.panics && last == Some(b'P'),
            CloseReason::Io(_) => client.reset,
            CloseReason::IdleTimeout => {
                let idle = s
                    .idle_timeout
                    .ok_or_else(|| what("idle timeout not set".into()))?;
                // The last read before the close (reads in the close's own
                // turn came before it: events precede timers).
                let last = peer
                    .reads
                    .iter()
                    .rev()
                    .find(|(turn, _)| *turn <= close_turn);
                let since = last.map(|(_, t)| closed_at.saturating_duration_since(*t));
                if since.is_some_and(|d| d < idle) {
                    return Err(what(format!(
                        "closed as idle {since:?} after its last data (at {:?} of the run)",
                        closed_at.saturating_duration_since(run.started)
                    )));
                }
                true
            }
            CloseReason::WriteStalled => s.write_stall.is_some(),
            CloseReason::Disconnected => client.disconnected,
            CloseReason::Banned => client.banned,
            // A ban in force at the end closed it before the final
            // shutdown could (its Kick was posted first).
            CloseReason::Shutdown => !client.ban_in_force || run.shut_in_script || run.failed,
            CloseReason::LoopFailed => run.failed,
            other => return Err(what(format!("unexpected close reason {other:?}"))),
        };
        if !reason_ok {
            return Err(what(format!(
                "closed with {reason:?} after {} of {} whole messages (oversized: {oversized:?}, \
                 reset: {}, half-closed: {})",
                c.delivered.len(),
                whole.len(),
                client.reset,
                client.closed
            )));
        }
        // What the client read back: echoes, host sends, broadcasts.
        let (out, _) = frames(&peer.received, usize::MAX);
        let echoes: Vec<&[u8]> = out
            .iter()
            .copied()
            .filter(|m| m.first() != Some(&0xFF))
            .collect();
        let expected: Vec<&[u8]> = c
            .delivered
            .iter()
            .filter(|m| !(s.panics && m.first() == Some(&b'P')))
            .map(|m| &m[..])
            .collect();
        if echoes.len() > expected.len() || echoes.iter().zip(&expected).any(|(a, b)| a != b) {
            return Err(what(format!(
                "read {} echoes that are not a prefix of the {} expected",
                echoes.len(),
                expected.len()
            )));
        }
        let flushes = !matches!(
            reason,
            CloseReason::Io(_) | CloseReason::WriteStalled | CloseReason::LoopFailed
        );
        if strict_flush && flushes && !client.reset && echoes.len() != expected.len() {
            return Err(what(format!(
                "closed with {reason:?}: {} of {} echoes arrived",
                echoes.len(),
                expected.len()
            )));
        }
        let seqs = |kind: u8| -> Vec<u32> {
            out.iter()
                .filter(|m| m.len() == 6 && m[0] == 0xFF && m[1] == kind)
                .map(|m| u32::from_be_bytes(m[2..6].try_into().unwrap()))
                .collect()
        };
        for kind in [1, 2] {
            let got = seqs(kind);
            if got.windows(2).any(|w| w[0] >= w[1]) {
                return Err(what(format!(
                    "host messages out of order or twice: {got:?}"
                )));
            }
            if kind == 1 && got.iter().any(|n| !c.sends_ok.contains(n)) {
                return Err(what(format!(
                    "a host send arrived that was refused: {got:?}"
                )));
            }
        }
        for group in 0..2u8 {
            let got: Vec<u32> = out
                .iter()
                .filter(|m| m.len() == 7 && m[..3] == [0xFF, 3, group])
                .map(|m| u32::from_be_bytes(m[3..7].try_into().unwrap()))
                .collect();
            if got.windows(2).any(|w| w[0] >= w[1]) {
                return Err(what(format!(
                    "publishes to group {group} out of order or twice: {got:?}"
                )));
            }
            if !got.is_empty() && !client.joined[group as usize] {
                return Err(what(format!(
                    "got publishes to group {group}, which it never joined: {got:?}"
                )));
            }
        }
        if run.handle.is_open(c.id) {
            return Err(what("its id still looks open".into()));
        }
        match run.handle.send(c.id, Bytes::from_static(b"late")) {
            Err(SendError::LoopFailed) if run.failed => {}
            Err(SendError::Stopped | SendError::Closed) if !run.failed => {}
            other => return Err(what(format!("a send after the end returned {other:?}"))),
        }
    }
    if !run.handle.groups().is_empty() {
        return Err(format!(
            "memberships left after every connection closed: {:?}",
            run.handle.groups()
        ));
    }
    if run.handle.connections() != 0 {
        return Err(format!(
            "{} connections still counted",
            run.handle.connections()
        ));
    }
    // Every byte queued was written or dropped: none is left counted as
    // queued, and none counted twice.
    for l in &run.handle.shared.loops {
        let c = l.stats.read();
        if c.bytes_queued != c.bytes_out + c.bytes_dropped {
            return Err(format!(
                "{} bytes queued, {} written and {} dropped",
                c.bytes_queued, c.bytes_out, c.bytes_dropped
            ));
        }
    }
    let stats = run.handle.stats();
    if stats.queued_bytes != 0 {
        return Err(format!(
            "{} bytes still counted as queued",
            stats.queued_bytes
        ));
    }
    if stats.handler_panics != panics {
        return Err(format!(
            "{} panics counted, {panics} seen",
            stats.handler_panics
        ));
    }
    Ok(())
}
