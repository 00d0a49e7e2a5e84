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
