//! S3's profile: any method, path, query, copy source and DeleteObjects body never panic, and
//! what it attributes is consistent: resources are sorted, without repeats, and never empty.
#![no_main]

use std::sync::LazyLock;

use fencegate::profile::keys::KeyMap;
use fencegate::profile::{Changes, Profile, RequestHead};
use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;

static PROFILE: LazyLock<Profile> = LazyLock::new(|| {
    let keys = KeyMap::with_captures(
        "s3:{bucket}/{key}",
        &[("wallets/".into(), "{bucket}:wallet:{segment}".into())],
        fencegate::profile::s3::CAPTURES,
    )
    .expect("a valid key map");
    Profile::S3(keys)
});

const METHODS: [&str; 5] = ["POST", "PUT", "DELETE", "GET", "PATCH"];

fuzz_target!(|data: &[u8]| {
    // The first byte picks the method, the text up to the first newline is the target and the
    // copy source, the rest the body.
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let method = Method::from_bytes(METHODS[usize::from(pick) % METHODS.len()].as_bytes()).unwrap();
    let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let (line, body) = rest.split_at(split);
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    let (target, source) = line.split_once(' ').unwrap_or((line, ""));
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let Ok(path) = fencegate::route::normalise_path(path) else {
        return;
    };
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_str(source)
        && !source.is_empty()
    {
        headers.insert("x-amz-copy-source", value);
    }
    let head = RequestHead {
        method: &method,
        path: &path,
        query,
        headers: &headers,
    };
    let body = if PROFILE.needs_body(&head) { body } else { &[] };
    if let Ok(Changes::Resources(resources)) = PROFILE.changes(&head, body) {
        assert!(!resources.is_empty());
        assert!(resources.windows(2).all(|pair| pair[0] < pair[1]));
    }
});
