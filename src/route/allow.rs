//! Who may send a route's fenced requests: clients whose certificate identity the route's `allow`
//! names, or, without mTLS, clients whose bearer token hashes to one of `allow_bearer_sha256`.
//!
//! Only hashes are configured, so a config file or its backup never holds a leader's secret. The
//! token travels in `Authorization: Bearer …`; on such a route that header is fencegate's and is
//! never forwarded to the storage.

use http::HeaderMap;
use http::header::AUTHORIZATION;
use ring::digest::{SHA256, digest};

use crate::tls::ClientIdentity;

/// A route's allow lists. At least one is set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allow {
    /// Certificate names (`spiffe://…`, a DNS name, `CN=…`), compared exactly.
    identities: Vec<String>,
    /// SHA-256 digests of the bearer tokens allowed.
    bearer_sha256: Vec<[u8; 32]>,
}

/// An `allow_bearer_sha256` entry that is not a SHA-256 digest in hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a SHA-256 digest in hex (64 hex digits, as `printf %s TOKEN | sha256sum` prints)"
)]
pub struct NotADigest(String);

impl Allow {
    /// Allows the clients whose certificates carry one of `identities`.
    pub fn identities(identities: Vec<String>) -> Allow {
        Allow {
            identities,
            bearer_sha256: Vec::new(),
        }
    }

    /// Also allows the clients whose bearer token hashes to one of `digests` (hex).
    pub fn with_bearer_sha256(mut self, digests: &[String]) -> Result<Allow, NotADigest> {
        for hex in digests {
            self.bearer_sha256.push(parse_digest(hex)?);
        }
        Ok(self)
    }

    /// The certificate names allowed.
    pub fn identity_names(&self) -> &[String] {
        &self.identities
    }

    /// Whether bearer tokens are allowed at all (then `Authorization` is fencegate's).
    pub fn takes_bearer_tokens(&self) -> bool {
        !self.bearer_sha256.is_empty()
    }

    /// Whether a client with `identity` that sent `headers` may send fenced requests.
    pub fn permits(&self, identity: Option<&ClientIdentity>, headers: &HeaderMap) -> bool {
        let by_certificate =
            identity.is_some_and(|identity| identity.is_allowed_by(&self.identities));
        by_certificate || self.permits_bearer(headers)
    }

    /// Whether `headers` carry exactly one `Authorization: Bearer` whose token hashes to an
    /// allowed digest. Every digest is compared, each in constant time: how long the check takes
    /// says nothing about which digest, or how much of one, matched.
    fn permits_bearer(&self, headers: &HeaderMap) -> bool {
        if self.bearer_sha256.is_empty() {
            return false;
        }
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return false;
        };
        let Some(token) = bearer_token(value.as_bytes()) else {
            return false;
        };
        let sent = digest(&SHA256, token);
        self.bearer_sha256.iter().fold(false, |found, allowed| {
            found | equal(allowed, sent.as_ref())
        })
    }
}

/// The token of `Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !token.is_empty()).then_some(token)
}

fn equal(a: &[u8; 32], b: &[u8]) -> bool {
    b.len() == 32 && a.iter().zip(b).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse_digest(hex: &str) -> Result<[u8; 32], NotADigest> {
    let invalid = || NotADigest(hex.to_owned());
    if hex.len() != 64 || !hex.is_ascii() {
        return Err(invalid());
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).map_err(|_| invalid())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| invalid())?;
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// `printf %s leader-secret | sha256sum`, as an operator makes the config's entry.
    const LEADER_SECRET_SHA256: &str =
        "e0aa1af1ca30898fa9196b18eebfdbc6501d87ed33ecd3a4f5f47f29a8e6eae6";

    fn headers(authorization: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in authorization {
            headers.append(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn only_a_bearer_token_whose_digest_is_listed_is_allowed() {
        let other = hex(digest(&SHA256, b"other-secret").as_ref());
        let allow = Allow::identities(Vec::new())
            .with_bearer_sha256(&[other.to_uppercase(), LEADER_SECRET_SHA256.to_owned()])
            .unwrap();
        assert!(allow.permits(None, &headers(&["Bearer leader-secret"])));
        assert!(allow.permits(None, &headers(&["bearer leader-secret"])));
        assert!(
            allow.permits(None, &headers(&["Bearer other-secret"])),
            "upper-case hex"
        );
        for refused in [
            &[][..],
            &["Bearer leader-secre"],
            &["Bearer leader-secret "],
            &["Basic leader-secret"],
            // Another seven-character scheme: only `Bearer` carries a token.
            &["Digest leader-secret"],
            &["Bearer "],
            &["Bearer leader-secret", "Bearer leader-secret"],
            &[LEADER_SECRET_SHA256],
        ] {
            assert!(!allow.permits(None, &headers(refused)), "{refused:?}");
        }
    }

    #[test]
    fn a_digest_listed_twice_still_allows_its_token() {
        // Every listed digest is compared (constant time), so a token matches more than once
        // when an operator repeats an entry; the matches must add up, never cancel out.
        let allow = Allow::identities(Vec::new())
            .with_bearer_sha256(&[
                LEADER_SECRET_SHA256.to_owned(),
                LEADER_SECRET_SHA256.to_uppercase(),
            ])
            .unwrap();
        assert!(allow.permits(None, &headers(&["Bearer leader-secret"])));
    }

    #[test]
    fn a_certificate_identity_or_a_bearer_token_suffices() {
        let identity = ClientIdentity::of_names(["CN=leader".to_owned()]).unwrap();
        let other = ClientIdentity::of_names(["CN=other".to_owned()]).unwrap();
        let listed = hex(digest(&SHA256, b"t").as_ref());
        let allow = Allow::identities(vec!["CN=leader".into()])
            .with_bearer_sha256(&[listed])
            .unwrap();
        assert!(allow.permits(Some(&identity), &headers(&[])));
        assert!(!allow.permits(Some(&other), &headers(&[])));
        assert!(allow.permits(Some(&other), &headers(&["Bearer t"])));
        let certificates_only = Allow::identities(vec!["CN=leader".into()]);
        assert!(!certificates_only.permits(None, &headers(&["Bearer t"])));
        assert!(!certificates_only.takes_bearer_tokens());
    }

    #[test]
    fn digests_are_equal_only_byte_for_byte() {
        let allowed = [0u8; 32];
        assert!(equal(&allowed, &[0u8; 32]));
        // Two differences that cancel each other out under XOR must still be differences.
        let mut twice = [0u8; 32];
        twice[0] = 1;
        twice[31] = 1;
        assert!(!equal(&allowed, &twice));
        assert!(!equal(&allowed, &[0u8; 31]), "a prefix");
        assert!(!equal(&allowed, &[0u8; 33]), "longer");
    }

    #[test]
    fn digests_are_64_hex_digits() {
        let allow = Allow::default();
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"é".repeat(32)] {
            assert_eq!(
                allow.clone().with_bearer_sha256(&[bad.to_owned()]),
                Err(NotADigest(bad.to_owned())),
                "{bad}"
            );
        }
        assert!(allow.with_bearer_sha256(&["0".repeat(64)]).is_ok());
    }
}
