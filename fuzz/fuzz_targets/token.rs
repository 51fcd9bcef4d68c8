//! Token parsing: never panics; whatever parses is canonical (prints back as the same text), and
//! the header parser agrees with the string parser.
#![no_main]

use fencegate::token::{self, FencingToken};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(token) = text.parse::<FencingToken>() {
            assert_eq!(token.to_string(), text, "a parsed token is canonical");
        }
    }
    if let Ok(value) = http::HeaderValue::from_bytes(data) {
        let mut headers = http::HeaderMap::new();
        headers.insert(token::FENCING_TOKEN, value);
        let from_header = token::from_headers(&headers);
        let from_text = std::str::from_utf8(data)
            .ok()
            .map(str::parse::<FencingToken>);
        if let Ok(token) = from_header {
            assert_eq!(from_text, Some(Ok(token)), "header and text parsers agree");
        }
    }
});
