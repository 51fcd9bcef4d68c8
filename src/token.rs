//! Fencing tokens, parsed once at the edge.
//!
//! A leader sends its epoch in the `Fencing-Token` header. Everything past the edge works with the
//! validated [`FencingToken`], never with the raw header, so a malformed token cannot reach the gate.

use std::fmt;
use std::str::FromStr;

use http::HeaderMap;
use http::header::HeaderName;

/// The request header that carries a leader's fencing token.
pub const FENCING_TOKEN: HeaderName = HeaderName::from_static("fencing-token");

/// The response header that tells a leader the highest token fencegate has seen for the resource.
pub const FENCING_TOKEN_HIGHEST: HeaderName = HeaderName::from_static("fencing-token-highest");

/// A leader's epoch: a canonical decimal `u64`.
///
/// ```
/// use fencegate::token::{FencingToken, TokenError};
///
/// assert_eq!("42".parse::<FencingToken>().map(FencingToken::get), Ok(42));
/// // Two spellings of one number are never two epochs: only the canonical one is accepted.
/// assert_eq!("042".parse::<FencingToken>(), Err(TokenError::NotCanonical));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps an already-validated value (from the database or a typed API).
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The numeric value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a `Fencing-Token` header was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the request has no Fencing-Token header")]
    Missing,
    #[error("the Fencing-Token header is present more than once")]
    Repeated,
    #[error("Fencing-Token must be a canonical decimal integer from 0 to 18446744073709551615")]
    NotCanonical,
}

impl FromStr for FencingToken {
    type Err = TokenError;

    /// Accepts exactly `0` or `[1-9][0-9]*` within `u64`. Signs, spaces, leading zeros and other
    /// spellings are refused: two spellings of one number must never be two different epochs to
    /// some other component that re-parses the forwarded header.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let canonical = match bytes {
            [] => false,
            [b'0'] => true,
            [first, rest @ ..] => {
                (b'1'..=b'9').contains(first) && rest.iter().all(u8::is_ascii_digit)
            }
        };
        if !canonical {
            return Err(TokenError::NotCanonical);
        }
        // `u64::from_str` only fails here on overflow, since the digits were checked above.
        s.parse::<u64>()
            .map(Self)
            .map_err(|_| TokenError::NotCanonical)
    }
}

/// Reads the one `Fencing-Token` header of a request.
pub fn from_headers(headers: &HeaderMap) -> Result<FencingToken, TokenError> {
    from_header(headers, &FENCING_TOKEN)
}

/// Reads the one token header `name` of a request (a route's `token_header`).
pub fn from_header(headers: &HeaderMap, name: &HeaderName) -> Result<FencingToken, TokenError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next().ok_or(TokenError::Missing)?;
    if values.next().is_some() {
        return Err(TokenError::Repeated);
    }
    first
        .to_str()
        .map_err(|_| TokenError::NotCanonical)?
        .parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parse(s: &str) -> Result<u64, TokenError> {
        s.parse::<FencingToken>().map(FencingToken::get)
    }

    #[test]
    fn canonical_decimals_parse() {
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(parse("7"), Ok(7));
        assert_eq!(parse("1234567890"), Ok(1_234_567_890));
        assert_eq!(parse("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn non_canonical_spellings_are_refused() {
        for bad in [
            "",
            " 1",
            "1 ",
            "+1",
            "-1",
            "01",
            "00",
            "0x10",
            "1e3",
            "1.0",
            "１",
            "1_000",
            "18446744073709551616",
            "99999999999999999999999",
        ] {
            assert_eq!(parse(bad), Err(TokenError::NotCanonical), "{bad:?}");
        }
    }

    #[test]
    fn header_missing_repeated_or_opaque_is_an_error() {
        let mut headers = HeaderMap::new();
        assert_eq!(from_headers(&headers), Err(TokenError::Missing));

        headers.insert(&FENCING_TOKEN, HeaderValue::from_static("5"));
        assert_eq!(from_headers(&headers), Ok(FencingToken::new(5)));

        headers.append(&FENCING_TOKEN, HeaderValue::from_static("5"));
        assert_eq!(from_headers(&headers), Err(TokenError::Repeated));

        let mut opaque = HeaderMap::new();
        opaque.insert(&FENCING_TOKEN, HeaderValue::from_bytes(b"\xff").unwrap());
        assert_eq!(from_headers(&opaque), Err(TokenError::NotCanonical));
    }

    #[test]
    fn tokens_order_numerically() {
        assert!(FencingToken::new(9) < FencingToken::new(10));
        assert_eq!(FencingToken::new(42).to_string(), "42");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn every_token_prints_as_text_that_parses_back_to_it(value: u64) {
                let token = FencingToken::new(value);
                prop_assert_eq!(token.to_string().parse::<FencingToken>(), Ok(token));
            }

            /// One epoch, one spelling: text is accepted exactly when it is how its number prints.
            #[test]
            fn only_the_printed_spelling_of_a_number_parses(text in "[-+ 0-9a-f_.]{0,22}") {
                match text.parse::<FencingToken>() {
                    Ok(token) => prop_assert_eq!(token.to_string(), text),
                    Err(error) => {
                        prop_assert_eq!(error, TokenError::NotCanonical);
                        let printed = text.parse::<u64>().map(|value| value.to_string());
                        prop_assert_ne!(printed, Ok(text));
                    }
                }
            }

            #[test]
            fn the_header_and_the_text_parse_alike(text in "[ -~]{0,22}") {
                let mut headers = HeaderMap::new();
                headers.insert(&FENCING_TOKEN, HeaderValue::from_str(&text).unwrap());
                prop_assert_eq!(from_headers(&headers), text.parse::<FencingToken>());
            }
        }
    }
}
