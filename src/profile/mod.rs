//! Storage profiles: what a database's HTTP API really changes.
//!
//! A route's path says what a plain file server writes; a database's API often says it elsewhere:
//! etcd's gateway carries every key base64-encoded in a JSON body, CouchDB's `_bulk_docs` writes
//! many documents in one request, S3's DeleteObjects lists its keys in XML. A profile reads a
//! request the way its storage will and answers with [`Changes`]: the resources it changes, that it
//! changes none, or that it changes state fencegate cannot attribute (refused, never forwarded
//! under a guess). The gate, the store and the audit log never learn which profile asked: they see
//! resources.
//!
//! One module per storage, each with the same two functions (`needs_body` and `changes`) over a
//! [`RequestHead`]; a new storage is one new module and one arm in each match of [`KeyApi`]. The key map
//! ([`keys`]) that turns a storage's keys into resources is shared by all of them.

pub mod couchdb;
pub mod etcd;
pub mod keys;
pub mod s3;
#[cfg(test)]
mod testing;
pub mod webdav;

use http::{HeaderMap, Method};

use crate::route::ResourceKey;

/// The profiles a route may name, and what each knows of its storage.
#[derive(Debug, Clone)]
pub enum Profile {
    /// A storage whose API names the keys each request changes: the profile reads them.
    Keys(KeyApi),
    /// WebDAV: the route's path template names the resource, as on a route without a profile,
    /// and WebDAV's read-only methods are the route's default `unfenced_methods`.
    WebDav,
}

/// The storage APIs whose keys a profile reads, each with its key map.
#[derive(Debug, Clone)]
pub enum KeyApi {
    /// etcd's v3 JSON gateway.
    EtcdV3(keys::KeyMap),
    /// CouchDB's HTTP API: documents of databases.
    CouchDb(keys::KeyMap),
    /// S3, path-style: objects of buckets.
    S3(keys::KeyMap),
}

/// The names `profile = "…"` accepts.
pub const PROFILE_NAMES: [&str; 4] = ["webdav", "s3", "couchdb", "etcd-v3"];

/// What a profile reads of a request before its body.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Percent-decoded and checked, as routing matched it (`route::normalise_path`).
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Profile {
    /// The name the configuration uses.
    pub fn name(&self) -> &'static str {
        match self {
            Profile::Keys(KeyApi::EtcdV3(_)) => "etcd-v3",
            Profile::Keys(KeyApi::CouchDb(_)) => "couchdb",
            Profile::Keys(KeyApi::S3(_)) => "s3",
            Profile::WebDav => "webdav",
        }
    }

    /// Whether the storage signs the `Host` header, so that it must reach it unchanged.
    pub fn signs_host(&self) -> bool {
        matches!(self, Profile::Keys(KeyApi::S3(_)))
    }
}

impl KeyApi {
    /// Whether a request must have its body read before the profile can say what it changes.
    /// Every other body streams.
    pub fn needs_body(&self, head: &RequestHead<'_>) -> bool {
        match self {
            KeyApi::EtcdV3(_) => etcd::needs_body(head.path),
            KeyApi::CouchDb(_) => couchdb::needs_body(head),
            KeyApi::S3(_) => s3::needs_body(head),
        }
    }

    /// What a request changes; `body` is empty unless [`KeyApi::needs_body`].
    pub fn changes(&self, head: &RequestHead<'_>, body: &[u8]) -> Result<Changes, ProfileError> {
        match self {
            KeyApi::EtcdV3(keys) => etcd::changes(head.path, body, keys),
            KeyApi::CouchDb(keys) => couchdb::changes(head, body, keys),
            KeyApi::S3(keys) => s3::changes(head, body, keys),
        }
    }
}

/// What a request changes, as a profile reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// No resource: a read, or a call that changes no key.
    ReadsOnly,
    /// These resources, sorted and without repeats; the request must pass every one's gate.
    Resources(Vec<ResourceKey>),
    /// State fencegate cannot name as a finite set of resources; why, for the answer.
    Unattributable(String),
}

impl Changes {
    /// The resources of `names`, sorted and without repeats.
    pub fn of(mut names: Vec<ResourceKey>) -> Changes {
        names.sort_unstable();
        names.dedup();
        Changes::Resources(names)
    }
}

/// Why a profile could not read a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("the body is not what the storage's API expects: {0}")]
    Body(String),
    #[error("{0}")]
    Header(String),
    #[error("the request holds more than {0} operations")]
    TooMany(usize),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
}

/// The path's segments after the leading `/`; a trailing slash gives a last empty segment.
fn segments(path: &str) -> Vec<&str> {
    path.strip_prefix('/').unwrap_or(path).split('/').collect()
}

/// Whether the method only reads, in every API fencegate knows: GET, HEAD and OPTIONS.
fn only_reads(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}
