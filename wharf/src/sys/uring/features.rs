//! What this kernel's io_uring can do, found out by trying it.
//!
//! Some features the driver cannot run without: the opcodes, and what
//! kernels 5.10 to 5.18 lack although their opcode numbers exist (provided
//! buffer rings, multishot accept, cancel by descriptor). Without one of
//! them `probe` fails, and `Backend::Auto` falls back to the poll backend.
//! Others it uses where they work and does without elsewhere: those are
//! [`Features`].
//!
//! Each is tried for real once per process. `WHARF_URING_DISABLE` (names,
//! comma-separated) makes the probe treat features as missing, so that the
//! suite also covers kernels without them: `buf_ring`, `multishot_accept`
//! and `cancel_fd` turn io_uring off; `multishot_recv` and
//! `incremental_buffers` keep it on without that feature.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fd, SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, IoUring};

use super::bufring::{self, BufRing};

/// The optional features, each true where this kernel has it (and it is
/// not turned off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Features {
    /// Multishot receive (kernel 6.0): one submission receives until the
    /// stream ends, instead of one per completion.
    pub(super) multishot_recv: bool,
    /// Buffers consumed incrementally (`IOU_PBUF_RING_INC`, kernel 6.12):
    /// receives share a provided buffer instead of taking one each.
    pub(super) incremental_buffers: bool,
}

/// Whether io_uring with every feature the driver needs works here.
pub(crate) fn probe() -> io::Result<()> {
    features().map(|_| ())
}

/// The optional features this kernel has; an error if a needed one is
/// missing. Probed once per process.
pub(super) fn features() -> io::Result<Features> {
    static PROBED: OnceLock<Result<Features, (io::ErrorKind, String)>> = OnceLock::new();
    PROBED
        .get_or_init(|| {
            let disabled = std::env::var("WHARF_URING_DISABLE").unwrap_or_default();
            try_features(&disabled).map_err(|e| (e.kind(), e.to_string()))
        })
        .clone()
        .map_err(|(kind, why)| io::Error::new(kind, why))
}

/// Probes the features, treating those named in `disabled` as missing.
fn try_features(disabled: &str) -> io::Result<Features> {
    let missing = |feature: &str| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring lacks {feature} (kernel 5.19 or later needed)"),
        )
    };
    let off = |feature: &str| disabled.split(',').any(|f| f.trim() == feature);
    let mut ring = IoUring::new(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::Connect::CODE, "connect"),
        (opcode::AsyncCancel2::CODE, "async_cancel"),
        (opcode::Read::CODE, "read"),
        (opcode::PollAdd::CODE, "poll_add"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks the {name} opcode"),
            ));
        }
    }
    if off("buf_ring") {
        return Err(missing("provided buffer rings"));
    }
    let bufs = BufRing::new(&ring, 2, 64, false).map_err(|_| missing("provided buffer rings"))?;
    let (multishot_recv, settled) = try_multishot_recv(&mut ring)?;
    let unregistered = settled && ring.submitter().unregister_buf_ring(bufring::GROUP).is_ok();
    if unregistered {
        drop(bufs);
    } else {
        bufs.leak();
    }
    // Registering is the test: a kernel without it refuses the flag.
    let incremental_buffers = match BufRing::new(&ring, 2, 64, true) {
        Ok(bufs) if ring.submitter().unregister_buf_ring(bufring::GROUP).is_ok() => {
            drop(bufs);
            true
        }
        Ok(bufs) => {
            bufs.leak();
            true
        }
        Err(_) => false,
    };
    // Multishot accept on a real listener, then cancelled by descriptor:
    // an old kernel refuses the first with EINVAL, and the second (no such
    // flag) with EINVAL too.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let fd = Fd(listener.as_raw_fd());
    let accept = opcode::AcceptMulti::new(fd).build().user_data(1);
    let cancel = opcode::AsyncCancel2::new(CancelBuilder::fd(fd).all())
        .build()
        .user_data(2);
    // SAFETY: neither entry carries a pointer; the kernel holds its own
    // reference to the listener's file while they are in flight.
    unsafe {
        let _ = ring.submission().push(&accept);
    }
    ring.submit()?;
    // SAFETY: as above.
    unsafe {
        let _ = ring.submission().push(&cancel);
    }
    let (mut accept_res, mut cancel_res) = (None, None);
    reap(&mut ring, |cqe| {
        match cqe.user_data() {
            1 if !cqueue::more(cqe.flags()) => accept_res = Some(cqe.result()),
            2 => cancel_res = Some(cqe.result()),
            _ => {}
        }
        accept_res.is_some() && cancel_res.is_some()
    });
    if off("multishot_accept") || accept_res != Some(-libc::ECANCELED) {
        return Err(missing("multishot accept"));
    }
    if off("cancel_fd") || !matches!(cancel_res, Some(r) if r >= 0) {
        return Err(missing("cancel by descriptor"));
    }
    Ok(Features {
        multishot_recv: multishot_recv && !off("multishot_recv"),
        incremental_buffers: incremental_buffers && !off("incremental_buffers"),
    })
}

/// A multishot receive from the buffer ring of `ring` on a socket pair
/// with one byte waiting: supported if that byte comes with "more to
/// come". Then cancelled. Also says whether the receive has ended (else
/// the kernel may still pick a buffer, which must not be freed).
fn try_multishot_recv(ring: &mut IoUring) -> io::Result<(bool, bool)> {
    let (a, mut b) = std::os::unix::net::UnixStream::pair()?;
    b.write_all(&[1])?;
    let recv = opcode::RecvMulti::new(Fd(a.as_raw_fd()), bufring::GROUP)
        .build()
        .user_data(3);
    // SAFETY: the receive writes only into the ring's buffers, which the
    // caller frees only once it has ended (or leaks).
    unsafe {
        let _ = ring.submission().push(&recv);
    }
    ring.submit()?;
    let mut first = None;
    reap(ring, |cqe| {
        if cqe.user_data() == 3 {
            first = Some((cqe.result(), cqueue::more(cqe.flags())));
        }
        first.is_some()
    });
    let supported = first == Some((1, true));
    let mut ended = matches!(first, Some((_, false)));
    if first.is_some() && !ended {
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(3))
            .build()
            .user_data(4);
        // SAFETY: a cancel carries no pointer.
        unsafe {
            let _ = ring.submission().push(&cancel);
        }
        reap(ring, |cqe| {
            ended |= cqe.user_data() == 3 && !cqueue::more(cqe.flags());
            ended
        });
    }
    Ok((supported, ended))
}

/// Waits up to a second for completions, handing each to `f` until it
/// says that was the last one wanted.
fn reap(ring: &mut IoUring, mut f: impl FnMut(&cqueue::Entry) -> bool) {
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        let ts = Timespec::from(Duration::from_millis(10));
        let _ = ring
            .submitter()
            .submit_with_args(1, &SubmitArgs::new().timespec(&ts));
        let reaped: Vec<cqueue::Entry> = ring.completion().collect();
        for cqe in &reaped {
            if f(cqe) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::try_features;

    /// The kernel's release as (major, minor), from uname.
    fn kernel() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut parts = release.trim().split(['.', '-']);
        let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (next(), next())
    }

    /// A kernel of 6.0 or later has multishot receives, and the probe
    /// finds them unless they are turned off.
    #[test]
    fn multishot_receives_are_found_and_can_be_turned_off() {
        let Ok(found) = try_features("") else {
            eprintln!("SKIPPED: io_uring is not usable here");
            return;
        };
        assert_eq!(
            found.multishot_recv,
            kernel() >= (6, 0),
            "kernel {:?}",
            kernel()
        );
        assert_eq!(found.incremental_buffers, kernel() >= (6, 12));
        let off = try_features("cancel_fd_x, multishot_recv").unwrap();
        assert!(!off.multishot_recv);
        assert!(off.incremental_buffers == found.incremental_buffers);
        let off = try_features("incremental_buffers").unwrap();
        assert!(!off.incremental_buffers);
        assert_eq!(off.multishot_recv, found.multishot_recv);
        assert!(try_features("buf_ring").is_err());
    }
}
