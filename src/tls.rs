//! TLS on fencegate's listeners (rustls, with the *ring* provider: nothing to install).
//!
//! A plane with a `cert` and a `key` serves HTTPS only, with ALPN `h2` then `http/1.1`; with a
//! `client_ca` it requires a client certificate that CA signed (mTLS). The files are read again on
//! SIGHUP and when they change on disk ([`ServerTls::watch`]); a new set that does not load is
//! logged and the old one keeps serving, so a half-copied certificate never takes a plane down.

mod identity;

pub use identity::ClientIdentity;

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The PEM files of one plane's TLS (`[admin_tls]`, `[tls]`, `[cluster.peer_tls]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC); RSA, ECDSA or Ed25519.
    pub key: PathBuf,
    /// When set, clients must present a certificate this CA (bundle) signed.
    pub client_ca: Option<PathBuf>,
}

/// Why a plane's TLS files cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {cause}")]
    Read { path: PathBuf, cause: String },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key")]
    NoKey { path: PathBuf },
    #[error(
        "the key in {path} cannot sign: {cause} (RSA, ECDSA P-256/P-384 and Ed25519 keys are supported)"
    )]
    Key { path: PathBuf, cause: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("CA file {path}: {cause}")]
    Ca { path: PathBuf, cause: String },
    #[error("the TLS provider refused its own defaults: {0}")]
    Provider(String),
}

/// A plane's TLS: the configuration its next handshakes use, replaced whole on a reload.
#[derive(Debug)]
pub struct ServerTls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
    /// What the files looked like when last loaded, to notice a change on disk.
    stamp: RwLock<Vec<Stamp>>,
}

/// A file's modification time and length.
type Stamp = Option<(SystemTime, u64)>;

impl ServerTls {
    /// Loads `files`; fails with the first problem found, naming the file.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = stamps(&files);
        let config = server_config(&files)?;
        Ok(Self {
            files,
            config: RwLock::new(Arc::new(config)),
            stamp: RwLock::new(stamp),
        })
    }

    /// The acceptor for one new connection, with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self.config.read().unwrap_or_else(|p| p.into_inner());
        TlsAcceptor::from(Arc::clone(&config))
    }

    /// Reads the files again. On success the next handshakes use them (connections already
    /// open keep theirs); on failure nothing changes and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamp = stamps(&self.files);
        let config = server_config(&self.files)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = stamp;
        Ok(())
    }

    /// Reloads whenever one of the files changes (checked every `every`), for as long as it
    /// runs. A set that does not load is logged once per change and the old one stays.
    pub async fn watch(self: Arc<Self>, plane: &'static str, every: Duration) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = stamps(&self.files);
            let changed = *self.stamp.read().unwrap_or_else(|p| p.into_inner()) != now;
            if !changed {
                continue;
            }
            match self.reload() {
                Ok(()) => {
                    tracing::info!(plane, cert = %self.files.cert.display(), "TLS certificate reloaded (changed on disk)")
                }
                Err(error) => {
                    // Not retried until the files change again.
                    *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = now;
                    tracing::error!(plane, %error, "TLS files changed but do not load; the previous certificate stays");
                }
            }
        }
    }
}

fn stamps(files: &TlsFiles) -> Vec<Stamp> {
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())))
    };
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| stamp(path))
    .collect()
}

/// The crypto provider every TLS configuration of fencegate uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let certified = certified_key(&files.cert, &files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Provider(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(path)? {
                roots.add(cert).map_err(|e| TlsError::Ca {
                    path: path.clone(),
                    cause: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Ca {
                    path: path.clone(),
                    cause: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// One certificate for every client, whatever name it asked for.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(cert)?;
    let der = std::fs::read(key).map_err(|e| TlsError::Read {
        path: key.to_owned(),
        cause: e.to_string(),
    })?;
    let private = PrivateKeyDer::from_pem_slice(&der).map_err(|_| TlsError::NoKey {
        path: key.to_owned(),
    })?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&private).map_err(|e| TlsError::Key {
            path: key.to_owned(),
            cause: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signer);
    // A key whose public half cannot be compared (`Unknown`) is left to the handshake.
    if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(TlsError::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
        });
    }
    Ok(certified)
}

/// Every certificate in a PEM file, in order.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_owned(),
        cause: e.to_string(),
    })?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// A client's TLS: the system's roots plus `extra_ca` (a private CA), and a client certificate
/// when the server wants one (`identity`: certificate chain and key files).
pub fn client_config(
    extra_ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    // A system without a usable store still trusts `extra_ca`; the handshake says the rest.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = extra_ca {
        for cert in certificates(path)? {
            roots.add(cert).map_err(|e| TlsError::Ca {
                path: path.to_owned(),
                cause: e.to_string(),
            })?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Provider(e.to_string()))?
        .with_root_certificates(roots);
    let Some((cert, key)) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    let chain = certificates(cert)?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|_| TlsError::NoKey {
        path: key.to_owned(),
    })?;
    builder
        .with_client_auth_cert(chain, private)
        .map_err(|e| TlsError::Key {
            path: key.to_owned(),
            cause: e.to_string(),
        })
}
