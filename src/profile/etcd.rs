//! etcd's v3 JSON gateway (`/v3/kv/put`, `/v3/kv/txn`, …): every write names its keys in the JSON
//! body, base64-encoded, so the path alone says nothing about what a request changes.
//!
//! Each call is read with serde_json into the gateway's own message shapes, accepting both
//! spellings the gateway accepts (`range_end` and `rangeEnd`, `request_put` and `requestPut`).
//! docs/storage.md lists every state-changing endpoint and how it is treated.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;

use super::keys::KeyMap;
use super::{Changes, ProfileError};

/// The most operations, nested transactions included, one request may hold.
const MAX_OPERATIONS: usize = 10_000;

/// How one gateway endpoint is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Put,
    DeleteRange,
    Txn,
    /// Reads, and calls that change no key (leases are granted and kept alive; keys attach to
    /// them only through a fenced put).
    ChangesNoKey,
    /// Changes keys fencegate cannot name: compaction (every key's history), lease revocation
    /// (every key attached to the lease), and everything it does not know.
    Unattributable,
}

/// The endpoint of a path below the gateway's version prefix (`/v3/`, `/v3beta/`, `/v3alpha/`).
fn endpoint(path: &str) -> Endpoint {
    let call = ["/v3/", "/v3beta/", "/v3alpha/"]
        .iter()
        .find_map(|version| path.strip_prefix(version))
        .unwrap_or("");
    match call.trim_end_matches('/') {
        "kv/put" => Endpoint::Put,
        "kv/deleterange" => Endpoint::DeleteRange,
        "kv/txn" => Endpoint::Txn,
        "kv/range"
        | "watch"
        | "lease/grant"
        | "lease/keepalive"
        | "lease/timetolive"
        | "lease/leases"
        | "kv/lease/timetolive"
        | "kv/lease/leases"
        | "maintenance/status" => Endpoint::ChangesNoKey,
        _ => Endpoint::Unattributable,
    }
}

/// Whether a request to `path` needs its body read to know what it changes.
pub fn needs_body(path: &str) -> bool {
    matches!(
        endpoint(path),
        Endpoint::Put | Endpoint::DeleteRange | Endpoint::Txn
    )
}

/// What a request to `path` with `body` changes, as resources of `keys`.
pub fn changes(path: &str, body: &[u8], keys: &KeyMap) -> Result<Changes, ProfileError> {
    let mut writes = Writes::default();
    match endpoint(path) {
        Endpoint::ChangesNoKey => return Ok(Changes::ReadsOnly),
        Endpoint::Unattributable => {
            return Ok(Changes::Unattributable(format!(
                "{path} is not an etcd call whose keys fencegate can name"
            )));
        }
        Endpoint::Put => writes.put(&parse::<Put>(body)?)?,
        Endpoint::DeleteRange => writes.delete(&parse::<Range>(body)?)?,
        Endpoint::Txn => writes.txn(&parse::<Txn>(body)?, 0)?,
    }
    writes.into_changes(keys)
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ProfileError> {
    serde_json::from_slice(body).map_err(|e| ProfileError::Body(e.to_string()))
}

/// A key as the gateway sends it: base64 text.
#[derive(Debug, Default, Deserialize)]
#[serde(transparent)]
struct Key(String);

impl Key {
    fn bytes(&self) -> Result<Vec<u8>, ProfileError> {
        BASE64
            .decode(&self.0)
            .map_err(|e| ProfileError::Body(format!("a key is not base64: {e}")))
    }
}

#[derive(Debug, Default, Deserialize)]
struct Put {
    #[serde(default)]
    key: Key,
}

/// A key or a key range: `DeleteRangeRequest`, and the key part of `Compare` and `RangeRequest`.
#[derive(Debug, Default, Deserialize)]
struct Range {
    #[serde(default)]
    key: Key,
    #[serde(default, alias = "rangeEnd")]
    range_end: Option<Key>,
}

#[derive(Debug, Default, Deserialize)]
struct Txn {
    #[serde(default)]
    compare: Vec<Range>,
    #[serde(default)]
    success: Vec<Op>,
    #[serde(default)]
    failure: Vec<Op>,
}

/// One operation of a transaction; exactly one member is set.
#[derive(Debug, Default, Deserialize)]
struct Op {
    #[serde(default, alias = "requestRange")]
    request_range: Option<serde_json::Value>,
    #[serde(default, alias = "requestPut")]
    request_put: Option<Put>,
    #[serde(default, alias = "requestDeleteRange")]
    request_delete_range: Option<Range>,
    #[serde(default, alias = "requestTxn")]
    request_txn: Option<Txn>,
}

/// The keys and ranges a request writes, gathered before they are mapped to resources.
#[derive(Debug, Default)]
struct Writes {
    ranges: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Compares over a range: they change nothing, but a transaction that depends on keys of
    /// several resources is refused as the contract says, not fenced under one of them.
    compared_ranges: Vec<(Vec<u8>, Vec<u8>)>,
    operations: usize,
}

impl Writes {
    fn count(&mut self) -> Result<(), ProfileError> {
        self.operations += 1;
        if self.operations > MAX_OPERATIONS {
            return Err(ProfileError::TooMany(MAX_OPERATIONS));
        }
        Ok(())
    }

    fn put(&mut self, put: &Put) -> Result<(), ProfileError> {
        self.count()?;
        self.ranges.push((put.key.bytes()?, None));
        Ok(())
    }

    fn delete(&mut self, range: &Range) -> Result<(), ProfileError> {
        self.count()?;
        let end = range.range_end.as_ref().map(Key::bytes).transpose()?;
        self.ranges.push((range.key.bytes()?, end));
        Ok(())
    }

    fn txn(&mut self, txn: &Txn, depth: usize) -> Result<(), ProfileError> {
        if depth > 16 {
            return Err(ProfileError::Body(
                "transactions nested more than 16 deep".into(),
            ));
        }
        for compare in &txn.compare {
            self.count()?;
            if let Some(end) = compare.range_end.as_ref().map(Key::bytes).transpose()? {
                self.compared_ranges.push((compare.key.bytes()?, end));
            }
        }
        for op in txn.success.iter().chain(&txn.failure) {
            let set = [
                op.request_range.is_some(),
                op.request_put.is_some(),
                op.request_delete_range.is_some(),
                op.request_txn.is_some(),
            ];
            if set.iter().filter(|set| **set).count() != 1 {
                return Err(ProfileError::Body(
                    "a transaction operation must hold exactly one request".into(),
                ));
            }
            if let Some(put) = &op.request_put {
                self.put(put)?;
            } else if let Some(range) = &op.request_delete_range {
                self.delete(range)?;
            } else if let Some(nested) = &op.request_txn {
                self.txn(nested, depth + 1)?;
            } else {
                self.count()?;
            }
        }
        Ok(())
    }

    fn into_changes(self, keys: &KeyMap) -> Result<Changes, ProfileError> {
        for (start, end) in &self.compared_ranges {
            if keys.resource_of_range(start, Some(end))?.is_none() {
                return Ok(Changes::Unattributable(
                    "a transaction compares a key range that spans resources".into(),
                ));
            }
        }
        let mut resources = Vec::new();
        for (start, end) in &self.ranges {
            match keys.resource_of_range(start, end.as_deref())? {
                Some(resource) => resources.push(resource),
                None => {
                    return Ok(Changes::Unattributable(
                        "a key range spans several resources".into(),
                    ));
                }
            }
        }
        resources.sort();
        resources.dedup();
        Ok(if resources.is_empty() {
            Changes::ReadsOnly
        } else {
            Changes::Resources(resources)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys() -> KeyMap {
        KeyMap::new(
            "etcd:{key}",
            &[
                ("/wallets/".into(), "wallet:{segment}".into()),
                ("/orders/".into(), "order:{segment}".into()),
            ],
        )
        .unwrap()
    }

    fn b64(key: &str) -> String {
        BASE64.encode(key)
    }

    fn names(path: &str, body: serde_json::Value) -> Result<Vec<String>, String> {
        match changes(path, body.to_string().as_bytes(), &keys()) {
            Ok(Changes::Resources(resources)) => {
                Ok(resources.iter().map(|r| r.to_string()).collect())
            }
            Ok(Changes::ReadsOnly) => Ok(vec![]),
            Ok(Changes::Unattributable(why)) => Err(format!("unattributable: {why}")),
            Err(e) => Err(format!("error: {e}")),
        }
    }

    #[test]
    fn a_put_changes_the_resource_of_its_key() {
        let body = json!({"key": b64("/wallets/1/balance"), "value": b64("120")});
        assert_eq!(
            names("/v3/kv/put", body.clone()),
            Ok(vec!["wallet:1".into()])
        );
        assert_eq!(names("/v3beta/kv/put", body), Ok(vec!["wallet:1".into()]));
        let other = json!({"key": b64("/config/x"), "value": b64("1")});
        assert_eq!(
            names("/v3/kv/put", other),
            Ok(vec!["etcd:/config/x".into()])
        );
    }

    #[test]
    fn a_delete_range_is_one_resource_or_refused() {
        let one = json!({"key": b64("/wallets/1")});
        assert_eq!(
            names("/v3/kv/deleterange", one),
            Ok(vec!["wallet:1".into()])
        );
        let member = json!({"key": b64("/wallets/1/"), "range_end": b64("/wallets/10")});
        assert_eq!(
            names("/v3/kv/deleterange", member),
            Ok(vec!["wallet:1".into()])
        );
        let camel = json!({"key": b64("/wallets/1/"), "rangeEnd": b64("/wallets/10")});
        assert_eq!(
            names("/v3/kv/deleterange", camel),
            Ok(vec!["wallet:1".into()])
        );
        let all_wallets = json!({"key": b64("/wallets/"), "range_end": b64("/wallets0")});
        assert!(
            names("/v3/kv/deleterange", all_wallets)
                .unwrap_err()
                .starts_with("unattributable")
        );
        let everything = json!({"key": "AA==", "range_end": "AA=="});
        assert!(
            names("/v3/kv/deleterange", everything)
                .unwrap_err()
                .starts_with("unattributable")
        );
    }

    #[test]
    fn a_txn_changes_every_key_either_branch_writes() {
        let txn = json!({
            "compare": [{"key": b64("/wallets/1"), "target": "VERSION", "version": "3"}],
            "success": [
                {"request_put": {"key": b64("/wallets/1"), "value": b64("a")}},
                {"requestRange": {"key": b64("/orders/9")}}
            ],
            "failure": [
                {"requestDeleteRange": {"key": b64("/orders/9/items/"), "range_end": b64("/orders/9/items0")}},
                {"request_txn": {"success": [{"requestPut": {"key": b64("/wallets/2"), "value": ""}}]}}
            ]
        });
        assert_eq!(
            names("/v3/kv/txn", txn),
            Ok(vec!["order:9".into(), "wallet:1".into(), "wallet:2".into()])
        );
        let reads_only = json!({"success": [{"request_range": {"key": b64("/wallets/1")}}]});
        assert_eq!(names("/v3/kv/txn", reads_only), Ok(vec![]));
        let wide_compare = json!({
            "compare": [{"key": b64("/wallets/"), "range_end": b64("/wallets0"), "target": "VERSION", "version": "0"}],
            "success": [{"request_put": {"key": b64("/wallets/1"), "value": ""}}]
        });
        assert!(
            names("/v3/kv/txn", wide_compare)
                .unwrap_err()
                .starts_with("unattributable")
        );
    }

    #[test]
    fn calls_that_change_no_key_pass_and_unknown_ones_are_unattributable() {
        for path in [
            "/v3/kv/range",
            "/v3/watch",
            "/v3/lease/grant",
            "/v3/lease/keepalive",
        ] {
            assert_eq!(names(path, json!({})), Ok(vec![]), "{path}");
            assert!(!needs_body(path));
        }
        for path in [
            "/v3/kv/compaction",
            "/v3/lease/revoke",
            "/v3/kv/lease/revoke",
            "/v3/auth/enable",
            "/v3/maintenance/defragment",
            "/v3/cluster/member/add",
            "/v3/kv/frobnicate",
            "/v2/keys/x",
        ] {
            assert!(
                names(path, json!({}))
                    .unwrap_err()
                    .starts_with("unattributable"),
                "{path}"
            );
        }
    }

    #[test]
    fn bodies_that_do_not_parse_are_errors() {
        for body in [
            "not json".to_owned(),
            json!({"key": "not base64!"}).to_string(),
            json!({"success": [{}]}).to_string(),
            json!({"success": [{"request_put": {"key": ""}, "request_range": {}}]}).to_string(),
        ] {
            let path = if body.contains("success") {
                "/v3/kv/txn"
            } else {
                "/v3/kv/put"
            };
            assert!(changes(path, body.as_bytes(), &keys()).is_err(), "{body}");
        }
        let binary_key = json!({"key": BASE64.encode([0xff, 0xfe])});
        assert!(changes("/v3/kv/put", binary_key.to_string().as_bytes(), &keys()).is_err());
    }

    #[test]
    fn work_per_request_is_bounded() {
        let ops: Vec<_> = (0..=MAX_OPERATIONS)
            .map(|i| json!({"request_put": {"key": b64(&format!("/k/{i}")), "value": ""}}))
            .collect();
        let txn = json!({"success": ops});
        assert!(matches!(
            changes("/v3/kv/txn", txn.to_string().as_bytes(), &keys()),
            Err(ProfileError::TooMany(_))
        ));
        let mut nested = json!({"success": []});
        for _ in 0..20 {
            nested = json!({"success": [{"request_txn": nested}]});
        }
        assert!(changes("/v3/kv/txn", nested.to_string().as_bytes(), &keys()).is_err());
    }
}
