//! Case-insensitive comparison of the protocol's words (header names, `close`, `chunked`,
//! `100-continue`) with the lowercase spelling fencegate knows them by, a word at a time.
//!
//! Every request and every answer compares a few names in full (`Fencing-Token`,
//! `Content-Length`, `Connection` and its `keep-alive`): byte by byte, lowercasing both sides,
//! that was about 380 instructions of a fenced PUT's 22,000 (`bench/instructions.sh`).

/// Bit 0x20 of every byte: set, it lowercases an ASCII letter.
const FOLD: u64 = 0x2020_2020_2020_2020;

/// Whether `bytes` spells `known` in any case.
///
/// `known` is lowercase letters, digits and `-`, the bytes that have bit 0x20 set already, so
/// setting that bit in `bytes` is all the folding needed: it lowercases a letter and leaves
/// every other byte of a header name or value as it is, or makes it something `known` cannot
/// hold. The exception is a control character (`\r` would become `-`): `bytes` must come from a
/// parsed head or a `HeaderValue`, which hold none but the tab (it becomes `)`).
#[inline]
pub(crate) fn eq_lowercase(bytes: &[u8], known: &[u8]) -> bool {
    debug_assert!(
        known
            .iter()
            .all(|&k| k.is_ascii_lowercase() || k.is_ascii_digit() || k == b'-'),
        "{known:?} is not lowercase letters, digits and -"
    );
    let n = bytes.len();
    if n != known.len() {
        return false;
    }
    if n >= 8 {
        // Eight bytes at a time, the last eight overlapping the word before.
        let word = |s: &[u8], at: usize| u64::from_le_bytes(eight(&s[at..]));
        let mut at = 0;
        while at + 8 < n {
            if word(bytes, at) | FOLD != word(known, at) {
                return false;
            }
            at += 8;
        }
        word(bytes, n - 8) | FOLD == word(known, n - 8)
    } else if n >= 4 {
        let word = |s: &[u8], at: usize| u32::from_le_bytes(four(&s[at..]));
        let fold = FOLD as u32;
        word(bytes, 0) | fold == word(known, 0) && word(bytes, n - 4) | fold == word(known, n - 4)
    } else {
        bytes.iter().zip(known).all(|(&b, &k)| b | 0x20 == k)
    }
}

fn eight(bytes: &[u8]) -> [u8; 8] {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[..8]);
    word
}

fn four(bytes: &[u8]) -> [u8; 4] {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[..4]);
    word
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every word fencegate compares this way.
    const KNOWN: &[&str] = &[
        "a",
        "te",
        "100",
        "date",
        "close",
        "expect",
        "chunked",
        "upgrade",
        "trailer",
        "location",
        "x-http-m",
        "connection",
        "keep-alive",
        "x-request-id",
        "100-continue",
        "fencing-token",
        "content-length",
        "x-method-override",
        "proxy-connection",
        "content-location",
        "transfer-encoding",
        "fencegate-replica",
        "proxy-authenticate",
        "proxy-authorization",
        "fencing-token-highest-2",
        "x-http-method-override",
        "fencing-token-highest",
    ];

    /// The bytes a parsed header name or value may hold: tab, and everything from space up.
    fn parsed_bytes() -> impl Iterator<Item = u8> {
        std::iter::once(b'\t').chain(0x20..=0xff)
    }

    /// The words above, and one of every length up to 40: each path through the comparison (under
    /// four bytes, four to seven, one word of eight, several with the last overlapping).
    fn known_words() -> impl Iterator<Item = Vec<u8>> {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz-0123456789";
        let every_length = (1..=40).map(|n| ALPHABET.iter().cycle().take(n).copied().collect());
        KNOWN
            .iter()
            .map(|known| known.as_bytes().to_vec())
            .chain(every_length)
    }

    #[test]
    fn agrees_with_a_byte_by_byte_comparison_for_every_byte_at_every_place() {
        for known in known_words() {
            let known = known.as_slice();
            assert!(eq_lowercase(known, known));
            assert!(eq_lowercase(&known.to_ascii_uppercase(), known));
            for at in 0..known.len() {
                let mut bytes = known.to_vec();
                for b in parsed_bytes() {
                    bytes[at] = b;
                    assert_eq!(
                        eq_lowercase(&bytes, known),
                        bytes.eq_ignore_ascii_case(known),
                        "{:?} against {:?}",
                        String::from_utf8_lossy(&bytes),
                        String::from_utf8_lossy(known)
                    );
                }
            }
        }
    }

    #[test]
    fn a_name_of_another_length_never_matches() {
        assert!(!eq_lowercase(b"content-lengt", b"content-length"));
        assert!(!eq_lowercase(b"content-lengths", b"content-length"));
        assert!(!eq_lowercase(b"", b"te"));
        assert!(!eq_lowercase(b"dat", b"date"));
    }

    #[test]
    fn mixed_case_matches_in_every_word() {
        assert!(eq_lowercase(
            b"Fencing-Token-Highest",
            b"fencing-token-highest"
        ));
        assert!(eq_lowercase(b"CONTENT-length", b"content-length"));
        assert!(eq_lowercase(b"content-LENGTH", b"content-length"));
        assert!(eq_lowercase(b"Keep-Alive", b"keep-alive"));
        assert!(eq_lowercase(b"DaTe", b"date"));
        assert!(eq_lowercase(b"TE", b"te"));
        assert!(!eq_lowercase(b"content_length", b"content-length"));
        assert!(!eq_lowercase(b"keep-alivf", b"keep-alive"));
    }
}
