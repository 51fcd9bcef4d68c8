//! CouchDB's profile: any method, path, Destination and body never panic, and what it attributes
//! is consistent: resources are sorted, without repeats, and never empty.
#![no_main]

mod profile_input;

use std::sync::LazyLock;

use fencegate::profile::keys::KeyMap;
use fencegate::profile::{KeyApi, RequestHead, couchdb};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use profile_input::Input;

static API: LazyLock<KeyApi> = LazyLock::new(|| {
    let keys = KeyMap::with_captures(
        "couch:{db}/{doc}",
        &[("wallet:".into(), "{db}:wallet:{segment}".into())],
        couchdb::CAPTURES,
    )
    .expect("a valid key map");
    KeyApi::CouchDb(keys)
});

fuzz_target!(|data: &[u8]| {
    // The line is the path, then after a space the Destination header.
    let Some(input) = Input::read(data, &["POST", "PUT", "DELETE", "COPY", "GET", "PATCH"]) else {
        return;
    };
    let (path, destination) = input.line.split_once(' ').unwrap_or((input.line, "x"));
    let Ok(path) = fencegate::route::normalise_path(path) else {
        return;
    };
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(destination) {
        headers.insert("destination", value);
    }
    let head = RequestHead {
        method: &input.method,
        path: &path,
        query: None,
        headers: &headers,
    };
    profile_input::check(&API, &head, input.body);
});
