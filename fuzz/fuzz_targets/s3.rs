//! S3's profile: any method, path, query, copy source and DeleteObjects body never panic, and
//! what it attributes is consistent: resources are sorted, without repeats, and never empty.
#![no_main]

mod profile_input;

use std::sync::LazyLock;

use fencegate::profile::keys::KeyMap;
use fencegate::profile::{KeyApi, RequestHead, s3};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use profile_input::Input;

static API: LazyLock<KeyApi> = LazyLock::new(|| {
    let keys = KeyMap::with_captures(
        "s3:{bucket}/{key}",
        &[("wallets/".into(), "{bucket}:wallet:{segment}".into())],
        s3::CAPTURES,
    )
    .expect("a valid key map");
    KeyApi::S3(keys)
});

fuzz_target!(|data: &[u8]| {
    // The line is the target (path and query), then after a space the copy source.
    let Some(input) = Input::read(data, &["POST", "PUT", "DELETE", "GET", "PATCH"]) else {
        return;
    };
    let (target, source) = input.line.split_once(' ').unwrap_or((input.line, ""));
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
        method: &input.method,
        path: &path,
        query,
        headers: &headers,
    };
    profile_input::check(&API, &head, input.body);
});
