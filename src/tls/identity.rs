//! Who a client is: the names its certificate gives it, and whether a route's `allow` list
//! names one of them.
//!
//! A certificate's names are its URI SANs (SPIFFE ids), its DNS SANs and `CN=` its subject's
//! common name. They are read once per connection, after the handshake has verified the chain
//! against the plane's `client_ca`, so a name here is one that CA vouched for.

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use x509_cert::Certificate;
use x509_cert::der::Decode;
use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, Utf8StringRef};
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

/// The most names one identity keeps: a certificate with more is not a leader's.
const MAX_NAMES: usize = 16;
/// The longest name kept; longer ones are left out rather than cut (a cut name could match an
/// allow entry the full one does not).
const MAX_NAME_LEN: usize = 512;

/// The verified names of a client certificate, in the order URI SANs, DNS SANs, `CN=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    names: Vec<String>,
}

impl ClientIdentity {
    /// The identity of the end-entity certificate `der`; `None` if it does not parse or names
    /// nothing fencegate can match.
    pub fn of_certificate(der: &[u8]) -> Option<Arc<ClientIdentity>> {
        let certificate = Certificate::from_der(der).ok()?;
        let mut names = subject_alt_names(&certificate);
        names.extend(common_names(&certificate).map(|cn| format!("CN={cn}")));
        Self::of_names(names)
    }

    /// An identity of `names`, bounded; `None` if none is left.
    pub(crate) fn of_names(names: impl IntoIterator<Item = String>) -> Option<Arc<ClientIdentity>> {
        let names: Vec<String> = names
            .into_iter()
            .filter(|name| !name.is_empty() && name.len() <= MAX_NAME_LEN)
            .take(MAX_NAMES)
            .collect();
        (!names.is_empty()).then(|| Arc::new(ClientIdentity { names }))
    }

    /// The names, in certificate order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether `allow` names this client. Names compare exactly: an allow entry is written as the
    /// certificate spells it.
    pub fn is_allowed_by(&self, allow: &[String]) -> bool {
        self.names.iter().any(|name| allow.contains(name))
    }

    /// The identity as the peer plane carries it (cluster mode): each name percent-encoded, comma
    /// separated, so that any name survives as one ASCII header value.
    pub fn to_header(&self) -> HeaderValue {
        let encoded: Vec<String> = self
            .names
            .iter()
            .map(|name| utf8_percent_encode(name, HEADER_ESCAPED).to_string())
            .collect();
        HeaderValue::try_from(encoded.join(","))
            .expect("percent-encoded ASCII is a valid header value")
    }

    /// Reads [`Self::to_header`]'s form back; `None` if it is not that form.
    pub fn from_header(value: &HeaderValue) -> Option<Arc<ClientIdentity>> {
        let text = value.to_str().ok()?;
        let names = text
            .split(',')
            .map(|name| {
                percent_decode_str(name)
                    .decode_utf8()
                    .map(|name| name.into_owned())
            })
            .collect::<Result<Vec<_>, _>>()
            .ok()?;
        Self::of_names(names)
    }
}

/// Names joined by `, `: how logs and the audit log show the identity.
impl fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, name) in self.names.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

/// What a name must escape in the peer header: controls, non-ASCII (by the encoder), the
/// separator and the escape itself.
const HEADER_ESCAPED: &AsciiSet = &CONTROLS.add(b',').add(b'%').add(b' ').add(b'"');

/// The certificate's URI SANs, then its DNS SANs.
fn subject_alt_names(certificate: &Certificate) -> Vec<String> {
    let Ok(Some((_, SubjectAltName(names)))) = certificate.tbs_certificate.get::<SubjectAltName>()
    else {
        return Vec::new();
    };
    let uris = names.iter().filter_map(|name| match name {
        GeneralName::UniformResourceIdentifier(uri) => Some(uri.to_string()),
        _ => None,
    });
    let dns = names.iter().filter_map(|name| match name {
        GeneralName::DnsName(dns) => Some(dns.to_string()),
        _ => None,
    });
    uris.chain(dns).collect()
}

/// The subject's common names (usually one), in the string types certificates use for them.
fn common_names(certificate: &Certificate) -> impl Iterator<Item = String> + '_ {
    const COMMON_NAME: x509_cert::der::oid::ObjectIdentifier =
        x509_cert::der::oid::db::rfc4519::COMMON_NAME;
    certificate
        .tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|attribute| attribute.oid == COMMON_NAME)
        .filter_map(|attribute| {
            let value = &attribute.value;
            value
                .decode_as::<Utf8StringRef<'_>>()
                .map(|s| s.to_string())
                .or_else(|_| {
                    value
                        .decode_as::<PrintableStringRef<'_>>()
                        .map(|s| s.to_string())
                })
                .or_else(|_| value.decode_as::<Ia5StringRef<'_>>().map(|s| s.to_string()))
                .ok()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(configure: impl FnOnce(&mut rcgen::CertificateParams)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        configure(&mut params);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn names_are_uri_sans_then_dns_sans_then_the_common_name() {
        let der = certificate(|params| {
            params.subject_alt_names = vec![
                rcgen::SanType::DnsName("leader.internal".try_into().unwrap()),
                rcgen::SanType::URI("spiffe://prod/wallet-leader".try_into().unwrap()),
            ];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "billing-leader");
        });
        let identity = ClientIdentity::of_certificate(&der).unwrap();
        assert_eq!(
            identity.names(),
            [
                "spiffe://prod/wallet-leader",
                "leader.internal",
                "CN=billing-leader"
            ]
        );
        assert_eq!(
            identity.to_string(),
            "spiffe://prod/wallet-leader, leader.internal, CN=billing-leader"
        );
    }

    #[test]
    fn an_allow_list_matches_any_name_exactly() {
        let der = certificate(|params| {
            params.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://prod/wallet-leader".try_into().unwrap(),
            )];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "billing-leader");
        });
        let identity = ClientIdentity::of_certificate(&der).unwrap();
        let allow = |names: &[&str]| {
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>()
        };
        assert!(identity.is_allowed_by(&allow(&["spiffe://prod/wallet-leader"])));
        assert!(identity.is_allowed_by(&allow(&["other", "CN=billing-leader"])));
        assert!(!identity.is_allowed_by(&allow(&["billing-leader"])));
        assert!(!identity.is_allowed_by(&allow(&["spiffe://prod/wallet-leader/"])));
        assert!(!identity.is_allowed_by(&allow(&["CN=Billing-Leader"])));
        assert!(!identity.is_allowed_by(&[]));
    }

    #[test]
    fn a_certificate_without_names_has_no_identity() {
        assert_eq!(ClientIdentity::of_certificate(&certificate(|_| {})), None);
        assert_eq!(ClientIdentity::of_certificate(b"not a certificate"), None);
    }

    #[test]
    fn the_peer_header_carries_any_name_back_unchanged() {
        let identity = ClientIdentity::of_names(vec![
            "spiffe://prod/a,b".to_owned(),
            "CN=Zoë 100%".to_owned(),
            "dns.example".to_owned(),
        ])
        .unwrap();
        let header = identity.to_header();
        assert_eq!(ClientIdentity::from_header(&header), Some(identity));
        assert_eq!(
            ClientIdentity::from_header(&HeaderValue::from_static("")),
            None
        );
        assert_eq!(
            ClientIdentity::from_header(&HeaderValue::from_static("%FF")),
            None
        );
    }
}
