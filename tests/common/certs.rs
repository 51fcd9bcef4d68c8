//! Certificates made per test with rcgen: a CA, servers and clients it signs, written as PEM
//! files, and a TLS client that reports which certificate the server presented.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test CA.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    pub pem: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

impl Ca {
    /// A new CA, its certificate written to `dir/<name>.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca { cert, key, pem }
    }

    /// A server certificate for `localhost` and 127.0.0.1, as `dir/<name>.{crt,key}`.
    pub fn server(&self, dir: &Path, name: &str) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, name);
        self.issue(dir, name, params)
    }

    /// A client certificate whose subject CN is `name`.
    pub fn client(&self, dir: &Path, name: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        self.issue(dir, name, params)
    }

    fn issue(&self, dir: &Path, name: &str, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let issued = Issued {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }
}

/// What a TLS client saw of a server.
pub struct Seen {
    /// The leaf certificate it presented.
    pub certificate: Vec<u8>,
    /// The protocol ALPN settled on.
    pub alpn: Option<Vec<u8>>,
    /// The HTTP/1.1 answer to `GET path` (status line first), when `path` was given.
    pub answer: String,
}

/// Connects to `addr` over TLS trusting `ca` (and presenting `client`, if any), offering
/// `alpn`, and sends `GET path` over HTTP/1.1 unless `path` is empty.
pub async fn tls_get(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Issued>,
    alpn: &[&[u8]],
    path: &str,
) -> std::io::Result<Seen> {
    let request = if path.is_empty() {
        String::new()
    } else {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    };
    tls_exchange(addr, ca, client, alpn, &request).await
}

/// A TLS connection to `addr` that trusts `ca` (and presents `client`, if any) and offers
/// `alpn`.
pub async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Issued>,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(client) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&client.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&client.key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
}

/// Sends `request` (raw HTTP/1.1, `Connection: close`; nothing if empty) over a TLS connection
/// made as [`tls_connect`] makes it, and reads the answer to the end.
pub async fn tls_exchange(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Issued>,
    alpn: &[&[u8]],
    request: &str,
) -> std::io::Result<Seen> {
    let mut tls = tls_connect(addr, ca, client, alpn).await?;
    let (_, session) = tls.get_ref();
    let certificate = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| cert.to_vec())
        .unwrap_or_default();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let mut answer = String::new();
    if !request.is_empty() {
        tls.write_all(request.as_bytes()).await?;
        tls.read_to_string(&mut answer).await?;
    }
    Ok(Seen {
        certificate,
        alpn,
        answer,
    })
}
