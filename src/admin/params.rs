//! Query parameters and JSON bodies of admin calls, checked strictly: every problem names the
//! parameter or field it is about.

use std::time::SystemTime;

use std::fmt;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::AdminError;
use crate::audit::{self, Reason};
use crate::token::FencingToken;

/// Rows per page when `limit` is not given.
pub(super) const DEFAULT_LIMIT: usize = 100;
/// The most rows one page may ask for: a page is built in memory.
pub(super) const MAX_LIMIT: usize = 1000;
/// The longest reason a reset may record.
pub(super) const MAX_REASON: usize = 1024;

/// A call's query parameters. An empty value counts as absent, so `?prefix=&limit=` is fine.
#[derive(Debug)]
pub(super) struct Params {
    values: Vec<(&'static str, String)>,
}

impl Params {
    /// Parses `query`, refusing parameters not in `allowed` and parameters given twice.
    pub(super) fn parse(query: Option<&str>, allowed: &[&'static str]) -> Result<Self, AdminError> {
        let mut values: Vec<(&'static str, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let Some(known) = allowed.iter().copied().find(|known| *known == name) else {
                return Err(AdminError::bad(
                    name.into_owned(),
                    format!("unknown parameter; this call takes {}", allowed.join(", ")),
                ));
            };
            if values.iter().any(|(seen, _)| *seen == known) {
                return Err(AdminError::bad(known, "given more than once"));
            }
            if !value.is_empty() {
                values.push((known, value.into_owned()));
            }
        }
        Ok(Self { values })
    }

    /// The value of `name`, if given.
    pub(super) fn take(&mut self, name: &str) -> Option<String> {
        let index = self.values.iter().position(|(known, _)| *known == name)?;
        Some(self.values.swap_remove(index).1)
    }

    /// `limit`: 1 to [`MAX_LIMIT`], default [`DEFAULT_LIMIT`].
    pub(super) fn limit(&mut self) -> Result<usize, AdminError> {
        let Some(text) = self.take("limit") else {
            return Ok(DEFAULT_LIMIT);
        };
        match text.parse::<usize>() {
            Ok(limit) if (1..=MAX_LIMIT).contains(&limit) => Ok(limit),
            _ => Err(AdminError::bad(
                "limit",
                format!("{text:?} is not a whole number from 1 to {MAX_LIMIT}"),
            )),
        }
    }

    /// `after` as a row id: the `next` cursor of an earlier page.
    pub(super) fn id_cursor(&mut self) -> Result<Option<i64>, AdminError> {
        let Some(text) = self.take("after") else {
            return Ok(None);
        };
        match text.parse::<i64>() {
            Ok(id) if id > 0 => Ok(Some(id)),
            _ => Err(AdminError::bad(
                "after",
                format!("{text:?} is not a cursor; pass the `next` value of the previous page"),
            )),
        }
    }

    /// `reason`: one of the audit reasons.
    pub(super) fn reason(&mut self) -> Result<Option<Reason>, AdminError> {
        self.take("reason")
            .map(|text| {
                text.parse::<Reason>()
                    .map_err(|e| AdminError::bad("reason", e.to_string()))
            })
            .transpose()
    }

    /// `since`: an RFC 3339 time or a duration back from now.
    pub(super) fn since(&mut self) -> Result<Option<SystemTime>, AdminError> {
        self.take("since")
            .map(|text| {
                audit::parse_since(&text, SystemTime::now())
                    .map_err(|problem| AdminError::bad("since", problem))
            })
            .transpose()
    }
}

/// A call's JSON object body.
#[derive(Debug)]
pub(super) struct Body {
    fields: Map<String, Value>,
}

impl Body {
    /// Parses `bytes` as a JSON object whose fields are all in `allowed`.
    pub(super) fn parse(bytes: &[u8], allowed: &[&'static str]) -> Result<Self, AdminError> {
        let example = "expected a JSON object such as {\"token\": 7}";
        let fields = match serde_json::from_slice::<UniqueObject>(bytes) {
            Ok(UniqueObject(fields)) => fields,
            Err(e) => return Err(AdminError::bad("body", format!("{example} ({e})"))),
        };
        if let Some(unknown) = fields.keys().find(|key| !allowed.contains(&key.as_str())) {
            return Err(AdminError::bad(
                unknown.clone(),
                format!("unknown field; this call takes {}", allowed.join(", ")),
            ));
        }
        Ok(Self { fields })
    }

    /// `token`: a whole number from 0 to 2^64-1, as a JSON number or a decimal string (for
    /// clients whose numbers are doubles and cannot carry every u64).
    pub(super) fn token(&mut self) -> Result<FencingToken, AdminError> {
        let problem = "must be a whole number from 0 to 18446744073709551615";
        match self.fields.remove("token") {
            None => Err(AdminError::bad("token", "is required")),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(FencingToken::new)
                .ok_or_else(|| AdminError::bad("token", problem)),
            Some(Value::String(text)) => text
                .parse::<FencingToken>()
                .map_err(|_| AdminError::bad("token", problem)),
            Some(_) => Err(AdminError::bad("token", problem)),
        }
    }

    /// `reason`: why an operator resets a token; kept in the epoch history.
    pub(super) fn reason(&mut self) -> Result<String, AdminError> {
        match self.fields.remove("reason") {
            None => Err(AdminError::bad(
                "reason",
                "is required: say why the token is reset",
            )),
            Some(Value::String(text)) if text.trim().is_empty() => {
                Err(AdminError::bad("reason", "must not be empty"))
            }
            Some(Value::String(text)) if text.len() > MAX_REASON => Err(AdminError::bad(
                "reason",
                format!("must be at most {MAX_REASON} bytes"),
            )),
            Some(Value::String(text)) => Ok(text),
            Some(_) => Err(AdminError::bad("reason", "must be a string")),
        }
    }
}

/// A JSON object whose keys are all different. serde_json keeps the last of repeated keys, so
/// `{"token":11,"token":999}` would fence to 999 while a log or a proxy that reads the first
/// saw 11; an ambiguous body is refused instead.
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = UniqueObject;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueObject, A::Error> {
                let mut fields = Map::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    if fields.contains_key(&key) {
                        return Err(A::Error::custom(format!(
                            "the field {key:?} is given more than once"
                        )));
                    }
                    fields.insert(key, value);
                }
                Ok(UniqueObject(fields))
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parameter(error: AdminError) -> String {
        match error {
            AdminError::BadParameter { parameter, .. } => parameter,
            other => panic!("not a bad parameter: {other:?}"),
        }
    }

    #[test]
    fn unknown_repeated_and_malformed_parameters_are_named() {
        let allowed = &["resource", "limit", "after", "since", "reason"];
        let cases = [
            ("resouce=a", "resouce"),
            ("limit=1&limit=2", "limit"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("after=-3", "after"),
            ("after=abc", "after"),
            ("since=tomorrow", "since"),
            ("reason=zombie", "reason"),
        ];
        for (query, name) in cases {
            let result = Params::parse(Some(query), allowed).and_then(|mut params| {
                params.limit()?;
                params.id_cursor()?;
                params.since()?;
                params.reason()?;
                Ok(())
            });
            assert_eq!(parameter(result.unwrap_err()), name, "{query}");
        }
    }

    #[test]
    fn empty_values_count_as_absent_and_values_are_decoded() {
        let mut params =
            Params::parse(Some("resource=a%2Fb%3A1&limit="), &["resource", "limit"]).unwrap();
        assert_eq!(params.limit().unwrap(), DEFAULT_LIMIT);
        assert_eq!(params.take("resource").as_deref(), Some("a/b:1"));
    }

    #[test]
    fn body_fields_are_checked_by_name() {
        let parse = |json: &str| Body::parse(json.as_bytes(), &["token", "reason"]);
        assert_eq!(parameter(parse("[1]").unwrap_err()), "body");
        assert_eq!(parameter(parse("{\"tokn\":1}").unwrap_err()), "tokn");
        assert_eq!(
            parameter(parse("{\"token\":11,\"token\":999}").unwrap_err()),
            "body"
        );
        let token_error = |json: &str| parameter(parse(json).unwrap().token().unwrap_err());
        assert_eq!(token_error("{}"), "token");
        assert_eq!(token_error("{\"token\":-1}"), "token");
        assert_eq!(token_error("{\"token\":1.5}"), "token");
        assert_eq!(token_error("{\"token\":\"07\"}"), "token");
        let big = parse("{\"token\":18446744073709551615}").unwrap().token();
        assert_eq!(big.unwrap().get(), u64::MAX);
        let text = parse("{\"token\":\"42\"}").unwrap().token();
        assert_eq!(text.unwrap().get(), 42);
        let reason_error = |json: &str| parameter(parse(json).unwrap().reason().unwrap_err());
        assert_eq!(reason_error("{\"reason\":\"  \"}"), "reason");
        assert_eq!(reason_error("{\"reason\":3}"), "reason");
    }
}
