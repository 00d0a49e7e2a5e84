//! The TLS configurations a user gives wharf: a server's (certificates,
//! names, ALPN, client certificates; replaceable at runtime) and a
//! client's (roots, server name, ALPN, its own certificate).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
    SupportedProtocolVersion,
};

use super::session::Session;

/// How long a handshake may take unless `Builder::tls_handshake_timeout`
/// says otherwise: a client that connects and says nothing is closed then.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

static TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// The provider every configuration made here uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why a TLS configuration could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// A PEM file held nothing of what was asked for.
    #[error("{}: no {what} in it", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
        /// What was looked for ("certificate", "private key").
        what: &'static str,
    },
    /// The PEM text could not be parsed.
    #[error("{}: {detail}", path.display())]
    Pem {
        /// The file (or `<memory>`).
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// The server configuration has no certificate at all.
    #[error("no certificate: give one with cert or cert_pem_files")]
    NoCertificate,
    /// rustls refused the configuration (a key it cannot use, a key that
    /// does not match its certificate, no usable protocol versions).
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// A server name that is neither a DNS name nor an IP address.
    #[error("not a valid server name: {0:?}")]
    ServerName(String),
    /// The system's root certificates could not be loaded.
    #[error("the system's root certificates: {0}")]
    NativeRoots(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certs_from_pem(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsConfigError::Pem {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn key_from_pem(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsConfigError::Missing {
            path: path.to_owned(),
            what: "private key",
        },
        e => TlsConfigError::Pem {
            path: path.to_owned(),
            detail: e.to_string(),
        },
    })
}

/// Reads the certificate chain in a PEM file (leaf first).
pub fn read_certs(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let path = path.as_ref();
    certs_from_pem(&read(path)?, path)
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsConfigError> {
    let key = rustls::crypto::ring::sign::any_supported_type(&key)?;
    let certified = CertifiedKey::new(chain, key);
    // A key that is not the certificate's is refused here, not at the
    // first handshake.
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Arc::new(certified))
}

fn roots_from_pem_file(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Builds a server's rustls configuration: a default certificate, others
/// chosen by the name the client asks for (SNI), ALPN protocols, client
/// certificates, protocol versions.
pub struct ServerTlsConfig {
    default: Option<Arc<CertifiedKey>>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
    alpn: Vec<Vec<u8>>,
    client_roots: Option<(RootCertStore, bool)>,
    versions: &'static [&'static SupportedProtocolVersion],
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        ServerTlsConfig::new()
    }
}

impl ServerTlsConfig {
    /// TLS 1.2 and 1.3, no certificate yet, no ALPN, no client certificates.
    pub fn new() -> ServerTlsConfig {
        ServerTlsConfig {
            default: None,
            by_name: HashMap::new(),
            alpn: Vec::new(),
            client_roots: None,
            versions: rustls::ALL_VERSIONS,
        }
    }

    /// The certificate chain (leaf first) and key given to clients whose
    /// requested name has no certificate of its own, or who ask for none.
    pub fn cert(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsConfigError> {
        self.default = Some(certified(chain, key)?);
        Ok(self)
    }

    /// [`cert`](Self::cert) from PEM files: the chain, and its key (PKCS#8,
    /// PKCS#1 or SEC1).
    pub fn cert_pem_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsConfigError> {
        let (chain, key) = pem_pair(cert.as_ref(), key.as_ref())?;
        self.cert(chain, key)
    }

    /// [`cert`](Self::cert) from PEM text in memory.
    pub fn cert_pem(self, cert: &[u8], key: &[u8]) -> Result<Self, TlsConfigError> {
        let memory = Path::new("<memory>");
        let chain = certs_from_pem(cert, memory)?;
        let key = key_from_pem(key, memory)?;
        self.cert(chain, key)
    }

    /// A certificate for clients that ask for `name` (SNI). A name
    /// `*.example.com` stands for every name one label under it.
    pub fn sni_cert(
        mut self,
        name: &str,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsConfigError> {
        self.by_name
            .insert(name.to_ascii_lowercase(), certified(chain, key)?);
        Ok(self)
    }

    /// [`sni_cert`](Self::sni_cert) from PEM files.
    pub fn sni_cert_pem_files(
        self,
        name: &str,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, TlsConfigError> {
        let (chain, key) = pem_pair(cert.as_ref(), key.as_ref())?;
        self.sni_cert(name, chain, key)
    }

    /// The application protocols offered (ALPN), most preferred first. A
    /// client that offers ALPN and none of these is refused, as RFC 7301
    /// asks; one that offers none gets none.
    pub fn alpn<P: Into<Vec<u8>>>(mut self, protocols: impl IntoIterator<Item = P>) -> Self {
        self.alpn = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Asks clients for a certificate that chains to one of `roots`:
    /// required (a client without one is refused), or optional (a client
    /// may present none; one that presents a bad one is still refused).
    pub fn client_auth(mut self, roots: RootCertStore, required: bool) -> Self {
        self.client_roots = Some((roots, required));
        self
    }

    /// [`client_auth`](Self::client_auth) with the CA certificates of a PEM file.
    pub fn client_auth_pem_file(
        self,
        ca: impl AsRef<Path>,
        required: bool,
    ) -> Result<Self, TlsConfigError> {
        let roots = roots_from_pem_file(ca.as_ref())?;
        Ok(self.client_auth(roots, required))
    }

    /// TLS 1.3 only (the default allows 1.2 and 1.3).
    pub fn tls13_only(mut self) -> Self {
        self.versions = TLS13;
        self
    }

    /// TLS 1.2 only (for tests of old clients, mostly).
    pub fn tls12_only(mut self) -> Self {
        self.versions = TLS12;
        self
    }

    /// The rustls configuration.
    pub fn build(self) -> Result<ServerConfig, TlsConfigError> {
        if self.default.is_none() && self.by_name.is_empty() {
            return Err(TlsConfigError::NoCertificate);
        }
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(self.versions)?;
        let builder = match self.client_roots {
            None => builder.with_no_client_auth(),
            Some((roots, required)) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                let verifier = if required {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| TlsConfigError::Rustls(rustls::Error::General(e.to_string())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(Arc::new(ByName {
            default: self.default,
            by_name: self.by_name,
        }));
        config.alpn_protocols = self.alpn;
        Ok(config)
    }
}

fn pem_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsConfigError> {
    let chain = certs_from_pem(&read(cert)?, cert)?;
    let key = key_from_pem(&read(key)?, key)?;
    Ok((chain, key))
}

/// Chooses the certificate by the name the client asked for.
struct ByName {
    default: Option<Arc<CertifiedKey>>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl fmt::Debug for ByName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByName")
            .field("default", &self.default.is_some())
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return self.default.clone();
        };
        // rustls gives the name lowercased.
        if let Some(key) = self.by_name.get(name) {
            return Some(key.clone());
        }
        let wildcard = name.split_once('.').and_then(|(_, parent)| {
            let mut w = String::with_capacity(parent.len() + 2);
            w.push_str("*.");
            w.push_str(parent);
            self.by_name.get(&w)
        });
        wildcard.or(self.default.as_ref()).cloned()
    }
}

/// A server's TLS: the configuration new connections get. Clones share
/// it, so one kept aside can [`replace`](Self::replace) it while the server
/// runs (a renewed certificate): connections accepted after that use the
/// new one, and those already open keep theirs.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Serves `config` (made with [`ServerTlsConfig`] or by hand).
    pub fn new(config: ServerConfig) -> ServerTls {
        ServerTls {
            current: Arc::new(RwLock::new(Arc::new(config))),
        }
    }

    /// One certificate chain and key from PEM files, TLS 1.2 and 1.3, no
    /// ALPN.
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<ServerTls, TlsConfigError> {
        Ok(ServerTls::new(
            ServerTlsConfig::new().cert_pem_files(cert, key)?.build()?,
        ))
    }

    /// Connections accepted from now on get `config`.
    pub fn replace(&self, config: ServerConfig) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    /// The configuration new connections get now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn session(&self) -> Result<Session, rustls::Error> {
        Session::server(self.config())
    }
}

/// A client connection's TLS ([`Connect::tls`](crate::Connect::tls)): the
/// rustls configuration (roots, ALPN, a client certificate) and the name
/// to ask for and verify (by default the host of `Connect::to`, or the IP
/// address connected to).
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Uses `config` as it is.
    pub fn new(config: ClientConfig) -> ClientTls {
        ClientTls {
            config: Arc::new(config),
            server_name: None,
        }
    }

    /// Verifies servers against `roots`.
    pub fn with_roots(roots: RootCertStore) -> ClientTls {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        ClientTls::new(config)
    }

    /// Verifies servers against the CA certificates in a PEM file.
    pub fn with_ca_pem_file(ca: impl AsRef<Path>) -> Result<ClientTls, TlsConfigError> {
        Ok(ClientTls::with_roots(roots_from_pem_file(ca.as_ref())?))
    }

    /// Verifies servers against the system's root certificates (through
    /// `rustls-native-certs`). Certificates the system lists but rustls
    /// cannot parse are skipped; none at all is an error.
    pub fn with_native_roots() -> Result<ClientTls, TlsConfigError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (_added, _skipped) = roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            let why = found
                .errors
                .first()
                .map_or_else(|| "none found".to_owned(), |e| e.to_string());
            return Err(TlsConfigError::NativeRoots(why));
        }
        Ok(ClientTls::with_roots(roots))
    }

    /// Accepts any certificate the server shows, verifying nothing but the
    /// handshake's own signatures: for tests and load generation against a
    /// server with a self-signed certificate, never for real traffic.
    pub fn insecure() -> ClientTls {
        let provider = provider();
        let config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        ClientTls::new(config)
    }

    /// The name to send (SNI) and to verify the certificate against.
    pub fn server_name(mut self, name: &str) -> Result<ClientTls, TlsConfigError> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| TlsConfigError::ServerName(name.to_owned()))?;
        self.server_name = Some(name);
        Ok(self)
    }

    /// The application protocols to offer (ALPN), most preferred first.
    pub fn alpn<P: Into<Vec<u8>>>(mut self, protocols: impl IntoIterator<Item = P>) -> Self {
        Arc::make_mut(&mut self.config).alpn_protocols =
            protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Presents this certificate chain and key when the server asks for one.
    pub fn client_cert(
        mut self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ClientTls, TlsConfigError> {
        let certified = certified(chain, key)?;
        Arc::make_mut(&mut self.config).client_auth_cert_resolver = Arc::new(Always(certified));
        Ok(self)
    }

    /// [`client_cert`](Self::client_cert) from PEM files.
    pub fn client_cert_pem_files(
        self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<ClientTls, TlsConfigError> {
        let (chain, key) = pem_pair(cert.as_ref(), key.as_ref())?;
        self.client_cert(chain, key)
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// A session for a connection to `host` (the name it was asked for by,
    /// if any) at `addr`.
    pub(crate) fn session(
        &self,
        host: Option<&str>,
        addr: std::net::SocketAddr,
    ) -> Result<Session, rustls::Error> {
        let name = match (&self.server_name, host) {
            (Some(name), _) => name.clone(),
            (None, Some(host)) => ServerName::try_from(host.to_owned())
                .map_err(|_| rustls::Error::General(format!("not a server name: {host:?}")))?,
            (None, None) => ServerName::IpAddress(addr.ip().into()),
        };
        Session::client(self.config.clone(), name)
    }
}

#[derive(Debug)]
struct Always(Arc<CertifiedKey>);

impl ResolvesClientCert for Always {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// `ClientTls::insecure`'s verifier: any certificate, signatures checked.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a callback can read of its connection's TLS
/// ([`Conn::tls`](crate::Conn::tls)).
pub struct TlsInfo<'a> {
    pub(crate) session: &'a Session,
}

impl<'a> TlsInfo<'a> {
    /// The application protocol agreed by ALPN, if any.
    pub fn alpn(&self) -> Option<&'a [u8]> {
        self.session.common().alpn_protocol()
    }

    /// The name the client asked for (SNI), on a server's connection.
    pub fn server_name(&self) -> Option<&'a str> {
        self.session.sni()
    }

    /// The protocol version agreed.
    pub fn version(&self) -> Option<rustls::ProtocolVersion> {
        self.session.common().protocol_version()
    }

    /// The cipher suite agreed.
    pub fn cipher_suite(&self) -> Option<rustls::SupportedCipherSuite> {
        self.session.common().negotiated_cipher_suite()
    }

    /// The certificate chain the peer presented (leaf first), if it
    /// presented one: the client's, when the server asked for it.
    pub fn peer_certificates(&self) -> Option<&'a [CertificateDer<'static>]> {
        self.session.common().peer_certificates()
    }
}
