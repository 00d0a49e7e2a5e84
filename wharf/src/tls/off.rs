//! Without the `tls` feature: the types the loop names, none of which can
//! exist, so every TLS path compiles to nothing.

use std::io::IoSlice;

use bytes::Bytes;

use crate::error::TlsError;

/// A connection's TLS state: never made without the feature.
pub(crate) enum Session {}

impl Session {
    pub(crate) fn is_handshaking(&self) -> bool {
        match *self {}
    }

    pub(crate) fn peer_closed(&self) -> bool {
        match *self {}
    }

    pub(crate) fn decrypt(&mut self, _: &[u8], _: &mut Vec<u8>) -> Result<(), TlsError> {
        match *self {}
    }

    pub(crate) fn eof(&mut self) -> Result<(), TlsError> {
        match *self {}
    }

    pub(crate) fn encrypt(&mut self, _: &[IoSlice<'_>]) {
        match *self {}
    }

    pub(crate) fn can_encrypt(&self) -> bool {
        match *self {}
    }

    pub(crate) fn close_notify(&mut self) {
        match *self {}
    }

    pub(crate) fn notified(&self) -> bool {
        match *self {}
    }

    pub(crate) fn take_output(&mut self) -> Option<Bytes> {
        match *self {}
    }
}

/// A server's TLS configuration: never made without the feature.
#[derive(Clone, Debug)]
pub(crate) enum ServerTls {}

impl ServerTls {
    pub(crate) fn session(&self) -> Result<Session, String> {
        match *self {}
    }
}

/// A client connection's TLS configuration: never made without the feature.
#[derive(Clone, Debug)]
pub(crate) enum ClientTls {}

impl ClientTls {
    pub(crate) fn session(
        &self,
        _: Option<&str>,
        _: std::net::SocketAddr,
    ) -> Result<Session, String> {
        match *self {}
    }
}
