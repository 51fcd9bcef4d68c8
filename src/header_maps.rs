//! Header maps kept for reuse by the thread that is done with them.
//!
//! Every forwarded request makes two `http::HeaderMap`s, the request's (the data plane's parser)
//! and the answer's (the upstream client's parser), and each is two allocations, freed a few
//! microseconds later on the same thread. Thread per core makes keeping them cheap: a map given
//! back after its head has been written is cleared (its capacity stays) and handed to the next
//! parser on that thread, with no lock. A thread keeps a few, each of a bounded size, so a burst
//! of large heads does not stay in memory.

use std::cell::RefCell;

use http::{HeaderMap, HeaderName};

/// The most maps a thread keeps: more than one thread's requests in hand at one moment need
/// (a request's map and its answer's, per connection being written to).
const KEPT_PER_THREAD: usize = 16;

/// A map with room for more headers than this is freed, not kept: the usual head has a dozen.
const LARGEST_KEPT: usize = 64;

thread_local! {
    static KEPT: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// A map with more names than this is searched by hash, not name by name.
const SCANNED: usize = 8;

/// Whether `headers` has no `name`, for a name that `http` does not know and that most requests
/// lack, such as `Destination`. A lookup hashes such a name a byte at a time (about 170
/// instructions, `bench/instructions.sh`); comparing it with each of a request's handful of
/// names costs less, and a larger map is searched by hash.
pub fn lacks(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.keys_len() <= SCANNED {
        !headers.keys().any(|each| each == name)
    } else {
        !headers.contains_key(name)
    }
}

/// An empty map with room for `headers`: one this thread kept, if it has one.
pub fn with_capacity(headers: usize) -> HeaderMap {
    match KEPT.with_borrow_mut(Vec::pop) {
        Some(mut map) => {
            map.reserve(headers);
            map
        }
        None => HeaderMap::with_capacity(headers),
    }
}

/// Gives a map whose headers are no longer needed back to this thread, for the next head.
pub fn give_back(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > LARGEST_KEPT {
        return;
    }
    map.clear();
    KEPT.with_borrow_mut(|kept| {
        if kept.len() < KEPT_PER_THREAD {
            kept.push(map);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::{CONTENT_LENGTH, HOST};

    fn kept() -> usize {
        KEPT.with_borrow(Vec::len)
    }

    /// Tests may share a thread (`--test-threads=1`), and with it what others gave back.
    fn nothing_kept() {
        KEPT.with_borrow_mut(Vec::clear);
    }

    #[test]
    fn a_name_is_lacking_only_where_contains_key_says_so_in_small_and_large_maps() {
        let destination = HeaderName::from_static("destination");
        for others in [0, 1, SCANNED - 1, SCANNED, SCANNED + 1, 3 * SCANNED] {
            let mut map = HeaderMap::new();
            for other in 0..others {
                let name = HeaderName::from_bytes(format!("x-other-{other}").as_bytes()).unwrap();
                map.append(name, HeaderValue::from_static("o"));
            }
            assert!(lacks(&map, &destination), "among {others}");
            map.append(HOST, HeaderValue::from_static("a"));
            map.append(&destination, HeaderValue::from_static("/b"));
            assert!(!lacks(&map, &destination), "among {others}");
            assert!(!lacks(&map, &HOST), "among {others}");
            assert_eq!(
                lacks(&map, &CONTENT_LENGTH),
                !map.contains_key(CONTENT_LENGTH)
            );
        }
    }

    #[test]
    fn a_map_given_back_comes_back_empty_with_its_room() {
        nothing_kept();
        let mut map = with_capacity(4);
        map.insert(HOST, HeaderValue::from_static("a"));
        map.append(CONTENT_LENGTH, HeaderValue::from_static("1"));
        let room = map.capacity();
        give_back(map);
        assert_eq!(kept(), 1);
        let map = with_capacity(2);
        assert!(map.is_empty(), "no header of the last head is left");
        assert_eq!(map.capacity(), room);
        assert_eq!(kept(), 0);
    }

    #[test]
    fn a_reused_map_still_has_room_for_what_is_asked() {
        nothing_kept();
        give_back(with_capacity(2));
        let map = with_capacity(40);
        assert!(map.capacity() >= 40);
    }

    #[test]
    fn large_maps_are_freed_and_the_thread_keeps_only_a_few() {
        nothing_kept();
        give_back(HeaderMap::with_capacity(LARGEST_KEPT * 2));
        assert_eq!(kept(), 0, "a large map is not kept");
        give_back(HeaderMap::new());
        assert_eq!(kept(), 0, "a map with no room is not worth keeping");
        for _ in 0..KEPT_PER_THREAD + 5 {
            give_back(HeaderMap::with_capacity(8));
        }
        assert_eq!(kept(), KEPT_PER_THREAD);
    }
}
