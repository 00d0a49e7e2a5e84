//! Commands from other threads to one loop, batched: posting takes a short
//! lock, and only the first post after the loop last looked wakes it.
//!
//! The rule that rules out a lost wake-up: a post pushes, then sets
//! `pending`, then (if it was the first) wakes; the loop clears `pending`,
//! then empties the queue. And a post that finds no waker yet (the loop is
//! still starting) is covered because the loop, after setting its waker,
//! checks `pending` before it first sleeps (`EventLoop::next_timeout`);
//! the SeqCst fences on both sides make "the post saw no waker" and "the
//! loop saw no pending post" impossible at once. `tests::loom_*` check this
//! under every interleaving (`RUSTFLAGS="--cfg loom" cargo test --release
//! -p wharf --lib loom`).

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;

use std::any::Any;

#[cfg(loom)]
use loom::sync::{
    atomic::{fence, AtomicBool, Ordering},
    Mutex,
};
#[cfg(not(loom))]
use std::sync::{
    atomic::{fence, AtomicBool, Ordering},
    Mutex,
};

use crate::connect::Dial;
use crate::id::ConnId;
use crate::sys::Socket;

/// What a job hands back to its loop: the connection's `Apply<S>`, erased
/// (a worker knows no handler's state type), or the panic's message.
pub(crate) type Output = Result<Box<dyn Any + Send>, String>;

/// A job's result on its way to the connection's loop.
pub(crate) struct Done {
    pub(crate) id: ConnId,
    pub(crate) seq: u32,
    pub(crate) output: Output,
}

/// Something another thread asks a loop to do.
pub(crate) enum Command {
    /// Send one message (the body; the loop adds the header).
    Send(ConnId, Bytes),
    /// Send a file's range (`Handle::send_file`).
    SendFile(ConnId, crate::FileRange),
    /// Send bytes already in wire form to every open connection.
    Broadcast(Bytes),
    /// Send bytes already in wire form to the loop's members of a group.
    Publish(std::sync::Arc<str>, Bytes),
    /// Add a connection to a group (counted in the registry already).
    Join(ConnId, std::sync::Arc<str>),
    /// Take a connection out of a group.
    Leave(ConnId, String),
    /// Close a connection after flushing it.
    Disconnect(ConnId),
    /// Open an outbound connection.
    Connect(Box<Dial>),
    /// Close the open connections from a network just banned.
    Kick(ipnet::IpNet),
    /// No more reconnects for this token.
    StopReconnect(u64),
    /// Take over a connection another loop accepted (loops that share one
    /// listening socket spread their accepts this way).
    Adopt(Socket, Option<SocketAddr>),
    /// Stop accepting, flush and close everything, exit by the deadline.
    Shutdown(Instant),
    /// A worker finished a job of a connection of this loop.
    JobDone(Done),
    /// Fail as a driver error would (`Handle::inject_loop_failure`, for
    /// tests of what a failed loop leaves behind on real sockets).
    InjectFailure,
}

/// What wakes the loop; the real one is the driver's (`sys::Waker`).
pub(crate) trait Wake {
    fn wake(&self);
}

impl Wake for crate::sys::Waker {
    fn wake(&self) {
        crate::sys::Waker::wake(self)
    }
}

pub(crate) struct Mailbox<C = Command, W = crate::sys::Waker> {
    queue: Mutex<Queue<C>>,
    /// Set by the first post after the loop last emptied the queue: the
    /// loop has been (or is being) woken and will look.
    pending: AtomicBool,
    /// Set once by the loop when its driver exists; read by every post.
    waker: Mutex<Option<W>>,
    has_waker: AtomicBool,
}

struct Queue<C> {
    commands: Vec<C>,
    /// The loop has ended: posts are refused (and handed back).
    closed: bool,
}

impl<C, W: Wake> Mailbox<C, W> {
    pub(crate) fn new() -> Self {
        Mailbox {
            queue: Mutex::new(Queue {
                commands: Vec::new(),
                closed: false,
            }),
            pending: AtomicBool::new(false),
            waker: Mutex::new(None),
            has_waker: AtomicBool::new(false),
        }
    }

    /// Called once by the loop when its driver exists, before its first
    /// wait (which does not sleep if a post is pending).
    pub(crate) fn set_waker(&self, waker: W) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker);
        self.has_waker.store(true, Ordering::Release);
        // Pairs with the fence in `post`: either that post sees the waker,
        // or the loop's next `has_pending` sees its flag.
        fence(Ordering::SeqCst);
    }

    /// Queues `command` and wakes the loop if it may be asleep; hands the
    /// command back if the loop has ended.
    pub(crate) fn post(&self, command: C) -> Result<(), C> {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.closed {
                return Err(command);
            }
            queue.commands.push(command);
        }
        self.announce();
        Ok(())
    }

    /// Queues every command of `commands` (emptying it) with one lock and
    /// at most one wake-up; drops them if the loop has ended.
    pub(crate) fn post_all(&self, commands: &mut Vec<C>) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.closed {
                commands.clear();
                return;
            }
            queue.commands.append(commands);
        }
        self.announce();
    }

    /// After a push: wakes the loop unless a post since it last looked
    /// already did. The swap comes after the push: if the flag was already
    /// set, the loop has not emptied the queue since, and will see what
    /// was pushed too.
    fn announce(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            fence(Ordering::SeqCst);
            if self.has_waker.load(Ordering::Acquire) {
                if let Some(w) = &*self.waker.lock().unwrap_or_else(|p| p.into_inner()) {
                    w.wake();
                }
            }
        }
    }

    /// Whether commands may be waiting.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Moves every waiting command into `into` (loop thread only).
    pub(crate) fn take(&self, into: &mut Vec<C>) {
        // Clear before emptying: a post racing with us either lands in this
        // batch or sets the flag again and wakes us.
        self.pending.store(false, Ordering::Release);
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut queue.commands, into);
    }

    /// Refuses every later post and returns what is still queued (the loop
    /// is ending): each command posted before is either taken by the loop
    /// or returned here, never left behind.
    pub(crate) fn close(&self) -> Vec<C> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.closed = true;
        self.pending.store(false, Ordering::Release);
        // Nothing will wake the loop again: let its waker's descriptor go
        // with the driver rather than live as long as the last `Handle`.
        self.has_waker.store(false, Ordering::Release);
        self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        std::mem::take(&mut queue.commands)
    }
}

#[cfg(all(test, loom))]
mod tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::sync::Arc;
    use loom::thread;

    /// Counts wake-ups, as the driver's eventfd would.
    #[derive(Clone, Default)]
    struct Counter(Arc<AtomicUsize>);

    impl Wake for Counter {
        fn wake(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn queued(m: &Mailbox<u32, Counter>) -> Vec<u32> {
        m.queue.lock().unwrap().commands.clone()
    }

    #[test]
    fn loom_a_post_before_the_waker_is_set_is_not_lost() {
        loom::model(|| {
            let m = Arc::new(Mailbox::<u32, Counter>::new());
            let waker = Counter::default();
            let poster = {
                let m = m.clone();
                thread::spawn(move || m.post(7).unwrap())
            };
            // The loop starting: set the waker, then decide whether to
            // sleep (it does not if a post is pending).
            m.set_waker(waker.clone());
            let sleeps = !m.has_pending();
            poster.join().unwrap();
            // A wake-up is sticky (an eventfd count): one at any time after
            // the decision ends the sleep.
            let woken = waker.0.load(Ordering::SeqCst) > 0;
            assert!(!sleeps || woken, "the loop slept with a command waiting");
            assert_eq!(queued(&m), vec![7]);
        });
    }

    #[test]
    fn loom_a_post_racing_with_take_wakes_or_is_taken() {
        loom::model(|| {
            let m = Arc::new(Mailbox::<u32, Counter>::new());
            let waker = Counter::default();
            m.set_waker(waker.clone());
            m.post(1).unwrap();
            let poster = {
                let m = m.clone();
                thread::spawn(move || m.post(2).unwrap())
            };
            // A loop turn: the wake-ups so far are consumed, take what is
            // there, then decide whether to sleep.
            let consumed = waker.0.load(Ordering::SeqCst);
            let mut got = Vec::new();
            m.take(&mut got);
            let sleeps = !m.has_pending();
            poster.join().unwrap();
            let left = queued(&m);
            let woken = waker.0.load(Ordering::SeqCst) > consumed;
            assert!(
                left.is_empty() || !sleeps || woken,
                "the loop slept with a command waiting"
            );
            got.extend(left);
            got.sort();
            assert_eq!(got, vec![1, 2], "a command was lost");
        });
    }

    #[test]
    fn loom_every_post_is_taken_or_handed_back_when_closing() {
        loom::model(|| {
            let m = Arc::new(Mailbox::<u32, Counter>::new());
            m.set_waker(Counter::default());
            let poster = {
                let m = m.clone();
                thread::spawn(move || m.post(5).is_ok())
            };
            let mut got = Vec::new();
            m.take(&mut got);
            let left = m.close();
            let accepted = poster.join().unwrap();
            got.extend(left);
            assert_eq!(accepted, got == vec![5], "an accepted post was dropped");
        });
    }
}
