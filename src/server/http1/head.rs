//! A client's request head: parsed with httparse, then judged by RFC 9112 — how its body is framed
//! (§6.3), whether the connection lives on after it (§9.3), whether it waits for `100 Continue`.
//!
//! Strict where request smuggling lives: a `Transfer-Encoding` next to a `Content-Length`, two
//! different lengths, a coding fencegate cannot decode, `chunked` anywhere but last, a
//! `Transfer-Encoding` on HTTP/1.0, obs-fold, bare CR and whitespace before a colon are all refused
//! before any handler sees the request. Everything here is pure: bytes in, a request or a typed
//! error out.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use smallvec::SmallVec;

use super::body::{ClientBody, ClientRequest};
use crate::ascii::eq_lowercase;
use crate::token::FENCING_TOKEN;

/// Header slots kept on the stack; a `max_headers` above this parses into the heap.
const STACK_HEADERS: usize = 128;

/// Header spans kept on the stack; a request with more moves them to the heap.
const INLINE_SPANS: usize = 16;

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (no length, or a length of zero).
    None,
    Length(u64),
    Chunked,
}

/// A parsed request head, with what the connection needs to know about it.
#[derive(Debug)]
pub struct RequestHead {
    /// The request, its body still empty; header values share the head's bytes.
    pub request: ClientRequest,
    pub framing: BodyFraming,
    /// Whether the client lets the connection carry another request after this one.
    pub keep_alive: bool,
    /// Whether the client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
}

/// Why a request head was refused. Each is answered with its status, and the connection closed:
/// after a head fencegate could not frame, the next byte's meaning is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the request head is larger than max_header_size ({0} bytes)")]
    TooLarge(usize),
    #[error("the request has more than max_headers ({0}) headers")]
    TooManyHeaders(usize),
    #[error("the request head is malformed: {0}")]
    Malformed(httparse::Error),
    #[error("the request target is not a valid URI")]
    Target,
    #[error("the request carries a header that is not valid HTTP")]
    InvalidHeader,
    #[error("the request's Content-Length is invalid or given twice with different values")]
    ContentLength,
    #[error("the request has both Transfer-Encoding and Content-Length")]
    LengthAndEncoding,
    #[error("the request's Transfer-Encoding does not end with chunked, or repeats it")]
    ChunkedNotLast,
    #[error("HTTP/1.0 has no Transfer-Encoding")]
    EncodingOnHttp10,
    #[error(
        "the request's Transfer-Encoding names a coding fencegate does not decode (only chunked)"
    )]
    UnknownCoding,
}

impl HeadError {
    /// The status this refusal is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders(_) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            HeadError::UnknownCoding => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The problem type's slug.
    pub fn slug(&self) -> &'static str {
        match self {
            HeadError::TooLarge(_) | HeadError::TooManyHeaders(_) => "head-too-large",
            HeadError::UnknownCoding => "unknown-transfer-coding",
            _ => "malformed-request",
        }
    }
}

/// The limits a head is parsed under.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_size: usize,
    pub max_headers: usize,
}

/// Where a part of the head sits in the buffer.
#[derive(Debug, Default, Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

/// A header's name and value spans.
#[derive(Debug, Default, Clone, Copy)]
struct HeaderSpan {
    name: Span,
    value: Span,
}

/// What the connection-level headers say, read while the head is parsed.
#[derive(Debug, Default)]
struct Hop {
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    /// Some once a Transfer-Encoding was seen: whether its codings so far are exactly `chunked`.
    encoding: Option<Result<Encoding, HeadError>>,
    /// Some once a Content-Length was seen: the number every value and element so far gave.
    length: Option<Result<u64, HeadError>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// No coding listed yet (only empty list elements).
    Nothing,
    Chunked,
}

/// Parses a request head at the start of `buf` and takes it off; `None` (and `buf` untouched)
/// if more bytes are needed.
pub fn parse(buf: &mut BytesMut, limits: HeadLimits) -> Result<Option<RequestHead>, HeadError> {
    let mut stack = [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] = if limits.max_headers <= STACK_HEADERS {
        &mut stack[..limits.max_headers]
    } else {
        heap.resize_with(limits.max_headers, MaybeUninit::uninit);
        &mut heap
    };
    // On the stack for the usual few headers: a `Vec` was an allocation on every request.
    let mut spans = SmallVec::<[HeaderSpan; INLINE_SPANS]>::new();
    let mut hop = Hop::default();
    let (length, method, target, version) = {
        let mut request = httparse::Request::new(&mut []);
        let length = match request.parse_with_uninit_headers(buf, slots) {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if buf.len() >= limits.max_size => {
                return Err(HeadError::TooLarge(limits.max_size));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(HeadError::TooManyHeaders(limits.max_headers));
            }
            Err(e) => return Err(HeadError::Malformed(e)),
        };
        if length > limits.max_size {
            return Err(HeadError::TooLarge(limits.max_size));
        }
        let base = buf.as_ptr() as usize;
        // The head is at most max_header_size (≤ 1 MiB), so offsets fit in u32.
        let span = |part: &[u8]| {
            let start = part.as_ptr() as usize - base;
            Span {
                start: start as u32,
                end: (start + part.len()) as u32,
            }
        };
        spans.reserve_exact(request.headers.len());
        for header in request.headers.iter() {
            spans.push(HeaderSpan {
                name: span(header.name.as_bytes()),
                value: span(header.value),
            });
            note_hop_by_hop(&mut hop, header);
        }
        let method = request.method.unwrap_or_default();
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| HeadError::Malformed(httparse::Error::Token))?;
        let target = span(request.path.unwrap_or_default().as_bytes());
        let version = match request.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        (length, method, target, version)
    };
    let head = buf.split_to(length).freeze();
    let slice = |span: Span| head.slice(span.start as usize..span.end as usize);
    let uri = Uri::from_maybe_shared(slice(target)).map_err(|_| HeadError::Target)?;
    // One more than the client sent: the server adds `X-Request-Id` when the client sent none,
    // and a full map would grow, rehashing what it holds and allocating twice, on every request.
    let mut headers = crate::header_maps::with_capacity(spans.len() + 1);
    for span in &spans {
        let name = &head[span.name.start as usize..span.name.end as usize];
        let name = header_name(name)?;
        let value = HeaderValue::from_maybe_shared(slice(span.value))
            .map_err(|_| HeadError::InvalidHeader)?;
        headers.append(name, value);
    }
    let framing = framing(version, hop.encoding, hop.length)?;
    let keep_alive = !hop.close && (version == Version::HTTP_11 || hop.keep_alive);
    // Boxed here, where it is made: from here on it moves as a pointer.
    let mut request = Box::new(Request::new(ClientBody::Empty));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(RequestHead {
        request,
        framing,
        keep_alive,
        expect_continue: hop.expect_continue && version == Version::HTTP_11,
    }))
}

/// A header's name. `Fencing-Token`, on every fenced request, is not one of the names `http`
/// knows, and `HeaderName::from_bytes` would copy it into an allocation of its own: it is
/// matched here and shared instead.
fn header_name(name: &[u8]) -> Result<HeaderName, HeadError> {
    if eq_lowercase(name, FENCING_TOKEN.as_str().as_bytes()) {
        return Ok(FENCING_TOKEN);
    }
    HeaderName::from_bytes(name).map_err(|_| HeadError::InvalidHeader)
}

/// Reads what `Connection`, `Expect`, `Transfer-Encoding` and `Content-Length` say: in the
/// parser's pass over the headers, as later lookups in the map cost more (bench/instructions.sh).
fn note_hop_by_hop(hop: &mut Hop, header: &httparse::Header<'_>) {
    let elements = || header.value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
    let name = header.name.as_bytes();
    if eq_lowercase(name, b"connection") {
        for option in elements() {
            hop.close |= eq_lowercase(option, b"close");
            hop.keep_alive |= eq_lowercase(option, b"keep-alive");
        }
    } else if eq_lowercase(name, b"expect") {
        hop.expect_continue |= eq_lowercase(header.value, b"100-continue");
    } else if eq_lowercase(name, b"transfer-encoding") {
        let mut encoding = hop.encoding.clone().unwrap_or(Ok(Encoding::Nothing));
        for coding in elements().filter(|coding| !coding.is_empty()) {
            encoding = match encoding {
                Ok(Encoding::Nothing) if eq_lowercase(coding, b"chunked") => Ok(Encoding::Chunked),
                // A coding after `chunked`, or `chunked` twice.
                Ok(Encoding::Chunked) => Err(HeadError::ChunkedNotLast),
                // gzip, deflate, identity...: forwarding the decoded body without the coding
                // would hand the upstream different bytes than the client meant.
                Ok(Encoding::Nothing) => Err(HeadError::UnknownCoding),
                Err(e) => Err(e),
            };
        }
        hop.encoding = Some(encoding);
    } else if eq_lowercase(name, b"content-length") {
        hop.length = Some(content_length(hop.length.clone(), header.value));
    }
}

/// How the body is framed (RFC 9112 §6.3), refusing every ambiguous case.
fn framing(
    version: Version,
    encoding: Option<Result<Encoding, HeadError>>,
    length: Option<Result<u64, HeadError>>,
) -> Result<BodyFraming, HeadError> {
    if let Some(encoding) = encoding {
        if version == Version::HTTP_10 {
            return Err(HeadError::EncodingOnHttp10);
        }
        if length.is_some() {
            return Err(HeadError::LengthAndEncoding);
        }
        return match encoding? {
            Encoding::Chunked => Ok(BodyFraming::Chunked),
            // `Transfer-Encoding:` with no coding at all.
            Encoding::Nothing => Err(HeadError::ChunkedNotLast),
        };
    }
    match length.transpose()? {
        None | Some(0) => Ok(BodyFraming::None),
        Some(length) => Ok(BodyFraming::Length(length)),
    }
}

/// The `Content-Length` so far, `known`, with one more value: every value, and every
/// comma-separated element, the same decimal number.
fn content_length(known: Option<Result<u64, HeadError>>, value: &[u8]) -> Result<u64, HeadError> {
    let mut length = known.transpose()?;
    for element in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        let parsed = parse_decimal(element).ok_or(HeadError::ContentLength)?;
        if length.is_some_and(|known| known != parsed) {
            return Err(HeadError::ContentLength);
        }
        length = Some(parsed);
    }
    length.ok_or(HeadError::ContentLength)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests;
