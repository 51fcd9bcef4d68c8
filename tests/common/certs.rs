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

    /// A server certificate for `localhost` and 127.0.0.1 that expired in 2020.
    pub fn expired_server(&self, dir: &Path, name: &str) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        self.issue(dir, name, params)
    }

    /// A server certificate for `host` alone (not this machine's names).
    pub fn server_named(&self, dir: &Path, name: &str, host: &str) -> Issued {
        let params = CertificateParams::new(vec![host.to_owned()]).unwrap();
        self.issue(dir, name, params)
    }

    /// A client certificate whose subject CN is `name`.
    pub fn client(&self, dir: &Path, name: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        self.issue(dir, name, params)
    }

    /// A client certificate for a workload: subject CN `name` and the URI SAN `uri` (a SPIFFE
    /// id, say).
    pub fn workload(&self, dir: &Path, name: &str, uri: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
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
        // rustls may still hold the last records: `write_all` returns once it has taken them.
        tls.flush().await?;
        tls.read_to_string(&mut answer).await?;
    }
    Ok(Seen {
        certificate,
        alpn,
        answer,
    })
}

/// What an [`HttpsUpstream`] saw of one request.
#[derive(Debug, Clone)]
pub struct Arrived {
    /// The SNI its connection sent.
    pub sni: Option<String>,
    pub token: Option<String>,
    pub version: http::Version,
    /// The authority it was addressed to (`:authority` or `Host`).
    pub authority: Option<String>,
    /// How many body bytes it carried (filled in once read).
    pub body_len: usize,
}

/// An HTTPS server on loopback that answers every request `200 stored`, for fencegate's
/// upstream: it counts TCP connections and records each request as it arrives. With
/// `client_ca`, it requires a client certificate that CA signed.
pub struct HttpsUpstream {
    pub addr: SocketAddr,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    /// Per request, in arrival order.
    pub seen: Arc<std::sync::Mutex<Vec<Arrived>>>,
}

impl HttpsUpstream {
    /// HTTP/1.1 only, answering at once.
    pub async fn start(server: &Issued, client_ca: Option<&Path>) -> HttpsUpstream {
        Self::start_with(server, client_ca, false, std::time::Duration::ZERO).await
    }

    /// With `h2`, ALPN offers `h2` first and a client that picks it is served HTTP/2; each
    /// answer waits a random time up to `delay`, so that concurrent requests overtake each other.
    pub async fn start_with(
        server: &Issued,
        client_ca: Option<&Path>,
        h2: bool,
        delay: std::time::Duration,
    ) -> HttpsUpstream {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).unwrap() {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(
                CertificateDer::pem_file_iter(&server.cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(&server.key).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = if h2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = HttpsUpstream {
            addr: listener.local_addr().unwrap(),
            connections: Arc::default(),
            seen: Arc::default(),
        };
        let (connections, seen) = (
            Arc::clone(&upstream.connections),
            Arc::clone(&upstream.seen),
        );
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (acceptor, seen) = (acceptor.clone(), Arc::clone(&seen));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_owned);
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let header = |name: &str| {
                                request
                                    .headers()
                                    .get(name)
                                    .and_then(|t| t.to_str().ok())
                                    .map(str::to_owned)
                            };
                            let authority = request
                                .uri()
                                .authority()
                                .map(|a| a.to_string())
                                .or_else(|| header("host"));
                            let index = {
                                let mut seen = seen.lock().unwrap();
                                seen.push(Arrived {
                                    sni: sni.clone(),
                                    token: header("fencing-token"),
                                    version: request.version(),
                                    authority,
                                    body_len: 0,
                                });
                                seen.len() - 1
                            };
                            let seen = Arc::clone(&seen);
                            async move {
                                use http_body_util::BodyExt;
                                let body = request.into_body().collect().await;
                                let length = body.map(|b| b.to_bytes().len()).unwrap_or(0);
                                seen.lock().unwrap()[index].body_len = length;
                                if !delay.is_zero() {
                                    let pause = fastrand::u64(0..=delay.as_millis() as u64);
                                    tokio::time::sleep(std::time::Duration::from_millis(pause))
                                        .await;
                                }
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from_static(b"stored")),
                                ))
                            }
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        upstream
    }

    pub fn url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.addr.port())
    }

    pub fn tokens(&self) -> Vec<Option<String>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|arrived| arrived.token.clone())
            .collect()
    }
}
