//! The audit trail: what a rejection record says.
//!
//! Every request fencegate refuses on fencing grounds becomes a [`Rejection`], committed through the
//! store's group-commit writer before the client gets its answer, so the log an operator reads is
//! never behind what zombies were told.

use std::fmt;
use std::time::SystemTime;

use crate::route::ResourceKey;
use crate::token::FencingToken;

/// The longest request path kept in a rejection row; a hostile client must not be able to make
/// each row arbitrarily large.
pub const MAX_AUDITED_PATH: usize = 2048;

/// The longest client-supplied request id kept in a rejection row.
pub const MAX_AUDITED_REQUEST_ID: usize = 128;

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
}

impl Reason {
    /// The name stored in the database and shown to operators.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Stale => "stale",
            Reason::Missing => "missing",
            Reason::Invalid => "invalid",
            Reason::Jump => "jump",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
    fn long_text_is_cut_on_a_char_boundary() {
        assert_eq!(truncated("/a", MAX_AUDITED_PATH), "/a");
        let long = "é".repeat(MAX_AUDITED_PATH);
        let cut = truncated(&long, MAX_AUDITED_PATH);
        assert!(cut.len() <= MAX_AUDITED_PATH && cut.len() > MAX_AUDITED_PATH - 2);
        assert!(cut.chars().all(|c| c == 'é'));
    }
}
