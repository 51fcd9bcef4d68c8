//! Key prefixes to resources: one key-value store, many independently led keyspaces.
//!
//! A route with a profile names its resources from the keys a request changes. By default each key
//! is its own resource (`resource = "etcd:{key}"`), or the whole store one (`resource = "etcd"`);
//! `[[routes.keys]]` entries carve keyspaces out of it: every key under `prefix = "/wallets/"`
//! belongs to the resource its next path segment names (`resource = "wallet:{segment}"`), so that
//! `/wallets/1/balance` and `/wallets/1/owner` are both `wallet:1`.
//!
//! A request may change a *range* of keys (etcd's `DeleteRange`). A range is attributed to one
//! resource only when every key it can contain belongs to that resource; otherwise it is
//! unattributable, and the request is refused rather than fenced under a guess.

use crate::route::ResourceKey;

/// Why a key or a key map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the key is not UTF-8 text without control characters; fencegate names resources after keys"
    )]
    NotText,
    #[error("{0}")]
    Template(String),
}

/// A resource template over a profile's captures: the key's (`{key}`, `{doc}`), the scope's that
/// hold it (`{bucket}`, `{db}`), or a keyspace member's `{segment}`.
#[derive(Debug, Clone)]
struct Template {
    parts: Vec<Part>,
    text: String,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    /// The index of the capture in the names the template was parsed against.
    Capture(usize),
}

impl Template {
    fn parse(text: &str, names: &[&str]) -> Result<Self, KeyError> {
        if text.is_empty() {
            return Err(KeyError::Template("must not be empty".into()));
        }
        let allowed = || {
            names
                .iter()
                .map(|name| format!("{{{name}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            let (name, after) = rest[open + 1..]
                .split_once('}')
                .ok_or_else(|| KeyError::Template(format!("has an unclosed {{ in {text:?}")))?;
            let index = names.iter().position(|n| *n == name).ok_or_else(|| {
                KeyError::Template(format!("may name only {}, not {{{name}}}", allowed()))
            })?;
            parts.push(Part::Capture(index));
            rest = after;
        }
        if rest.contains('}') {
            return Err(KeyError::Template(format!("has a stray }} in {text:?}")));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        Ok(Self {
            parts,
            text: text.to_owned(),
        })
    }

    /// Renders with `values`, in the order of the names the template was parsed against.
    fn render(&self, values: &[&str]) -> ResourceKey {
        if !self.names_a_capture() {
            return ResourceKey::new(self.text.as_str());
        }
        let mut name = String::with_capacity(self.text.len() + 32);
        for part in &self.parts {
            match part {
                Part::Literal(text) => name.push_str(text),
                Part::Capture(index) => name.push_str(values.get(*index).copied().unwrap_or("")),
            }
        }
        ResourceKey::new(name)
    }

    fn names_a_capture(&self) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Capture(_)))
    }

    /// Whether the template names the capture at `index`.
    fn names(&self, index: usize) -> bool {
        self.parts
            .iter()
            .any(|part| matches!(part, Part::Capture(i) if *i == index))
    }
}

/// The captures a profile's key map renders: the key's own name, and the names of the scopes
/// that hold a key (a bucket, a database), outermost first.
#[derive(Debug, Clone, Copy)]
pub struct Captures {
    pub key: &'static str,
    pub scopes: &'static [&'static str],
}

/// Maps the keys of one key-value store to resources.
#[derive(Debug, Clone)]
pub struct KeyMap {
    /// Longest prefix first, so that the most specific keyspace wins.
    prefixes: Vec<(String, Template)>,
    default: Template,
    /// How many scope captures come before the key's (or the segment's).
    scopes: usize,
}

/// etcd's captures: a key, in no scope.
pub const ETCD_CAPTURES: Captures = Captures {
    key: "key",
    scopes: &[],
};

impl KeyMap {
    /// A map whose keys outside every prefix are named by `default` (over `{key}`), and whose keys
    /// under each `(prefix, template)` by `template` (over `{segment}`).
    pub fn new(default: &str, prefixes: &[(String, String)]) -> Result<Self, KeyError> {
        Self::with_captures(default, prefixes, ETCD_CAPTURES)
    }

    /// A map over `captures`: `default` may name the scopes and the key, each prefix's template
    /// the scopes and `{segment}`.
    pub fn with_captures(
        default: &str,
        prefixes: &[(String, String)],
        captures: Captures,
    ) -> Result<Self, KeyError> {
        let names = |last: &'static str| {
            let mut names = captures.scopes.to_vec();
            names.push(last);
            names
        };
        let default = Template::parse(default, &names(captures.key))?;
        let mut parsed = Vec::with_capacity(prefixes.len());
        for (prefix, template) in prefixes {
            if prefix.is_empty() {
                return Err(KeyError::Template("a key prefix must not be empty".into()));
            }
            parsed.push((
                prefix.clone(),
                Template::parse(template, &names("segment"))?,
            ));
        }
        parsed.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(Self {
            prefixes: parsed,
            default,
            scopes: captures.scopes.len(),
        })
    }

    /// The resource of one key.
    ///
    /// ```
    /// use fencegate::profile::keys::KeyMap;
    ///
    /// let map = KeyMap::new("etcd:{key}", &[("/wallets/".into(), "wallet:{segment}".into())]).unwrap();
    /// assert_eq!(map.resource_of(b"/wallets/1/balance").unwrap().as_str(), "wallet:1");
    /// assert_eq!(map.resource_of(b"/orders/9").unwrap().as_str(), "etcd:/orders/9");
    /// ```
    pub fn resource_of(&self, key: &[u8]) -> Result<ResourceKey, KeyError> {
        self.resource_in(&[], key)
    }

    /// The resource of one key held in the scopes `scope` (a bucket, a database), given in the
    /// order of the map's [`Captures::scopes`].
    pub fn resource_in(&self, scope: &[&str], key: &[u8]) -> Result<ResourceKey, KeyError> {
        let key = text(key)?;
        for value in scope {
            text(value.as_bytes())?;
        }
        let mut values = Vec::with_capacity(self.scopes + 1);
        values.extend((0..self.scopes).map(|i| scope.get(i).copied().unwrap_or("")));
        for (prefix, template) in &self.prefixes {
            if let Some(rest) = key.strip_prefix(prefix.as_str()) {
                // The next path segment; a key equal to its prefix has the empty segment.
                values.push(rest.split('/').next().unwrap_or(""));
                return Ok(template.render(&values));
            }
        }
        values.push(key);
        Ok(self.default.render(&values))
    }

    /// The one resource every key in `[start, end)` belongs to, or `None` when the range can hold
    /// keys of several resources. `end` of `None` is the single key `start`; an `end` of `[0]` is
    /// every key from `start` on (etcd's convention).
    pub fn resource_of_range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Result<Option<ResourceKey>, KeyError> {
        let end = match end {
            None | Some([]) => return self.resource_of(start).map(Some),
            Some([0]) => None,
            Some(end) => Some(end),
        };
        if end.is_some_and(|end| *end == successor(start)) {
            return self.resource_of(start).map(Some);
        }
        if end.is_some_and(|end| end <= start) {
            // An empty range changes nothing; etcd treats it as no keys at all.
            return self.resource_of(start).map(Some);
        }
        // A range from a key that is not text (etcd's `\0`, "from the start") names no resource.
        let Ok(start_text) = text(start) else {
            return Ok(None);
        };
        // Inside one keyspace member: `<prefix><segment>/…` up to the end of that subtree.
        for (prefix, template) in &self.prefixes {
            if let Some(rest) = start_text.strip_prefix(prefix.as_str()) {
                let Some((segment, _)) = rest.split_once('/') else {
                    return Ok(None);
                };
                let subtree = format!("{prefix}{segment}/");
                let limit = prefix_end(subtree.as_bytes());
                return Ok(end
                    .filter(|end| limit.as_deref().is_none_or(|limit| *end <= limit))
                    .map(|_| template.render(&[segment])));
            }
        }
        // Outside every keyspace: one resource only if the default names no key and the range
        // reaches into no keyspace.
        if self.default.names(self.scopes) {
            return Ok(None);
        }
        let overlaps_a_keyspace = self.prefixes.iter().any(|(prefix, _)| {
            let prefix = prefix.as_bytes();
            let after_prefix = prefix_end(prefix);
            let starts_before_its_end = after_prefix.as_deref().is_none_or(|e| start < e);
            let ends_after_its_start = end.is_none_or(|end| end > prefix);
            starts_before_its_end && ends_after_its_start
        });
        Ok((!overlaps_a_keyspace).then(|| self.default.render(&[start_text])))
    }
}

fn text(key: &[u8]) -> Result<&str, KeyError> {
    let key = std::str::from_utf8(key).map_err(|_| KeyError::NotText)?;
    if key.chars().any(char::is_control) {
        return Err(KeyError::NotText);
    }
    Ok(key)
}

/// The smallest key after `key` in byte order: `key` followed by a zero byte.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// The first key after every key that starts with `prefix` (etcd's `--prefix` range end), or
/// `None` if there is none (a prefix of only `0xff` bytes).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> KeyMap {
        KeyMap::new(
            "etcd:{key}",
            &[
                ("/wallets/".into(), "wallet:{segment}".into()),
                ("/wallets/vip/".into(), "vip:{segment}".into()),
                ("/orders/".into(), "orders".into()),
            ],
        )
        .unwrap()
    }

    fn of(map: &KeyMap, start: &str, end: Option<&[u8]>) -> Option<String> {
        map.resource_of_range(start.as_bytes(), end)
            .unwrap()
            .map(|r| r.to_string())
    }

    #[test]
    fn keys_take_the_longest_prefix_and_the_next_segment() {
        let map = map();
        let of = |key: &str| map.resource_of(key.as_bytes()).unwrap().to_string();
        assert_eq!(of("/wallets/1"), "wallet:1");
        assert_eq!(of("/wallets/1/balance"), "wallet:1");
        assert_eq!(of("/wallets/"), "wallet:", "a key equal to its prefix");
        assert_eq!(of("/wallets/vip/7/x"), "vip:7");
        assert_eq!(of("/orders/12"), "orders");
        assert_eq!(of("/other"), "etcd:/other");
        assert_eq!(map.resource_of(b"\xff"), Err(KeyError::NotText));
        assert_eq!(map.resource_of(b"a\nb"), Err(KeyError::NotText));
    }

    #[test]
    fn a_range_inside_one_member_is_that_member() {
        let map = map();
        let end = prefix_end(b"/wallets/1/").unwrap();
        assert_eq!(
            of(&map, "/wallets/1/", Some(&end)).as_deref(),
            Some("wallet:1")
        );
        assert_eq!(
            of(&map, "/wallets/1/a", Some(b"/wallets/1/b")).as_deref(),
            Some("wallet:1")
        );
        assert_eq!(
            of(&map, "/wallets/1", Some(b"/wallets/1\0")).as_deref(),
            Some("wallet:1"),
            "one key"
        );
        assert_eq!(of(&map, "/wallets/1", None).as_deref(), Some("wallet:1"));
    }

    #[test]
    fn a_range_across_members_or_keys_is_unattributable() {
        let map = map();
        // `--prefix /wallets/1` also holds /wallets/10 and /wallets/1x.
        assert_eq!(of(&map, "/wallets/1", Some(b"/wallets/2")), None);
        assert_eq!(
            of(&map, "/wallets/", Some(&prefix_end(b"/wallets/").unwrap())),
            None
        );
        assert_eq!(of(&map, "/wallets/1/", Some(b"/wallets/2/")), None);
        assert_eq!(
            of(&map, "/wallets/1/", Some(&[0])),
            None,
            "to the end of the keyspace"
        );
        assert_eq!(
            of(&map, "/a", Some(b"/b")),
            None,
            "several per-key resources"
        );
        assert_eq!(of(&map, "\0", Some(&[0])), None, "everything");
    }

    #[test]
    fn a_shared_default_resource_owns_ranges_that_reach_into_no_keyspace() {
        let map = KeyMap::new("etcd", &[("/wallets/".into(), "wallet:{segment}".into())]).unwrap();
        assert_eq!(of(&map, "/a", Some(b"/b")).as_deref(), Some("etcd"));
        assert_eq!(of(&map, "/a", Some(b"/x")), None, "reaches /wallets/");
        assert_eq!(
            of(&map, "/x", Some(&[0])).as_deref(),
            Some("etcd"),
            "after every keyspace"
        );
    }

    #[test]
    fn templates_name_only_their_capture() {
        assert!(KeyMap::new("etcd:{segment}", &[]).is_err());
        assert!(KeyMap::new("", &[]).is_err());
        assert!(KeyMap::new("k:{key}", &[("/w/".into(), "w:{key}".into())]).is_err());
        assert!(KeyMap::new("k:{key}", &[("".into(), "w".into())]).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Keys made of the pieces that matter: prefixes, separators, and the bytes around them.
        fn key() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(
                prop::sample::select(vec![
                    "/",
                    "wallets",
                    "vip",
                    "orders",
                    "1",
                    "10",
                    "a",
                    "0",
                    "/wallets/",
                    "/wallets/vip/",
                ]),
                0..5,
            )
            .prop_map(|pieces| pieces.concat().into_bytes())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// A range attributed to one resource holds no key of another: every key a delete of
            /// that range could remove belongs to the resource it was fenced under.
            #[test]
            fn an_attributed_range_holds_only_keys_of_its_resource(
                start in key(),
                end in prop::option::of(key()),
                keys in prop::collection::vec(key(), 1..40),
                shared_default in any::<bool>(),
            ) {
                let default = if shared_default { "etcd" } else { "etcd:{key}" };
                let map = KeyMap::new(default, &[
                    ("/wallets/".into(), "wallet:{segment}".into()),
                    ("/wallets/vip/".into(), "vip:{segment}".into()),
                    ("/orders/".into(), "orders".into()),
                ]).unwrap();
                if let Ok(Some(resource)) = map.resource_of_range(&start, end.as_deref()) {
                    let in_range = |k: &Vec<u8>| match end.as_deref() {
                        None | Some([]) => *k == start,
                        Some([0]) => *k >= start,
                        Some(end) => *k >= start && k.as_slice() < end,
                    };
                    for k in keys.iter().chain([&start]).filter(|k| in_range(k)) {
                        prop_assert_eq!(map.resource_of(k).unwrap(), resource.clone(), "{:?} in {:?}..{:?}", String::from_utf8_lossy(k), String::from_utf8_lossy(&start), end.as_deref().map(String::from_utf8_lossy));
                    }
                }
            }
        }
    }

    #[test]
    fn prefix_ends_follow_etcd() {
        assert_eq!(prefix_end(b"/a/"), Some(b"/a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }
}
