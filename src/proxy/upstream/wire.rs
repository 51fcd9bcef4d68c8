//! HTTP/1.1 on the upstream connection: the request head fencegate writes, the response head it
//! parses (with httparse), how the response body is framed (RFC 9112 §6.3), and chunked coding in
//! both directions.
//!
//! Everything here is pure: bytes in, bytes or a typed error out. The connection that moves the
//! bytes is in [`super::exchange`].

use std::mem::MaybeUninit;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use smallvec::SmallVec;

use super::super::headers::{self, AnswerHeader};
use crate::ascii::eq_lowercase;
use crate::verbatim::{Kind, VerbatimHeaders};

/// The largest response head (status line and headers) accepted from an upstream.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The most headers a response head may carry.
pub const MAX_RESPONSE_HEADERS: usize = 128;

/// The longest chunk-size line (size and extensions), and the most trailer bytes, accepted.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an upstream's response could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("the response head is larger than {MAX_RESPONSE_HEAD} bytes")]
    HeadTooLarge,
    #[error("the response head is malformed: {0}")]
    MalformedHead(httparse::Error),
    #[error("the response carries a header that is not valid HTTP")]
    InvalidHeader,
    #[error("the response's Content-Length is invalid or given twice with different values")]
    ContentLength,
    #[error("the response's Transfer-Encoding is not understood")]
    TransferEncoding,
    #[error("the response's chunked body is malformed")]
    Chunk,
    #[error("the response's trailers are malformed or larger than {MAX_TRAILERS} bytes")]
    Trailers,
    #[error("the upstream sent more than 16 interim (1xx) responses")]
    TooManyInterim,
    #[error("the upstream closed the connection in the middle of the response")]
    Truncated,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// The end-to-end headers, as the upstream sent them: the hop-by-hop ones, and those
    /// `Connection` names, are left out (they describe this connection, not the answer).
    pub headers: VerbatimHeaders,
    /// Whether one of them is a header the proxy reads or changes in an answer (see
    /// [`headers::answer_header`]): such an answer needs its headers in a map.
    pub handled: bool,
    /// What the framing is decided from, read off the hop-by-hop headers.
    hop: HopByHop,
}

/// What the hop-by-hop headers of a response say about its framing and its connection.
#[derive(Debug, Default, Clone, Copy)]
struct HopByHop {
    close: bool,
    keep_alive: bool,
    /// Whether a `Transfer-Encoding` was sent, and its last coding is `chunked`; `Err` if
    /// `chunked` came before another coding.
    transfer_encoding: Option<Result<bool, WireError>>,
    /// Whether a `Content-Length` was sent, and the number its every value and element gave;
    /// `Err` if they disagree or one is not a plain number.
    content_length: Option<Result<u64, WireError>>,
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a HEAD's response, 1xx, 204, 304, or `Content-Length: 0`.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection (no length and no chunked coding).
    UntilClose,
}

/// Where a header sits in the head: offsets of its name and value.
#[derive(Debug, Clone, Copy)]
struct Span {
    name: (usize, usize),
    value: (usize, usize),
    class: AnswerHeader,
}

impl ResponseHead {
    /// The end-to-end headers in a map.
    pub fn header_map(&self) -> Result<HeaderMap, WireError> {
        let mut map = HeaderMap::new();
        self.headers
            .append_to(&mut map)
            .map_err(|_| WireError::InvalidHeader)?;
        Ok(map)
    }
}

/// Parses a response head at the start of `buf` and takes it off; `None` (and `buf` untouched)
/// if more bytes are needed.
pub fn parse_head(buf: &mut BytesMut) -> Result<Option<ResponseHead>, WireError> {
    // Uninitialised: initialising 128 slots (4 KiB) on every response cost more than parsing.
    let mut slots = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
    let mut hop = HopByHop::default();
    // Header names `Connection` lists beyond close and keep-alive: rare, so allocated only then.
    let mut named: Vec<(usize, usize)> = Vec::new();
    let (length, status, version, spans) = {
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        );
        let length = match parsed {
            Ok(httparse::Status::Complete(length)) => length,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
                return Err(WireError::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(WireError::MalformedHead(e)),
        };
        if length > MAX_RESPONSE_HEAD {
            return Err(WireError::HeadTooLarge);
        }
        let status = response
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .ok_or(WireError::MalformedHead(httparse::Error::Status))?;
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let base = buf.as_ptr() as usize;
        let offsets = |part: &[u8]| {
            let start = part.as_ptr() as usize - base;
            (start, start + part.len())
        };
        // On the stack for the usual few headers: a `Vec` was an allocation on every answer.
        let mut spans = SmallVec::<[Span; 16]>::new();
        for header in response.headers.iter() {
            let class = headers::answer_header(header.name.as_bytes());
            spans.push(Span {
                name: offsets(header.name.as_bytes()),
                value: offsets(header.value),
                class,
            });
            note_hop_by_hop(&mut hop, &mut named, class, header.value, &offsets);
        }
        (length, status, version, spans)
    };
    let mut headers = VerbatimHeaders::with_capacity(spans.len());
    let mut handled = false;
    for span in &spans {
        let kind = match span.class {
            AnswerHeader::Connection | AnswerHeader::TransferEncoding | AnswerHeader::HopByHop => {
                continue;
            }
            AnswerHeader::ContentLength => Kind::ContentLength,
            AnswerHeader::Date => Kind::Date,
            AnswerHeader::Handled => {
                handled = true;
                Kind::Other
            }
            AnswerHeader::Other => Kind::Other,
        };
        if !named.is_empty() {
            let name = &buf[span.name.0..span.name.1];
            if named
                .iter()
                .any(|&(start, end)| buf[start..end].eq_ignore_ascii_case(name))
            {
                continue;
            }
        }
        // httparse has checked the bytes: a name of token characters, a value of visible ones,
        // spaces and tabs, as `http` requires of a `HeaderName` and a `HeaderValue`.
        headers.push(span.name, span.value, kind);
    }
    headers.set_head(buf.split_to(length).freeze());
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        handled,
        hop,
    }))
}

/// Reads what a hop-by-hop header says about framing and the connection.
fn note_hop_by_hop(
    hop: &mut HopByHop,
    named: &mut Vec<(usize, usize)>,
    class: AnswerHeader,
    value: &[u8],
    offsets: &impl Fn(&[u8]) -> (usize, usize),
) {
    if class == AnswerHeader::Connection {
        for option in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if eq_lowercase(option, b"close") {
                hop.close = true;
            } else if eq_lowercase(option, b"keep-alive") {
                hop.keep_alive = true;
            } else if !option.is_empty() {
                named.push(offsets(option));
            }
        }
    } else if class == AnswerHeader::TransferEncoding {
        let mut chunked_last = hop.transfer_encoding.unwrap_or(Ok(false));
        for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if coding.is_empty() {
                continue;
            }
            // `chunked` anywhere but last is not a valid response (RFC 9112 §6.1).
            chunked_last = match chunked_last {
                Ok(true) => Err(WireError::TransferEncoding),
                Ok(false) => Ok(eq_lowercase(coding, b"chunked")),
                Err(e) => Err(e),
            };
        }
        hop.transfer_encoding = Some(chunked_last);
    } else if class == AnswerHeader::ContentLength {
        // Read here, in the parser's pass, not looked up in the map later: it is on every answer.
        hop.content_length = Some(content_length(hop.content_length, value));
    }
}

/// How the body of `head`, the answer to a `method` request, is delimited, and whether the
/// connection can carry another request after it.
pub fn framing_of(head: &ResponseHead, method: &Method) -> Result<(Framing, bool), WireError> {
    // HTTP/1.1 lives on unless it says `close`; HTTP/1.0 only if it says `keep-alive`.
    let keep_alive = !head.hop.close && (head.version == Version::HTTP_11 || head.hop.keep_alive);
    let status = head.status.as_u16();
    if *method == Method::HEAD || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok((Framing::Empty, keep_alive));
    }
    if let Some(chunked_last) = head.hop.transfer_encoding {
        // A Transfer-Encoding overrides any Content-Length; a message with both may be an attempt
        // at smuggling, so the connection is not reused after it (RFC 9112 §6.1).
        let reusable = keep_alive && head.hop.content_length.is_none();
        return match chunked_last? {
            true => Ok((Framing::Chunked, reusable)),
            false => Ok((Framing::UntilClose, false)),
        };
    }
    match head.hop.content_length.transpose()? {
        Some(0) => Ok((Framing::Empty, keep_alive)),
        Some(length) => Ok((Framing::Length(length), keep_alive)),
        None => Ok((Framing::UntilClose, false)),
    }
}

/// The `Content-Length` so far, `known`, with one more value: every value (and every
/// comma-separated element) must be the same decimal number.
fn content_length(known: Option<Result<u64, WireError>>, value: &[u8]) -> Result<u64, WireError> {
    let mut length = known.transpose()?;
    for element in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        let parsed = std::str::from_utf8(element)
            .ok()
            .and_then(parse_decimal)
            .ok_or(WireError::ContentLength)?;
        if length.is_some_and(|known| known != parsed) {
            return Err(WireError::ContentLength);
        }
        length = Some(parsed);
    }
    length.ok_or(WireError::ContentLength)
}

fn parse_decimal(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// How a request body goes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body bytes follow the head.
    None,
    /// The client's `Content-Length`, forwarded unchanged.
    Length(u64),
    /// A body of unknown length: chunked coding.
    Chunked,
}

/// Writes a request head into `out`: the request line (its `target` given in pieces), `host`
/// (if given: the caller passes `None` when the client's own `Host` is among the header lines),
/// the header lines that `write_headers` writes, and the framing headers for `framing`.
pub fn write_request_head(
    out: &mut BytesMut,
    method: &Method,
    target: &[&str],
    host: Option<&str>,
    framing: RequestFraming,
    write_headers: impl FnOnce(&mut BytesMut),
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    for piece in target {
        out.extend_from_slice(piece.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        write_header(out, b"host", host.as_bytes());
    }
    write_headers(out);
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(length) => {
            let mut digits = [0; 20];
            write_header(out, b"content-length", format_u64(length, &mut digits));
        }
        RequestFraming::Chunked => write_header(out, b"transfer-encoding", b"chunked"),
    }
    out.extend_from_slice(b"\r\n");
}

/// One header line.
pub(crate) fn write_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `value` in decimal, written into `buffer`: no formatting machinery per request.
pub(crate) fn format_u64(mut value: u64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            return &buffer[start..];
        }
    }
}

/// Appends one chunk of `data` in chunked coding; an empty `data` would end the body, so it is
/// skipped.
pub fn write_chunk(out: &mut impl bytes::BufMut, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    write_chunk_size(out, data.len());
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Appends a chunk-size line: the size in hex, written into a stack buffer.
pub(crate) fn write_chunk_size(out: &mut impl bytes::BufMut, mut size: usize) {
    let mut digits = [0u8; 16];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b"0123456789abcdef"[size % 16];
        size /= 16;
        if size == 0 {
            break;
        }
    }
    out.put_slice(&digits[start..]);
    out.put_slice(b"\r\n");
}

/// The end of a chunked body (no trailers are sent upstream).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A piece of a decoded response body.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete.
    End,
}

/// Decodes a chunked body incrementally from a buffer that grows as bytes arrive.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Inside a chunk, with this many bytes of it left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailers, then an empty line.
    Trailers,
    Done,
}

impl ChunkedDecoder {
    /// Whether the body, trailers included, has been read to its end.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Takes what it can from `buf`: a piece of data, the trailers, the end, or `None` if more
    /// bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, WireError> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some((line, size)) = chunk_size_line(buf)? else {
                        return Ok(None);
                    };
                    buf.advance(line);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Some(Decoded::Data(buf.split_to(take).freeze())));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(WireError::Chunk);
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some((length, trailers)) = trailer_section(buf)? else {
                        return Ok(None);
                    };
                    buf.advance(length);
                    self.state = ChunkState::Done;
                    if !trailers.is_empty() {
                        return Ok(Some(Decoded::Trailers(trailers)));
                    }
                }
                ChunkState::Done => return Ok(Some(Decoded::End)),
            }
        }
    }
}

/// A chunk-size line: one to sixteen hex digits, optional extensions (ignored), CRLF. Returns the
/// line's length and the size. Strict where lenient parsers disagree: no empty size, no bare LF,
/// no control characters in extensions, a bounded line.
fn chunk_size_line(buf: &[u8]) -> Result<Option<(usize, u64)>, WireError> {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_CHUNK_LINE {
            Err(WireError::Chunk)
        } else {
            Ok(None)
        };
    };
    if end > MAX_CHUNK_LINE || end == 0 || buf[end - 1] != b'\r' {
        return Err(WireError::Chunk);
    }
    let line = &buf[..end - 1];
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return Err(WireError::Chunk);
    }
    let extensions = &line[digits..];
    let well_formed = extensions.is_empty()
        || (extensions.trim_ascii_start().first() == Some(&b';')
            && extensions
                .iter()
                .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)));
    if !well_formed {
        return Err(WireError::Chunk);
    }
    let size = std::str::from_utf8(&line[..digits])
        .ok()
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or(WireError::Chunk)?;
    Ok(Some((end + 1, size)))
}

/// The trailer section after the last chunk, up to and including its empty line.
fn trailer_section(buf: &[u8]) -> Result<Option<(usize, HeaderMap)>, WireError> {
    if buf.starts_with(b"\r\n") {
        return Ok(Some((2, HeaderMap::new())));
    }
    let mut slots = [httparse::EMPTY_HEADER; 32];
    match httparse::parse_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete((length, parsed))) => {
            if length > MAX_TRAILERS {
                return Err(WireError::Trailers);
            }
            let mut trailers = HeaderMap::with_capacity(parsed.len());
            for header in parsed {
                let name = HeaderName::from_bytes(header.name.as_bytes())
                    .map_err(|_| WireError::Trailers)?;
                let value =
                    HeaderValue::from_bytes(header.value).map_err(|_| WireError::Trailers)?;
                trailers.append(name, value);
            }
            Ok(Some((length, trailers)))
        }
        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS => Err(WireError::Trailers),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(_) => Err(WireError::Trailers),
    }
}

/// A whole response read from `input` as the answer to `method`: its head, body and trailers,
/// skipping interim (1xx) responses. What the fuzz target and the tests drive; the connection
/// reads the same way, piece by piece.
pub fn read_response(
    input: &[u8],
    method: &Method,
) -> Result<(ResponseHead, Vec<u8>, Option<HeaderMap>), WireError> {
    let mut buf = BytesMut::from(input);
    let mut interim = 0;
    let head = loop {
        let head = parse_head(&mut buf)?.ok_or(WireError::Truncated)?;
        if !head.status.is_informational() || head.status == StatusCode::SWITCHING_PROTOCOLS {
            break head;
        }
        interim += 1;
        if interim > 16 {
            return Err(WireError::TooManyInterim);
        }
    };
    let (framing, _) = framing_of(&head, method)?;
    let mut body = Vec::new();
    let mut trailers = None;
    match framing {
        Framing::Empty => {}
        Framing::Length(length) => {
            if (buf.len() as u64) < length {
                return Err(WireError::Truncated);
            }
            body.extend_from_slice(&buf[..length as usize]);
        }
        Framing::UntilClose => body.extend_from_slice(&buf),
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::default();
            loop {
                match decoder.decode(&mut buf)? {
                    Some(Decoded::Data(data)) => body.extend_from_slice(&data),
                    Some(Decoded::Trailers(t)) => trailers = Some(t),
                    Some(Decoded::End) => break,
                    None => return Err(WireError::Truncated),
                }
            }
        }
    }
    Ok((head, body, trailers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(input: &str) -> Result<(ResponseHead, Vec<u8>, Option<HeaderMap>), WireError> {
        read_response(input.as_bytes(), &Method::PUT)
    }

    fn head_of(input: &str) -> Result<Option<ResponseHead>, WireError> {
        parse_head(&mut BytesMut::from(input.as_bytes()))
    }

    fn framing(input: &str, method: Method) -> (Framing, bool) {
        let head = head_of(input).unwrap().unwrap();
        framing_of(&head, &method).unwrap()
    }

    #[test]
    fn a_head_is_parsed_once_complete() {
        assert!(head_of("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
        let mut buf = BytesMut::from(&b"HTTP/1.1 201 Created\r\nETag: \"1\"\r\n\r\nrest"[..]);
        let head = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.header_map().unwrap()["etag"], "\"1\"");
        assert_eq!(&buf[..], b"rest", "the head is taken off the buffer");
    }

    #[test]
    fn a_kept_header_is_its_line_as_sent_and_the_same_in_a_map() {
        let head = head_of(
            "HTTP/1.1 200 OK\r\nServer:nginx\r\nX-Empty:\r\nX-Spaced: \t v  w \t\r\n\
             X-Blank:   \r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let lines: Vec<_> = head.headers.lines().map(|(line, _, _)| line).collect();
        assert_eq!(
            lines,
            [
                &b"Server:nginx"[..],
                b"X-Empty:",
                b"X-Spaced: \t v  w",
                b"X-Blank:   "
            ]
        );
        let map = head.header_map().unwrap();
        assert_eq!(map["x-spaced"], "v  w");
        assert_eq!(map["x-empty"], "");
        assert_eq!(map["x-blank"], "");
    }

    #[test]
    fn a_head_that_never_ends_is_refused_at_the_limit() {
        let mut endless = b"HTTP/1.1 200 OK\r\n".to_vec();
        while endless.len() < MAX_RESPONSE_HEAD {
            endless.extend_from_slice(b"x-filler: aaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(
            parse_head(&mut BytesMut::from(endless.as_slice())),
            Err(WireError::HeadTooLarge | WireError::MalformedHead(_))
        ));
    }

    /// A complete head of exactly `length` bytes: one header whose value fills it.
    fn head_of_length(length: usize) -> String {
        let frame = "HTTP/1.1 200 OK\r\nx-big: \r\n\r\n".len();
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n",
            "a".repeat(length - frame)
        )
    }

    #[test]
    fn a_head_may_fill_the_limit_but_not_pass_it() {
        let fits = head_of_length(MAX_RESPONSE_HEAD);
        assert_eq!(fits.len(), MAX_RESPONSE_HEAD);
        assert!(head_of(&fits).unwrap().is_some());
        let over = head_of_length(MAX_RESPONSE_HEAD + 1);
        assert_eq!(head_of(&over).unwrap_err(), WireError::HeadTooLarge);
        // One endless line, never complete: refused once the buffer reaches the limit.
        let endless = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}",
            "a".repeat(MAX_RESPONSE_HEAD)
        );
        assert_eq!(head_of(&endless).unwrap_err(), WireError::HeadTooLarge);
        let growing = format!("HTTP/1.1 200 OK\r\nx-big: {}", "a".repeat(32 * 1024));
        assert!(
            head_of(&growing).unwrap().is_none(),
            "32 KiB so far: wait for more"
        );
    }

    #[test]
    fn trailers_up_to_their_limit_are_read() {
        let trailer = format!("x-sum: {}\r\n", "b".repeat(8 * 1024));
        let response = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n{trailer}\r\n"
        );
        let (_, body, trailers) = read(&response).unwrap();
        assert_eq!(body, b"ok");
        assert_eq!(trailers.unwrap()["x-sum"].len(), 8 * 1024);
        let huge = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nx-sum: {}\r\n\r\n",
            "b".repeat(MAX_TRAILERS)
        );
        assert_eq!(read(&huge).unwrap_err(), WireError::Trailers);
    }

    #[test]
    fn hop_by_hop_headers_are_read_for_framing_and_left_out_of_the_answer() {
        let head = head_of(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nTrailer: checksum\r\nX-Hop: 1\r\nETag: \"7\"\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let map = head.header_map().unwrap();
        let names: Vec<&str> = map.keys().map(|name| name.as_str()).collect();
        assert_eq!(names, ["etag"]);
        assert_eq!(
            framing_of(&head, &Method::GET).unwrap(),
            (Framing::Chunked, true)
        );
    }

    #[test]
    fn the_body_is_delimited_as_rfc_9112_says() {
        let ok = "HTTP/1.1 200 OK\r\n";
        let bare = format!("{ok}\r\n");
        assert_eq!(framing(&bare, Method::GET), (Framing::UntilClose, false));
        let sized = format!("{ok}Content-Length: 5\r\n\r\n");
        assert_eq!(framing(&sized, Method::GET), (Framing::Length(5), true));
        assert_eq!(framing(&sized, Method::HEAD), (Framing::Empty, true));
        let chunked = format!("{ok}Transfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(framing(&chunked, Method::GET), (Framing::Chunked, true));
        let both = format!("{ok}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(framing(&both, Method::GET), (Framing::Chunked, false));
        let gzip_only = format!("{ok}Transfer-Encoding: gzip\r\n\r\n");
        assert_eq!(
            framing(&gzip_only, Method::GET),
            (Framing::UntilClose, false)
        );
        for status in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let head = format!("HTTP/1.1 {status}\r\nContent-Length: 9\r\n\r\n");
            assert_eq!(framing(&head, Method::GET).0, Framing::Empty, "{status}");
        }
        let close = format!("{ok}Connection: close\r\nContent-Length: 1\r\n\r\n");
        assert_eq!(framing(&close, Method::GET), (Framing::Length(1), false));
        let old = "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(framing(old, Method::GET), (Framing::Length(1), false));
        let old_kept = "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(framing(old_kept, Method::GET), (Framing::Length(1), true));
    }

    #[test]
    fn ambiguous_lengths_and_codings_are_errors() {
        for head in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        ] {
            let parsed = head_of(head).unwrap().unwrap();
            assert!(framing_of(&parsed, &Method::GET).is_err(), "{head}");
        }
        let same = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(framing(same, Method::GET), (Framing::Length(5), true));
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (_, body, trailers) = read(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
             5;name=value\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nChecksum: abc\r\n\r\n",
        )
        .unwrap();
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.unwrap()["checksum"], "abc");
    }

    #[test]
    fn the_decoder_is_done_only_after_the_last_chunk_and_its_trailers() {
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"2\r\nok\r\n0\r\n"[..]);
        assert_eq!(
            decoder.decode(&mut buf).unwrap(),
            Some(Decoded::Data(Bytes::from("ok")))
        );
        assert!(!decoder.is_done(), "inside the body");
        assert_eq!(decoder.decode(&mut buf).unwrap(), None);
        assert!(!decoder.is_done(), "the trailer section has not ended");
        buf.extend_from_slice(b"x-sum: 1\r\n\r\n");
        assert!(matches!(
            decoder.decode(&mut buf).unwrap(),
            Some(Decoded::Trailers(_))
        ));
        assert!(decoder.is_done());
        assert_eq!(decoder.decode(&mut buf).unwrap(), Some(Decoded::End));
    }

    #[test]
    fn a_chunked_body_arriving_one_byte_at_a_time_decodes_the_same() {
        let wire = b"5\r\nhello\r\n3\r\n!!!\r\n0\r\n\r\n";
        let mut decoder = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut ended = false;
        for byte in wire {
            buf.extend_from_slice(&[*byte]);
            while let Some(piece) = decoder.decode(&mut buf).unwrap() {
                match piece {
                    Decoded::Data(data) => {
                        assert!(!data.is_empty(), "no empty pieces");
                        body.extend_from_slice(&data);
                    }
                    Decoded::Trailers(_) => panic!("no trailers were sent"),
                    Decoded::End => {
                        ended = true;
                        break;
                    }
                }
            }
        }
        assert!(ended);
        assert_eq!(body, b"hello!!!");
    }

    #[test]
    fn malformed_chunks_are_errors_not_guesses() {
        for body in [
            "\r\n\r\n",                     // no size: not the last chunk
            "5\nhello\r\n0\r\n\r\n",        // bare LF
            "5\r\nhelloXX0\r\n\r\n",        // no CRLF after the data
            "g\r\n",                        // not hex
            "10000000000000000\r\n",        // seventeen digits
            "5;\x01\r\nhello\r\n0\r\n\r\n", // control character in an extension
            "5 x\r\nhello\r\n0\r\n\r\n",    // junk after the size
        ] {
            let response = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{body}");
            assert!(
                matches!(read(&response), Err(WireError::Chunk)),
                "{body:?} gave {:?}",
                read(&response).map(|r| r.1)
            );
        }
        let endless_extension = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;{}",
            "x".repeat(MAX_CHUNK_LINE + 1)
        );
        assert_eq!(read(&endless_extension).unwrap_err(), WireError::Chunk);
    }

    #[test]
    fn a_body_cut_short_is_truncated() {
        let short = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        assert_eq!(read(short).unwrap_err(), WireError::Truncated);
        let unfinished = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
        assert_eq!(read(unfinished).unwrap_err(), WireError::Truncated);
    }

    #[test]
    fn interim_responses_are_skipped_but_bounded() {
        let (head, body, _) = read(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
             HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        )
        .unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(body, b"ok");
        let endless = "HTTP/1.1 100 Continue\r\n\r\n".repeat(17);
        assert_eq!(read(&endless).unwrap_err(), WireError::TooManyInterim);
    }

    #[test]
    fn the_request_head_states_fencegates_own_framing() {
        let mut out = BytesMut::new();
        let token = |out: &mut BytesMut| write_header(out, b"fencing-token", b"7");
        write_request_head(
            &mut out,
            &Method::PUT,
            &["/db", "/wallets/1?x=2"],
            Some("127.0.0.1:8080"),
            RequestFraming::Length(5),
            token,
        );
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "PUT /db/wallets/1?x=2 HTTP/1.1\r\nhost: 127.0.0.1:8080\r\nfencing-token: 7\r\n\
             content-length: 5\r\n\r\n"
        );
        let mut out = BytesMut::new();
        write_request_head(
            &mut out,
            &Method::POST,
            &["/"],
            None,
            RequestFraming::Chunked,
            |_| {},
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(
            text,
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn chunks_are_written_with_hex_sizes() {
        let mut out = Vec::new();
        write_chunk(&mut out, &[b'a'; 26]);
        write_chunk(&mut out, b"");
        out.extend_from_slice(LAST_CHUNK);
        assert_eq!(
            out,
            [b"1a\r\n".as_slice(), &[b'a'; 26], b"\r\n0\r\n\r\n"].concat()
        );
        let mut digits = [0; 20];
        assert_eq!(format_u64(0, &mut digits), b"0");
        assert_eq!(format_u64(u64::MAX, &mut digits), b"18446744073709551615");
    }
}
