//! Path normalisation and routing: never panics; a path that normalises resolves to a non-empty
//! resource on the catch-all table, and a resolved resource is rendered from the path alone
//! (resolving the same path twice gives the same resource). The collection check and the
//! Destination parser take the same input and must not panic either.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use fencegate::config::{Config, Overrides};
use fencegate::route::destination::destination_path;
use fencegate::route::normalise_path;
use http::Method;
use libfuzzer_sys::fuzz_target;

static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    let text = r#"
[[routes]]
path = "/wallets/{id}"
upstream = "http://127.0.0.1:1"
resource = "wallet:{id}"

[[routes]]
path = "/files/{bucket}/{*key}"
upstream = "http://127.0.0.1:1/store"
resource = "file:{bucket}/{key}"

[[routes]]
path = "/{*rest}"
upstream = "http://127.0.0.1:1"
resource = "default"
"#;
    Config::from_toml(text, Path::new("fuzz.toml"), Overrides::default()).expect("a valid config")
});

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let _ = destination_path(raw, Some("fencegate.test"));
    let Ok(path) = normalise_path(raw) else {
        return;
    };
    let first = CONFIG.routes.resolve(&path).map(|r| r.resource.to_string());
    let second = CONFIG.routes.resolve(&path).map(|r| r.resource.to_string());
    assert_eq!(first, second);
    if path.starts_with('/') {
        let resource = first.expect("the catch-all route matches every absolute path");
        assert!(!resource.is_empty());
    }
    if let Some(resolved) = CONFIG.routes.resolve(&path) {
        for method in [Method::DELETE, Method::PUT] {
            let _ = CONFIG.routes.collection_conflict(&path, &resolved, &method);
        }
    }
});
