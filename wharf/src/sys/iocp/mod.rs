//! The Windows backend: one I/O completion port per loop thread.
//!
//! The lessons of the classic IOCP servers, built in:
//! - accepts are a pool of pre-posted `AcceptEx` calls per listener
//!   (sockets made before clients arrive), refilled as they complete;
//! - receives are a zero-byte `WSARecv`: an idle connection locks no buffer
//!   (the WSAENOBUFS lesson). When it completes, non-blocking `recv` calls
//!   read into the loop's one buffer until the socket is dry, then the next
//!   zero-byte read is posted;
//! - a send is one `WSASend` gathering the queued buffers;
//! - every operation's `OVERLAPPED` lives in its own heap allocation, owned
//!   by the kernel from the post until the completion is dequeued, cancelled
//!   or not (`op.rs`); a slot is reused only after all of them came back.
//!
//! Completions are reaped in batches with `GetQueuedCompletionStatusEx`;
//! `PostQueuedCompletionStatus` wakes the loop from other threads.

mod accept;
mod op;
mod stream;

use std::collections::VecDeque;
use std::io;
use std::os::windows::io::AsRawSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, INVALID_HANDLE_VALUE, WAIT_TIMEOUT};
use windows_sys::Win32::Networking::WinSock::{LPFN_CONNECTEX, SOCKET};
use windows_sys::Win32::System::IO::{
    CreateIoCompletionPort, GetQueuedCompletionStatusEx, PostQueuedCompletionStatus,
    OVERLAPPED_ENTRY,
};

use self::accept::ListenerIo;
use self::op::Kind;
pub(crate) use self::stream::SendScratch;
use self::stream::SlotIo;
use super::{DriverConfig, Event, Flow, RecvEnd, SendBatch};

/// Completions dequeued per `GetQueuedCompletionStatusEx` call.
const BATCH: usize = 256;
/// `AcceptEx` calls kept posted per listener, unless
/// `WHARF_IOCP_ACCEPT_POOL` says otherwise.
const ACCEPT_POOL: usize = 16;
/// The completion key of wake-up packets (sockets are associated with 0).
const WAKE_KEY: usize = 1;

/// A completion port handle, closed when the last owner lets go.
#[derive(Debug)]
struct Port(HANDLE);

// SAFETY: a completion port may be used from any thread; the handle is only
// an identifier, and `PostQueuedCompletionStatus` is thread-safe.
unsafe impl Send for Port {}
// SAFETY: as above: nothing is reached through the handle but the kernel
// object, which does its own locking.
unsafe impl Sync for Port {}

impl Port {
    fn new() -> io::Result<Port> {
        // SAFETY: creates a new port; no pointers are passed.
        let handle =
            unsafe { CreateIoCompletionPort(INVALID_HANDLE_VALUE, std::ptr::null_mut(), 0, 1) };
        if handle.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(Port(handle))
    }

    /// Routes the completions of `socket` to this port (once per socket).
    fn associate(&self, socket: SOCKET) -> io::Result<()> {
        // SAFETY: `socket` is an open socket its caller owns; a socket is a
        // kernel handle, and associating it changes no memory of ours.
        let handle = unsafe { CreateIoCompletionPort(socket as HANDLE, self.0, 0, 0) };
        if handle.is_null() {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // SAFETY: the handle is ours and closed once. Operations still in
        // flight (only after a loop died) keep their memory leaked; their
        // packets are dropped with the port.
        unsafe { CloseHandle(self.0) };
    }
}

#[derive(Debug)]
struct WakerInner {
    port: Port,
    /// A wake-up packet is queued and not yet dequeued: more wakes need
    /// not post another.
    queued: AtomicBool,
}

/// Wakes a driver from another thread with a packet on its port.
#[derive(Clone, Debug)]
pub(crate) struct Waker(Arc<WakerInner>);

impl Waker {
    pub(crate) fn wake(&self) {
        if self.0.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: posts a packet with no OVERLAPPED; the port outlives this
        // call (the Arc holds it).
        let ok =
            unsafe { PostQueuedCompletionStatus(self.0.port.0, 0, WAKE_KEY, std::ptr::null()) };
        if ok == 0 {
            self.0.queued.store(false, Ordering::Release);
        }
    }
}

/// Endings decided without a completion packet (a call refused at once,
/// a cancel of a receive between reads), reported at the next `poll`.
enum Done {
    Sent(u32, Box<SendBatch>, io::Error),
    RecvEnded(u32, RecvEnd),
    Connected(u32, io::Error),
    AcceptEnded(u32),
}

pub(crate) struct Driver {
    /// Holds the port (the waker's `Arc` keeps it open).
    waker: Waker,
    entries: Vec<OVERLAPPED_ENTRY>,
    /// The loop's one receive buffer: filled by non-blocking `recv` calls
    /// only, never lent to the kernel.
    buf: Box<[u8]>,
    slots: Vec<SlotIo>,
    listeners: Vec<ListenerIo>,
    done: VecDeque<Done>,
    /// Slots whose reading was cut short by the per-turn budget.
    read_again: Vec<u32>,
    accept_pool: usize,
    /// `ConnectEx`, looked up on the first outbound connection.
    connect_ex: LPFN_CONNECTEX,
    in_flight: usize,
}

impl Driver {
    pub(crate) fn new(config: &DriverConfig) -> io::Result<Driver> {
        let port = Port::new()?;
        let accept_pool = std::env::var("WHARF_IOCP_ACCEPT_POOL")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or(ACCEPT_POOL);
        Ok(Driver {
            waker: Waker(Arc::new(WakerInner {
                port,
                queued: AtomicBool::new(false),
            })),
            entries: vec![
                OVERLAPPED_ENTRY {
                    lpCompletionKey: 0,
                    lpOverlapped: std::ptr::null_mut(),
                    Internal: 0,
                    dwNumberOfBytesTransferred: 0,
                };
                BATCH
            ],
            buf: vec![0u8; config.recv_buffer_size.max(4096) as usize].into_boxed_slice(),
            slots: Vec::new(),
            listeners: Vec::new(),
            done: VecDeque::new(),
            read_again: Vec::new(),
            accept_pool,
            connect_ex: None,
            in_flight: 0,
        })
    }

    pub(crate) fn waker(&self) -> Waker {
        self.waker.clone()
    }

    fn port(&self) -> &Port {
        &self.waker.0.port
    }

    /// Reports what is ready, waiting up to `timeout` (forever if `None`)
    /// when nothing is.
    pub(crate) fn poll(
        &mut self,
        timeout: Option<Duration>,
        mut f: impl FnMut(Event<'_>) -> Flow,
    ) -> io::Result<()> {
        let mut busy = self.report_done(&mut f);
        for slot in std::mem::take(&mut self.read_again) {
            busy = true;
            self.read(slot, &mut f);
        }
        let wait_ms = if busy || !self.done.is_empty() || !self.read_again.is_empty() {
            0
        } else {
            millis(timeout)
        };
        let mut entries = std::mem::take(&mut self.entries);
        let mut n = 0u32;
        // SAFETY: `entries` is a live buffer of `entries.len()` entries that
        // the call fills; nothing else uses it meanwhile.
        let ok = unsafe {
            GetQueuedCompletionStatusEx(
                self.port().0,
                entries.as_mut_ptr(),
                entries.len() as u32,
                &mut n,
                wait_ms,
                0,
            )
        };
        if ok == 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(WAIT_TIMEOUT as i32) {
                self.entries = entries;
                return Err(e);
            }
            n = 0;
        }
        for entry in &entries[..n as usize] {
            if entry.lpOverlapped.is_null() {
                // Clear before the loop looks at its mailbox: a wake after
                // this posts a new packet.
                self.waker.0.queued.store(false, Ordering::Release);
                f(Event::Woken);
                continue;
            }
            // SAFETY: every packet with an OVERLAPPED on this port comes
            // from an operation this driver posted through a live `OpBox`
            // (sockets are associated only by this driver, with key 0).
            let op = unsafe { op::header(entry.lpOverlapped) };
            let id = op.id();
            match op.kind() {
                Kind::Accept => self.accept_completed(id, entry, &mut f),
                Kind::Recv => self.recv_completed(id, entry, &mut f),
                Kind::Send => self.send_completed(id, entry, &mut f),
                Kind::Connect => self.connect_completed(id, entry, &mut f),
            }
        }
        self.entries = entries;
        self.report_done(&mut f);
        Ok(())
    }

    fn report_done(&mut self, f: &mut impl FnMut(Event<'_>) -> Flow) -> bool {
        let any = !self.done.is_empty();
        while let Some(done) = self.done.pop_front() {
            // Every ending queued here was counted in flight when started.
            self.in_flight -= 1;
            match done {
                Done::Sent(slot, batch, e) => {
                    self.settle(slot);
                    f(Event::Sent {
                        slot,
                        batch,
                        result: Err(e),
                    });
                }
                Done::RecvEnded(slot, why) => {
                    self.settle(slot);
                    f(Event::RecvEnded { slot, why });
                }
                Done::Connected(slot, e) => {
                    self.settle(slot);
                    f(Event::Connected {
                        slot,
                        result: Err(e),
                    });
                }
                Done::AcceptEnded(listener) => {
                    let error = self.listeners[listener as usize].error.take();
                    f(Event::AcceptEnded { listener, error });
                }
            }
        }
        any
    }

    /// Operations whose ending has not been reported.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// The raw handle of an owned socket.
fn raw(socket: &impl AsRawSocket) -> SOCKET {
    socket.as_raw_socket() as SOCKET
}

/// A wait in whole milliseconds, rounded up so that a short timer never
/// turns into a busy loop; `INFINITE` for none.
fn millis(timeout: Option<Duration>) -> u32 {
    match timeout {
        None => u32::MAX,
        Some(d) => d
            .as_nanos()
            .div_ceil(1_000_000)
            .min(u128::from(u32::MAX - 1)) as u32,
    }
}

/// Whether completion ports can be used here.
pub(crate) fn probe() -> io::Result<()> {
    Port::new().map(drop)
}
