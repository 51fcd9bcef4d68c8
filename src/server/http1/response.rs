//! Writing a response to the client: the head, then the body framed by `Content-Length` when its
//! length is known, chunked when it is not (HTTP/1.1), or up to the connection's close (HTTP/1.0).
//!
//! Small answers leave in one system call: the head and every body piece already at hand are
//! gathered in one buffer, which is written only when the body has nothing more to give at once.

use std::fmt::Display;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Version};
use hyper::body::Body;
use tokio::net::tcp::OwnedWriteHalf;

use crate::proxy::wire::{LAST_CHUNK, format_u64, write_chunk, write_chunk_size};
use crate::verbatim::{CarriesHeaders, Kind, VerbatimHeaders};

/// Bytes gathered before they are written, and the size above which a body piece is written
/// from its own buffer instead of being copied.
const GATHER: usize = 16 * 1024;

/// What the connection knows of the request being answered.
#[derive(Debug, Clone, Copy)]
pub(super) struct Asked {
    pub(super) head: bool,
    pub(super) version: Version,
    /// Whether the connection may carry another request (the client's wish, and not stopping).
    pub(super) keep_alive: bool,
}

impl Asked {
    pub(super) fn of<B>(request: &http::Request<B>, keep_alive: bool) -> Asked {
        Asked {
            head: request.method() == Method::HEAD,
            version: request.version(),
            keep_alive,
        }
    }

    /// The same, on a connection that closes after this answer.
    pub(super) fn closing(self) -> Asked {
        Asked {
            keep_alive: false,
            ..self
        }
    }
}

/// Why a response could not be written whole; the connection is closed after any of them.
#[derive(Debug, thiserror::Error)]
pub(super) enum WriteError {
    #[error("writing to the client failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client read nothing for {0:?}")]
    Stalled(Duration),
    #[error("the response body failed: {0}")]
    Body(String),
    #[error("the response body did not match its Content-Length")]
    Length,
}

/// How the body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// The connection's write side.
#[derive(Debug)]
pub(super) struct Writer {
    write: OwnedWriteHalf,
    out: BytesMut,
    /// How long a write may wait for the client to read.
    stall: Duration,
}

impl Writer {
    pub(super) fn new(write: OwnedWriteHalf, stall: Duration) -> Writer {
        Writer {
            write,
            out: BytesMut::with_capacity(4096),
            stall,
        }
    }

    pub(super) fn into_inner(self) -> OwnedWriteHalf {
        self.write
    }

    /// Writes `response`; returns whether the connection may carry another request.
    pub(super) async fn respond<B>(
        &mut self,
        response: Response<B>,
        asked: Asked,
    ) -> Result<bool, WriteError>
    where
        B: Body<Data = Bytes> + CarriesHeaders,
        B::Error: Display,
    {
        let (parts, body) = response.into_parts();
        let (framing, keep_alive) = self.head(&parts, &body, asked);
        crate::header_maps::give_back(parts.headers);
        let mut body = std::pin::pin!(body);
        if framing == Framing::None {
            self.flush().await?;
            return Ok(keep_alive);
        }
        self.body(body.as_mut(), framing).await?;
        Ok(keep_alive)
    }

    /// Gathers the head, and decides the framing and whether the connection lives on.
    fn head<B: Body + CarriesHeaders>(
        &mut self,
        parts: &http::response::Parts,
        body: &B,
        asked: Asked,
    ) -> (Framing, bool) {
        let status = parts.status;
        let bodiless = asked.head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let out = &mut self.out;
        out.put_slice(b"HTTP/1.1 ");
        out.put_slice(status.as_str().as_bytes());
        out.put_u8(b' ');
        out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.put_slice(b"\r\n");
        let mut seen = Seen::default();
        if let Some(verbatim) = body.verbatim_headers() {
            debug_assert!(
                shares_no_name(verbatim, &parts.headers),
                "a header the proxy adds to an answer is also among the upstream's verbatim ones"
            );
            seen = put_verbatim_headers(out, verbatim, bodiless);
        }
        seen.add(put_end_to_end_headers(out, &parts.headers, bodiless));
        let mut keep_alive = asked.keep_alive && !seen.close;
        let framing = if bodiless {
            Framing::None
        } else if let Some(length) = seen.length.or(body.size_hint().exact()) {
            if length == 0 {
                Framing::None
            } else {
                Framing::Length(length)
            }
        } else if asked.version == Version::HTTP_11 {
            Framing::Chunked
        } else {
            keep_alive = false;
            Framing::UntilClose
        };
        if !seen.date {
            put_header(out, b"date", &http_date());
        }
        match framing {
            Framing::Length(length) => {
                let mut digits = [0; 20];
                put_header(out, b"content-length", format_u64(length, &mut digits));
            }
            Framing::None if !bodiless => put_header(out, b"content-length", b"0"),
            Framing::Chunked => put_header(out, b"transfer-encoding", b"chunked"),
            Framing::None | Framing::UntilClose => {}
        }
        if !keep_alive {
            put_header(out, b"connection", b"close");
        } else if asked.version == Version::HTTP_10 {
            put_header(out, b"connection", b"keep-alive");
        }
        out.put_slice(b"\r\n");
        (framing, keep_alive)
    }

    /// Writes the body, gathering what arrives at once.
    async fn body<B>(&mut self, mut body: Pin<&mut B>, framing: Framing) -> Result<(), WriteError>
    where
        B: Body<Data = Bytes>,
        B::Error: Display,
    {
        let mut left = match framing {
            Framing::Length(length) => length,
            _ => u64::MAX,
        };
        let mut trailers_sent = false;
        loop {
            let out_empty = self.out.is_empty();
            let next = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
                // Nothing more at once: what is gathered leaves now.
                Poll::Pending if !out_empty => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            })
            .await;
            let frame = match next {
                None => {
                    self.flush().await?;
                    continue;
                }
                Some(None) => break,
                Some(Some(Ok(frame))) => frame,
                Some(Some(Err(e))) => {
                    // Nothing can say "failed" in the middle of an HTTP/1 body but closing.
                    let _ = self.flush().await;
                    return Err(WriteError::Body(e.to_string()));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    if data.len() as u64 > left {
                        return Err(WriteError::Length);
                    }
                    if let Framing::Length(_) = framing {
                        left -= data.len() as u64;
                    }
                    self.data(data, framing).await?;
                }
                Err(frame) => {
                    if let (Ok(trailers), Framing::Chunked) = (frame.into_trailers(), framing) {
                        self.out.put_slice(b"0\r\n");
                        for (name, value) in &trailers {
                            put_header(&mut self.out, name.as_str().as_bytes(), value.as_bytes());
                        }
                        self.out.put_slice(b"\r\n");
                        trailers_sent = true;
                    }
                }
            }
        }
        match framing {
            Framing::Chunked if !trailers_sent => self.out.put_slice(LAST_CHUNK),
            Framing::Length(_) if left != 0 => {
                let _ = self.flush().await;
                return Err(WriteError::Length);
            }
            _ => {}
        }
        self.flush().await
    }

    /// Gathers or writes one piece of the body.
    async fn data(&mut self, data: Bytes, framing: Framing) -> Result<(), WriteError> {
        if data.is_empty() {
            return Ok(());
        }
        if data.len() < GATHER {
            if framing == Framing::Chunked {
                write_chunk(&mut self.out, &data);
            } else {
                self.out.put_slice(&data);
            }
            if self.out.len() >= GATHER {
                self.flush().await?;
            }
            return Ok(());
        }
        // A large piece is written from its own buffer, after what was gathered.
        if framing == Framing::Chunked {
            write_chunk_size(&mut self.out, data.len());
        }
        self.flush().await?;
        self.write_all(&data).await?;
        if framing == Framing::Chunked {
            self.out.put_slice(b"\r\n");
        }
        Ok(())
    }

    /// Writes what is gathered.
    pub(super) async fn flush(&mut self) -> Result<(), WriteError> {
        let out = std::mem::take(&mut self.out);
        let written = self.write_all(&out).await;
        self.out = out;
        self.out.clear();
        written
    }

    /// Writes all of `bytes`; a client that reads nothing for `stall` is given up on.
    async fn write_all(&self, mut bytes: &[u8]) -> Result<(), WriteError> {
        while !bytes.is_empty() {
            match self.write.try_write(bytes) {
                Ok(written) => bytes = &bytes[written..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::timeout(self.stall, self.write.writable())
                        .await
                        .map_err(|_| WriteError::Stalled(self.stall))??;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// What a response's own headers say about this hop, noted while they are written.
#[derive(Debug, Default, PartialEq, Eq)]
struct Seen {
    /// A `Connection` option is `close` (fencegate's own refusals say so when the request body
    /// was left unread).
    close: bool,
    /// The first `Content-Length`, if it is one plain number.
    length: Option<u64>,
    /// A `Date` is there already.
    date: bool,
}

impl Seen {
    /// Adds what headers written after these said.
    fn add(&mut self, later: Seen) {
        self.close |= later.close;
        self.length = self.length.or(later.length);
        self.date |= later.date;
    }
}

/// Writes an upstream's headers kept verbatim: `Content-Length` only if the answer is
/// `bodiless`, as [`put_end_to_end_headers`] does (the hop-by-hop ones were left out when the
/// upstream's head was read).
fn put_verbatim_headers(out: &mut BytesMut, headers: &VerbatimHeaders, bodiless: bool) -> Seen {
    let mut seen = Seen::default();
    let mut first_length = true;
    for (line, value, kind) in headers.lines() {
        match kind {
            Kind::ContentLength => {
                if first_length {
                    seen.length = declared_length(value);
                    first_length = false;
                }
                if bodiless {
                    put_line(out, line);
                }
            }
            Kind::Date => {
                seen.date = true;
                put_line(out, line);
            }
            Kind::Other => put_line(out, line),
        }
    }
    seen
}

/// Writes a header's whole line, as the upstream sent it.
fn put_line(out: &mut BytesMut, line: &[u8]) {
    out.put_slice(line);
    out.put_slice(b"\r\n");
}

/// Whether no header of `map` has the name of one of `verbatim`: written one after the other,
/// a shared name would be sent twice.
fn shares_no_name(verbatim: &VerbatimHeaders, map: &HeaderMap) -> bool {
    map.keys().all(|name| {
        verbatim
            .iter()
            .all(|(kept, _, _)| !kept.eq_ignore_ascii_case(name.as_str().as_bytes()))
    })
}

/// Writes `headers` but the ones that frame this hop (`Connection`, `Transfer-Encoding`, and
/// `Content-Length` unless the answer is `bodiless`: a HEAD's or a 304's describes the body it
/// leaves out), and notes what they say. One pass: three lookups in the map cost more than
/// the writing (bench/instructions.sh).
fn put_end_to_end_headers(out: &mut BytesMut, headers: &HeaderMap, bodiless: bool) -> Seen {
    let mut seen = Seen::default();
    let mut first_length = true;
    for (name, value) in headers {
        if name == CONNECTION {
            seen.close |= says_close(value);
        } else if name == TRANSFER_ENCODING {
            // This hop's framing: the caller writes its own.
        } else if name == CONTENT_LENGTH {
            if first_length {
                seen.length = declared_length(value.as_bytes());
                first_length = false;
            }
            if bodiless {
                put_header(out, name.as_str().as_bytes(), value.as_bytes());
            }
        } else {
            seen.date |= name == DATE;
            put_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    seen
}

/// Whether a `Connection` value has the option `close`.
fn says_close(value: &HeaderValue) -> bool {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .any(|option| crate::ascii::eq_lowercase(option.trim_ascii(), b"close"))
}

/// A `Content-Length` value, if it is one plain number.
fn declared_length(value: &[u8]) -> Option<u64> {
    let value = std::str::from_utf8(value).ok()?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn put_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

thread_local! {
    /// The `Date` header's text, remade once a second.
    static DATE_TEXT: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
}

/// The current time as an HTTP date (29 bytes), formatted at most once a second per thread.
fn http_date() -> [u8; 29] {
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    DATE_TEXT.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            if let Ok(bytes) = <[u8; 29]>::try_from(text.as_bytes()) {
                *cached = (second, bytes);
            }
        }
        cached.1
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end-to-end headers of an upstream answer with `lines`, as the upstream client keeps them.
    fn kept(lines: &str) -> VerbatimHeaders {
        let head = format!("HTTP/1.1 200 OK\r\n{lines}\r\n");
        let mut buf = BytesMut::from(head.as_bytes());
        crate::proxy::wire::parse_head(&mut buf)
            .unwrap()
            .unwrap()
            .headers
    }

    #[test]
    fn verbatim_headers_are_written_as_sent_but_the_framing_they_are_noted_for() {
        let headers = kept("ETag:\"1\"\r\nContent-Length: 12\r\nDate: Tue, 01 Dec 2026\r\n");
        for bodiless in [false, true] {
            let mut out = BytesMut::new();
            let seen = put_verbatim_headers(&mut out, &headers, bodiless);
            let length = if bodiless {
                "Content-Length: 12\r\n"
            } else {
                ""
            };
            assert_eq!(
                std::str::from_utf8(&out).unwrap(),
                format!("ETag:\"1\"\r\n{length}Date: Tue, 01 Dec 2026\r\n")
            );
            let expected = Seen {
                close: false,
                length: Some(12),
                date: true,
            };
            assert_eq!(seen, expected);
        }
    }

    #[test]
    fn what_later_headers_say_is_added_and_the_first_length_kept() {
        let mut seen = Seen {
            close: false,
            length: Some(1),
            date: false,
        };
        seen.add(Seen {
            close: true,
            length: Some(2),
            date: true,
        });
        let expected = Seen {
            close: true,
            length: Some(1),
            date: true,
        };
        assert_eq!(seen, expected);
        let mut none = Seen::default();
        none.add(Seen {
            length: Some(2),
            ..Seen::default()
        });
        assert_eq!(none.length, Some(2));
    }

    #[test]
    fn a_name_in_both_the_verbatim_headers_and_the_map_is_found_in_any_case() {
        let headers = kept("ETag: 1\r\nServer: s\r\n");
        let mut map = HeaderMap::new();
        map.insert("fencing-token-highest", HeaderValue::from_static("1"));
        assert!(shares_no_name(&headers, &map));
        map.insert("server", HeaderValue::from_static("fencegate"));
        assert!(!shares_no_name(&headers, &map));
    }

    #[test]
    fn an_http_date_is_29_bytes_of_imf_fixdate() {
        let date = http_date();
        let text = std::str::from_utf8(&date).unwrap();
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
    }

    fn seen(headers: &[(&'static str, &'static str)], bodiless: bool) -> (Seen, String) {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, value.parse().unwrap());
        }
        let mut out = BytesMut::new();
        let seen = put_end_to_end_headers(&mut out, &map, bodiless);
        (seen, String::from_utf8(out.to_vec()).unwrap())
    }

    #[test]
    fn a_response_says_close_when_any_connection_option_is_close() {
        let (said, written) = seen(&[("connection", "keep-alive, Close")], false);
        assert!(said.close);
        assert_eq!(
            written, "",
            "Connection is this hop's, written by the server"
        );
        let (said, _) = seen(&[("connection", "keep-alive"), ("connection", "x")], false);
        assert!(!said.close);
        let (said, _) = seen(
            &[("connection", "keep-alive"), ("connection", "close")],
            false,
        );
        assert!(said.close, "any of the Connection lines");
    }

    #[test]
    fn a_declared_length_is_the_first_content_length_as_one_plain_number() {
        let length = |value| seen(&[("content-length", value)], false).0.length;
        assert_eq!(length("12"), Some(12));
        assert_eq!(length("+12"), None);
        assert_eq!(length("1,1"), None);
        let (said, _) = seen(&[("content-length", "7"), ("content-length", "9")], false);
        assert_eq!(said.length, Some(7));
        let (said, _) = seen(&[("content-length", "x"), ("content-length", "9")], false);
        assert_eq!(said.length, None, "only the first is read");
    }

    #[test]
    fn framing_headers_are_left_out_and_the_rest_written_in_order() {
        let headers = [
            ("etag", "\"1\""),
            ("content-length", "3"),
            ("transfer-encoding", "chunked"),
            ("date", "Thu, 03 Dec 2026 12:00:00 GMT"),
            ("etag", "\"2\""),
        ];
        let (said, written) = seen(&headers, false);
        assert_eq!(
            said,
            Seen {
                close: false,
                length: Some(3),
                date: true,
            }
        );
        assert_eq!(
            written,
            "etag: \"1\"\r\netag: \"2\"\r\ndate: Thu, 03 Dec 2026 12:00:00 GMT\r\n"
        );
        let (said, written) = seen(&headers[..2], true);
        assert!(!said.date);
        assert_eq!(
            written, "etag: \"1\"\r\ncontent-length: 3\r\n",
            "a bodiless answer keeps the length it describes"
        );
    }
}
