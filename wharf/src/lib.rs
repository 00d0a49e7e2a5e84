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

mod codec;
mod conn;
mod error;
mod event_loop;
mod handler;
mod id;
mod limits;
mod mailbox;
mod sendq;
mod server;
mod sys;
mod timer;

pub use bytes::Bytes;
pub use codec::{Codec, Decoded, FrameError, Framing, LengthPrefixed};
pub use conn::Conn;
pub use error::{CloseReason, SendError, ShutdownError};
pub use handler::{Accept, Handler};
pub use id::ConnId;
pub use server::{Backend, Builder, Handle, Server, Stats};
