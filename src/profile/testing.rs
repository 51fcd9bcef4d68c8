//! What the profiles' tests share: request heads built from text, and the verdict of a property
//! test that holds a profile's answer against a model of what its storage writes.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Changes, ProfileError};
use crate::route::ResourceKey;

/// Headers from `(name, value)` pairs, in order (a name given twice is appended).
pub(super) fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    map
}

/// Whether a profile's `answer` keeps the fence, given what the storage would write: `Some` of the
/// resources it writes, or `None` when it writes what nobody can name in advance. A request let
/// through must be fenced under every resource written; refusing is always safe.
pub(super) fn keeps_the_fence(
    answer: &Result<Changes, ProfileError>,
    written: Option<Vec<ResourceKey>>,
) -> Result<(), String> {
    match (answer, written) {
        (Ok(Changes::Unattributable(_)) | Err(_), _) => Ok(()),
        (Ok(_), None) => Err("forwarded, but the storage writes what nobody named".into()),
        (Ok(Changes::ReadsOnly), Some(written)) if written.is_empty() => Ok(()),
        (Ok(Changes::ReadsOnly), Some(written)) => Err(format!("writes {written:?} unfenced")),
        (Ok(Changes::Resources(fenced)), Some(written)) => {
            match written.iter().find(|resource| !fenced.contains(resource)) {
                Some(unfenced) => Err(format!(
                    "{unfenced} is written but fenced are only {fenced:?}"
                )),
                None => Ok(()),
            }
        }
    }
}
