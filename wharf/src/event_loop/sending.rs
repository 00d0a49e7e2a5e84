//! What a connection sends, and each turn's step that moves it on: start a
//! send (encrypted first when it is TLS), take back a finished one, pause
//! or re-arm receiving against the high-water mark.

use super::guard::contain;
use super::slot::{Phase, Recv};
use super::Core;
use crate::error::CloseReason;
use crate::handler::Handler;
use crate::sys::{self, Driver, SendBatch};

/// Most plaintext encrypted for one send.
const TLS_BATCH: usize = 256 * 1024;

impl<H: Handler> Core<H> {
    pub(super) fn sent(
        &mut self,
        key: u32,
        mut batch: Box<SendBatch>,
        result: std::io::Result<usize>,
    ) {
        let slot = &mut self.conns[key as usize];
        slot.io.sending = false;
        match result {
            Ok(n) => {
                self.counters.bytes_out += n as u64;
                // Bytes of a batch that was in flight when the queue was
                // dropped (an abortive close) were counted as dropped then;
                // those the kernel still wrote are sent, not dropped.
                let already_dropped = n.saturating_sub(slot.ctl.unsent);
                self.counters.bytes_dropped -= already_dropped as u64;
                slot.ctl.unsent -= n - already_dropped;
                if n > 0 {
                    slot.last_write_tick = self.now.ceil;
                }
                batch.advance(n);
                if batch.is_empty() {
                    self.spare_batches.push(batch);
                } else {
                    slot.io.leftover = Some(batch);
                }
                if slot.io.leftover.is_none() && slot.ctl.out.is_empty() {
                    // Quiet: give back what a big message made the queue grow.
                    slot.ctl.out.shrink_idle();
                }
                let drained = slot.ctl.unsent <= self.limits.low_water;
                if let Phase::Open(open) = &mut slot.phase {
                    if open.congested && drained {
                        open.congested = false;
                        // Reading resumes now: the idle clock starts again
                        // (it does not run while wharf itself paused reading).
                        slot.last_recv_tick = self.now.ceil;
                        self.shared().live.set_congested(key, false);
                        let id = self.id_of(key);
                        let handler = self.handler.clone();
                        if let Err(why) =
                            self.with_conn(key, |conn| contain(|| handler.on_drain(conn)))
                        {
                            self.panicked("on_drain", &id, &why);
                            self.conns[key as usize].ctl.close_request =
                                Some(CloseReason::HandlerPanic);
                        }
                    }
                }
            }
            Err(e) => {
                batch.clear();
                self.spare_batches.push(batch);
                self.send_failed(key, e);
            }
        }
        self.touch(key);
    }

    pub(super) fn touch(&mut self, key: u32) {
        let slot = &mut self.conns[key as usize];
        if !slot.ctl.touched {
            slot.ctl.touched = true;
            self.touched.push(key);
        }
    }

    /// Moves one connection forward: carry out a requested close, deliver
    /// what was held, start a send, pause or re-arm receiving, or take the
    /// next closing step.
    pub(super) fn advance(&mut self, driver: &mut Driver, key: u32) {
        match self.conns[key as usize].phase {
            Phase::Connecting => self.advance_connecting(driver, key),
            Phase::Open(_) => self.advance_open(driver, key),
            Phase::Closing(_) => self.advance_closing(driver, key),
        }
    }

    fn advance_open(&mut self, driver: &mut Driver, key: u32) {
        let high = self.limits.high_water;
        let slot = &mut self.conns[key as usize];
        if let Some(reason) = slot.ctl.close_request.take() {
            return self.close_as_asked(key, reason);
        }
        let Phase::Open(open) = &mut slot.phase else {
            return;
        };
        if slot.ctl.unsent > high && !open.congested {
            // Over the mark: refuse further sends (here and from other
            // threads) and stop reading, so that a handler answering every
            // message cannot grow the queue.
            open.congested = true;
            self.counters.backpressure_pauses += 1;
            self.shared().live.set_congested(key, true);
        }
        let slot = &mut self.conns[key as usize];
        let Phase::Open(open) = &mut slot.phase else {
            return;
        };
        let jobs = slot.ctl.jobs.in_flight();
        let jobs_full = jobs >= self.limits.jobs_per_connection;
        let held_back = open.congested || slot.ctl.read_paused || jobs_full;
        if slot.ctl.sink.is_some() && open.held.is_empty() {
            // As in `deliver`: a partial frame the reader held belongs to
            // the file asked for since.
            open.held = slot.reader.take_pending();
        }
        if !held_back && !open.held.is_empty() {
            // The queue drained (and jobs came back): deliver what arrived
            // meanwhile. Crossing the mark again holds the rest; this slot
            // is touched, so the next round pauses it.
            let held = std::mem::take(&mut open.held);
            self.deliver(key, &held);
            let slot = &mut self.conns[key as usize];
            if let Some(reason) = slot.ctl.close_request.take() {
                return self.close_as_asked(key, reason);
            }
            if !matches!(slot.phase, Phase::Open(_)) {
                return;
            }
        }
        let slot = &self.conns[key as usize];
        if let (Some(sink), Phase::Open(open)) = (&slot.ctl.sink, &slot.phase) {
            // Asked for nothing, or the stream ended short of it.
            let short = open.eof && open.held.is_empty();
            if sink.left == 0 || short {
                let e = short.then(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the stream ended before the bytes asked for",
                    )
                });
                self.finish_sink(key, e);
                if let Some(reason) = self.conns[key as usize].ctl.close_request.take() {
                    return self.close_as_asked(key, reason);
                }
            }
        }
        let slot = &mut self.conns[key as usize];
        let Phase::Open(open) = &mut slot.phase else {
            return;
        };
        let jobs = slot.ctl.jobs.in_flight();
        let jobs_full = jobs >= self.limits.jobs_per_connection;
        if open.eof && open.held.is_empty() && jobs == 0 {
            // Every request the peer sent has been delivered and its jobs
            // answered: close, and flush the replies.
            return self.close(key, CloseReason::PeerClosed, true);
        }
        if self.shutdown.is_some() && jobs == 0 {
            // Left open at shutdown until its jobs came back: they have.
            return self.close(key, CloseReason::Shutdown, true);
        }
        // Reading pauses over the send queue's mark, while the connection
        // has as many jobs in flight as it may, and during a shutdown.
        let paused = open.congested || slot.ctl.read_paused || jobs_full || self.shutdown.is_some();
        let eof = open.eof;
        self.start_send(driver, key);
        if !matches!(self.conns[key as usize].phase, Phase::Open(_)) {
            return; // the send failed at once (a file could not be read)
        }
        let slot = &mut self.conns[key as usize];
        let flushed = !slot.io.sending && slot.ctl.out.is_empty() && slot.io.leftover.is_none();
        if slot.ctl.shut_write && !slot.ctl.write_shut && flushed {
            // Half-closed by the handler: the FIN follows what was queued.
            slot.ctl.write_shut = true;
            sys::shutdown_write(&slot.socket);
        }
        match slot.io.recv {
            Recv::Armed if paused => {
                slot.io.recv = Recv::Cancelling;
                driver.cancel_recv(key, &slot.socket);
            }
            Recv::Idle if !paused && !eof => {
                slot.io.recv = Recv::Armed;
                driver.recv(key, &slot.socket);
            }
            _ => {}
        }
        self.arm_timer(key);
    }

    pub(super) fn start_send(&mut self, driver: &mut Driver, key: u32) {
        let slot = &mut self.conns[key as usize];
        // A TLS session may have something of its own to send (handshake,
        // close_notify): `fill_tls` finds out.
        let idle = slot.ctl.out.is_empty() && slot.io.leftover.is_none() && slot.tls.is_none();
        if slot.io.sending || idle {
            return;
        }
        if slot.io.leftover.is_none() && slot.ctl.unsent == slot.ctl.out.len() {
            // The queue starts moving now: the stall clock starts now.
            slot.last_write_tick = self.now.ceil;
        }
        let mut batch = slot
            .io
            .leftover
            .take()
            .or_else(|| self.spare_batches.pop())
            .unwrap_or_default();
        let filled = if slot.tls.is_some() {
            self.fill_tls(key, &mut batch)
        } else {
            let zero_copy = self
                .limits
                .zero_copy_files
                .unwrap_or_else(|| !slot.peer.ip().to_canonical().is_loopback());
            slot.ctl
                .out
                .fill(&mut batch, zero_copy && driver.sends_files())
        };
        if let Err(e) = filled {
            // A file being sent could not be read (it shrank, or the read
            // failed): the message it began cannot be completed, so the
            // connection fails as on a send error.
            tracing::debug!(conn = %self.id_of(key), error = %e, "reading a file to send failed");
            batch.clear();
            self.spare_batches.push(batch);
            return self.send_failed(key, e);
        }
        let slot = &mut self.conns[key as usize];
        if batch.is_empty() {
            // Handshaking, with plaintext waiting for it to finish.
            self.spare_batches.push(batch);
            return;
        }
        slot.io.sending = true;
        driver.send(key, &slot.socket, batch);
    }

    /// Encrypts what is queued (up to `TLS_BATCH` of plaintext at a time,
    /// so that rustls never holds more than one send's worth), closes the
    /// TLS stream once the queue is empty on a connection that is ending
    /// its sending, and adds the ciphertext to `batch`. `unsent` and the
    /// queued-bytes counter count what goes on the wire: the plaintext
    /// taken out is replaced by its ciphertext.
    fn fill_tls(&mut self, key: u32, batch: &mut SendBatch) -> std::io::Result<()> {
        let slot = &mut self.conns[key as usize];
        let Some(tls) = slot.tls.as_deref_mut() else {
            return Ok(());
        };
        let mut taken = 0;
        if tls.can_encrypt() {
            let chunks = &mut self.tls_chunks;
            while taken < TLS_BATCH && chunks.len() < 64 {
                let popped = slot.ctl.out.pop_upto(TLS_BATCH - taken);
                // The list is the loop's: on a failed file read nothing of
                // this connection may stay in it for the next one.
                let popped = popped.inspect_err(|_| chunks.clear())?;
                match popped {
                    Some(chunk) => {
                        taken += chunk.len();
                        chunks.push(chunk);
                    }
                    None => break,
                }
            }
            if !chunks.is_empty() {
                let slices: Vec<std::io::IoSlice<'_>> =
                    chunks.iter().map(|c| std::io::IoSlice::new(c)).collect();
                tls.encrypt(&slices);
                drop(slices);
                chunks.clear();
            }
            let ending = !slot.ctl.open || slot.ctl.shut_write;
            if ending && slot.ctl.out.is_empty() && !tls.notified() {
                let handshaking = matches!(&slot.phase, Phase::Open(o) if o.handshaking);
                if !handshaking {
                    tls.close_notify();
                }
            }
        }
        if let Some(wire) = tls.take_output() {
            self.counters.bytes_queued += wire.len() as u64;
            self.counters.bytes_queued -= taken as u64;
            slot.ctl.unsent = slot.ctl.unsent + wire.len() - taken;
            batch.bufs.push(wire);
        } else if taken > 0 {
            // The session failed while encrypting: the plaintext is lost.
            slot.ctl.unsent -= taken;
            self.counters.bytes_dropped += taken as u64;
        }
        Ok(())
    }
}
