//! Receiving: one receive per connection, multishot where the kernel has
//! it, with a watch for the stream's end beside it (see [`Reading`]).

use std::os::fd::{AsRawFd, RawFd};

use io_uring::types::Fd;
use io_uring::{opcode, squeue};

use super::super::unix::Socket;
use super::{bufring, tag, Driver, RECV, WATCH};

/// What ends a stream, for the watch: the peer's FIN, an error (a reset),
/// a hang-up.
const STREAM_END: u32 = (libc::POLLRDHUP | libc::POLLERR | libc::POLLHUP) as u32;

/// The driver's side of one slot's receiving.
///
/// A multishot receive can miss the end of its stream: when data and the
/// peer's FIN or reset arrive together, one pass reads the data and goes
/// back to waiting for a wake-up that has already come. (Kernel 6.18:
/// about one connection in 2,000 under `tests/churn.rs`, whose clients send
/// half a frame and reset at once, never saw its reset; `SO_ERROR` of such
/// a socket holds ECONNRESET, and a fresh receive returns it. A reset that
/// comes a few milliseconds after the data is never missed.) So beside each
/// multishot receive the driver keeps a watch: a poll for the end of the
/// stream, which reads nothing and so cannot spend the wake-up on data.
/// When it fires, the driver cancels the multishot receive and one-shot
/// receives take over, each of which checks the socket afresh; the loop
/// sees one receive that goes on.
#[derive(Clone, Copy, Default)]
pub(super) struct Reading {
    /// The socket of the receive in flight (for the one-shot receive that
    /// replaces a multishot one).
    fd: RawFd,
    /// The receive in flight is multishot.
    multishot: bool,
    /// The generation of the watch in flight beside it, if any: the
    /// completion of an older watch is told apart by it.
    watch: Option<u8>,
    /// The generation of the next watch.
    next_watch: u8,
    /// A watch saw the end of this connection's stream: receive one-shot
    /// from here on.
    ended: bool,
    /// The driver cancelled the multishot receive itself (its watch
    /// fired): its ECANCELED starts a one-shot receive instead of ending
    /// the loop's receive.
    switching: bool,
    /// The loop asked for the receive to end (`cancel_recv`, `cancel`).
    cancelled: bool,
}

fn watch_tag(slot: u32, generation: u8) -> u64 {
    tag(WATCH, slot) | (generation as u64) << 32
}

impl Driver {
    pub(crate) fn recv(&mut self, slot: u32, socket: &Socket) {
        let fd = socket.as_raw_fd();
        let multishot = self.features.multishot_recv;
        let r = self.reading_mut(slot);
        r.fd = fd;
        r.cancelled = false;
        r.switching = false;
        if !multishot || r.ended {
            return self.recv_once(slot, fd);
        }
        r.multishot = true;
        let generation = r.next_watch;
        r.next_watch = generation.wrapping_add(1);
        r.watch = Some(generation);
        let recv = opcode::RecvMulti::new(Fd(fd), bufring::GROUP)
            .build()
            .user_data(tag(RECV, slot));
        let watch = opcode::PollAdd::new(Fd(fd), STREAM_END)
            .build()
            .user_data(watch_tag(slot, generation));
        // SAFETY: the receive writes only into ring buffers, which outlive
        // every operation (see `Drop`); a poll carries no pointers.
        unsafe {
            self.push(recv);
            self.push(watch);
        }
        self.in_flight += 2;
    }

    /// A receive of one completion, picking a pooled buffer: the loop (or
    /// the driver, for a multishot receive whose watch fired) re-arms it.
    pub(super) fn recv_once(&mut self, slot: u32, fd: RawFd) {
        self.reading_mut(slot).multishot = false;
        let entry = opcode::Recv::new(Fd(fd), std::ptr::null_mut(), 0)
            .buf_group(bufring::GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(tag(RECV, slot));
        // SAFETY: the receive writes only into ring buffers, which outlive
        // every operation (see `Drop`).
        unsafe { self.push(entry) };
        self.in_flight += 1;
    }

    pub(crate) fn cancel_recv(&mut self, slot: u32, socket: &Socket) {
        let _ = socket;
        self.reading_mut(slot).cancelled = true;
        self.cancel_user_data(tag(RECV, slot));
    }

    /// Slot `slot`'s connection is ending (its operations are being
    /// cancelled): a later receive on this slot is the next connection's.
    pub(super) fn connection_ends(&mut self, slot: u32) {
        let r = self.reading_mut(slot);
        r.cancelled = true;
        r.ended = false;
    }

    fn reading_mut(&mut self, slot: u32) -> &mut Reading {
        let i = slot as usize;
        if self.reading.len() <= i {
            self.reading.resize(i + 1, Reading::default());
        }
        &mut self.reading[i]
    }

    /// The last completion of slot `slot`'s receive came, with `res`: ends
    /// its watch, and says whether the loop's receive ended (else the
    /// driver replaced a multishot receive it cancelled with a one-shot
    /// one).
    pub(super) fn recv_finished(&mut self, slot: u32, res: i32) -> bool {
        let r = self.reading_mut(slot);
        let watch = r.watch.take();
        let switching = std::mem::take(&mut r.switching);
        let fd = r.fd;
        if res == 0 || (res < 0 && res != -libc::ECANCELED && res != -libc::ENOBUFS) {
            // The end of this connection's stream: the next receive on
            // this slot is another connection's.
            r.ended = false;
        }
        let go_on = switching && res == -libc::ECANCELED && !r.cancelled;
        if let Some(generation) = watch {
            self.cancel_user_data(watch_tag(slot, generation));
        }
        if go_on {
            self.recv_once(slot, fd);
        }
        !go_on
    }

    /// The watch of generation `generation` on `slot` completed with `res`
    /// (the poll's events, or an error such as ECANCELED).
    pub(super) fn watch_fired(&mut self, slot: u32, generation: u8, res: i32) {
        let r = self.reading_mut(slot);
        if res <= 0 || r.watch != Some(generation) {
            return; // cancelled, or the watch of a receive that has ended
        }
        r.watch = None;
        r.ended = true;
        if r.multishot && !r.cancelled {
            r.switching = true;
            self.cancel_user_data(tag(RECV, slot));
        }
    }
}
