//! One overlapped operation's memory, and the rule that keeps it safe.
//!
//! The kernel writes an operation's `OVERLAPPED` (and, for `AcceptEx`, the
//! address buffer) from the moment it is posted until its completion packet
//! is dequeued; cancelling does not end that, only the dequeued completion
//! does. So every operation lives in its own heap allocation that never
//! moves ([`OpBox`]), is marked pending while the kernel owns it, and is
//! freed only when it is not pending: dropping a pending one leaks it.
//!
//! The kernel's part sits in `UnsafeCell`s and the driver's part in
//! `Cell`s, and the driver only ever holds shared references: the two
//! writers never alias a `&mut`.

use std::cell::{Cell, UnsafeCell};
use std::io;
use std::ops::Deref;
use std::ptr::NonNull;

use windows_sys::Win32::Networking::WinSock::{WSAGetLastError, WSAGetOverlappedResult, SOCKET};
use windows_sys::Win32::System::IO::{OVERLAPPED, OVERLAPPED_ENTRY};

/// What an operation is, read back from its completion.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    Accept,
    Recv,
    Send,
    Connect,
}

/// The header every operation starts with.
#[repr(C)]
pub(super) struct Op {
    /// First, so that the `OVERLAPPED` pointer the port hands back is the
    /// operation's own address. Written by the kernel while pending.
    overlapped: UnsafeCell<OVERLAPPED>,
    /// `WSARecv`'s in/out flags, which the call may write at completion.
    flags: UnsafeCell<u32>,
    kind: Kind,
    /// The slot or listener the operation belongs to.
    id: Cell<u32>,
    /// The socket it was issued on (to ask for its error, and to cancel).
    socket: Cell<SOCKET>,
    /// Posted, and its completion not yet dequeued.
    pending: Cell<bool>,
}

impl Op {
    pub(super) fn new(kind: Kind, id: u32) -> Op {
        Op {
            // SAFETY: OVERLAPPED is a plain C struct; all zero is the
            // documented initial value.
            overlapped: UnsafeCell::new(unsafe { std::mem::zeroed() }),
            flags: UnsafeCell::new(0),
            kind,
            id: Cell::new(id),
            socket: Cell::new(0),
            pending: Cell::new(false),
        }
    }

    pub(super) fn kind(&self) -> Kind {
        self.kind
    }

    pub(super) fn id(&self) -> u32 {
        self.id.get()
    }

    pub(super) fn is_pending(&self) -> bool {
        self.pending.get()
    }

    /// Readies the operation to be posted on `socket` for `id`; returns
    /// the flags to hand to the call. Called through [`OpBox::start`].
    fn prepare(&self, socket: SOCKET, id: u32) -> *mut u32 {
        assert!(!self.is_pending(), "an operation was posted twice");
        // SAFETY: not pending, so the kernel holds no pointer to these, and
        // the driver holds no reference into them (only raw pointers).
        unsafe {
            self.overlapped.get().write(std::mem::zeroed());
            self.flags.get().write(0);
        }
        self.socket.set(socket);
        self.id.set(id);
        self.flags.get()
    }

    /// The `OVERLAPPED`, to name this operation to `CancelIoEx`.
    pub(super) fn overlapped(&self) -> *const OVERLAPPED {
        self.overlapped.get()
    }

    /// The call accepted the operation: a completion packet will come
    /// (also after an immediate success: wharf does not ask the port to
    /// skip those).
    pub(super) fn posted(&self) {
        self.pending.set(true);
    }

    /// The call refused the operation: no packet will come.
    pub(super) fn failed(&self) {
        self.pending.set(false);
    }

    /// Its completion was dequeued: the kernel is done with the memory.
    /// Returns the bytes transferred or the error.
    pub(super) fn complete(&self, entry: &OVERLAPPED_ENTRY) -> io::Result<u32> {
        debug_assert!(self.is_pending());
        self.pending.set(false);
        // SAFETY: the completion was dequeued: the kernel no longer writes
        // the OVERLAPPED, and this read is the only access.
        let status = unsafe { (*self.overlapped.get()).Internal } as i32;
        if status >= 0 {
            return Ok(entry.dwNumberOfBytesTransferred);
        }
        // An NTSTATUS failure: ask Winsock for the matching WSA error.
        let mut bytes = 0u32;
        let mut flags = 0u32;
        // SAFETY: the socket is still open (its owner closes it only after
        // this completion is handled), and the OVERLAPPED is complete.
        let ok = unsafe {
            WSAGetOverlappedResult(
                self.socket.get(),
                self.overlapped.get(),
                &mut bytes,
                0,
                &mut flags,
            )
        };
        if ok != 0 {
            return Ok(bytes);
        }
        Err(last_wsa_error())
    }
}

/// Types whose memory starts with an [`Op`] (`#[repr(C)]`, first field).
///
/// # Safety
/// The implementing type must be `#[repr(C)]` with an `Op` as its first
/// field, so that a pointer to it is a pointer to its `Op` and its
/// `OVERLAPPED`.
pub(super) unsafe trait StartsWithOp {
    fn op(&self) -> &Op;
}

// SAFETY: an Op starts with itself.
unsafe impl StartsWithOp for Op {
    fn op(&self) -> &Op {
        self
    }
}

/// An operation's memory: allocated once, never moved, freed only when no
/// operation is pending on it.
pub(super) struct OpBox<T: StartsWithOp>(NonNull<T>);

impl<T: StartsWithOp> OpBox<T> {
    pub(super) fn new(value: T) -> OpBox<T> {
        OpBox(NonNull::from(Box::leak(Box::new(value))))
    }

    /// Readies the operation to be posted on `socket` for `id`; returns the
    /// `OVERLAPPED` and flags to hand to the call. The caller calls
    /// [`Op::posted`] or [`Op::failed`] right after.
    ///
    /// The `OVERLAPPED` pointer is made from the whole allocation's, so
    /// that the completion's copy of it may be read back as the `Op` that
    /// starts the allocation ([`header`]).
    pub(super) fn start(&self, socket: SOCKET, id: u32) -> (*mut OVERLAPPED, *mut u32) {
        let flags = self.op().prepare(socket, id);
        (self.0.as_ptr().cast::<OVERLAPPED>(), flags)
    }

    /// Whether `overlapped` (from a completion) is this operation's.
    pub(super) fn is(&self, overlapped: *mut OVERLAPPED) -> bool {
        self.0.as_ptr().cast::<OVERLAPPED>() == overlapped
    }
}

impl<T: StartsWithOp> Deref for OpBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the allocation lives as long as `self` (or longer, when
        // leaked); only shared references are ever made, and the fields the
        // kernel writes are `UnsafeCell`s.
        unsafe { self.0.as_ref() }
    }
}

impl<T: StartsWithOp> Drop for OpBox<T> {
    fn drop(&mut self) {
        if self.op().is_pending() {
            // The kernel may still write here: leaking is the only safe
            // choice (it happens only when a driver dies with I/O in flight,
            // never on an orderly shutdown).
            tracing::warn!("leaking an overlapped operation still in flight");
            return;
        }
        // SAFETY: made by `Box::leak` in `new`, not pending, and dropped
        // once.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

/// Reads the header of the operation whose `OVERLAPPED` a completion
/// names.
///
/// # Safety
/// `overlapped` must come from a completion of an operation this driver
/// posted through an [`OpBox`] that is still alive.
pub(super) unsafe fn header<'a>(overlapped: *mut OVERLAPPED) -> &'a Op {
    // SAFETY: every OVERLAPPED the driver posts is the first field of an
    // Op at the start of a live OpBox allocation (see `StartsWithOp`).
    unsafe { &*overlapped.cast::<Op>() }
}

/// The calling thread's last Winsock error.
pub(super) fn last_wsa_error() -> io::Error {
    // SAFETY: takes no arguments, reads thread-local state.
    io::Error::from_raw_os_error(unsafe { WSAGetLastError() })
}
