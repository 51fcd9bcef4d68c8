//! The client-facing request head parser (httparse, then RFC 9112 §6.3 framing): never panics,
//! takes exactly one head off the buffer, frames a body only in unambiguous ways, and reads the
//! same head whether the bytes arrive whole or piece by piece.
#![no_main]

use bytes::BytesMut;
use fencegate::server::http1::head::{self, BodyFraming, HeadLimits};
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let limits = HeadLimits {
        max_size: 8 * 1024,
        max_headers: if selector & 1 == 0 { 16 } else { 200 },
    };
    let step = usize::from(selector >> 1).max(1);
    let mut whole = BytesMut::from(input);
    let parsed = head::parse(&mut whole, limits);
    if let Ok(Some(head)) = &parsed {
        let consumed = input.len() - whole.len();
        assert!(consumed <= limits.max_size);
        assert_eq!(&input[consumed..], &whole[..], "only the head is taken off");
        let headers = head.request.headers();
        match head.framing {
            BodyFraming::Chunked => {
                assert!(headers.contains_key(TRANSFER_ENCODING));
                assert!(!headers.contains_key(CONTENT_LENGTH), "never both");
            }
            BodyFraming::Length(length) => {
                assert!(!headers.contains_key(TRANSFER_ENCODING));
                for value in headers.get_all(CONTENT_LENGTH) {
                    for element in value.to_str().unwrap().split(',') {
                        assert_eq!(element.trim().parse::<u64>().unwrap(), length);
                    }
                }
            }
            BodyFraming::None => assert!(!headers.contains_key(TRANSFER_ENCODING)),
        }
    }
    // Piece by piece, as the connection reads.
    let mut buffer = BytesMut::new();
    let mut fed = 0;
    let pieces = loop {
        let end = (fed + step).min(input.len());
        buffer.extend_from_slice(&input[fed..end]);
        fed = end;
        match head::parse(&mut buffer, limits) {
            Ok(None) if fed < input.len() => continue,
            other => break other,
        }
    };
    match (&parsed, &pieces) {
        (Ok(Some(whole)), Ok(Some(piece))) => {
            assert_eq!(whole.request.method(), piece.request.method());
            assert_eq!(whole.request.uri(), piece.request.uri());
            assert_eq!(whole.request.headers(), piece.request.headers());
            assert_eq!(whole.framing, piece.framing);
            assert_eq!(whole.keep_alive, piece.keep_alive);
        }
        (Ok(Some(_)), other) => panic!("whole parsed, piece by piece gave {other:?}"),
        // A head refused whole may be refused earlier, or found too large, piece by piece.
        _ => {}
    }
});
