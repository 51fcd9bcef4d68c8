//! The upstream response parser (httparse heads, RFC 9112 §6.3 framing, chunked decoding): never
//! panics, reading the bytes piece by piece, as the connection does, gives exactly what
//! reading them whole gives, and every header it keeps is one `http` accepts, on one line.
#![no_main]

use bytes::BytesMut;
use fencegate::proxy::wire::{self, ChunkedDecoder, Decoded, Framing};
use http::Method;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let method = if selector & 1 == 0 {
        Method::GET
    } else {
        Method::HEAD
    };
    let step = usize::from(selector >> 1).max(1);
    let whole = wire::read_response(input, &method);
    let pieces = read_in_pieces(input, &method, step);
    match (&whole, &pieces) {
        (Ok((head, body, trailers)), Some((status, piece_body, piece_trailers))) => {
            assert_eq!(head.status, *status);
            assert_eq!(body, piece_body, "piece by piece reads the same body");
            assert_eq!(trailers, piece_trailers);
        }
        (Ok(_), None) => panic!("whole read succeeded, piece by piece failed"),
        (Err(_), _) => {}
    }
});

/// Reads like the connection: the buffer grows `step` bytes at a time.
fn read_in_pieces(
    input: &[u8],
    method: &Method,
    step: usize,
) -> Option<(http::StatusCode, Vec<u8>, Option<http::HeaderMap>)> {
    let mut fed = 0;
    let mut buffer = BytesMut::new();
    let mut feed = |buffer: &mut BytesMut| -> bool {
        if fed >= input.len() {
            return false;
        }
        let end = (fed + step).min(input.len());
        buffer.extend_from_slice(&input[fed..end]);
        fed = end;
        true
    };
    let mut interim = 0;
    let head = loop {
        match wire::parse_head(&mut buffer) {
            Ok(Some(head)) => {
                if head.status.is_informational() && head.status.as_u16() != 101 {
                    interim += 1;
                    if interim > 16 {
                        return None;
                    }
                    continue;
                }
                break head;
            }
            Ok(None) => {
                if !feed(&mut buffer) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    };
    // The headers are written to an HTTP/1.1 client as httparse accepted them, and moved into
    // an `http` map for the others: `http` must accept every one.
    head.header_map()
        .expect("a header httparse accepted is a valid http header");
    for (line, _, _) in head.headers.lines() {
        assert!(
            !line.iter().any(|&b| b == b'\r' || b == b'\n'),
            "a kept header's line is one line"
        );
    }
    let (framing, _) = wire::framing_of(&head, method).ok()?;
    let mut body = Vec::new();
    let mut trailers = None;
    match framing {
        Framing::Empty => {}
        Framing::Length(length) => {
            while (buffer.len() as u64) < length {
                if !feed(&mut buffer) {
                    return None;
                }
            }
            body.extend_from_slice(&buffer[..length as usize]);
        }
        Framing::UntilClose => {
            while feed(&mut buffer) {}
            body.extend_from_slice(&buffer);
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::default();
            loop {
                match decoder.decode(&mut buffer).ok()? {
                    Some(Decoded::Data(data)) => body.extend_from_slice(&data),
                    Some(Decoded::Trailers(t)) => trailers = Some(t),
                    Some(Decoded::End) => break,
                    None => {
                        if !feed(&mut buffer) {
                            return None;
                        }
                    }
                }
            }
        }
    }
    Some((head.status, body, trailers))
}
