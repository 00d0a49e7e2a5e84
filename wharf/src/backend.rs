//! The choice of completion engine.

/// Which completion engine the loops run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The best one this machine supports.
    #[default]
    Auto,
    /// io_uring (Linux).
    Uring,
    /// Readiness polling through mio (epoll, kqueue): on Unix, and where
    /// io_uring is blocked (container seccomp profiles) or too old.
    Poll,
    /// I/O completion ports (Windows).
    Iocp,
}

/// The optional io_uring features the backend uses where the kernel has
/// them, by the names that `WHARF_URING_DISABLE` (comma-separated) takes to
/// turn them off, so that the backend runs as on a kernel without them:
/// `multishot_recv`, multishot receives (kernel 6.0), and
/// `incremental_buffers`, receive buffers that the kernel consumes
/// incrementally, so that receives share them (kernel 6.12).
///
/// `WHARF_URING_DISABLE` also takes `buf_ring`, `multishot_accept` and
/// `cancel_fd`, which the backend cannot do without: `Backend::Auto` then
/// picks the poll backend.
pub const URING_OPTIONAL_FEATURES: &str = "multishot_recv,incremental_buffers";

impl Backend {
    /// Reads `WHARF_BACKEND` (`uring`, `poll`, `iocp` or `auto`), which overrides
    /// the builder's choice.
    pub(crate) fn from_env() -> Option<Backend> {
        let v = std::env::var("WHARF_BACKEND").ok()?;
        match v.to_ascii_lowercase().as_str() {
            "uring" | "io_uring" => Some(Backend::Uring),
            "poll" | "mio" => Some(Backend::Poll),
            "iocp" => Some(Backend::Iocp),
            "auto" | "" => Some(Backend::Auto),
            other => {
                tracing::warn!(value = other, "ignoring unknown WHARF_BACKEND");
                None
            }
        }
    }
}
