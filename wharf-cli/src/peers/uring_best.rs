//! The best echo this machine's io_uring does, as the bench's limit: one
//! thread and one ring (single issuer, deferred task work), multishot
//! accept straight into the ring's table of direct descriptors (no file
//! table, no fd per connection), and one multishot receive per connection
//! from a ring of provided buffers, whose buffer is then sent back as it
//! is and returned to the ring when the send completes: no copy, no
//! per-connection buffer. It echoes bytes as they come (raw). No
//! timeouts, limits, framing or back-pressure, and none of wharf's
//! guards (it would, for one, keep a connection whose reset the kernel's
//! multishot receive missed). Everything wharf does beyond this is what
//! wharf costs.
//!
//! Receive bundles are left out on purpose: a buffer here (32 KiB) holds
//! every message of the bench's matrix, and the load generator waits for
//! each echo before the next message, so a bundle would never hold more
//! than the one buffer a plain multishot receive takes.
//!
//! Broadcast: a receive is copied once into a shared buffer, its buffer
//! goes back to the ring, and a send of the copy is queued on every
//! connection.

use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::error::Error;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::Mode;

const RING_ENTRIES: u32 = 4096;
/// Direct descriptors: one per connection, more than the bench opens.
const FILES: u32 = 16 * 1024;
/// Provided buffers: one per connection with an echo in flight, and more.
const BUFFERS: u16 = 4096;
const BUFFER_SIZE: usize = 32 * 1024;
const GROUP: u16 = 0;

const ACCEPT: u64 = u64::MAX;
const OP_RECV: u64 = 0;
const OP_SEND: u64 = 1;
/// Completions nobody waits for: closes and cancels.
const OP_IGNORE: u64 = 2;

/// Bytes waiting to be sent on a connection.
enum Out {
    /// Echo: a provided buffer the kernel filled, sent back as it is.
    Buffer { bid: u16, len: usize, sent: usize },
    /// Broadcast: a message shared by every connection.
    Shared { msg: Rc<[u8]>, sent: usize },
}

struct Conn {
    /// Its position in `Echo::live`.
    live_at: usize,
    /// A multishot receive is armed.
    receiving: bool,
    send_busy: bool,
    out: VecDeque<Out>,
    /// Its input ended (end of stream or an error), or a send failed.
    ending: bool,
}

/// The provided buffers and the ring that hands them to the kernel. Both
/// are leaked: the kernel may write into them until the process ends.
struct Pool {
    entries: &'static mut [BufRingEntry],
    memory: &'static mut [u8],
    tail: u16,
    /// Buffers the program holds (filled, not yet given back).
    held: usize,
}

struct Echo {
    ring: IoUring,
    mode: Mode,
    pool: Pool,
    /// By direct descriptor.
    conns: Vec<Option<Conn>>,
    /// The open connections' descriptors, for broadcast.
    live: Vec<u32>,
    /// Connections whose receive ended for want of buffers.
    starved: Vec<u32>,
}

/// Serves on `listener` until the process exits.
pub(super) fn serve(
    listener: TcpListener,
    mode: Mode,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), Box<dyn Error>> {
    let ring = IoUring::builder()
        .setup_cqsize(RING_ENTRIES * 4)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .map_err(|e| format!("uring-best needs single-issuer, deferred-taskrun rings: {e}"))?;
    ring.submitter()
        .register_files_sparse(FILES)
        .map_err(|e| format!("uring-best needs direct descriptors: {e}"))?;
    let pool = Pool::new(&ring).map_err(|e| format!("uring-best needs buffer rings: {e}"))?;
    // Accepted sockets inherit TCP_NODELAY from the listener, and a direct
    // descriptor has no fd to set it on.
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
    let mut echo = Echo {
        ring,
        mode,
        pool,
        conns: (0..FILES).map(|_| None).collect(),
        live: Vec::new(),
        starved: Vec::new(),
    };
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .allocate_file_index(true)
        .build()
        .user_data(ACCEPT);
    echo.push(&accept)?;
    ready(listener.local_addr()?);
    let mut done = Vec::new();
    loop {
        echo.ring.submit_and_wait(1)?;
        done.extend(
            echo.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for (data, result, flags) in done.drain(..) {
            if data == ACCEPT {
                if result >= 0 {
                    echo.opened(result as u32)?;
                }
                if !cqueue::more(flags) {
                    echo.push(&accept)?;
                }
                continue;
            }
            let file = (data >> 2) as u32;
            match data & 3 {
                OP_RECV => echo.received(file, result, flags)?,
                OP_SEND => echo.sent(file, result)?,
                _ => {}
            }
        }
        if !echo.starved.is_empty() && echo.pool.held < BUFFERS as usize {
            for file in std::mem::take(&mut echo.starved) {
                echo.arm_recv(file)?;
            }
        }
    }
}

impl Pool {
    fn new(ring: &IoUring) -> io::Result<Pool> {
        let count = BUFFERS as usize;
        let layout = Layout::from_size_align(count * std::mem::size_of::<BufRingEntry>(), 4096)
            .map_err(io::Error::other)?;
        // SAFETY: the layout's size is not zero. The ring must start zeroed
        // (the kernel reads its tail from it).
        let entries = unsafe { alloc::alloc_zeroed(layout) } as *mut BufRingEntry;
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        // SAFETY: `entries` is a fresh, zeroed, never-freed allocation of
        // `count` entries (a zeroed entry is a valid one: plain integers).
        let entries = unsafe { std::slice::from_raw_parts_mut(entries, count) };
        let memory = Vec::leak(vec![0u8; count * BUFFER_SIZE]);
        // SAFETY: the entries and the buffers they point at are leaked, so
        // they stay valid for as long as the kernel may use them.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                BUFFERS,
                GROUP,
                0,
            )?;
        }
        let mut pool = Pool {
            entries,
            memory,
            tail: 0,
            held: count,
        };
        for bid in 0..BUFFERS {
            pool.give_back(bid);
        }
        Ok(pool)
    }

    /// The first `len` bytes of buffer `bid`, which a receive completion
    /// handed to the program.
    fn filled(&self, bid: u16, len: usize) -> &[u8] {
        let start = bid as usize * BUFFER_SIZE;
        &self.memory[start..start + len]
    }

    /// Hands buffer `bid` back to the kernel.
    fn give_back(&mut self, bid: u16) {
        let at = (self.tail & (BUFFERS - 1)) as usize;
        let addr = self.memory[bid as usize * BUFFER_SIZE..].as_ptr() as u64;
        let entry = &mut self.entries[at];
        entry.set_addr(addr);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.held -= 1;
        // SAFETY: the tail overlays the first entry's reserved field, inside
        // the leaked entries; the kernel reads it concurrently, hence the
        // atomic store, with release order after the entry's writes.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Echo {
    /// Queues `entry`, submitting first if the queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points at is either in the
        // leaked pool (held by the program until the send that reads
        // it completes) or an `Rc` in the connection's `out` queue,
        // which keeps it until the send's completion has been handled.
        unsafe { super::push_entry(&mut self.ring, entry) }
    }

    fn opened(&mut self, file: u32) -> io::Result<()> {
        self.conns[file as usize] = Some(Conn {
            live_at: self.live.len(),
            receiving: false,
            send_busy: false,
            out: VecDeque::new(),
            ending: false,
        });
        self.live.push(file);
        self.arm_recv(file)
    }

    fn arm_recv(&mut self, file: u32) -> io::Result<()> {
        let Some(conn) = self.conns[file as usize].as_mut() else {
            return Ok(());
        };
        conn.receiving = true;
        let entry = opcode::RecvMulti::new(types::Fixed(file), GROUP)
            .build()
            .user_data((file as u64) << 2 | OP_RECV);
        self.push(&entry)
    }

    fn received(&mut self, file: u32, result: i32, flags: u32) -> io::Result<()> {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(conn) = self.conns[file as usize].as_mut() else {
            return Ok(());
        };
        conn.receiving = more;
        if result <= 0 {
            if let Some(bid) = bid {
                self.pool.held += 1;
                self.pool.give_back(bid);
            }
            if result == -libc::ENOBUFS && !conn.ending {
                self.starved.push(file);
            } else {
                conn.ending = true;
                self.close_if_quiet(file)?;
            }
            return Ok(());
        }
        let Some(bid) = bid else {
            return Err(io::Error::other("a receive completion without its buffer"));
        };
        self.pool.held += 1;
        let len = result as usize;
        match self.mode {
            Mode::Echo => {
                conn.out.push_back(Out::Buffer { bid, len, sent: 0 });
                self.post_send(file)?;
            }
            // No groups here: the group is every connection.
            Mode::Broadcast | Mode::Group => {
                let msg: Rc<[u8]> = Rc::from(self.pool.filled(bid, len));
                self.pool.give_back(bid);
                for i in 0..self.live.len() {
                    let other = self.live[i];
                    if let Some(c) = self.conns[other as usize].as_mut() {
                        c.out.push_back(Out::Shared {
                            msg: msg.clone(),
                            sent: 0,
                        });
                        self.post_send(other)?;
                    }
                }
            }
        }
        if !more && !self.conns[file as usize].as_ref().is_some_and(|c| c.ending) {
            self.arm_recv(file)?;
        }
        Ok(())
    }

    /// Posts the send at the head of the connection's queue, if none is in
    /// flight.
    fn post_send(&mut self, file: u32) -> io::Result<()> {
        let Some(conn) = self.conns[file as usize].as_mut() else {
            return Ok(());
        };
        if conn.send_busy {
            return Ok(());
        }
        let (ptr, len) = match conn.out.front() {
            None => return Ok(()),
            Some(&Out::Buffer { bid, len, sent }) => {
                let bytes = &self.pool.filled(bid, len)[sent..];
                (bytes.as_ptr(), bytes.len())
            }
            Some(Out::Shared { msg, sent }) => (msg[*sent..].as_ptr(), msg.len() - sent),
        };
        conn.send_busy = true;
        let entry = opcode::Send::new(types::Fixed(file), ptr, len as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data((file as u64) << 2 | OP_SEND);
        self.push(&entry)
    }

    fn sent(&mut self, file: u32, result: i32) -> io::Result<()> {
        let Some(conn) = self.conns[file as usize].as_mut() else {
            return Ok(());
        };
        conn.send_busy = false;
        if result < 0 {
            conn.ending = true;
            for out in conn.out.drain(..) {
                if let Out::Buffer { bid, .. } = out {
                    self.pool.give_back(bid);
                }
            }
            if conn.receiving {
                let cancel = opcode::AsyncCancel::new((file as u64) << 2 | OP_RECV)
                    .build()
                    .user_data(OP_IGNORE);
                return self.push(&cancel);
            }
            return self.close_if_quiet(file);
        }
        let finished = match conn.out.front_mut() {
            Some(Out::Buffer { len, sent, .. }) => {
                *sent += result as usize;
                sent == len
            }
            Some(Out::Shared { msg, sent }) => {
                *sent += result as usize;
                *sent == msg.len()
            }
            None => false,
        };
        if finished {
            if let Some(Out::Buffer { bid, .. }) = conn.out.pop_front() {
                self.pool.give_back(bid);
            }
        }
        self.post_send(file)?;
        self.close_if_quiet(file)
    }

    /// Closes an ending connection once nothing is in flight on it and
    /// nothing is left to send.
    fn close_if_quiet(&mut self, file: u32) -> io::Result<()> {
        let quiet = self.conns[file as usize]
            .as_ref()
            .is_some_and(|c| c.ending && !c.receiving && !c.send_busy && c.out.is_empty());
        if !quiet {
            return Ok(());
        }
        let conn = self.conns[file as usize].take().expect("checked");
        self.live.swap_remove(conn.live_at);
        if let Some(&moved) = self.live.get(conn.live_at) {
            if let Some(c) = self.conns[moved as usize].as_mut() {
                c.live_at = conn.live_at;
            }
        }
        self.starved.retain(|&f| f != file);
        // The descriptor's slot is free for the next accept once this runs;
        // nothing of this connection is in flight, so no completion of its
        // can reach the next one.
        let close = opcode::Close::new(types::Fixed(file))
            .build()
            .user_data(OP_IGNORE);
        self.push(&close)
    }
}
