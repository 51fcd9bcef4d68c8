//! Storage profiles: what a database's HTTP API really changes.
//!
//! A route's path says what a plain file server writes; a database's API often says it elsewhere:
//! etcd's gateway carries every key base64-encoded in a JSON body, CouchDB's `_bulk_docs` writes
//! many documents in one request. A profile reads a request the way its storage will and answers
//! with [`Changes`]: the resources it changes, that it changes none, or that it changes state
//! fencegate cannot attribute (refused, never forwarded under a guess). The gate, the store and the
//! audit log never learn which profile asked: they see resources.
//!
//! This step holds the profile-independent key map ([`keys`]) and the etcd v3 gateway ([`etcd`]),
//! each pure and tested on its own; routes take them up in the step that wires profiles into the
//! configuration and the proxy (issue 14).

pub mod etcd;
pub mod keys;

use crate::route::ResourceKey;

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
