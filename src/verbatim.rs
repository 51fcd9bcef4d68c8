//! An upstream answer's end-to-end headers, kept as the bytes the upstream sent.
//!
//! Turning each header of an answer into an `http::HeaderMap` entry (a name looked up among the
//! standard ones, a value checked byte by byte, a hash, an insert, a drop) cost about 1,700
//! instructions per answer (`bench/instructions.sh`), only for the data plane's HTTP/1.1 server
//! to write the same bytes back out. An answer the proxy neither reads nor changes a header of
//! keeps them here instead: positions in the upstream's head, which httparse has already checked
//! (its header-name and header-value bytes are exactly those `http` accepts), written to the
//! client as they came. The answer's `HeaderMap` then holds only what the proxy adds.
//!
//! Whoever needs a map (hyper's server, for TLS and HTTP/2 clients, or the access log) moves the
//! headers into it with [`into_map`].

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response};
use http_body_util::{Either, Full};
use smallvec::SmallVec;

/// The end-to-end headers of an upstream's answer, as positions in its head's bytes.
#[derive(Debug, Clone, Default)]
pub struct VerbatimHeaders {
    head: Bytes,
    /// In a `Vec`, not inline: the head is moved from the parser up to the proxy, and a dozen
    /// headers inline made each move a copy of 300 bytes.
    headers: Vec<Header>,
}

/// Where one header sits in the head, and whether the answer's writer must look at it. Offsets
/// fit in `u32`: a head is at most 64 KiB.
#[derive(Debug, Clone, Copy)]
struct Header {
    name: (u32, u32),
    value: (u32, u32),
    kind: Kind,
}

/// What a header means to the writer of the answer's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `Content-Length`: the writer frames the body itself.
    ContentLength,
    /// `Date`: the writer adds one only if the upstream sent none.
    Date,
    Other,
}

/// A header that `http` would not accept: not expected of what httparse accepted, and answered
/// as any other invalid upstream header if it happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the upstream's answer carries a header that is not valid HTTP")]
pub struct InvalidHeader;

impl VerbatimHeaders {
    /// Room for `headers` headers.
    pub fn with_capacity(headers: usize) -> Self {
        VerbatimHeaders {
            head: Bytes::new(),
            headers: Vec::with_capacity(headers),
        }
    }

    /// Sets the head the headers' offsets point into.
    pub fn set_head(&mut self, head: Bytes) {
        self.head = head;
    }

    /// Adds the header whose name and value are at these byte offsets of the head.
    pub fn push(&mut self, name: (usize, usize), value: (usize, usize), kind: Kind) {
        let narrow = |(start, end): (usize, usize)| {
            (
                u32::try_from(start).unwrap_or(u32::MAX),
                u32::try_from(end).unwrap_or(u32::MAX),
            )
        };
        self.headers.push(Header {
            name: narrow(name),
            value: narrow(value),
            kind,
        });
    }

    /// Each header's name and value, as the upstream sent them, with its kind.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], Kind)> {
        self.headers.iter().map(|header| {
            (
                self.bytes(header.name),
                self.bytes(header.value),
                header.kind,
            )
        })
    }

    /// Each header as its line in the head, with no line ending (the name, the colon, the
    /// whitespace the upstream put after it, and the value), its value, and its kind. The
    /// writer copies a line whole rather than in four pieces.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8], Kind)> {
        self.headers.iter().map(|header| {
            (
                self.bytes((header.name.0, header.value.1)),
                self.bytes(header.value),
                header.kind,
            )
        })
    }

    fn bytes(&self, (start, end): (u32, u32)) -> &[u8] {
        self.head
            .get(start as usize..end as usize)
            .unwrap_or_default()
    }

    /// The bytes at these offsets, sharing the head's buffer.
    fn shared(&self, (start, end): (u32, u32)) -> Option<Bytes> {
        let range = start as usize..end as usize;
        self.head.get(range.clone())?;
        Some(self.head.slice(range))
    }

    /// Appends the headers to `map`, all or none; the values share the head's bytes.
    pub fn append_to(&self, map: &mut HeaderMap) -> Result<(), InvalidHeader> {
        let entries = self.entries()?;
        map.reserve(entries.len());
        for (name, value) in entries {
            map.append(name, value);
        }
        Ok(())
    }

    /// The headers as `http`'s names and values.
    fn entries(&self) -> Result<SmallVec<[(HeaderName, HeaderValue); 12]>, InvalidHeader> {
        self.headers
            .iter()
            .map(|header| {
                let name =
                    HeaderName::from_bytes(self.bytes(header.name)).map_err(|_| InvalidHeader)?;
                let value = self.shared(header.value).ok_or(InvalidHeader)?;
                let value = HeaderValue::from_maybe_shared(value).map_err(|_| InvalidHeader)?;
                Ok((name, value))
            })
            .collect()
    }
}

/// A response body that may carry its answer's headers verbatim.
pub trait CarriesHeaders {
    /// The headers to write before the response's own map, if they were kept verbatim.
    fn verbatim_headers(&self) -> Option<&VerbatimHeaders>;
    /// Takes them out, for a writer that needs them in the map.
    fn take_verbatim_headers(&mut self) -> Option<VerbatimHeaders>;
}

impl CarriesHeaders for Full<Bytes> {
    fn verbatim_headers(&self) -> Option<&VerbatimHeaders> {
        None
    }
    fn take_verbatim_headers(&mut self) -> Option<VerbatimHeaders> {
        None
    }
}

impl<L: CarriesHeaders, R: CarriesHeaders> CarriesHeaders for Either<L, R> {
    fn verbatim_headers(&self) -> Option<&VerbatimHeaders> {
        match self {
            Either::Left(body) => body.verbatim_headers(),
            Either::Right(body) => body.verbatim_headers(),
        }
    }
    fn take_verbatim_headers(&mut self) -> Option<VerbatimHeaders> {
        match self {
            Either::Left(body) => body.take_verbatim_headers(),
            Either::Right(body) => body.take_verbatim_headers(),
        }
    }
}

/// Moves a response's verbatim headers, if it has any, into its map, after the ones already
/// there (which the proxy added, and which no verbatim header shares a name with). On an error
/// nothing has moved.
pub fn into_map<B: CarriesHeaders>(response: &mut Response<B>) -> Result<(), InvalidHeader> {
    let Some(verbatim) = response.body().verbatim_headers() else {
        return Ok(());
    };
    let entries = verbatim.entries()?;
    response.body_mut().take_verbatim_headers();
    let map = response.headers_mut();
    map.reserve(entries.len());
    for (name, value) in entries {
        map.append(name, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers of `head` (a whole head, its lines split by hand), verbatim.
    fn verbatim(head: &'static str) -> VerbatimHeaders {
        let mut headers = VerbatimHeaders::default();
        let mut at = 0;
        for line in head.split_inclusive("\r\n") {
            if let Some((name, value)) = line.trim_end().split_once(": ") {
                let value_at = at + name.len() + 2;
                headers.push(
                    (at, at + name.len()),
                    (value_at, value_at + value.len()),
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => Kind::ContentLength,
                        "date" => Kind::Date,
                        _ => Kind::Other,
                    },
                );
            }
            at += line.len();
        }
        headers.set_head(Bytes::from_static(head.as_bytes()));
        headers
    }

    #[test]
    fn headers_are_read_back_as_sent_with_their_kind() {
        let headers = verbatim("Server: nginx\r\nContent-Length: 5\r\nDATE: today\r\n\r\n");
        let read: Vec<_> = headers.iter().collect();
        assert_eq!(
            read,
            [
                (&b"Server"[..], &b"nginx"[..], Kind::Other),
                (b"Content-Length", b"5", Kind::ContentLength),
                (b"DATE", b"today", Kind::Date),
            ]
        );
    }

    #[test]
    fn a_line_runs_from_the_name_to_the_end_of_the_value() {
        let headers = verbatim("Server: nginx\r\nVary: a\r\n\r\n");
        let lines: Vec<_> = headers.lines().map(|(line, _, _)| line).collect();
        assert_eq!(lines, [&b"Server: nginx"[..], b"Vary: a"]);
    }

    #[test]
    fn moved_into_a_map_they_follow_what_is_there() {
        let mut response = Response::new(Either::<Kept, Full<Bytes>>::Left(Kept(Some(verbatim(
            "ETag: \"1\"\r\nVary: a\r\nvary: b\r\n\r\n",
        )))));
        response
            .headers_mut()
            .insert("x-request-id", HeaderValue::from_static("7"));
        into_map(&mut response).unwrap();
        let map: Vec<_> = response
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str(), value.to_str().unwrap()))
            .collect();
        assert_eq!(
            map,
            [
                ("x-request-id", "7"),
                ("etag", "\"1\""),
                ("vary", "a"),
                ("vary", "b")
            ]
        );
        assert!(
            response.body().verbatim_headers().is_none(),
            "moved, not copied: they are written once"
        );
    }

    #[test]
    fn a_header_http_refuses_is_an_error_that_moves_nothing() {
        let mut map = HeaderMap::new();
        assert_eq!(
            verbatim("ETag: 1\r\nBad Name: x\r\n\r\n").append_to(&mut map),
            Err(InvalidHeader)
        );
        assert_eq!(
            verbatim("ETag: 1\r\nX-Bell: \x07\r\n\r\n").append_to(&mut map),
            Err(InvalidHeader)
        );
        assert!(map.is_empty(), "all or none");
        let mut response = Response::new(Kept(Some(verbatim("ETag: 1\r\nX-Bell: \x07\r\n\r\n"))));
        assert_eq!(into_map(&mut response), Err(InvalidHeader));
        assert!(response.headers().is_empty());
        assert_eq!(
            response
                .body()
                .verbatim_headers()
                .map(|kept| kept.iter().count()),
            Some(2),
            "still carried, to be written as they came"
        );
    }

    /// A body that only carries headers.
    struct Kept(Option<VerbatimHeaders>);

    impl CarriesHeaders for Kept {
        fn verbatim_headers(&self) -> Option<&VerbatimHeaders> {
            self.0.as_ref()
        }
        fn take_verbatim_headers(&mut self) -> Option<VerbatimHeaders> {
            self.0.take()
        }
    }
}
