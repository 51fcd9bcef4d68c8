//! The audit trail: what a rejection record says.
//!
//! Every request fencegate refuses on fencing grounds becomes a [`Rejection`], committed through the
//! store's group-commit writer before the client gets its answer, so the log an operator reads is
//! never behind what zombies were told.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use crate::route::ResourceKey;
use crate::token::FencingToken;

/// The longest request path kept in a rejection row; a hostile client must not be able to make
/// each row arbitrarily large.
pub const MAX_AUDITED_PATH: usize = 1024;

/// The longest client-supplied request id kept in a rejection row.
pub const MAX_AUDITED_REQUEST_ID: usize = 128;

/// The longest client identity kept in a rejection row (its names, comma separated).
pub const MAX_AUDITED_IDENTITY: usize = 1024;

/// The longest method kept in a rejection row: registered methods are at most 17 bytes, and an
/// extension method is the client's text.
pub const MAX_AUDITED_METHOD: usize = 32;

/// Why a fenced request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The token was lower than the resource's highest.
    Stale,
    /// No `Fencing-Token` header.
    Missing,
    /// A `Fencing-Token` header that is not one canonical decimal `u64`.
    Invalid,
    /// A token further above the highest than the route's `max_token_jump` allows.
    Jump,
    /// A request on a collection above paths that other resources own (`DELETE /wallets/`).
    Collection,
    /// A client whose certificate identity the route's `allow` list does not name.
    Forbidden,
    /// A state-changing request that cannot be attributed to a finite set of resources.
    Unattributable,
}

impl Reason {
    /// Every reason, in declaration order (so `reason as usize` indexes this array).
    pub const ALL: [Reason; 7] = [
        Reason::Stale,
        Reason::Missing,
        Reason::Invalid,
        Reason::Jump,
        Reason::Collection,
        Reason::Forbidden,
        Reason::Unattributable,
    ];

    /// The name stored in the database and shown to operators.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Stale => "stale",
            Reason::Missing => "missing",
            Reason::Invalid => "invalid",
            Reason::Jump => "jump",
            Reason::Collection => "collection",
            Reason::Forbidden => "forbidden",
            Reason::Unattributable => "unattributable",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of the [`Reason`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a rejection reason; use stale, missing, invalid, jump, collection, forbidden or unattributable"
)]
pub struct UnknownReason(String);

impl FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == name)
            .ok_or_else(|| UnknownReason(name.to_owned()))
    }
}

/// One refused request, as it is written to the audit log.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub at: SystemTime,
    pub resource: ResourceKey,
    pub reason: Reason,
    /// The token the client sent, when it parsed.
    pub token: Option<FencingToken>,
    /// The resource's highest token when the request was refused; `None` if never seen.
    pub highest: Option<FencingToken>,
    pub method: String,
    pub path: String,
    /// The client's address as fencegate saw it.
    pub client: String,
    pub request_id: Option<String>,
    /// The client's certificate identity (see [`crate::tls::ClientIdentity`]), when it sent one.
    pub identity: Option<String>,
}

/// Reads a `since` bound: an RFC 3339 timestamp (any offset) or a duration back from `now`, such
/// as `15m` or `2h 30m`.
pub fn parse_since(text: &str, now: SystemTime) -> Result<SystemTime, String> {
    // Stored times are all after 1970; an earlier bound means "everything".
    let not_before_1970 = |at: SystemTime| at.max(SystemTime::UNIX_EPOCH);
    if let Ok(at) = text.parse::<jiff::Timestamp>() {
        return Ok(not_before_1970(SystemTime::from(at)));
    }
    // jiff's timestamps end late on 9999-12-30; humantime reads UTC times to the end of 9999,
    // so `since=9999-12-31T23:59:59Z` means "nothing yet" rather than a bad parameter.
    if let Ok(at) = humantime::parse_rfc3339(text) {
        return Ok(at);
    }
    match humantime::parse_duration(text) {
        Ok(ago) => Ok(not_before_1970(
            now.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH),
        )),
        Err(_) => Err(format!(
            "{text:?} is neither an RFC 3339 time such as 2026-11-23T10:00:00Z nor a duration \
             such as 15m"
        )),
    }
}

/// Cuts client-controlled `text` to at most `max` bytes, on a character boundary, for storage.
pub fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_timestamp_with_any_offset_or_a_duration() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let utc = parse_since("1970-01-12T13:46:40Z", now).unwrap();
        assert_eq!(utc, now);
        assert_eq!(parse_since("1970-01-12T14:46:40+01:00", now).unwrap(), now);
        let ago = now - std::time::Duration::from_secs(15 * 60);
        assert_eq!(parse_since("15m", now).unwrap(), ago);
        assert_eq!(parse_since("100000h", now).unwrap(), SystemTime::UNIX_EPOCH);
        let ancient = parse_since("0001-01-01T00:00:00Z", now).unwrap();
        assert_eq!(ancient, SystemTime::UNIX_EPOCH);
        let end_of_time = parse_since("9999-12-31T23:59:59Z", now).unwrap();
        assert!(end_of_time > now);
        let error = parse_since("yesterday", now).unwrap_err();
        assert!(error.contains("\"yesterday\""), "{error}");
    }

    #[test]
    fn reasons_parse_from_their_names_only() {
        for reason in Reason::ALL {
            assert_eq!(reason.as_str().parse(), Ok(reason));
            assert_eq!(Reason::ALL[reason as usize], reason);
        }
        assert!("Stale".parse::<Reason>().is_err());
        assert!("".parse::<Reason>().is_err());
    }

    #[test]
    fn long_text_is_cut_on_a_char_boundary() {
        assert_eq!(truncated("/a", MAX_AUDITED_PATH), "/a");
        let long = "é".repeat(MAX_AUDITED_PATH);
        let cut = truncated(&long, MAX_AUDITED_PATH);
        assert!(cut.len() <= MAX_AUDITED_PATH && cut.len() > MAX_AUDITED_PATH - 2);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
