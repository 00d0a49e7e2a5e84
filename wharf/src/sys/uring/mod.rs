//! The io_uring backend: one ring per loop thread.
//!
//! Accepts are multishot (one submission, many completions), and so are
//! receives where the kernel has them (see `Reading`); receives draw from a
//! provided-buffer ring, so an idle connection pins no buffer; every
//! connection has at most one gathered `sendmsg` in flight. Submissions
//! queue up during a loop turn and go to the kernel in one `io_uring_enter`
//! with the wait.

mod bufring;
mod features;
mod reading;

pub(crate) use features::probe;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};
use socket2::SockAddr;

use self::bufring::BufRing;
use self::reading::Reading;
use super::unix::{Listener, Socket};
use super::{DriverConfig, Event, Flow, RecvEnd, SendBatch};

// The high byte of a submission's user data says what it was; the low 32 bits
// name the slot or listener it belongs to.
const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;
const CONNECT: u64 = 4;
const CANCEL: u64 = 5;
const WAKE: u64 = 6;
/// A file send waiting for its socket to take more (then `sendfile`).
const SEND_FILE: u64 = 7;
/// The watch for the end of a stream beside a multishot receive; bits 32
/// to 39 of its user data hold the watch's generation.
const WATCH: u64 = 8;

fn tag(kind: u64, id: u32) -> u64 {
    kind << 56 | id as u64
}

/// Most buffers gathered into one `sendmsg`.
const MAX_IOV: usize = 64;

/// Scratch space of one send: the kernel reads the message header and the
/// iovecs while the send is in flight, so they live in the batch.
pub(crate) struct SendScratch {
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

impl Default for SendScratch {
    fn default() -> Self {
        SendScratch {
            iov: Vec::new(),
            // SAFETY: msghdr is a plain C struct for which all-zero is the
            // documented "no address, no control data" value.
            msg: unsafe { std::mem::zeroed() },
        }
    }
}

/// Wakes a driver from another thread through an eventfd the ring reads.
#[derive(Clone, Debug)]
pub(crate) struct Waker {
    fd: Arc<OwnedFd>,
}

impl Waker {
    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own. An
        // error (the counter is saturated) means a wake-up is pending anyway.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }
}

pub(crate) struct Driver {
    ring: IoUring,
    /// Freed in `Drop` only once the kernel is done with it (unregistered,
    /// nothing in flight), else leaked.
    bufs: ManuallyDrop<BufRing>,
    /// Submissions that did not fit the submission queue yet.
    backlog: VecDeque<squeue::Entry>,
    /// Completions copied out of the ring before they are handled, so that
    /// handling them may queue new submissions.
    reaped: Vec<cqueue::Entry>,
    /// Operations submitted whose final completion has not arrived: while
    /// any is, the buffers may not be freed.
    in_flight: usize,
    waker: Waker,
    /// The eventfd counter is read into this box; the read is in flight
    /// for the driver's whole life, so `Drop` cancels it and waits for its
    /// completion before freeing the box (or leaks it).
    wake_buf: ManuallyDrop<Box<u64>>,
    /// `Drop` has begun: a finished eventfd read is not re-armed.
    stopping: bool,
    /// Addresses of connects in flight, which the kernel reads.
    connecting: HashMap<u32, Box<SockAddr>>,
    /// The batch of each slot's send in flight (indexed by slot): the
    /// kernel reads its buffers, iovecs and header until the completion.
    sending: Vec<Option<Box<SendBatch>>>,
    /// The socket of each file send waiting to be writable.
    file_sockets: HashMap<u32, RawFd>,
    /// Each slot's receiving (indexed by slot).
    reading: Vec<Reading>,
    features: features::Features,
}

impl Driver {
    pub(crate) fn new(config: &DriverConfig) -> io::Result<Driver> {
        let features = features::features()?;
        let depth = config.queue_depth.max(64);
        // Task work (completions) runs only when this thread enters the
        // kernel to wait, never by interrupting it: fewer context switches
        // (kernel 6.1+). Older kernels get the plainer set-ups.
        let ring = IoUring::builder()
            .setup_cqsize(depth * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(depth)
            .or_else(|_| {
                IoUring::builder()
                    .setup_cqsize(depth * 4)
                    .setup_coop_taskrun()
                    .build(depth)
            })
            .or_else(|_| IoUring::builder().setup_cqsize(depth * 4).build(depth))?;
        let bufs = BufRing::new(
            &ring,
            config.recv_buffers,
            config.recv_buffer_size,
            features.incremental_buffers,
        )?;
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh eventfd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut driver = Driver {
            ring,
            bufs: ManuallyDrop::new(bufs),
            backlog: VecDeque::new(),
            reaped: Vec::with_capacity(256),
            in_flight: 0,
            waker: Waker { fd: Arc::new(fd) },
            wake_buf: ManuallyDrop::new(Box::new(0)),
            stopping: false,
            connecting: HashMap::new(),
            sending: Vec::new(),
            file_sockets: HashMap::new(),
            reading: Vec::new(),
            features,
        };
        driver.arm_waker();
        Ok(driver)
    }

    pub(crate) fn waker(&self) -> Waker {
        self.waker.clone()
    }

    pub(crate) fn listen(&mut self, listener: u32, socket: &Listener) {
        let entry = opcode::AcceptMulti::new(Fd(socket.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(tag(ACCEPT, listener));
        // SAFETY: a multishot accept carries no pointers.
        unsafe { self.push(entry) };
        self.in_flight += 1;
    }

    pub(crate) fn unlisten(&mut self, listener: u32, socket: &Listener) {
        let _ = listener;
        self.cancel_fd(socket.as_raw_fd());
    }

    pub(crate) fn send(&mut self, slot: u32, socket: &Socket, mut batch: Box<SendBatch>) {
        if batch.file.is_some() {
            return self.send_file(slot, socket, batch);
        }
        let SendBatch {
            bufs, offset, os, ..
        } = &mut *batch;
        // One buffer (an echo, a reply): a plain send, which spares the
        // kernel the message header and the iovec array.
        if bufs.len() == 1 {
            let buf = &bufs[0][*offset..];
            let len = buf.len().min(i32::MAX as usize) as u32;
            let entry = opcode::Send::new(Fd(socket.as_raw_fd()), buf.as_ptr(), len)
                .flags(super::unix::SEND_FLAGS)
                .build()
                .user_data(tag(SEND, slot));
            // SAFETY: the buffer is the batch's, which stays in `sending`
            // (below) until the completion.
            unsafe { self.push(entry) };
            return self.sent_off(slot, batch);
        }
        os.iov.clear();
        for (i, buf) in bufs.iter().take(MAX_IOV).enumerate() {
            let skip = if i == 0 { *offset } else { 0 };
            os.iov.push(libc::iovec {
                iov_base: buf[skip..].as_ptr() as *mut libc::c_void,
                iov_len: buf.len() - skip,
            });
        }
        os.msg.msg_iov = os.iov.as_mut_ptr();
        os.msg.msg_iovlen = os.iov.len() as _;
        let entry = opcode::SendMsg::new(Fd(socket.as_raw_fd()), &os.msg)
            .flags(super::unix::SEND_FLAGS as u32)
            .build()
            .user_data(tag(SEND, slot));
        // The box stays in `sending` until the completion (`Drop` leaks it if
        // the driver goes first); MSG_NOSIGNAL: no SIGPIPE from a reset peer.
        // SAFETY: the batch's buffers, iovecs and header outlive the send.
        unsafe { self.push(entry) };
        self.sent_off(slot, batch);
    }

    /// Keeps `batch`, whose send has just been queued, until its completion.
    fn sent_off(&mut self, slot: u32, batch: Box<SendBatch>) {
        let i = slot as usize;
        if self.sending.len() <= i {
            self.sending.resize_with(i + 1, || None);
        }
        debug_assert!(self.sending[i].is_none(), "a second send on one slot");
        self.sending[i] = Some(batch);
        self.in_flight += 1;
    }

    /// A file send: wait until the socket takes more, then `sendfile` from
    /// the loop (no io_uring operation sends a file in one go; a splice
    /// through a pipe would be two, and the file half runs on a worker
    /// thread). The socket is non-blocking only for the `sendfile` call:
    /// io_uring's own sends on a non-blocking socket can end in `EAGAIN`
    /// once handed to a worker, instead of waiting.
    fn send_file(&mut self, slot: u32, socket: &Socket, batch: Box<SendBatch>) {
        let fd = socket.as_raw_fd();
        self.poll_writable(slot, fd);
        let i = slot as usize;
        if self.sending.len() <= i {
            self.sending.resize_with(i + 1, || None);
        }
        debug_assert!(self.sending[i].is_none(), "a second send on one slot");
        self.sending[i] = Some(batch);
        self.file_sockets.insert(slot, fd);
    }

    fn poll_writable(&mut self, slot: u32, fd: RawFd) {
        let entry = opcode::PollAdd::new(Fd(fd), libc::POLLOUT as u32)
            .build()
            .user_data(tag(SEND_FILE, slot));
        // SAFETY: a poll carries no pointers.
        unsafe { self.push(entry) };
        self.in_flight += 1;
    }

    pub(crate) fn connect(&mut self, slot: u32, socket: &Socket, addr: SocketAddr) {
        let addr = Box::new(SockAddr::from(addr));
        let entry = opcode::Connect::new(
            Fd(socket.as_raw_fd()),
            addr.as_ptr() as *const _,
            addr.len(),
        )
        .build()
        .user_data(tag(CONNECT, slot));
        // SAFETY: the boxed address stays in `connecting` until the connect's
        // completion is handled.
        unsafe { self.push(entry) };
        self.connecting.insert(slot, addr);
        self.in_flight += 1;
    }

    pub(crate) fn cancel(&mut self, slot: u32, socket: &Socket) {
        self.connection_ends(slot);
        self.cancel_fd(socket.as_raw_fd());
    }

    fn cancel_user_data(&mut self, user_data: u64) {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::user_data(user_data))
            .build()
            .user_data(tag(CANCEL, 0));
        // SAFETY: a cancel carries no pointers.
        unsafe { self.push(entry) };
    }

    fn cancel_fd(&mut self, fd: RawFd) {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::fd(Fd(fd)).all())
            .build()
            .user_data(tag(CANCEL, 0));
        // SAFETY: a cancel carries no pointers.
        unsafe { self.push(entry) };
    }

    fn arm_waker(&mut self) {
        let buf: *mut u64 = &mut **self.wake_buf;
        let entry = opcode::Read::new(Fd(self.waker.fd.as_raw_fd()), buf as *mut u8, 8)
            .build()
            .user_data(tag(WAKE, 0));
        // SAFETY: `wake_buf` is boxed, and `Drop` frees it only after this
        // read has completed (or leaks it); nothing else touches it while
        // the read is pending.
        unsafe { self.push(entry) };
        self.in_flight += 1;
    }

    /// Queues one submission.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid until its final completion.
    unsafe fn push(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty() {
            // SAFETY: forwarded from the caller.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
        }
        self.backlog.push_back(entry);
    }

    /// Moves backlogged submissions into the queue, flushing it to the kernel
    /// when full.
    fn drain_backlog(&mut self) -> io::Result<()> {
        while let Some(entry) = self.backlog.pop_front() {
            // SAFETY: every backlogged entry met `push`'s contract.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                self.backlog.push_front(entry);
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if submit_can_wait(&e) => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Submits what is queued, waits up to `timeout` (forever if `None`) for
    /// a completion, and hands every ready completion to `f`.
    pub(crate) fn poll(
        &mut self,
        timeout: Option<Duration>,
        mut f: impl FnMut(Event<'_>) -> Flow,
    ) -> io::Result<()> {
        self.drain_backlog()?;
        let want = usize::from(self.ring.completion().is_empty());
        let result = match timeout {
            None => self.ring.submit_and_wait(want),
            Some(t) => {
                let ts = Timespec::from(t);
                let args = SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
        };
        match result {
            Ok(_) => {}
            Err(e) => match e.raw_os_error() {
                // ETIME: the timeout passed. EINTR: a signal. EBUSY: the
                // completion queue overflowed; reaping below makes room.
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                _ => return Err(e),
            },
        }
        self.reaped.clear();
        self.reaped.extend(self.ring.completion());
        let mut reaped = std::mem::take(&mut self.reaped);
        for cqe in &reaped {
            self.dispatch(cqe, &mut f);
        }
        reaped.clear();
        self.reaped = reaped;
        self.bufs.refill();
        Ok(())
    }

    fn dispatch(&mut self, cqe: &cqueue::Entry, f: &mut impl FnMut(Event<'_>) -> Flow) {
        let data = cqe.user_data();
        let id = data as u32;
        let res = cqe.result();
        let more = cqueue::more(cqe.flags());
        if !more && data >> 56 != CANCEL {
            self.in_flight -= 1;
        }
        match data >> 56 {
            ACCEPT => {
                if res >= 0 {
                    // SAFETY: a successful accept returns a new descriptor
                    // that nothing else owns.
                    let socket = unsafe { Socket::from_raw_fd(res) };
                    f(Event::Accepted {
                        listener: id,
                        socket,
                        peer: None,
                    });
                }
                if !more {
                    // A cancel, or an error that concerns only the client
                    // being accepted (it reset first, a signal): `None`
                    // asks the loop to re-arm at once. Anything else (EMFILE,
                    // ENFILE, ENOMEM) pauses accepting.
                    f(Event::AcceptEnded {
                        listener: id,
                        error: accept_end_error(res),
                    });
                }
            }
            RECV => {
                let bid = cqueue::buffer_select(cqe.flags());
                // Whether an ENOBUFS found the whole pool out, rather than
                // only the ring's window (which it grows).
                let mut pool_out = false;
                if res > 0 {
                    let bid = bid.expect("a receive with data names its buffer");
                    // SAFETY: the completion hands us buffer `bid` holding
                    // `res` bytes; they are given back only after `f` returns.
                    let data = unsafe { self.bufs.filled(bid, res as usize) };
                    f(Event::Received { slot: id, data });
                    self.bufs.consumed(bid, res as usize, cqe.flags());
                } else if let Some(bid) = bid {
                    self.bufs.consumed(bid, 0, cqe.flags());
                } else if res == -libc::ENOBUFS {
                    pool_out = self.bufs.starved();
                }
                if !more {
                    if !self.recv_finished(id, res) {
                        return; // a one-shot receive goes on
                    }
                    let why = match res {
                        0 => RecvEnd::Eof,
                        r if r > 0 => RecvEnd::Rearm,
                        r if r == -libc::ENOBUFS && pool_out => RecvEnd::NoBuffers,
                        r if r == -libc::ENOBUFS => RecvEnd::Rearm,
                        r if r == -libc::ECANCELED => RecvEnd::Cancelled,
                        r => RecvEnd::Error(io::Error::from_raw_os_error(-r)),
                    };
                    f(Event::RecvEnded { slot: id, why });
                }
            }
            SEND => {
                let result = if res >= 0 {
                    Ok(res as usize)
                } else {
                    Err(io::Error::from_raw_os_error(-res))
                };
                let batch = self.sending[id as usize]
                    .take()
                    .expect("a send completion names a send in flight");
                f(Event::Sent {
                    slot: id,
                    batch,
                    result,
                });
            }
            SEND_FILE => {
                let fd = self.file_sockets[&id];
                let result = if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    let batch = self.sending[id as usize]
                        .as_ref()
                        .expect("a file send completion names a send in flight");
                    let file = batch.file.as_ref().expect("a file send has its file");
                    match send_file_nonblocking(fd, file) {
                        // Writable, yet nothing went: a send of nothing, for
                        // the loop to start again (or, if it is closing, not:
                        // a poll re-armed here could miss its cancel).
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                        other => other,
                    }
                };
                self.file_sockets.remove(&id);
                let batch = self.sending[id as usize].take().expect("checked above");
                f(Event::Sent {
                    slot: id,
                    batch,
                    result,
                });
            }
            CONNECT => {
                self.connecting.remove(&id);
                let result = if res >= 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(-res))
                };
                f(Event::Connected { slot: id, result });
            }
            WAKE => {
                if res != -libc::ECANCELED && !self.stopping {
                    self.arm_waker();
                }
                f(Event::Woken);
            }
            WATCH => self.watch_fired(id, (data >> 32) as u8, res),
            _ => {} // CANCEL: each cancelled operation reports itself.
        }
    }

    /// Operations whose final completion has not arrived yet.
    pub(crate) fn in_flight(&self) -> usize {
        // The eventfd read is always pending and owned by the driver itself.
        self.in_flight.saturating_sub(1)
    }
}

impl Driver {
    /// Cancels the eventfd read and waits (briefly) for its completion, so
    /// that nothing in flight names the driver's memory. True when done.
    fn quiesce(&mut self) -> bool {
        self.stopping = true;
        for _ in 0..100 {
            if self.in_flight == 0 {
                return true;
            }
            let entry = opcode::AsyncCancel2::new(CancelBuilder::user_data(tag(WAKE, 0)))
                .build()
                .user_data(tag(CANCEL, 0));
            // SAFETY: a cancel carries no pointers.
            unsafe { self.push(entry) };
            let timeout = Duration::from_millis(10);
            if self.poll(Some(timeout), |_| Flow::Continue).is_err() {
                return false;
            }
        }
        self.in_flight == 0
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Orderly (nothing but the eventfd read in flight): end that read,
        // unregister the buffer ring, then free. Otherwise (a loop torn down
        // by a failure) the kernel may still write into the receive buffers
        // and the eventfd box, and read the batches being sent: leak them.
        let clean = self.in_flight() == 0 && self.quiesce();
        // SAFETY: taken once, here; `bufs` is not used after this.
        let bufs = unsafe { ManuallyDrop::take(&mut self.bufs) };
        if clean
            && self
                .ring
                .submitter()
                .unregister_buf_ring(bufring::GROUP)
                .is_ok()
        {
            drop(bufs);
            // SAFETY: the read into it has completed (`quiesce`); it is not
            // used after this.
            unsafe { ManuallyDrop::drop(&mut self.wake_buf) };
        } else {
            tracing::warn!(
                "io_uring driver dropped with operations in flight: leaking their memory"
            );
            bufs.leak();
            std::mem::forget(std::mem::take(&mut self.sending));
            std::mem::forget(std::mem::take(&mut self.connecting));
        }
    }
}

/// Accept errors that concern only the connection being accepted, or the
/// call: re-arm at once, as the poll backend does.
/// Whether a failed submit only has to wait: the completion queue is full
/// (EBUSY), the kernel is short of memory for a moment (EAGAIN), or a
/// signal came (EINTR). The loop reaps first and submits again next turn;
/// anything else is the ring failing.
fn submit_can_wait(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
    )
}

/// What ended a multishot accept whose last completion was `res`, as the
/// loop needs it: `None` to re-arm at once (a cancel, or an error that
/// concerns only the client being accepted), the error to pause on.
fn accept_end_error(res: i32) -> Option<io::Error> {
    (res < 0 && res != -libc::ECANCELED && !transient_accept_error(-res))
        .then(|| io::Error::from_raw_os_error(-res))
}

fn transient_accept_error(errno: i32) -> bool {
    matches!(
        errno,
        libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPROTO | libc::EPERM
    )
}

/// `sendfile` on `fd` with the socket non-blocking for the call only (see
/// `Driver::send_file`).
fn send_file_nonblocking(fd: RawFd, file: &crate::file::FileChunk) -> io::Result<usize> {
    // SAFETY: the loop keeps the socket open while its send is in flight.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let socket = socket2::SockRef::from(&borrowed);
    socket.set_nonblocking(true)?;
    let sent = super::unix::send_file(&fd, file);
    if let Err(e) = socket.set_nonblocking(false) {
        // Not expected on an open socket; what was sent still counts.
        tracing::warn!(error = %e, "making a socket blocking again failed");
    }
    sent
}

#[cfg(test)]
mod accept_tests {
    use super::{accept_end_error, submit_can_wait};
    use std::io;

    /// A submit refused for a moment waits for the next turn; a broken
    /// ring fails the loop.
    #[test]
    fn only_a_broken_ring_fails_a_submit() {
        for errno in [libc::EBUSY, libc::EAGAIN, libc::EINTR] {
            assert!(
                submit_can_wait(&io::Error::from_raw_os_error(errno)),
                "errno {errno}"
            );
        }
        for errno in [libc::EBADF, libc::EFAULT, libc::EINVAL, libc::ENXIO] {
            assert!(
                !submit_can_wait(&io::Error::from_raw_os_error(errno)),
                "errno {errno}"
            );
        }
    }

    /// Errors that concern one client (it reset before we took it, a
    /// signal) re-arm accepting; running out of descriptors or memory
    /// pauses it.
    #[test]
    fn only_resource_errors_pause_accepting() {
        for errno in [
            libc::ECONNABORTED,
            libc::EINTR,
            libc::EAGAIN,
            libc::EPROTO,
            libc::EPERM,
        ] {
            assert!(
                accept_end_error(-errno).is_none(),
                "errno {errno} paused accepting"
            );
        }
        assert!(accept_end_error(-libc::ECANCELED).is_none());
        assert!(accept_end_error(5).is_none(), "a last successful accept");
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::ENOBUFS] {
            let e = accept_end_error(-errno).expect("a pause");
            assert_eq!(e.raw_os_error(), Some(errno));
        }
    }
}
