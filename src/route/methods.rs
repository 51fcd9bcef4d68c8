//! Which methods can change state, and which spellings of a method are refused.
//!
//! fencegate denies by default: every method is fenced unless a route lists it in
//! `unfenced_methods`, and a route may list only methods that cannot change state. WebDAV alone
//! adds six write methods to HTTP's four, and storage is free to invent more, so a list of writes
//! would always be one method short; a list of reads is not.

use http::Method;

/// The methods a route leaves unfenced when the config does not say.
pub const DEFAULT_UNFENCED_METHODS: [Method; 3] = [Method::GET, Method::HEAD, Method::OPTIONS];

/// The only methods a route may leave unfenced: RFC 9110's safe methods and the read methods of
/// WebDAV (PROPFIND, RFC 4918), DeltaV (REPORT, RFC 3253) and DASL (SEARCH, RFC 5323). None of
/// them changes state on a server that follows its RFC.
pub const SAFE_METHODS: [&str; 7] = [
    "GET", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "REPORT", "SEARCH",
];

/// Methods that HTTP, WebDAV and its extensions define, in their registered (upper-case) spelling.
/// A request that spells one of them in another case is refused: methods are case-sensitive
/// (RFC 9110 §9.1), but storage frameworks that upper-case the method would run `put` as PUT.
const REGISTERED_METHODS: [&str; 36] = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "SEARCH",
    "REPORT",
    "MKCALENDAR",
    "MKREDIRECTREF",
    "UPDATEREDIRECTREF",
    "ACL",
    "BIND",
    "UNBIND",
    "REBIND",
    "VERSION-CONTROL",
    "CHECKOUT",
    "CHECKIN",
    "UNCHECKOUT",
    "MKWORKSPACE",
    "UPDATE",
    "LABEL",
    "MERGE",
    "MKACTIVITY",
    "BASELINE-CONTROL",
    "ORDERPATCH",
];

/// Whether `name` (upper case) is a method that cannot change state.
pub fn is_safe(name: &str) -> bool {
    SAFE_METHODS.contains(&name)
}

/// The registered method that `method` spells in another case, if it does (`put` → `PUT`).
///
/// ```
/// use fencegate::route::methods::case_variant_of;
/// use http::Method;
///
/// let put = Method::from_bytes(b"pUt").unwrap();
/// assert_eq!(case_variant_of(&put), Some("PUT"));
/// assert_eq!(case_variant_of(&Method::PUT), None);
/// assert_eq!(case_variant_of(&Method::from_bytes(b"frobnicate").unwrap()), None);
/// ```
pub fn case_variant_of(method: &Method) -> Option<&'static str> {
    let name = method.as_str();
    // Every registered method is upper case, so the common case costs one scan of a short name.
    if !name.bytes().any(|byte| byte.is_ascii_lowercase()) {
        return None;
    }
    REGISTERED_METHODS
        .into_iter()
        .find(|registered| registered.eq_ignore_ascii_case(name))
}

/// Whether a request with `method` on a collection only creates or changes the collection
/// itself, never anything below it. MKCOL fails on a name that exists, so it can create an empty
/// collection but never touch a member.
pub fn touches_only_its_target(method: &Method) -> bool {
    method.as_str() == "MKCOL"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_variant_of_a_registered_method_is_found() {
        for name in [
            "put", "Put", "pAtCh", "delete", "mkcol", "Move", "copy", "lock",
        ] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            let registered = case_variant_of(&method).unwrap();
            assert!(registered.eq_ignore_ascii_case(name), "{name}");
        }
    }

    #[test]
    fn registered_spellings_and_unknown_methods_are_not_case_variants() {
        for name in REGISTERED_METHODS {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            assert_eq!(case_variant_of(&method), None, "{name}");
        }
        let extension = Method::from_bytes(b"frobnicate").unwrap();
        assert_eq!(case_variant_of(&extension), None);
    }

    #[test]
    fn only_reads_are_safe() {
        for name in SAFE_METHODS {
            assert!(is_safe(name));
        }
        for name in [
            "POST",
            "PUT",
            "PATCH",
            "DELETE",
            "MKCOL",
            "PROPPATCH",
            "COPY",
            "MOVE",
            "LOCK",
            "UNLOCK",
            "FROB",
            "get",
        ] {
            assert!(!is_safe(name), "{name}");
        }
    }
}
