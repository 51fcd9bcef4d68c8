//! Resource template placeholders that read the request beyond its path, for storage without a
//! profile: `{query.NAME}`, `{header.NAME}`, `{body.POINTER}` and `{body64.POINTER}` (a JSON
//! pointer into the body, base64-decoded for the second).
//!
//! A value that is not there leaves the request unattributable (422): fencing it under a resource
//! with a hole in its name would share one gate between unrelated writes. A value given twice is
//! ambiguous (400): the upstream may read either.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::header::HeaderName;

use crate::profile::RequestHead;

/// One placeholder that reads the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestPart {
    Query(String),
    Header(HeaderName),
    /// A JSON pointer (RFC 6901) into the body; `base64` decodes the string it finds.
    Body {
        pointer: String,
        base64: bool,
    },
}

/// Why a request part has no usable value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    #[error("the request has no {0}, which names its resource")]
    Missing(String),
    #[error("{0}")]
    Malformed(String),
}

impl RequestPart {
    /// The part a placeholder names, `None` if it names a path capture instead; an error for a
    /// request placeholder that is malformed.
    pub fn parse(placeholder: &str) -> Option<Result<Self, String>> {
        let (kind, name) = placeholder.split_once('.')?;
        let part = match kind {
            "query" if !name.is_empty() => Ok(RequestPart::Query(name.to_owned())),
            "header" => HeaderName::from_bytes(name.as_bytes())
                .map(RequestPart::Header)
                .map_err(|_| format!("{{{placeholder}}}: {name:?} is not a header name")),
            "body" | "body64" if name.is_empty() || name.starts_with('/') => {
                Ok(RequestPart::Body {
                    pointer: name.to_owned(),
                    base64: kind == "body64",
                })
            }
            "body" | "body64" => Err(format!(
                "{{{placeholder}}}: a JSON pointer starts with / (like {{body./key}})"
            )),
            "query" => Err(format!("{{{placeholder}}} names no query parameter")),
            _ => return None,
        };
        Some(part)
    }

    /// Whether the body must be read for this part.
    pub fn reads_body(&self) -> bool {
        matches!(self, RequestPart::Body { .. })
    }

    /// The part's value in a request; `body` is empty unless a part reads it.
    pub fn value(&self, head: &RequestHead<'_>, body: &[u8]) -> Result<String, PartError> {
        match self {
            RequestPart::Query(name) => query_value(head.query, name),
            RequestPart::Header(name) => header_value(head, name),
            RequestPart::Body { pointer, base64 } => body_value(body, pointer, *base64),
        }
    }
}

fn query_value(query: Option<&str>, name: &str) -> Result<String, PartError> {
    let mut values = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(key, _)| key == name)
        .map(|(_, value)| value);
    match (values.next(), values.next()) {
        (None, _) => Err(PartError::Missing(format!("query parameter {name:?}"))),
        (Some(_), Some(_)) => Err(PartError::Malformed(format!(
            "the query parameter {name:?} is given more than once"
        ))),
        (Some(value), None) => text(value.into_owned(), || format!("query parameter {name:?}")),
    }
}

fn header_value(head: &RequestHead<'_>, name: &HeaderName) -> Result<String, PartError> {
    let mut values = head.headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (None, _) => Err(PartError::Missing(format!("{name} header"))),
        (Some(_), Some(_)) => Err(PartError::Malformed(format!(
            "the {name} header is given more than once"
        ))),
        (Some(value), None) => {
            let value = value
                .to_str()
                .map_err(|_| PartError::Malformed(format!("the {name} header is not text")))?
                .trim();
            text(value.to_owned(), || format!("{name} header"))
        }
    }
}

fn body_value(body: &[u8], pointer: &str, base64: bool) -> Result<String, PartError> {
    let UniqueKeys(document) = serde_json::from_slice(body)
        .map_err(|e| PartError::Malformed(format!("the body is not JSON: {e}")))?;
    let missing = || PartError::Missing(format!("body value at {pointer:?}"));
    let value = match document.pointer(pointer).ok_or_else(missing)? {
        serde_json::Value::String(text) => text.clone(),
        // Base64 is a string; a number's digits may still decode (1500 is "ם4"), so a number
        // where base64 is expected is refused rather than read as text the storage never sees.
        serde_json::Value::Number(number) if !base64 => number.to_string(),
        serde_json::Value::Null => return Err(missing()),
        _ => {
            return Err(PartError::Malformed(format!(
                "the body value at {pointer:?} is not a {}",
                if base64 {
                    "base64 string"
                } else {
                    "string or number"
                }
            )));
        }
    };
    if !base64 {
        return text(value, || format!("body value at {pointer:?}"));
    }
    let bytes = BASE64.decode(&value).map_err(|e| {
        PartError::Malformed(format!("the body value at {pointer:?} is not base64: {e}"))
    })?;
    let value = String::from_utf8(bytes).map_err(|_| {
        PartError::Malformed(format!(
            "the body value at {pointer:?} does not decode to text"
        ))
    })?;
    text(value, || format!("body value at {pointer:?}"))
}

/// A JSON document none of whose objects repeats a key. serde_json keeps the last of repeated
/// keys; a storage may keep the first, and `{"id":"wallet:1","id":"fresh"}` would then be fenced
/// under a never-seen resource while it writes `wallet:1`. An ambiguous body is refused instead.
struct UniqueKeys(serde_json::Value);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueKeysVisitor)
            .map(UniqueKeys)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(UniqueKeys(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(items.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = serde_json::Map::new();
        while let Some((key, UniqueKeys(value))) = map.next_entry::<String, UniqueKeys>()? {
            if fields.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "the key {key:?} is given more than once"
                )));
            }
            fields.insert(key, value);
        }
        Ok(fields.into())
    }
}

/// A value usable in a resource name: non-empty text without control characters.
fn text(value: String, what: impl Fn() -> String) -> Result<String, PartError> {
    if value.is_empty() {
        return Err(PartError::Missing(what()));
    }
    if value.chars().any(char::is_control) {
        return Err(PartError::Malformed(format!(
            "the {} holds control characters",
            what()
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Method};

    fn value_of(
        placeholder: &str,
        query: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<String, PartError> {
        let part = RequestPart::parse(placeholder).unwrap().unwrap();
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let head = RequestHead {
            method: &Method::POST,
            path: "/jobs",
            query,
            headers: &map,
        };
        part.value(&head, body.as_bytes())
    }

    #[test]
    fn placeholders_read_the_query_a_header_or_the_body() {
        assert_eq!(
            value_of("query.id", Some("a=1&id=w%3A7"), &[], ""),
            Ok("w:7".into())
        );
        assert_eq!(
            value_of("header.x-tenant", None, &[("X-Tenant", " acme ")], ""),
            Ok("acme".into())
        );
        assert_eq!(
            value_of("body./job/id", None, &[], r#"{"job":{"id":"j-1"}}"#),
            Ok("j-1".into())
        );
        assert_eq!(
            value_of("body./n", None, &[], r#"{"n":42}"#),
            Ok("42".into())
        );
        assert_eq!(
            value_of("body./n", None, &[], r#"{"n":-3}"#),
            Ok("-3".into())
        );
        assert_eq!(
            value_of("body./n", None, &[], r#"{"n":2.5}"#),
            Ok("2.5".into())
        );
        assert_eq!(
            value_of("body64./key", None, &[], r#"{"key":"L3dhbGxldHMvMQ=="}"#),
            Ok("/wallets/1".into())
        );
    }

    #[test]
    fn a_missing_value_is_missing_and_an_ambiguous_one_malformed() {
        let missing = |r: Result<String, PartError>| matches!(r, Err(PartError::Missing(_)));
        let malformed = |r: Result<String, PartError>| matches!(r, Err(PartError::Malformed(_)));
        assert!(missing(value_of("query.id", None, &[], "")));
        assert!(missing(value_of("query.id", Some("id="), &[], "")));
        assert!(malformed(value_of("query.id", Some("id=1&id=2"), &[], "")));
        assert!(missing(value_of("header.x-tenant", None, &[], "")));
        assert!(malformed(value_of(
            "header.x-tenant",
            None,
            &[("x-tenant", "a"), ("x-tenant", "b")],
            ""
        )));
        assert!(missing(value_of("body./id", None, &[], "{}")));
        assert!(missing(value_of("body./id", None, &[], r#"{"id":null}"#)));
        assert!(malformed(value_of("body./id", None, &[], "not json")));
        assert!(malformed(value_of("body./id", None, &[], r#"{"id":{}}"#)));
        assert!(malformed(value_of("body./id", None, &[], r#"{"id":true}"#)));
        assert!(malformed(value_of("body./id", None, &[], r#"{"id":[1]}"#)));
        assert!(malformed(value_of(
            "body64./id",
            None,
            &[],
            r#"{"id":"%%"}"#
        )));
        assert!(malformed(value_of("body64./id", None, &[], r#"{"id":7}"#)));
        assert!(
            malformed(value_of("body64./id", None, &[], r#"{"id":1500}"#)),
            "digits that decode"
        );
        assert!(malformed(value_of(
            "body./id",
            None,
            &[],
            r#"{"id":"a\nb"}"#
        )));
    }

    #[test]
    fn only_body_placeholders_read_the_body() {
        let reads_body = |p: &str| RequestPart::parse(p).unwrap().unwrap().reads_body();
        assert!(reads_body("body./id"));
        assert!(reads_body("body64./key"));
        assert!(!reads_body("query.id"));
        assert!(!reads_body("header.x-tenant"));
    }

    #[test]
    fn placeholders_are_parsed_or_refused() {
        assert_eq!(RequestPart::parse("id"), None, "a path capture");
        assert_eq!(RequestPart::parse("other.x"), None);
        assert!(RequestPart::parse("query.").unwrap().is_err());
        assert!(RequestPart::parse("header.bad header").unwrap().is_err());
        assert!(RequestPart::parse("body.id").unwrap().is_err());
        assert!(
            RequestPart::parse("body.").unwrap().is_ok(),
            "the whole body"
        );
    }
}
