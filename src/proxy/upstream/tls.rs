//! TLS to an `https://` upstream: which roots it is verified against, which certificate
//! fencegate presents to it, the name it is checked for (and sent as SNI), and what a refused
//! certificate is called in a 502.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::{CertificateError, ClientConfig};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::{TlsError, client_config};

/// The files an upstream's TLS is made of, beyond the system's roots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsClientFiles {
    /// A CA bundle (PEM) trusted besides the system's roots (`upstream_ca`).
    pub ca: Option<PathBuf>,
    /// A client certificate chain and key presented to storage that wants mTLS.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// The protocols offered by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Alpn {
    /// `h2`, then `http/1.1`: a storage upstream, spoken to in HTTP/2 if it prefers it.
    H2OrHttp1,
    /// `http/1.1` only: another replica's peer plane, which fencegate's own client speaks.
    Http1,
}

impl TlsClientFiles {
    /// A rustls client configuration that trusts the system's roots plus `ca` and presents
    /// `identity`, if set.
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let identity = self
            .identity
            .as_ref()
            .map(|(cert, key)| (cert.as_path(), key.as_path()));
        client_config(self.ca.as_deref(), identity)
    }
}

/// How fencegate speaks TLS to one upstream.
#[derive(Clone)]
pub(super) struct UpstreamTls {
    connector: TlsConnector,
    /// The name the certificate must be valid for, and the SNI sent: the URL's host.
    server_name: ServerName<'static>,
    files: TlsClientFiles,
    alpn: Alpn,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("files", &self.files)
            .field("alpn", &self.alpn)
            .finish()
    }
}

/// Two upstreams' TLS are the same when they check the same name with the same files.
impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
            && self.files == other.files
            && self.alpn == other.alpn
    }
}

impl Eq for UpstreamTls {}

impl UpstreamTls {
    /// TLS to `host` with `files`, offering `alpn`. With no files, the system's roots, loaded
    /// once per process.
    pub(super) fn new(host: &str, files: TlsClientFiles, alpn: Alpn) -> Result<Self, TlsError> {
        let server_name = ServerName::try_from(host.to_owned()).map_err(|e| {
            TlsError::Provider(format!(
                "{host:?} is not a name a certificate can be checked for: {e}"
            ))
        })?;
        let config = if files == TlsClientFiles::default() {
            system_roots_only(alpn)?
        } else {
            Arc::new(offering(alpn, files.client_config()?))
        };
        Ok(Self {
            connector: TlsConnector::from(config),
            server_name,
            files,
            alpn,
        })
    }

    /// Whether the upstream may choose HTTP/2.
    pub(super) fn offers_h2(&self) -> bool {
        self.alpn == Alpn::H2OrHttp1
    }

    /// The files this TLS was made from.
    pub(super) fn files(&self) -> &TlsClientFiles {
        &self.files
    }

    /// The TLS handshake over `tcp`; fails if the upstream's certificate does not verify.
    pub(super) async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connector.connect(self.server_name.clone(), tcp).await
    }
}

/// The client configuration that trusts the system's roots alone, shared by every upstream
/// that names no files: reading the system's store is done once.
fn system_roots_only(alpn: Alpn) -> Result<Arc<ClientConfig>, TlsError> {
    static SHARED: OnceLock<Result<ClientConfig, String>> = OnceLock::new();
    let config = SHARED
        .get_or_init(|| client_config(None, None).map_err(|e| e.to_string()))
        .clone()
        .map_err(TlsError::Provider)?;
    Ok(Arc::new(offering(alpn, config)))
}

/// Says which protocols the client speaks: a server that would pick h2 for a client offering
/// nothing must not, where fencegate's client speaks only HTTP/1.1.
fn offering(alpn: Alpn, mut config: ClientConfig) -> ClientConfig {
    config.alpn_protocols = match alpn {
        Alpn::H2OrHttp1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        Alpn::Http1 => vec![b"http/1.1".to_vec()],
    };
    config
}

/// A failed TLS handshake with an upstream, by what an operator must fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// The certificate's validity has ended.
    Expired,
    /// The certificate is not valid yet (or a clock is wrong).
    NotYetValid,
    /// No trusted root signed the chain: set `upstream_ca`.
    UnknownIssuer,
    /// The certificate does not name the upstream URL's host.
    NameMismatch,
    /// Any other refused certificate (revoked, bad signature, unsupported algorithm, …).
    BadCertificate,
    /// The upstream refused fencegate's client certificate, or none was given.
    ClientCertificateRefused,
    /// Not a certificate problem: no common protocol version or cipher, a reset, a timeout.
    Other,
}

impl HandshakeFailure {
    /// Classifies the error of a handshake.
    pub fn of(error: &std::io::Error) -> HandshakeFailure {
        let Some(rustls_error) = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        else {
            return HandshakeFailure::Other;
        };
        match rustls_error {
            rustls::Error::InvalidCertificate(certificate) => match certificate {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    HandshakeFailure::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    HandshakeFailure::NotYetValid
                }
                CertificateError::UnknownIssuer => HandshakeFailure::UnknownIssuer,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => HandshakeFailure::NameMismatch,
                _ => HandshakeFailure::BadCertificate,
            },
            rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateRequired
                | rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::AccessDenied,
            ) => HandshakeFailure::ClientCertificateRefused,
            _ => HandshakeFailure::Other,
        }
    }

    /// One word for logs and metrics.
    pub fn cause(self) -> &'static str {
        match self {
            HandshakeFailure::Expired => "tls_expired",
            HandshakeFailure::NotYetValid => "tls_not_yet_valid",
            HandshakeFailure::UnknownIssuer => "tls_unknown_issuer",
            HandshakeFailure::NameMismatch => "tls_name_mismatch",
            HandshakeFailure::BadCertificate => "tls_bad_certificate",
            HandshakeFailure::ClientCertificateRefused => "tls_client_certificate_refused",
            HandshakeFailure::Other => "tls",
        }
    }

    /// What the 502's detail says.
    pub fn describe(self) -> &'static str {
        match self {
            HandshakeFailure::Expired => "the upstream's TLS certificate has expired",
            HandshakeFailure::NotYetValid => {
                "the upstream's TLS certificate is not valid yet (or a clock is wrong)"
            }
            HandshakeFailure::UnknownIssuer => {
                "the upstream's TLS certificate was signed by an unknown issuer; trust its CA with the route's upstream_ca"
            }
            HandshakeFailure::NameMismatch => {
                "the upstream's TLS certificate does not name the host in the route's upstream URL"
            }
            HandshakeFailure::BadCertificate => "the upstream's TLS certificate was refused",
            HandshakeFailure::ClientCertificateRefused => {
                "the upstream refused fencegate's client certificate (or wanted one); see the route's upstream_cert"
            }
            HandshakeFailure::Other => "the TLS handshake with the upstream failed",
        }
    }
}
