//! A running server: stopping it, and what it listens on.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::error::ShutdownError;
use crate::handle::Handle;
use crate::mailbox::Command;

/// A running server: its loops, listeners and connections.
///
/// Dropping it stops it at once (as `shutdown(Duration::ZERO)`): call
/// [`Server::shutdown`] to let queued data drain.
#[derive(Debug)]
pub struct Server {
    handle: Handle,
    joins: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    backend: Backend,
}

impl Server {
    pub(crate) fn new(
        handle: Handle,
        joins: Vec<JoinHandle<()>>,
        local_addrs: Vec<SocketAddr>,
        backend: Backend,
    ) -> Server {
        Server {
            handle,
            joins,
            local_addrs,
            backend,
        }
    }

    /// A handle to reach connections from any thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The first address listened on (useful after binding port 0).
    ///
    /// # Panics
    /// If the server listens on nothing.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// The backend the loops run on (never `Auto`).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Every address listened on.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Stops accepting, lets every connection flush what is queued (until
    /// `deadline` has passed), closes them (each gets `on_close` with
    /// [`CloseReason::Shutdown`](crate::CloseReason::Shutdown)) and joins the
    /// loop threads. A connection with jobs on the worker pool waits for
    /// their results (until the deadline) before it closes. No callback
    /// runs after this returns.
    pub fn shutdown(mut self, deadline: Duration) -> Result<(), ShutdownError> {
        self.stop(deadline)
    }

    pub(crate) fn stop(&mut self, deadline: Duration) -> Result<(), ShutdownError> {
        let until = crate::timer::deadline(Instant::now(), deadline);
        for l in &self.handle.shared.loops {
            // A loop that has ended already needs no telling.
            let _ = l.mailbox.post(Command::Shutdown(until));
        }
        let mut panicked = false;
        for join in self.joins.drain(..) {
            panicked |= join.join().is_err();
        }
        self.handle.shared.stopped.store(true, Ordering::Release);
        // Every connection is closed: what is queued for the workers is
        // dropped; running jobs get what is left of the deadline.
        self.handle.shared.pool.stop(until);
        if let Some(b) = &self.handle.shared.groups.backplane {
            b.detach();
        }
        if panicked {
            Err(ShutdownError::Panicked)
        } else {
            Ok(())
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.joins.is_empty() {
            let _ = self.stop(Duration::ZERO);
        }
    }
}
