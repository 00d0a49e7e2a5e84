//! Commands from other threads to one loop, batched: posting takes a short
//! lock, and only the first post after the loop last looked wakes it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;

use crate::id::ConnId;
use crate::sys::{Socket, Waker};

/// Something another thread asks a loop to do.
pub(crate) enum Command {
    /// Send one message (the body; the loop adds the header).
    Send(ConnId, Bytes),
    /// Send bytes already in wire form to every open connection.
    Broadcast(Bytes),
    /// Close a connection after flushing it.
    Disconnect(ConnId),
    /// Open an outbound connection.
    Connect(SocketAddr),
    /// Take over a connection another loop accepted (loops that share one
    /// listening socket spread their accepts this way).
    Adopt(Socket),
    /// Stop accepting, flush and close everything, exit by the deadline.
    Shutdown(Instant),
}

pub(crate) struct Mailbox {
    queue: Mutex<Vec<Command>>,
    /// Set by the first post after the loop last emptied the queue: the
    /// loop has been (or is being) woken and will look.
    pending: AtomicBool,
    waker: OnceLock<Waker>,
}

impl Mailbox {
    pub(crate) fn new() -> Mailbox {
        Mailbox {
            queue: Mutex::new(Vec::new()),
            pending: AtomicBool::new(false),
            waker: OnceLock::new(),
        }
    }

    /// Called once by the loop when its driver exists.
    pub(crate) fn set_waker(&self, waker: Waker) {
        let _ = self.waker.set(waker);
    }

    pub(crate) fn post(&self, command: Command) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(command);
        // Swap after the push: if the flag was already set, the loop has not
        // emptied the queue since, and will see this command too.
        if !self.pending.swap(true, Ordering::AcqRel) {
            if let Some(w) = self.waker.get() {
                w.wake();
            }
        }
    }

    /// Whether commands may be waiting.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Moves every waiting command into `into` (loop thread only).
    pub(crate) fn take(&self, into: &mut Vec<Command>) {
        // Clear before emptying: a post racing with us either lands in this
        // batch or sets the flag again and wakes us.
        self.pending.store(false, Ordering::Release);
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *queue, into);
    }
}
