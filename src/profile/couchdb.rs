//! CouchDB's HTTP API (also spoken by PouchDB Server): documents of databases, where one request
//! may write many documents (`_bulk_docs`), name its document in the body (`POST /{db}`) or in a
//! header (`COPY` with `Destination`), and where `_`-endpoints do everything from reading to
//! purging history.
//!
//! A route with this profile sits at the storage's root: the first path segment is the database.
//! Its resources are documents, named by the route's `resource` template over `{db}` and `{doc}`
//! (and `[[routes.keys]]` over the document id). Design documents are `_design/NAME`, local ones
//! `_local/NAME`. docs/storage.md lists every state-changing endpoint and how it is treated.

use serde::Deserialize;

use super::keys::{Captures, KeyMap};
use super::{Changes, ProfileError, RequestHead, only_reads, segments};

/// The captures a CouchDB route's templates may name.
pub const CAPTURES: Captures = Captures {
    key: "doc",
    scopes: &["db"],
};

/// Server-level endpoints whose non-read calls change no document.
const SERVER_CALLS_THAT_CHANGE_NO_DOCUMENT: [&str; 4] =
    ["_session", "_dbs_info", "_search_analyze", "_uuids"];

/// Databases whose names start with `_` but hold documents like any other.
const SYSTEM_DATABASES: [&str; 3] = ["_users", "_replicator", "_global_changes"];

/// Database endpoints that read, whatever the method (queries are sent as POST bodies).
const DATABASE_READS: [&str; 12] = [
    "_all_docs",
    "_design_docs",
    "_local_docs",
    "_find",
    "_explain",
    "_changes",
    "_bulk_get",
    "_revs_diff",
    "_missing_revs",
    "_ensure_full_commit",
    "_shards",
    "_sync_shards",
];

/// Design-document endpoints that read (views and show/list functions run queries).
const DESIGN_READS: [&str; 7] = [
    "_view",
    "_show",
    "_list",
    "_info",
    "_search",
    "_search_info",
    "_nouveau",
];

/// How one call is treated.
#[derive(Debug, PartialEq, Eq)]
enum Call<'a> {
    Reads,
    /// One document of a database, named in the path.
    Document {
        db: &'a str,
        doc: String,
    },
    /// `POST /{db}`: one new document, named by the body's `_id`.
    NewDocument {
        db: &'a str,
    },
    /// `POST /{db}/_bulk_docs`: every document in the body.
    Bulk {
        db: &'a str,
    },
    /// `COPY /{db}/{doc}`: the document the `Destination` header names.
    Copy {
        db: &'a str,
    },
    Unattributable(String),
}

/// Whether a request needs its body read to know what it changes.
pub fn needs_body(head: &RequestHead<'_>) -> bool {
    matches!(call(head), Call::NewDocument { .. } | Call::Bulk { .. })
}

/// What a request changes, as resources of `keys`.
pub fn changes(
    head: &RequestHead<'_>,
    body: &[u8],
    keys: &KeyMap,
) -> Result<Changes, ProfileError> {
    let resource = |db: &str, doc: &str| keys.resource_in(&[db], doc.as_bytes());
    match call(head) {
        Call::Reads => Ok(Changes::ReadsOnly),
        Call::Unattributable(why) => Ok(Changes::Unattributable(why)),
        Call::Document { db, doc } => Ok(Changes::of(vec![resource(db, &doc)?])),
        Call::Copy { db } => {
            let doc = destination(head)?;
            Ok(Changes::of(vec![resource(db, &doc)?]))
        }
        Call::NewDocument { db } => {
            let document: Document = parse(body)?;
            match document.id {
                Some(doc) => Ok(Changes::of(vec![resource(db, &doc)?])),
                None => Ok(Changes::Unattributable(
                    "a document without _id gets an id fencegate cannot know in advance; \
                     send its _id, or PUT /{db}/{id}"
                        .into(),
                )),
            }
        }
        Call::Bulk { db } => {
            let bulk: Bulk = parse(body)?;
            let mut names = Vec::with_capacity(bulk.docs.len());
            for document in &bulk.docs {
                let Some(doc) = &document.id else {
                    return Ok(Changes::Unattributable(
                        "a _bulk_docs document without _id gets an id fencegate cannot know in \
                         advance; give every document its _id"
                            .into(),
                    ));
                };
                names.push(resource(db, doc)?);
            }
            if names.is_empty() {
                return Ok(Changes::ReadsOnly);
            }
            Ok(Changes::of(names))
        }
    }
}

fn call<'a>(head: &RequestHead<'a>) -> Call<'a> {
    if only_reads(head.method) {
        return Call::Reads;
    }
    let segments = segments(head.path);
    let unattributable = |what: &str| {
        Call::Unattributable(format!(
            "{} {} {what}; fencegate cannot name the documents it changes",
            head.method, head.path
        ))
    };
    let (db, rest) = match segments.split_first() {
        Some((db, rest)) if !db.is_empty() => (*db, rest),
        _ => return unattributable("is a server call"),
    };
    if db.starts_with('_') && !SYSTEM_DATABASES.contains(&db) {
        if rest.is_empty() && SERVER_CALLS_THAT_CHANGE_NO_DOCUMENT.contains(&db) {
            return Call::Reads;
        }
        return unattributable("is a server call (replication, configuration, …)");
    }
    // A trailing slash is the same call: `/db/` is `/db`, `/db/doc/` is `/db/doc`.
    let rest = match rest {
        [before @ .., ""] => before,
        rest => rest,
    };
    match rest {
        [] if *head.method == http::Method::POST => Call::NewDocument { db },
        [] => unattributable("creates, deletes or changes a whole database"),
        ["_bulk_docs"] if *head.method == http::Method::POST => Call::Bulk { db },
        [endpoint] | [endpoint, "queries"] if DATABASE_READS.contains(endpoint) => Call::Reads,
        ["_design", name, rest @ ..] => design_document(head, db, name, rest),
        ["_local", name] => document(head, db, format!("_local/{name}")),
        [doc, ..] if !doc.starts_with('_') => document(head, db, (*doc).to_owned()),
        [endpoint, ..] => unattributable(&format!(
            "is {endpoint}, which changes more than documents it names (purge, compaction, \
             security, indexes) or is unknown"
        )),
    }
}

/// A call on `/{db}/{doc}` or below it (an attachment): the document, or for COPY its destination.
fn document<'a>(head: &RequestHead<'a>, db: &'a str, doc: String) -> Call<'a> {
    if head.method.as_str() == "COPY" {
        Call::Copy { db }
    } else {
        Call::Document { db, doc }
    }
}

fn design_document<'a>(head: &RequestHead<'a>, db: &'a str, name: &str, rest: &[&str]) -> Call<'a> {
    match rest.first() {
        Some(endpoint) if DESIGN_READS.contains(endpoint) => Call::Reads,
        Some(endpoint) if endpoint.starts_with('_') => Call::Unattributable(format!(
            "{} {}: design function {endpoint} may write any document; fencegate cannot name it",
            head.method, head.path
        )),
        // The design document itself, or one of its attachments.
        _ => document(head, db, format!("_design/{name}")),
    }
}

/// The document id a COPY's `Destination` names: `id` or `id?rev=…`, percent-encoded.
fn destination(head: &RequestHead<'_>) -> Result<String, ProfileError> {
    let mut values = head.headers.get_all("destination").iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(ProfileError::Header(
            "a COPY needs exactly one Destination header naming the new document".into(),
        ));
    };
    let value = value
        .to_str()
        .map_err(|_| ProfileError::Header("the Destination header is not text".into()))?;
    let id = value.split('?').next().unwrap_or("");
    let id = percent_encoding::percent_decode_str(id)
        .decode_utf8()
        .map_err(|_| ProfileError::Header("the Destination header is not UTF-8".into()))?;
    if id.is_empty() {
        return Err(ProfileError::Header(
            "the Destination header names no document".into(),
        ));
    }
    Ok(id.into_owned())
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ProfileError> {
    serde_json::from_slice(body).map_err(|e| ProfileError::Body(e.to_string()))
}

/// A document as far as fencing reads it: its id, if it has one. CouchDB refuses an `_id` that
/// is not a string, and so does fencegate.
#[derive(Debug, Deserialize)]
struct Document {
    #[serde(rename = "_id", default)]
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Bulk {
    docs: Vec<Document>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::testing;
    use crate::route::ResourceKey;
    use http::{HeaderMap, Method};

    fn keys() -> KeyMap {
        KeyMap::with_captures(
            "couch:{db}/{doc}",
            &[("wallet:".into(), "{db}:wallet:{segment}".into())],
            CAPTURES,
        )
        .unwrap()
    }

    fn changes_of(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Changes, ProfileError> {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let map = testing::header_map(headers);
        let head = RequestHead {
            method: &method,
            path,
            query: None,
            headers: &map,
        };
        let body = if needs_body(&head) { body } else { "" };
        changes(&head, body.as_bytes(), &keys())
    }

    fn names(method: &str, path: &str, body: &str) -> Vec<String> {
        match changes_of(method, path, &[], body).unwrap() {
            Changes::Resources(names) => names.iter().map(|n| n.to_string()).collect(),
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    fn is_unattributable(method: &str, path: &str, body: &str) -> bool {
        matches!(
            changes_of(method, path, &[], body),
            Ok(Changes::Unattributable(_))
        )
    }

    #[test]
    fn a_document_write_changes_that_document() {
        assert_eq!(names("PUT", "/bank/wallet:1", ""), ["bank:wallet:1"]);
        assert_eq!(names("DELETE", "/bank/wallet:1/", ""), ["bank:wallet:1"]);
        assert_eq!(names("PUT", "/bank/other", ""), ["couch:bank/other"]);
        assert_eq!(
            names("PUT", "/bank/wallet:1/receipt.pdf", ""),
            ["bank:wallet:1"],
            "an attachment belongs to its document"
        );
        assert_eq!(
            names("PUT", "/bank/_design/app", ""),
            ["couch:bank/_design/app"]
        );
        assert_eq!(
            names("PUT", "/bank/_design/app/logo.png", ""),
            ["couch:bank/_design/app"]
        );
        assert_eq!(
            names("DELETE", "/bank/_local/cp", ""),
            ["couch:bank/_local/cp"]
        );
        assert_eq!(
            names("PUT", "/_users/org.couchdb.user:x", ""),
            ["couch:_users/org.couchdb.user:x"]
        );
    }

    #[test]
    fn bulk_docs_changes_every_document_in_the_body() {
        let body = r#"{"docs":[{"_id":"wallet:2","v":1},{"_id":"wallet:1","_deleted":true},{"_id":"x"},{"_id":"wallet:1"}]}"#;
        assert_eq!(
            names("POST", "/bank/_bulk_docs", body),
            ["bank:wallet:1", "bank:wallet:2", "couch:bank/x"]
        );
        let body = r#"{"docs":[{"_id":"a"},{"v":2}]}"#;
        assert!(
            is_unattributable("POST", "/bank/_bulk_docs", body),
            "a doc without _id"
        );
        assert_eq!(
            changes_of("POST", "/bank/_bulk_docs", &[], r#"{"docs":[]}"#),
            Ok(Changes::ReadsOnly)
        );
    }

    #[test]
    fn only_calls_that_name_documents_in_the_body_have_it_read() {
        let headers = HeaderMap::new();
        let reads_body = |method: Method, path: &str| {
            needs_body(&RequestHead {
                method: &method,
                path,
                query: None,
                headers: &headers,
            })
        };
        assert!(reads_body(Method::POST, "/bank"));
        assert!(reads_body(Method::POST, "/bank/_bulk_docs"));
        // A document or an attachment streams, however large.
        assert!(!reads_body(Method::PUT, "/bank/wallet:1"));
        assert!(!reads_body(Method::PUT, "/bank/wallet:1/scan.pdf"));
        assert!(!reads_body(Method::POST, "/bank/_find"));
        assert!(!reads_body(Method::GET, "/bank"));
    }

    #[test]
    fn a_new_document_is_named_by_its_id() {
        assert_eq!(
            names("POST", "/bank", r#"{"_id":"wallet:3"}"#),
            ["bank:wallet:3"]
        );
        assert!(is_unattributable("POST", "/bank", r#"{"v":1}"#));
    }

    #[test]
    fn copy_changes_its_destination() {
        let copy = |destination: &str| {
            changes_of(
                "COPY",
                "/bank/wallet:1",
                &[("destination", destination)],
                "",
            )
        };
        assert_eq!(
            copy("wallet:2?rev=1-abc"),
            Ok(Changes::Resources(vec![ResourceKey::new("bank:wallet:2")]))
        );
        assert_eq!(
            copy("wallet%3A9"),
            Ok(Changes::Resources(vec![ResourceKey::new("bank:wallet:9")]))
        );
        assert!(copy("").is_err());
        assert!(changes_of("COPY", "/bank/wallet:1", &[], "").is_err());
    }

    #[test]
    fn reads_pass_whatever_the_method() {
        for (method, path) in [
            ("GET", "/bank/wallet:1"),
            ("HEAD", "/bank"),
            ("POST", "/bank/_all_docs"),
            ("POST", "/bank/_find"),
            ("POST", "/bank/_changes"),
            ("POST", "/bank/_bulk_get"),
            ("POST", "/bank/_revs_diff"),
            ("POST", "/bank/_design/app/_view/by_owner"),
            ("POST", "/_session"),
            ("DELETE", "/_session"),
        ] {
            assert_eq!(
                changes_of(method, path, &[], ""),
                Ok(Changes::ReadsOnly),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn what_cannot_be_named_is_unattributable() {
        for (method, path) in [
            ("POST", "/bank/_purge"),
            ("POST", "/bank/_compact"),
            ("POST", "/bank/_view_cleanup"),
            ("PUT", "/bank/_security"),
            ("PUT", "/bank/_revs_limit"),
            ("POST", "/bank/_index"),
            ("POST", "/bank/_unknown"),
            ("PUT", "/bank/_design/app/_update/fn/wallet:1"),
            ("POST", "/bank/_design/app/_rewrite/x"),
            ("PUT", "/bank"),
            ("DELETE", "/bank"),
            ("DELETE", "/bank/"),
            ("POST", "/_replicate"),
            ("PUT", "/_node/_local/_config/x/y"),
            ("POST", "/"),
        ] {
            assert!(is_unattributable(method, path, ""), "{method} {path}");
        }
    }

    #[test]
    fn bodies_that_do_not_parse_are_errors() {
        for body in ["", "[]", r#"{"docs":{}}"#, r#"{"docs":[{"_id":1}]}"#] {
            assert!(
                matches!(
                    changes_of("POST", "/bank/_bulk_docs", &[], body),
                    Err(ProfileError::Body(_))
                ),
                "{body}"
            );
        }
        assert!(matches!(
            changes_of("POST", "/bank", &[], r#"{"_id":["x"]}"#),
            Err(ProfileError::Body(_))
        ));
        // A key given twice: the storage may read either, so fencegate reads neither.
        for (path, body) in [
            ("/bank", r#"{"_id":"x","_id":"wallet:1"}"#),
            (
                "/bank/_bulk_docs",
                r#"{"docs":[{"_id":"x","_id":"wallet:1"}]}"#,
            ),
            (
                "/bank/_bulk_docs",
                r#"{"docs":[{"_id":"x"}],"docs":[{"_id":"wallet:1"}]}"#,
            ),
        ] {
            assert!(
                matches!(
                    changes_of("POST", path, &[], body),
                    Err(ProfileError::Body(_))
                ),
                "{body}"
            );
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// What CouchDB itself would write for a request, written from its documentation and
        /// independently of the profile: `Some(documents)`, or `None` for "documents nobody can
        /// name in advance" (purge, replication, a generated id, a design function).
        fn model_writes(
            method: &str,
            segments: &[&str],
            docs: &[Option<String>],
            destination: &str,
        ) -> Option<Vec<(String, String)>> {
            let reads = ["GET", "HEAD"].contains(&method);
            // A COPY writes the document its Destination names, whichever it copies.
            let written = |db: &str, doc: String| {
                let doc = if method == "COPY" {
                    destination.to_owned()
                } else {
                    doc
                };
                Some(vec![(db.to_owned(), doc)])
            };
            match segments {
                _ if reads => Some(vec![]),
                [db, "_bulk_docs"] if method == "POST" => docs
                    .iter()
                    .map(|id| id.clone().map(|id| (db.to_string(), id)))
                    .collect(),
                [db] if method == "POST" => match docs.first() {
                    Some(Some(id)) => Some(vec![(db.to_string(), id.clone())]),
                    _ => None,
                },
                [_, "_all_docs" | "_find" | "_changes"] => Some(vec![]),
                // A design document, or one of its attachments (whose names may hold `/`).
                [db, "_design", name, rest @ ..]
                    if rest.first().is_none_or(|a| !a.starts_with('_')) =>
                {
                    written(db, format!("_design/{name}"))
                }
                [db, "_local", name] => written(db, format!("_local/{name}")),
                // A document, or one of its attachments.
                [db, doc, ..] if !doc.starts_with('_') => written(db, doc.to_string()),
                _ => None,
            }
        }

        fn segment() -> impl Strategy<Value = &'static str> {
            prop::sample::select(vec![
                "bank",
                "_bulk_docs",
                "_purge",
                "_design",
                "_local",
                "app",
                "wallet:1",
                "wallet:2",
                "x",
                "_all_docs",
                "_find",
                "_changes",
                "_update",
                "att",
                "logo",
                "_compact",
                "_security",
            ])
        }

        fn id() -> impl Strategy<Value = Option<String>> {
            prop::option::weighted(
                0.9,
                prop::sample::select(vec!["wallet:1", "wallet:2", "wallet:10", "x", "_design/d"])
                    .prop_map(str::to_owned),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// Whatever the profile lets through is fenced under every document CouchDB would
            /// write; and what nobody can name is never let through.
            #[test]
            fn the_resources_cover_every_document_couchdb_would_write(
                method in prop::sample::select(vec!["PUT", "DELETE", "POST", "COPY", "GET"]),
                segments in prop::collection::vec(segment(), 1..4),
                docs in prop::collection::vec(id(), 0..5),
                destination in prop::sample::select(vec!["wallet:1", "wallet:3", "x"]),
            ) {
                let path = format!("/{}", segments.join("/"));
                let body = if segments.len() == 1 {
                    match docs.first().cloned().flatten() {
                        Some(id) => serde_json::json!({"_id": id}),
                        None => serde_json::json!({"v": 1}),
                    }
                } else {
                    let docs: Vec<_> = docs.iter().map(|id| match id {
                        Some(id) => serde_json::json!({"_id": id}),
                        None => serde_json::json!({"v": 1}),
                    }).collect();
                    serde_json::json!({"docs": docs})
                };
                let answer = changes_of(method, &path, &[("destination", destination)], &body.to_string());
                let model = model_writes(method, &segments, &docs, destination);
                let written = model.map(|writes| {
                    writes
                        .iter()
                        .map(|(db, doc)| keys().resource_in(&[db], doc.as_bytes()).unwrap())
                        .collect()
                });
                if let Err(why) = testing::keeps_the_fence(&answer, written) {
                    prop_assert!(false, "{method} {path}: {why}");
                }
            }
        }
    }
}
