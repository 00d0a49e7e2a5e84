//! wharf: a completion-based TCP server and client library.
//!
//! A few callbacks ([`Handler`]) over a completion engine (io_uring on
//! Linux), with the hard parts handled: buffer lifetimes, connection
//! identity that a reused socket cannot confuse, per-connection ordering,
//! framing with a maximum checked before allocation, and shutdown that
//! delivers what was queued.
//!
//! ```no_run
//! use wharf::{Conn, Handler, Server};
//!
//! struct Echo;
//! impl Handler for Echo {
//!     type State = ();
//!     fn on_message(&self, conn: &mut Conn<'_, ()>, msg: &[u8]) {
//!         let _ = conn.send(msg);
//!     }
//! }
//!
//! # fn main() -> std::io::Result<()> {
//! let server = Server::builder().bind("127.0.0.1:0")?.start(Echo)?;
//! println!("echo on {}", server.local_addr());
//! server.shutdown(std::time::Duration::from_secs(1)).ok();
//! # Ok(())
//! # }
//! ```
#![deny(unsafe_op_in_unsafe_fn, missing_docs, rust_2018_idioms)]
#![warn(unreachable_pub)]

mod access;
mod backend;
mod builder;
pub mod cluster;
mod codec;
mod conn;
mod connect;
mod error;
mod event_loop;
mod file;
mod groups;
mod handle;
mod handler;
mod id;
mod limits;
mod mailbox;
#[cfg(feature = "prometheus")]
pub mod metrics;
mod pool;
#[cfg(all(unix, any(test, fuzzing)))]
mod scripted;
mod sendq;
mod server;
mod stats;
mod sys;
mod timer;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(not(feature = "tls"))]
mod tls;

pub use access::{AcceptRate, BadNetwork, Ban, IpRules};
pub use backend::{Backend, URING_OPTIONAL_FEATURES};
pub use builder::Builder;
pub use bytes::Bytes;
pub use codec::{Codec, Decoded, FrameError, Framing, LengthPrefixed, Lines};
pub use conn::Conn;
pub use connect::{Connect, ConnectFailure, Opening, Reconnect, DEFAULT_CONNECT_TIMEOUT};
pub use error::{CloseReason, SendError, ShutdownError, TlsError};
pub use event_loop::Tick;
pub use file::FileRange;
pub use groups::Backplane;
pub use handle::Handle;
pub use handler::{Accept, Handler};
pub use id::ConnId;
pub use pool::SubmitError;
pub use server::Server;
pub use stats::Stats;

/// Thin public wrappers over crate-private items, for the cargo-fuzz targets
/// in `fuzz/` (cargo fuzz builds with `--cfg fuzzing`). Not part of the API.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing {
    use crate::codec::{FrameError, FrameReader, FrameWriter, Framing};
    use std::ops::ControlFlow;

    /// A connection's decoding and encoding state (`FrameReader`,
    /// `FrameWriter`).
    pub struct Reader(FrameReader, FrameWriter);

    impl Reader {
        /// A fresh reader for `framing`, as a new connection gets.
        pub fn new(framing: &Framing) -> Self {
            Reader(framing.reader(), framing.writer())
        }

        /// `FrameReader::feed_until`.
        pub fn feed_until(
            &mut self,
            input: &[u8],
            on_frame: impl FnMut(&[u8]) -> ControlFlow<()>,
            rest: &mut Vec<u8>,
        ) -> Result<(), FrameError> {
            let result = self.0.feed_until(input, on_frame, rest);
            self.0.take_spare();
            result
        }

        /// `FrameWriter::encode`, appending the wire form of `msg` to `dst`.
        pub fn encode(&mut self, msg: &[u8], dst: &mut Vec<u8>) -> Result<(), FrameError> {
            let mut buf = bytes::BytesMut::new();
            self.1.encode(msg, &mut buf)?;
            dst.extend_from_slice(&buf);
            Ok(())
        }
    }

    /// Decodes `data` into a scripted run of the real event loop on the
    /// fake driver, runs it and checks it (see `scripted`); panics with
    /// what broke. With `panics`, messages starting with `P` make the
    /// handler panic (the caller's panic hook must let those unwind).
    #[cfg(unix)]
    pub fn run_loop_script(data: &[u8], panics: bool) {
        let plan = crate::scripted::Plan::from_bytes(data, panics);
        if let Err(e) = crate::scripted::check(&crate::scripted::run(&plan)) {
            panic!("{e}\n{plan:#?}");
        }
    }

    /// Wraps the panic hook so that the handler panics `run_loop_script`
    /// provokes unwind (the loop contains them) and every other panic
    /// reaches the hook as before. Call it once before running scripts.
    #[cfg(unix)]
    pub fn let_handler_panics_unwind() {
        crate::scripted::let_handler_panics_unwind()
    }
}
