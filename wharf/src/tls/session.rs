//! One connection's TLS inside its loop: ciphertext in, plaintext out, and
//! the other way round, over in-memory buffers (rustls's buffered API).

use std::io::{IoSlice, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, CommonState, Connection, ServerConfig};

use crate::error::TlsError;

/// A connection's TLS state.
pub(crate) struct Session {
    conn: Connection,
    /// Where the peer's byte stream is relative to its records, to tell a
    /// peer that left mid-record from one that left between records, and
    /// a peer that does not speak TLS from one that does it badly.
    records: Records,
    /// A fatal error happened: nothing more is encrypted or decrypted.
    failed: bool,
    /// Our close_notify is queued.
    notified: bool,
}

impl Session {
    pub(crate) fn server(config: Arc<ServerConfig>) -> Result<Session, rustls::Error> {
        let conn = rustls::ServerConnection::new(config)?;
        Ok(Session::with(conn.into()))
    }

    pub(crate) fn client(
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Session, rustls::Error> {
        let conn = ClientConnection::new(config, name)?;
        Ok(Session::with(conn.into()))
    }

    fn with(mut conn: Connection) -> Session {
        // The loop's own send queue and water marks bound what is written;
        // rustls holds only what one send's worth encrypts to.
        conn.set_buffer_limit(None);
        Session {
            conn,
            records: Records::default(),
            failed: false,
            notified: false,
        }
    }

    pub(crate) fn common(&self) -> &CommonState {
        &self.conn
    }

    pub(crate) fn sni(&self) -> Option<&str> {
        match &self.conn {
            Connection::Server(s) => s.server_name(),
            Connection::Client(_) => None,
        }
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The peer sent close_notify: it sends nothing more.
    pub(crate) fn peer_closed(&self) -> bool {
        self.records.closed
    }

    /// Decrypts `data`, appending the plaintext to `plain`. An error is
    /// fatal; an alert for the peer may be waiting in [`take_output`].
    pub(crate) fn decrypt(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<(), TlsError> {
        if self.failed || self.records.closed {
            return Ok(());
        }
        let mut rest = data;
        while !rest.is_empty() {
            // Never called with nothing: an empty read means EOF to rustls.
            let before = rest;
            let n = match self.conn.read_tls(&mut rest) {
                Ok(n) => n,
                Err(e) => return Err(self.fail(TlsError::Protocol(e.to_string()), plain)),
            };
            // The headers are followed in step with rustls, over what it
            // took: a bad one found here names the failure better than
            // rustls's own error (plaintext on a TLS port is `NotTls`).
            let headers = self.records.feed(&before[..n]);
            let state = match self.conn.process_new_packets() {
                Ok(state) => state,
                Err(e) => {
                    let e = headers.err().unwrap_or_else(|| classify(e));
                    return Err(self.fail(e, plain));
                }
            };
            take_plaintext(&mut self.conn, state.plaintext_bytes_to_read(), plain);
            if state.peer_has_closed() {
                // Anything after close_notify is not read, nor judged.
                self.records.closed = true;
                break;
            }
            if let Err(e) = headers {
                return Err(self.fail(e, plain));
            }
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// The session failed with `e`: nothing more is decrypted. The
    /// plaintext of the records that came whole before the failure is
    /// still handed on (it was authenticated), as if it had come in a read
    /// of its own.
    fn fail(&mut self, e: TlsError, plain: &mut Vec<u8>) -> TlsError {
        self.failed = true;
        let mut buf = [0u8; 4096];
        // rustls answers `WouldBlock` once nothing is buffered.
        while let Ok(n @ 1..) = self.conn.reader().read(&mut buf) {
            plain.extend_from_slice(&buf[..n]);
        }
        e
    }

    /// The peer's FIN came: fine between records after the handshake (many
    /// clients never send close_notify), a truncation otherwise.
    pub(crate) fn eof(&mut self) -> Result<(), TlsError> {
        if self.failed || self.records.closed {
            return Ok(());
        }
        if self.is_handshaking() || !self.records.at_boundary() {
            self.failed = true;
            return Err(TlsError::Truncated);
        }
        Ok(())
    }

    /// Encrypts `bufs` (after the handshake).
    pub(crate) fn encrypt(&mut self, bufs: &[IoSlice<'_>]) {
        debug_assert!(!self.is_handshaking());
        if self.failed || self.notified {
            return;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Without a buffer limit rustls takes everything after the handshake.
        match self.conn.writer().write_vectored(bufs) {
            Ok(n) => debug_assert_eq!(n, total),
            Err(_) => self.failed = true,
        }
    }

    /// Plaintext may be handed over: the handshake is done, and neither a
    /// fatal error nor our close_notify ended the sending side.
    pub(crate) fn can_encrypt(&self) -> bool {
        !self.failed && !self.notified && !self.is_handshaking()
    }

    /// Queues close_notify (once; never after a fatal error, or during the
    /// handshake).
    pub(crate) fn close_notify(&mut self) {
        if self.can_encrypt() {
            self.notified = true;
            self.conn.send_close_notify();
        }
    }

    pub(crate) fn notified(&self) -> bool {
        self.notified
    }

    /// Everything rustls has for the wire (handshake, records, alerts).
    pub(crate) fn take_output(&mut self) -> Option<Bytes> {
        if !self.conn.wants_write() {
            return None;
        }
        let mut out = Vec::new();
        while self.conn.wants_write() {
            // Writing into a Vec cannot fail.
            if self.conn.write_tls(&mut out).is_err() {
                break;
            }
        }
        Some(Bytes::from(out))
    }
}

/// Moves the `len` bytes of plaintext rustls has decrypted into `plain`.
fn take_plaintext(conn: &mut Connection, len: usize, plain: &mut Vec<u8>) {
    if len > 0 {
        let start = plain.len();
        plain.resize(start + len, 0);
        conn.reader()
            .read_exact(&mut plain[start..])
            .expect("rustls holds the plaintext it counted");
    }
}

fn classify(e: rustls::Error) -> TlsError {
    use rustls::Error as E;
    match e {
        E::DecryptError => TlsError::Decrypt,
        E::AlertReceived(alert) => TlsError::Alert(format!("{alert:?}")),
        E::InvalidCertificate(why) => TlsError::Certificate(format!("{why:?}")),
        E::NoCertificatesPresented => TlsError::Certificate("none presented".into()),
        e => TlsError::Protocol(e.to_string()),
    }
}

/// Follows the record layer of the peer's stream: 5-byte headers (content
/// type, version, length) and their bodies.
#[derive(Default)]
struct Records {
    header: [u8; 5],
    /// Bytes of the current header seen (0 to 5).
    in_header: usize,
    /// Bytes of the current record's body still to come.
    body_left: usize,
    /// A whole header has been seen.
    started: bool,
    /// close_notify came.
    closed: bool,
}

/// Content types 20 to 24: change_cipher_spec, alert, handshake,
/// application_data, heartbeat.
const CONTENT_TYPES: std::ops::RangeInclusive<u8> = 20..=24;

/// The largest record a peer may send: 2^14 plus the most expansion TLS
/// allows (RFC 8446 5.2; RFC 5246 6.2.3 allows 2048 for TLS 1.2).
const MAX_RECORD: usize = (1 << 14) + 2048;

impl Records {
    fn at_boundary(&self) -> bool {
        self.in_header == 0 && self.body_left == 0
    }

    fn feed(&mut self, mut data: &[u8]) -> Result<(), TlsError> {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.in_header).min(data.len());
            self.header[self.in_header..self.in_header + n].copy_from_slice(&data[..n]);
            self.in_header += n;
            data = &data[n..];
            if self.in_header < 5 {
                break;
            }
            self.in_header = 0;
            let [kind, major, _, hi, lo] = self.header;
            let len = usize::from(u16::from_be_bytes([hi, lo]));
            if !CONTENT_TYPES.contains(&kind) || major != 3 || len > MAX_RECORD {
                return Err(if self.started {
                    TlsError::Protocol("a malformed TLS record header".into())
                } else {
                    TlsError::NotTls
                });
            }
            self.started = true;
            self.body_left = len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_followed_across_reads() {
        let mut r = Records::default();
        let record = [22, 3, 1, 0, 3, 1, 2, 3];
        for b in record {
            assert!(r.feed(&[b]).is_ok());
        }
        assert!(r.at_boundary());
        r.feed(&record[..6]).unwrap();
        assert!(!r.at_boundary(), "in the middle of a body");
        r.feed(&record[6..]).unwrap();
        r.feed(&[23, 3]).unwrap();
        assert!(!r.at_boundary(), "in the middle of a header");
    }

    #[test]
    fn plaintext_is_not_tls_and_a_bad_later_header_is_a_protocol_error() {
        let mut r = Records::default();
        assert_eq!(r.feed(b"GET / HTTP/1.1\r\n"), Err(TlsError::NotTls));
        let mut r = Records::default();
        r.feed(&[22, 3, 1, 0, 1, 9]).unwrap();
        assert!(matches!(
            r.feed(&[99, 3, 3, 0, 0]),
            Err(TlsError::Protocol(_))
        ));
        let mut r = Records::default();
        assert_eq!(r.feed(&[23, 3, 3, 0xff, 0xff]), Err(TlsError::NotTls));
    }

    /// A server and a client session that have finished their handshake in
    /// memory.
    fn pair() -> (Session, Session) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = issued.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(issued.signing_key.serialize_der().into());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut s = Session::server(Arc::new(server)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = Session::client(Arc::new(client), name).unwrap();
        let mut plain = Vec::new();
        for _ in 0..10 {
            if let Some(wire) = c.take_output() {
                s.decrypt(&wire, &mut plain).unwrap();
            }
            if let Some(wire) = s.take_output() {
                c.decrypt(&wire, &mut plain).unwrap();
            }
        }
        assert!(!s.is_handshaking() && !c.is_handshaking());
        assert!(plain.is_empty());
        (s, c)
    }

    #[test]
    fn records_before_a_bad_one_in_the_same_read_are_delivered() {
        let (mut s, mut c) = pair();
        c.encrypt(&[IoSlice::new(b"hello")]);
        let mut wire = c.take_output().unwrap().to_vec();
        wire.extend_from_slice(&[99, 3, 3, 0, 2, 0, 0]);
        let mut plain = Vec::new();
        let got = s.decrypt(&wire, &mut plain);
        assert!(matches!(got, Err(TlsError::Protocol(_))), "{got:?}");
        assert_eq!(plain, b"hello");
        // Failed: nothing more is read.
        c.encrypt(&[IoSlice::new(b"more")]);
        s.decrypt(&c.take_output().unwrap(), &mut plain).unwrap();
        assert_eq!(plain, b"hello");
    }

    #[test]
    fn bytes_after_close_notify_are_not_judged() {
        let (mut s, mut c) = pair();
        c.encrypt(&[IoSlice::new(b"bye")]);
        c.close_notify();
        let mut wire = c.take_output().unwrap().to_vec();
        wire.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let mut plain = Vec::new();
        s.decrypt(&wire, &mut plain).unwrap();
        assert_eq!(plain, b"bye");
        assert!(s.peer_closed());
        assert_eq!(s.eof(), Ok(()));
    }
}
