//! etcd's v3 gateway profile: any body, for every endpoint that reads one, never panics, and what
//! it attributes is consistent: resources are sorted, without repeats, and never empty.
#![no_main]

use std::sync::LazyLock;

use fencegate::profile::keys::KeyMap;
use fencegate::profile::{Changes, etcd};
use libfuzzer_sys::fuzz_target;

static KEYS: LazyLock<KeyMap> = LazyLock::new(|| {
    KeyMap::new(
        "etcd:{key}",
        &[
            ("/wallets/".into(), "wallet:{segment}".into()),
            ("/orders/".into(), "orders".into()),
        ],
    )
    .expect("a valid key map")
});

fuzz_target!(|data: &[u8]| {
    for path in ["/v3/kv/put", "/v3/kv/deleterange", "/v3/kv/txn"] {
        if let Ok(Changes::Resources(resources)) = etcd::changes(path, data, &KEYS) {
            assert!(!resources.is_empty());
            assert!(resources.windows(2).all(|pair| pair[0] < pair[1]));
        }
    }
});
