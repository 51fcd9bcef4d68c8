//! Storage profiles: what a database's HTTP API really changes.
//!
//! A route's path says what a plain file server writes; a database's API often says it elsewhere:
//! etcd's gateway carries every key base64-encoded in a JSON body, CouchDB's `_bulk_docs` writes
//! many documents in one request. A profile reads a request the way its storage will and answers
//! with [`Changes`]: the resources it changes, that it changes none, or that it changes state
//! fencegate cannot attribute (refused, never forwarded under a guess). The gate, the store and the
//! audit log never learn which profile asked: they see resources.
//!
//! A route names its profile with `profile = "…"`; [`Profile`] is what the route keeps. So far:
//! the etcd v3 gateway ([`etcd`]), over the profile-independent key map ([`keys`]).

pub mod etcd;
pub mod keys;

use crate::route::ResourceKey;

/// The profiles a route may name, and what each knows of its storage.
#[derive(Debug, Clone)]
pub enum Profile {
    /// etcd's v3 JSON gateway, its keys mapped to resources.
    EtcdV3(keys::KeyMap),
}

/// The names `profile = "…"` accepts.
pub const PROFILE_NAMES: [&str; 1] = ["etcd-v3"];

impl Profile {
    /// The name the configuration uses.
    pub fn name(&self) -> &'static str {
        match self {
            Profile::EtcdV3(_) => "etcd-v3",
        }
    }

    /// Whether a request to `path` must have its body read before the profile can say what it
    /// changes. Every other body streams.
    pub fn needs_body(&self, path: &str) -> bool {
        match self {
            Profile::EtcdV3(_) => etcd::needs_body(path),
        }
    }

    /// What a request to `path` changes; `body` is empty unless [`Profile::needs_body`].
    pub fn changes(&self, path: &str, body: &[u8]) -> Result<Changes, ProfileError> {
        match self {
            Profile::EtcdV3(keys) => etcd::changes(path, body, keys),
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

/// Why a profile could not read a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("the body is not what the storage's API expects: {0}")]
    Body(String),
    #[error("the request holds more than {0} operations")]
    TooMany(usize),
    #[error(transparent)]
    Key(#[from] keys::KeyError),
}
