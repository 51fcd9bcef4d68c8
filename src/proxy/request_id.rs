//! `X-Request-Id`: the client's, or a fresh v4 UUID; forwarded upstream, written to the audit
//! log with a rejection, and echoed in the answer.

use bytes::Bytes;
use http::HeaderMap;
use http::header::Entry;
use http::header::{HeaderName, HeaderValue};

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id, made and set if the client sent none. A v4 UUID from a thread-local
/// generator (uuid's `fast-rng`): no system call per request.
pub fn ensure(headers: &mut HeaderMap) -> HeaderValue {
    // One entry, not a lookup and then an insert: the name is hashed byte by byte, twice.
    let vacant = match headers.entry(X_REQUEST_ID) {
        Entry::Occupied(sent) => return sent.get().clone(),
        Entry::Vacant(vacant) => vacant,
    };
    let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    // One buffer shared by both values, the request's and the answer's: `from_owner` allocates
    // once and counts references. A value made from text copies it into an allocation of its
    // own, and a clone of one turns its buffer into a shared one: two allocations either way.
    // Checked once: the clone shares the buffer and the check.
    let value = HeaderValue::from_maybe_shared(Bytes::from_owner(text))
        .expect("a UUID is a valid header value");
    vacant.insert(value.clone());
    value
}

/// Echoes the request's id in its answer, unless the answer already carries one.
pub fn echo(headers: &mut HeaderMap, id: HeaderValue) {
    headers.entry(X_REQUEST_ID).or_insert(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_id_is_kept_and_a_missing_one_made() {
        let mut headers = HeaderMap::new();
        headers.insert(X_REQUEST_ID, HeaderValue::from_static("leader-7"));
        assert_eq!(ensure(&mut headers), "leader-7");

        let mut headers = HeaderMap::new();
        let made = ensure(&mut headers);
        assert_eq!(headers[X_REQUEST_ID], made);
        let text = made.to_str().unwrap();
        assert_eq!(uuid::Uuid::parse_str(text).unwrap().get_version_num(), 4);
        assert_ne!(ensure(&mut HeaderMap::new()), made, "each request its own");
    }

    #[test]
    fn the_answer_echoes_the_id_unless_it_has_one() {
        let mut answer = HeaderMap::new();
        echo(&mut answer, HeaderValue::from_static("a"));
        assert_eq!(answer[X_REQUEST_ID], "a");
        echo(&mut answer, HeaderValue::from_static("b"));
        assert_eq!(answer[X_REQUEST_ID], "a");
    }
}
