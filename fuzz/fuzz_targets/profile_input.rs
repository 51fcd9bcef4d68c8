//! What the profile targets share: fuzz input read as a request (a method, a line of text, a
//! body), and the properties every profile's answer keeps.

use fencegate::profile::{Changes, KeyApi, RequestHead};
use http::Method;

/// One request: the first byte picks the method from `methods`, the text up to the first newline
/// is the `line` (the target uses it for a path and a header), and the rest is the body.
pub struct Input<'a> {
    pub method: Method,
    pub line: &'a str,
    pub body: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn read(data: &'a [u8], methods: &[&str]) -> Option<Self> {
        let (&pick, rest) = data.split_first()?;
        let method =
            Method::from_bytes(methods[usize::from(pick) % methods.len()].as_bytes()).ok()?;
        let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let (line, body) = rest.split_at(split);
        let line = std::str::from_utf8(line).ok()?;
        Some(Self { method, line, body })
    }
}

/// Reads the request as `api` would (its body only where the profile asks for it): never a
/// panic, and resources sorted, without repeats and never empty.
pub fn check(api: &KeyApi, head: &RequestHead<'_>, body: &[u8]) {
    let body = if api.needs_body(head) { body } else { &[] };
    if let Ok(Changes::Resources(resources)) = api.changes(head, body) {
        assert!(!resources.is_empty());
        assert!(resources.windows(2).all(|pair| pair[0] < pair[1]));
    }
}
