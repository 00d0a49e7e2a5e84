//! TLS in the event loop, with rustls (feature `tls`).
//!
//! TLS sits between the socket and the framing, inside the loop: what a
//! receive brings is decrypted and the plaintext framed as usual; what the
//! handler sends is queued as plaintext, and encrypted when the loop next
//! writes to the socket, a batch at a time (so a burst of small messages
//! becomes a few records, not one each). Nothing blocks and no thread is
//! added; the backends (io_uring, poll, IOCP) move ciphertext and never
//! know.
//!
//! A server turns it on with [`Builder::tls`](crate::Builder::tls): every
//! accepted connection then does a handshake first, and `on_open` runs when
//! it completes, so a handler only ever sees connections that finished it
//! (and can read the ALPN protocol, the SNI name and the client's
//! certificate with [`Conn::tls`](crate::Conn::tls)). A client connection
//! asks for it with [`Connect::tls`](crate::Connect::tls).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use wharf::tls::{ServerTls, ServerTlsConfig};
//! let tls = ServerTls::new(
//!     ServerTlsConfig::new()
//!         .cert_pem_files("cert.pem", "key.pem")?
//!         .alpn(["myproto/1"])
//!         .build()?,
//! );
//! # let _ = tls;
//! // wharf::Builder::new().tls(tls.clone()) ...; later, without a restart:
//! // tls.replace(ServerTlsConfig::new().cert_pem_files("new.pem", "new-key.pem")?.build()?);
//! # Ok(()) }
//! ```
//!
//! The provider is rustls's `ring`: it builds with the mingw toolchain for
//! Windows and type-checks for macOS from Linux, where aws-lc-rs needs
//! CMake and a C toolchain per target. Every configuration wharf makes
//! names the provider itself, so a process whose other crates install a
//! different default provider still works.

#[cfg(feature = "tls")]
mod config;
#[cfg(not(feature = "tls"))]
mod off;
#[cfg(feature = "tls")]
mod session;

#[cfg(feature = "tls")]
pub use config::{
    read_certs, ClientTls, ServerTls, ServerTlsConfig, TlsConfigError, TlsInfo,
    DEFAULT_HANDSHAKE_TIMEOUT,
};
#[cfg(not(feature = "tls"))]
pub(crate) use off::{ClientTls, ServerTls, Session};
#[cfg(feature = "tls")]
pub use rustls;
#[cfg(feature = "tls")]
pub(crate) use session::Session;

/// How long a handshake may take, by default, when no
/// `Builder::tls_handshake_timeout` is set.
#[cfg(not(feature = "tls"))]
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(10);
