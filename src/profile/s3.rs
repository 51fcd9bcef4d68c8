//! S3, path-style (`/{bucket}/{key}`): objects of buckets, where one request may delete many keys
//! listed in XML (DeleteObjects), a write may read another object (`x-amz-copy-source`), and an
//! object is written in several requests (a multipart upload: create, parts, complete).
//!
//! A route with this profile sits at the storage's root: the first path segment is the bucket and
//! the rest, as the storage decodes it, the key. Its resources are objects, named by the route's
//! `resource` template over `{bucket}` and `{key}` (and `[[routes.keys]]` over the key). The
//! storage must serve path-style requests only: with virtual-hosted addressing the bucket travels
//! in `Host`, and `/a/b` would be key `a/b` of another bucket than the one fenced.
//!
//! SigV4 signs the `Host` header, so this profile forwards it unchanged (the route's
//! `preserve_host`). docs/storage.md lists every state-changing call and how it is treated.

use serde::Deserialize;

use super::keys::{Captures, KeyMap};
use super::{Changes, ProfileError, RequestHead, only_reads, segments};

/// The captures an S3 route's templates may name.
pub const CAPTURES: Captures = Captures {
    key: "key",
    scopes: &["bucket"],
};

/// The header that makes a PUT a copy (CopyObject, UploadPartCopy).
const COPY_SOURCE: &str = "x-amz-copy-source";

/// How one call is treated.
#[derive(Debug, PartialEq, Eq)]
enum Call<'a> {
    Reads,
    /// One object, named in the path: PutObject, CopyObject, DeleteObject, every multipart step,
    /// and the object's own subresources (tagging, ACL, retention, legal hold, restore).
    Object {
        bucket: &'a str,
        key: String,
    },
    /// `POST /{bucket}?delete`: every key in the XML body.
    DeleteObjects {
        bucket: &'a str,
    },
    Unattributable(String),
}

/// Whether a request needs its body read to know what it changes.
pub fn needs_body(head: &RequestHead<'_>) -> bool {
    matches!(call(head), Call::DeleteObjects { .. })
}

/// What a request changes, as resources of `keys`.
pub fn changes(
    head: &RequestHead<'_>,
    body: &[u8],
    keys: &KeyMap,
) -> Result<Changes, ProfileError> {
    match call(head) {
        Call::Reads => Ok(Changes::ReadsOnly),
        Call::Unattributable(why) => Ok(Changes::Unattributable(why)),
        Call::Object { bucket, key } => {
            check_copy_source(head)?;
            Ok(Changes::of(vec![
                keys.resource_in(&[bucket], key.as_bytes())?,
            ]))
        }
        Call::DeleteObjects { bucket } => {
            let delete: Delete = quick_xml::de::from_reader(body)
                .map_err(|e| ProfileError::Body(format!("DeleteObjects: {e}")))?;
            let names = delete
                .objects
                .iter()
                .map(|object| keys.resource_in(&[bucket], object.key.as_bytes()))
                .collect::<Result<Vec<_>, _>>()?;
            if names.is_empty() {
                return Err(ProfileError::Body("DeleteObjects names no object".into()));
            }
            Ok(Changes::of(names))
        }
    }
}

fn call<'a>(head: &RequestHead<'a>) -> Call<'a> {
    let subresources = subresources(head.query);
    let has = |name: &str| subresources.iter().any(|s| s == name);
    let unattributable = |what: &str| {
        Call::Unattributable(format!(
            "{} {} {what}; fencegate cannot name the objects it changes",
            head.method, head.path
        ))
    };
    let segments = segments(head.path);
    let (bucket, key) = match segments.split_first() {
        Some((bucket, key)) if !bucket.is_empty() => (*bucket, key.join("/")),
        _ if only_reads(head.method) => return Call::Reads,
        _ => return unattributable("is a service call"),
    };
    if only_reads(head.method) {
        return Call::Reads;
    }
    let method = head.method.as_str();
    if key.is_empty() {
        return match method {
            "POST" if has("delete") => Call::DeleteObjects { bucket },
            _ => unattributable(
                "changes a bucket (create, delete, policy, lifecycle, a form upload, …)",
            ),
        };
    }
    match method {
        "PUT" | "DELETE" => Call::Object { bucket, key },
        // SelectObjectContent reads; create, complete and restore change the object.
        "POST" if has("select") => Call::Reads,
        "POST" if has("uploads") || has("uploadId") || has("restore") => {
            Call::Object { bucket, key }
        }
        _ => unattributable("is not an S3 call fencegate knows"),
    }
}

/// The names in a query string (`?delete`, `?uploadId=…&partNumber=1`), decoded.
fn subresources(query: Option<&str>) -> Vec<String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(name, _)| name.into_owned())
        .collect()
}

/// A copy reads its source and changes only the object in the path; the source must still be
/// one the storage reads the same way (`bucket/key`, optionally `?versionId=`), or the request is
/// malformed.
fn check_copy_source(head: &RequestHead<'_>) -> Result<(), ProfileError> {
    let mut values = head.headers.get_all(COPY_SOURCE).iter();
    let Some(value) = values.next() else {
        return Ok(());
    };
    let malformed = |why: &str| ProfileError::Header(format!("{COPY_SOURCE}: {why}"));
    if values.next().is_some() {
        return Err(malformed("sent twice"));
    }
    let value = value.to_str().map_err(|_| malformed("not text"))?;
    let source = value.split('?').next().unwrap_or("");
    let source = percent_encoding::percent_decode_str(source)
        .decode_utf8()
        .map_err(|_| malformed("not UTF-8"))?;
    let source = source.strip_prefix('/').unwrap_or(&source);
    match source.split_once('/') {
        Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => Ok(()),
        _ => Err(malformed("must name bucket/key")),
    }
}

/// DeleteObjects' body: `<Delete><Object><Key>…</Key></Object>…<Quiet>…</Quiet></Delete>`.
#[derive(Debug, Deserialize)]
struct Delete {
    #[serde(rename = "Object", default)]
    objects: Vec<Object>,
}

#[derive(Debug, Deserialize)]
struct Object {
    #[serde(rename = "Key")]
    key: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::testing;
    use crate::route::ResourceKey;
    use http::{HeaderMap, Method};

    fn keys() -> KeyMap {
        KeyMap::with_captures(
            "s3:{bucket}/{key}",
            &[("wallets/".into(), "{bucket}:wallet:{segment}".into())],
            CAPTURES,
        )
        .unwrap()
    }

    fn changes_of(
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Changes, ProfileError> {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let map = testing::header_map(headers);
        let head = RequestHead {
            method: &method,
            path,
            query,
            headers: &map,
        };
        let body = if needs_body(&head) { body } else { "" };
        changes(&head, body.as_bytes(), &keys())
    }

    fn names(method: &str, target: &str, body: &str) -> Vec<String> {
        match changes_of(method, target, &[], body).unwrap() {
            Changes::Resources(names) => names.iter().map(|n| n.to_string()).collect(),
            other => panic!("{method} {target}: {other:?}"),
        }
    }

    #[test]
    fn object_writes_change_their_object() {
        assert_eq!(names("PUT", "/bank/wallets/1", ""), ["bank:wallet:1"]);
        assert_eq!(
            names("PUT", "/bank/wallets/1/statement.pdf", ""),
            ["bank:wallet:1"]
        );
        assert_eq!(
            names("DELETE", "/bank/other/key", ""),
            ["s3:bank/other/key"]
        );
        assert_eq!(
            names("PUT", "/bank/dir/", ""),
            ["s3:bank/dir/"],
            "a key may end in /"
        );
        assert_eq!(
            names("PUT", "/bank/wallets/1?tagging", ""),
            ["bank:wallet:1"]
        );
    }

    #[test]
    fn every_step_of_a_multipart_upload_is_fenced_under_its_object() {
        for target in [
            "/bank/wallets/1?uploads",
            "/bank/wallets/1?partNumber=2&uploadId=abc",
            "/bank/wallets/1?uploadId=abc",
        ] {
            let method = if target.contains("partNumber") {
                "PUT"
            } else {
                "POST"
            };
            assert_eq!(names(method, target, ""), ["bank:wallet:1"], "{target}");
        }
        assert_eq!(
            names("DELETE", "/bank/wallets/1?uploadId=abc", ""),
            ["bank:wallet:1"]
        );
    }

    #[test]
    fn only_delete_objects_has_its_body_read() {
        let headers = HeaderMap::new();
        let reads_body = |method: Method, path: &str, query: Option<&str>| {
            needs_body(&RequestHead {
                method: &method,
                path,
                query,
                headers: &headers,
            })
        };
        assert!(reads_body(Method::POST, "/bank", Some("delete")));
        // Objects and parts stream, however large.
        assert!(!reads_body(Method::PUT, "/bank/wallets/1", None));
        assert!(!reads_body(
            Method::PUT,
            "/bank/wallets/1",
            Some("partNumber=1&uploadId=u")
        ));
        assert!(!reads_body(
            Method::POST,
            "/bank/wallets/1",
            Some("uploadId=u")
        ));
    }

    #[test]
    fn delete_objects_changes_every_listed_key() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Object><Key>wallets/2/a</Key></Object>
  <Object><Key>wallets/1</Key><VersionId>v1</VersionId></Object>
  <Object><Key>x &amp; y</Key></Object>
  <Quiet>true</Quiet>
</Delete>"#;
        assert_eq!(
            names("POST", "/bank?delete", body),
            ["bank:wallet:1", "bank:wallet:2", "s3:bank/x & y"]
        );
        assert_eq!(names("POST", "/bank/?delete=", body).len(), 3);
        for bad in [
            "",
            "<Delete><Object></Object></Delete>",
            "<Delete/>",
            "not xml <",
        ] {
            assert!(
                matches!(
                    changes_of("POST", "/bank?delete", &[], bad),
                    Err(ProfileError::Body(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_copy_changes_its_destination_and_needs_a_well_formed_source() {
        let copy =
            |source: &str| changes_of("PUT", "/bank/wallets/2", &[(COPY_SOURCE, source)], "");
        assert_eq!(
            copy("/bank/wallets/1?versionId=3"),
            Ok(Changes::Resources(vec![ResourceKey::new("bank:wallet:2")]))
        );
        assert!(copy("bank/wallets%2F1").is_ok());
        assert!(copy("bank").is_err());
        assert!(copy("/").is_err());
        assert!(copy("bank/").is_err(), "no key");
        assert!(copy("//wallets/1").is_err(), "no bucket");
    }

    #[test]
    fn reads_pass_and_bucket_or_unknown_calls_are_unattributable() {
        for (method, target) in [
            ("GET", "/"),
            ("GET", "/bank?list-type=2"),
            ("HEAD", "/bank/wallets/1"),
            ("OPTIONS", "/bank/wallets/1"),
            ("POST", "/bank/wallets/1?select&select-type=2"),
        ] {
            assert_eq!(
                changes_of(method, target, &[], ""),
                Ok(Changes::ReadsOnly),
                "{target}"
            );
        }
        for (method, target) in [
            ("PUT", "/bank"),
            ("DELETE", "/bank"),
            ("PUT", "/bank?policy"),
            ("PUT", "/bank/?lifecycle"),
            ("POST", "/bank"),
            ("POST", "/bank/wallets/1"),
            ("PATCH", "/bank/wallets/1"),
            ("DELETE", "/"),
            ("POST", "/?delete"),
        ] {
            assert!(
                matches!(
                    changes_of(method, target, &[], ""),
                    Ok(Changes::Unattributable(_))
                ),
                "{method} {target}"
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// What an S3 server writes for a request, from the S3 API reference and independently
        /// of the profile: `Some(objects)`, or `None` for "not objects anyone named" (bucket
        /// calls, a form upload, anything unknown).
        fn model_writes(
            method: &str,
            segments: &[&str],
            query: &str,
            keys: &[&str],
        ) -> Option<Vec<(String, String)>> {
            if ["GET", "HEAD"].contains(&method) {
                return Some(vec![]);
            }
            let (bucket, key) = match segments {
                [bucket, rest @ ..] if !rest.is_empty() && rest != [""] => {
                    (bucket.to_string(), rest.join("/"))
                }
                [bucket] | [bucket, ""] if method == "POST" && query == "delete" => {
                    let written = keys.iter().map(|k| (bucket.to_string(), k.to_string()));
                    return Some(written.collect());
                }
                _ => return None,
            };
            match (method, query) {
                ("PUT" | "DELETE", _) | ("POST", "uploads" | "uploadId=u") => {
                    Some(vec![(bucket, key)])
                }
                ("POST", "select") => Some(vec![]),
                _ => None,
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Whatever the profile lets through is fenced under every object S3 would write.
            #[test]
            fn the_resources_cover_every_object_s3_would_write(
                method in prop::sample::select(vec!["PUT", "DELETE", "POST", "GET", "PATCH"]),
                segments in prop::collection::vec(prop::sample::select(vec!["bank", "wallets", "1", "2", "orders", "", "x"]), 1..5),
                query in prop::sample::select(vec!["", "delete", "uploads", "uploadId=u", "select", "tagging", "policy"]),
                listed in prop::collection::vec(prop::sample::select(vec!["wallets/1", "wallets/2/a", "orders/9", "x"]), 0..4),
            ) {
                // Paths as routing hands them over: no empty segment but a trailing one.
                let segments: Vec<&str> = segments.iter().enumerate()
                    .filter(|(i, s)| !s.is_empty() || *i == segments.len() - 1)
                    .map(|(_, s)| *s).collect();
                let path = format!("/{}", segments.join("/"));
                let objects: String = listed.iter().map(|k| format!("<Object><Key>{k}</Key></Object>")).collect();
                let body = format!("<Delete>{objects}</Delete>");
                let target = if query.is_empty() { path.clone() } else { format!("{path}?{query}") };
                let answer = changes_of(method, &target, &[], &body);
                let model = model_writes(method, &segments, query, &listed);
                let written = model.map(|writes| {
                    writes
                        .iter()
                        .map(|(bucket, key)| keys().resource_in(&[bucket], key.as_bytes()).unwrap())
                        .collect()
                });
                if let Err(why) = testing::keeps_the_fence(&answer, written) {
                    prop_assert!(false, "{method} {target}: {why}");
                }
            }
        }
    }
}
