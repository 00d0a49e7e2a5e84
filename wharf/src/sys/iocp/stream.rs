//! One connection's operations: zero-byte receives followed by
//! non-blocking reads, gathered `WSASend`s, `TransmitFile` for a file's
//! range, `ConnectEx`, and cancelling.

use std::cell::UnsafeCell;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::SockAddr;
use windows_sys::core::GUID;
use windows_sys::Win32::Foundation::{ERROR_INVALID_PARAMETER, ERROR_IO_PENDING, HANDLE};
use windows_sys::Win32::Networking::WinSock::{
    recv, setsockopt, TransmitFile, WSAIoctl, WSARecv, WSASend, LPFN_CONNECTEX,
    SIO_GET_EXTENSION_FUNCTION_POINTER, SOCKET, SOL_SOCKET, SO_UPDATE_CONNECT_CONTEXT, WSABUF,
    WSAEWOULDBLOCK, WSAID_CONNECTEX, WSA_IO_PENDING, WSA_OPERATION_ABORTED,
};
use windows_sys::Win32::System::IO::{CancelIoEx, OVERLAPPED_ENTRY};

use super::op::{last_wsa_error, Kind, Op, OpBox, StartsWithOp};
use super::{raw, Done, Driver};
use crate::sys::windows::{Socket, SEND_FLAGS};
use crate::sys::{Event, Flow, RecvEnd, SendBatch};

/// Reads per connection per turn before others get a go.
const READS_PER_TURN: usize = 16;
/// Most buffers gathered into one `WSASend`.
const MAX_BUFS: usize = 64;
/// Most bytes in one `WSASend` (its byte count is 32 bits), or in one
/// `TransmitFile` (at most 2^31 - 2).
const MAX_SEND: usize = 1 << 30;

/// The target of a zero-byte receive. Nothing is ever written to it (its
/// length is given as 0); it exists so the pointer is a real one.
static ZERO_READ: [u8; 1] = [0];

/// Scratch space of one send: the `WSABUF` array, kept in the batch while
/// the send is in flight (Winsock copies it during the call, but keeping it
/// costs nothing and asks nothing of the provider).
#[derive(Default)]
pub(crate) struct SendScratch {
    bufs: Vec<WSABUF>,
}

/// One `ConnectEx`, with the address it connects to.
#[repr(C)]
pub(super) struct ConnectOp {
    op: Op,
    /// Read by the kernel while the connect is pending.
    addr: UnsafeCell<SockAddr>,
}

// SAFETY: `ConnectOp` is `#[repr(C)]` with its `Op` first.
unsafe impl StartsWithOp for ConnectOp {
    fn op(&self) -> &Op {
        &self.op
    }
}

/// What the driver knows of one connection slot. Its operations are made
/// once and reused by the next connection in the slot, which the loop opens
/// only after every ending of the previous one was reported.
pub(super) struct SlotIo {
    /// The connection's socket (the loop keeps it open while any operation
    /// on it is in flight).
    socket: SOCKET,
    recv: OpBox<Op>,
    send: OpBox<Op>,
    /// Made on the slot's first outbound connect (most slots never
    /// connect, and an idle connection should cost little).
    connect: Option<OpBox<ConnectOp>>,
    /// The batch of the send in flight: Winsock reads its buffers until the
    /// completion, which hands it back to the loop.
    batch: Option<Box<SendBatch>>,
    /// A receive was asked for and its `RecvEnded` is still owed.
    receiving: bool,
    /// The receive was asked to stop.
    recv_cancelled: bool,
}

impl SlotIo {
    fn new(slot: u32) -> SlotIo {
        SlotIo {
            socket: 0,
            recv: OpBox::new(Op::new(Kind::Recv, slot)),
            send: OpBox::new(Op::new(Kind::Send, slot)),
            connect: None,
            batch: None,
            receiving: false,
            recv_cancelled: false,
        }
    }
}

impl Drop for SlotIo {
    fn drop(&mut self) {
        if self.send.is_pending() {
            // Winsock may still read the batch (a driver dropped with I/O in
            // flight, after a failure): leak it, as the operation is leaked.
            std::mem::forget(self.batch.take());
        }
    }
}

impl Driver {
    /// The slot's state, with `socket` ready for its operations: routed to
    /// this loop's port and non-blocking. That is done when the slot meets
    /// a socket it does not know: the slot forgets its socket when its last
    /// operation ends ([`Driver::settle`]), since the loop may close it then
    /// and a new socket may get the same handle value.
    fn slot(&mut self, slot: u32, socket: &Socket) -> io::Result<&mut SlotIo> {
        let i = slot as usize;
        while self.slots.len() <= i {
            let next = self.slots.len() as u32;
            self.slots.push(SlotIo::new(next));
        }
        let s = raw(socket);
        if self.slots[i].socket != s {
            match self.port().associate(s) {
                Ok(()) => {}
                // Routed to this port already: a socket is associated once,
                // and wharf never moves a socket between loops.
                Err(e) if e.raw_os_error() == Some(ERROR_INVALID_PARAMETER as i32) => {}
                Err(e) => return Err(e),
            }
            // For the reads that follow a zero-byte receive.
            socket.set_nonblocking(true)?;
            self.slots[i].socket = s;
        }
        Ok(&mut self.slots[i])
    }

    /// Forgets the slot's socket once nothing is in flight on it.
    pub(super) fn settle(&mut self, slot: u32) {
        let Some(io) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let connecting = io.connect.as_ref().is_some_and(|c| c.op().is_pending());
        if !io.receiving && !io.recv.is_pending() && !io.send.is_pending() && !connecting {
            io.socket = 0;
        }
    }

    pub(crate) fn recv(&mut self, slot: u32, socket: &Socket) {
        self.in_flight += 1;
        let io = match self.slot(slot, socket) {
            Ok(io) => io,
            Err(e) => {
                self.done
                    .push_back(Done::RecvEnded(slot, RecvEnd::Error(e)));
                return;
            }
        };
        debug_assert!(!io.receiving, "a second receive on one slot");
        io.receiving = true;
        io.recv_cancelled = false;
        self.post_zero_read(slot);
    }

    /// Posts the zero-byte receive that completes when the socket has data
    /// (or the peer closed): no buffer is locked while the peer is idle.
    fn post_zero_read(&mut self, slot: u32) {
        let io = &mut self.slots[slot as usize];
        let (overlapped, flags) = io.recv.start(io.socket, slot);
        let buf = WSABUF {
            len: 0,
            buf: ZERO_READ.as_ptr().cast_mut(),
        };
        // SAFETY: the OVERLAPPED and flags live in the slot's receive
        // operation, which is neither moved nor freed while pending; the
        // WSABUF array is read during the call only and names zero bytes.
        let rc = unsafe {
            WSARecv(
                io.socket,
                &buf,
                1,
                std::ptr::null_mut(),
                flags,
                overlapped,
                None,
            )
        };
        if rc != 0 {
            let e = last_wsa_error();
            if e.raw_os_error() != Some(WSA_IO_PENDING) {
                io.recv.failed();
                io.receiving = false;
                self.done
                    .push_back(Done::RecvEnded(slot, RecvEnd::Error(e)));
                return;
            }
        }
        io.recv.posted();
    }

    pub(super) fn recv_completed(
        &mut self,
        slot: u32,
        entry: &OVERLAPPED_ENTRY,
        f: &mut impl FnMut(Event<'_>) -> Flow,
    ) {
        let io = &mut self.slots[slot as usize];
        let result = io.recv.complete(entry);
        if io.recv_cancelled {
            return self.recv_ended(slot, RecvEnd::Cancelled, f);
        }
        match result {
            // Readable (or at end of stream): read it now.
            Ok(_) => self.read(slot, f),
            Err(e) if e.raw_os_error() == Some(WSA_OPERATION_ABORTED) => {
                self.recv_ended(slot, RecvEnd::Cancelled, f)
            }
            Err(e) => self.recv_ended(slot, RecvEnd::Error(e), f),
        }
    }

    /// Reads what the socket holds into the loop's buffer, each read
    /// reported as it comes, until the socket is dry (then the next
    /// zero-byte receive is posted) or the per-turn budget is spent.
    pub(super) fn read(&mut self, slot: u32, f: &mut impl FnMut(Event<'_>) -> Flow) {
        let Some(io) = self.slots.get(slot as usize) else {
            return;
        };
        if !io.receiving || io.recv.is_pending() {
            return; // ended or cancelled meanwhile, or already waiting
        }
        let socket = io.socket;
        let len = self.buf.len().min(i32::MAX as usize) as i32;
        for _ in 0..READS_PER_TURN {
            // SAFETY: a plain non-blocking read into the loop's buffer,
            // which is ours for the length given; the socket is open while
            // the receive is on.
            let n = unsafe { recv(socket, self.buf.as_mut_ptr(), len, 0) };
            if n > 0 {
                let n = n as usize;
                let flow = f(Event::Received {
                    slot,
                    data: &self.buf[..n],
                });
                if flow == Flow::Pause {
                    // Nothing more this turn; the next one reads on unless
                    // the loop cancels meanwhile (no zero-byte receive is
                    // posted, so nothing else would).
                    self.read_again.push(slot);
                    return;
                }
                if n < self.buf.len() {
                    // Probably dry: the zero-byte receive completes at once
                    // if it is not.
                    return self.post_zero_read(slot);
                }
            } else if n == 0 {
                return self.recv_ended(slot, RecvEnd::Eof, f);
            } else {
                let e = last_wsa_error();
                if e.raw_os_error() == Some(WSAEWOULDBLOCK) {
                    return self.post_zero_read(slot);
                }
                return self.recv_ended(slot, RecvEnd::Error(e), f);
            }
        }
        self.read_again.push(slot);
    }

    fn recv_ended(&mut self, slot: u32, why: RecvEnd, f: &mut impl FnMut(Event<'_>) -> Flow) {
        let io = &mut self.slots[slot as usize];
        if io.receiving {
            io.receiving = false;
            self.in_flight -= 1;
            self.settle(slot);
            f(Event::RecvEnded { slot, why });
        }
    }

    pub(crate) fn send(&mut self, slot: u32, socket: &Socket, mut batch: Box<SendBatch>) {
        self.in_flight += 1;
        let io = match self.slot(slot, socket) {
            Ok(io) => io,
            Err(e) => {
                self.done.push_back(Done::Sent(slot, batch, e));
                return;
            }
        };
        if batch.file.is_some() {
            return self.transmit_file(slot, batch);
        }
        let SendBatch {
            bufs, offset, os, ..
        } = &mut *batch;
        os.bufs.clear();
        let mut total = 0;
        for (i, buf) in bufs.iter().take(MAX_BUFS).enumerate() {
            let skip = if i == 0 { *offset } else { 0 };
            let part = &buf[skip..];
            let len = part.len().min(MAX_SEND - total);
            os.bufs.push(WSABUF {
                len: len as u32,
                buf: part.as_ptr().cast_mut(),
            });
            total += len;
            if total == MAX_SEND {
                break;
            }
        }
        let (overlapped, _) = io.send.start(io.socket, slot);
        // The box is kept in the slot (below) until the completion; a driver
        // dropped first leaks it. Winsock only reads the buffers.
        // SAFETY: buffers, WSABUFs and the slot's OVERLAPPED outlive the send.
        let rc = unsafe {
            WSASend(
                io.socket,
                os.bufs.as_ptr(),
                os.bufs.len() as u32,
                std::ptr::null_mut(),
                SEND_FLAGS,
                overlapped,
                None,
            )
        };
        if rc != 0 {
            let e = last_wsa_error();
            if e.raw_os_error() != Some(WSA_IO_PENDING) {
                io.send.failed();
                self.done.push_back(Done::Sent(slot, batch, e));
                return;
            }
        }
        io.send.posted();
        io.batch = Some(batch);
    }

    /// Sends (part of) the batch's file range with `TransmitFile`: the
    /// kernel reads the file and writes the socket, nothing passes
    /// through this process. The completion is the send's.
    fn transmit_file(&mut self, slot: u32, batch: Box<SendBatch>) {
        use std::os::windows::io::AsRawHandle;
        let io = &mut self.slots[slot as usize];
        let file = batch.file.as_ref().expect("checked by send");
        let len = file.len.min(MAX_SEND as u64) as u32;
        let (overlapped, _) = io.send.start(io.socket, slot);
        // SAFETY: `start` readied the OVERLAPPED and it is not posted yet:
        // nothing else reads or writes it. The union's offset pair is where
        // TransmitFile starts reading the file.
        unsafe {
            let at = &mut (*overlapped).Anonymous.Anonymous;
            at.Offset = file.offset as u32;
            at.OffsetHigh = (file.offset >> 32) as u32;
        }
        let handle = file.file.as_raw_handle() as HANDLE;
        // The box (holding the file open) stays in the slot until the
        // completion; a driver dropped first leaks it.
        let ok = {
            // SAFETY: the socket and the file stay open until the
            // completion; the slot's OVERLAPPED outlives the call; no header
            // or trailer buffers.
            unsafe { TransmitFile(io.socket, handle, len, 0, overlapped, std::ptr::null(), 0) }
        };
        if ok == 0 {
            let e = last_wsa_error();
            if e.raw_os_error() != Some(WSA_IO_PENDING)
                && e.raw_os_error() != Some(ERROR_IO_PENDING as i32)
            {
                io.send.failed();
                self.done.push_back(Done::Sent(slot, batch, e));
                return;
            }
        }
        io.send.posted();
        io.batch = Some(batch);
    }

    pub(super) fn send_completed(
        &mut self,
        slot: u32,
        entry: &OVERLAPPED_ENTRY,
        f: &mut impl FnMut(Event<'_>) -> Flow,
    ) {
        let io = &mut self.slots[slot as usize];
        let mut result = io.send.complete(entry);
        let batch = io.batch.take().expect("a send completion names its batch");
        if let Some(file) = &batch.file {
            // TransmitFile stops quietly at the end of a file that shrank
            // (nothing sent, or an error of its own): say so.
            let short = file
                .file
                .metadata()
                .is_ok_and(|m| m.len() < file.offset + file.len);
            if short && !matches!(result, Ok(n) if n > 0) {
                result = Err(crate::file::shrunk());
            }
        }
        self.in_flight -= 1;
        self.settle(slot);
        f(Event::Sent {
            slot,
            batch,
            result: result.map(|n| n as usize),
        });
    }

    pub(crate) fn connect(&mut self, slot: u32, socket: &Socket, addr: SocketAddr) {
        self.in_flight += 1;
        if let Err(e) = self.start_connect(slot, socket, addr) {
            self.done.push_back(Done::Connected(slot, e));
        }
    }

    fn start_connect(&mut self, slot: u32, socket: &Socket, addr: SocketAddr) -> io::Result<()> {
        // ConnectEx wants a bound socket.
        let any = match addr {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        socket.bind(&any.into())?;
        if self.connect_ex.is_none() {
            self.connect_ex = connect_ex(raw(socket))?;
        }
        let Some(connect_ex) = self.connect_ex else {
            return Err(io::Error::other("Winsock has no ConnectEx"));
        };
        let io = self.slot(slot, socket)?;
        let op = io.connect.get_or_insert_with(|| {
            OpBox::new(ConnectOp {
                op: Op::new(Kind::Connect, slot),
                addr: UnsafeCell::new(SockAddr::from(addr)),
            })
        });
        let (overlapped, _) = op.start(io.socket, slot);
        // SAFETY: not pending (just started), so nothing reads the address.
        let target = unsafe {
            op.addr.get().write(SockAddr::from(addr));
            &*op.addr.get()
        };
        // SAFETY: the address and the OVERLAPPED live in the slot's connect
        // operation, neither moved nor freed while it is pending; no data
        // is sent with the connect.
        let ok = unsafe {
            connect_ex(
                io.socket,
                target.as_ptr().cast(),
                target.len(),
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
                overlapped,
            )
        };
        if ok == 0 {
            let e = last_wsa_error();
            if e.raw_os_error() != Some(ERROR_IO_PENDING as i32) {
                op.op.failed();
                return Err(e);
            }
        }
        op.op.posted();
        Ok(())
    }

    pub(super) fn connect_completed(
        &mut self,
        slot: u32,
        entry: &OVERLAPPED_ENTRY,
        f: &mut impl FnMut(Event<'_>) -> Flow,
    ) {
        let io = &self.slots[slot as usize];
        let Some(op) = &io.connect else {
            debug_assert!(false, "a connect completion without its operation");
            return;
        };
        let result = op.op().complete(entry).and_then(|_| {
            // Makes getpeername and shutdown work on the socket.
            // SAFETY: no option value is passed; the socket is open.
            let rc = unsafe {
                setsockopt(
                    io.socket,
                    SOL_SOCKET,
                    SO_UPDATE_CONNECT_CONTEXT,
                    std::ptr::null(),
                    0,
                )
            };
            if rc == 0 {
                Ok(())
            } else {
                Err(last_wsa_error())
            }
        });
        self.in_flight -= 1;
        self.settle(slot);
        f(Event::Connected { slot, result });
    }

    pub(crate) fn cancel(&mut self, slot: u32, socket: &Socket) {
        let Some(io) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let connecting = io.connect.as_ref().is_some_and(|c| c.op().is_pending());
        let mut pending = io.send.is_pending() || connecting;
        if io.receiving {
            if io.recv.is_pending() {
                io.recv_cancelled = true;
                pending = true;
            } else {
                // Between reads: nothing of the kernel's to wait for.
                io.receiving = false;
                self.done
                    .push_back(Done::RecvEnded(slot, RecvEnd::Cancelled));
            }
        }
        if pending {
            // SAFETY: cancels the operations issued on this open socket; each
            // still completes, and its memory stays until then.
            unsafe { CancelIoEx(raw(socket) as HANDLE, std::ptr::null()) };
        }
    }

    pub(crate) fn cancel_recv(&mut self, slot: u32, socket: &Socket) {
        let Some(io) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if !io.receiving || io.recv_cancelled {
            return;
        }
        if io.recv.is_pending() {
            io.recv_cancelled = true;
            // SAFETY: cancels the receive alone; it still completes, and
            // its OVERLAPPED stays in the slot until then.
            unsafe { CancelIoEx(raw(socket) as HANDLE, io.recv.overlapped()) };
        } else {
            io.receiving = false;
            self.done
                .push_back(Done::RecvEnded(slot, RecvEnd::Cancelled));
        }
    }
}

/// Looks up `ConnectEx`, which Winsock exports only through `WSAIoctl`.
fn connect_ex(socket: SOCKET) -> io::Result<LPFN_CONNECTEX> {
    let guid = WSAID_CONNECTEX;
    let mut f: LPFN_CONNECTEX = None;
    let mut bytes = 0u32;
    // SAFETY: input and output point to live values of the sizes given;
    // the call is synchronous (no OVERLAPPED).
    let rc = unsafe {
        WSAIoctl(
            socket,
            SIO_GET_EXTENSION_FUNCTION_POINTER,
            (&guid as *const GUID).cast(),
            std::mem::size_of::<GUID>() as u32,
            (&mut f as *mut LPFN_CONNECTEX).cast(),
            std::mem::size_of::<LPFN_CONNECTEX>() as u32,
            &mut bytes,
            std::ptr::null_mut(),
            None,
        )
    };
    if rc != 0 {
        return Err(last_wsa_error());
    }
    Ok(f)
}
