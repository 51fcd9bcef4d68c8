use super::*;

const LIMITS: HeadLimits = HeadLimits {
    max_size: 8 * 1024,
    max_headers: 16,
};

fn parsed(text: &str) -> Result<Option<RequestHead>, HeadError> {
    parse(&mut BytesMut::from(text), LIMITS)
}

fn head(text: &str) -> RequestHead {
    parsed(text).expect("a valid head").expect("a whole head")
}

fn refused(text: &str) -> HeadError {
    parsed(text).expect_err("a refused head")
}

#[test]
fn a_head_is_parsed_and_taken_off_the_buffer_leaving_the_body() {
    let mut buf = BytesMut::from(
        "PUT /wallets/1?x=1 HTTP/1.1\r\nHost: a\r\nFencing-Token: 7\r\ncontent-length: 5\r\n\r\nhello",
    );
    let head = parse(&mut buf, LIMITS).unwrap().unwrap();
    assert_eq!(&buf[..], b"hello");
    assert_eq!(head.request.method(), Method::PUT);
    assert_eq!(head.request.uri().path(), "/wallets/1");
    assert_eq!(head.request.uri().query(), Some("x=1"));
    assert_eq!(head.request.version(), Version::HTTP_11);
    assert_eq!(head.request.headers()["fencing-token"], "7");
    assert_eq!(head.request.headers()["host"], "a");
    assert_eq!(head.framing, BodyFraming::Length(5));
    assert!(head.keep_alive);
    assert!(!head.expect_continue);
}

#[test]
fn a_partial_head_leaves_the_buffer_untouched() {
    let mut buf = BytesMut::from("GET / HTTP/1.1\r\nHost: a\r\n");
    assert!(parse(&mut buf, LIMITS).unwrap().is_none());
    assert_eq!(&buf[..], b"GET / HTTP/1.1\r\nHost: a\r\n");
}

#[test]
fn heads_over_the_size_or_header_limits_are_431() {
    let long = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(LIMITS.max_size));
    let error = refused(&long);
    assert_eq!(error, HeadError::TooLarge(LIMITS.max_size));
    assert_eq!(error.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Whole, but larger than the limit.
    let whole = format!(
        "GET / HTTP/1.1\r\nx: {}\r\n\r\n",
        "a".repeat(LIMITS.max_size)
    );
    assert_eq!(refused(&whole), HeadError::TooLarge(LIMITS.max_size));
    let many: String = (0..=LIMITS.max_headers)
        .map(|i| format!("h{i}: v\r\n"))
        .collect();
    let error = refused(&format!("GET / HTTP/1.1\r\n{many}\r\n"));
    assert_eq!(error, HeadError::TooManyHeaders(LIMITS.max_headers));
    assert_eq!(error.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    // Exactly max_headers is fine.
    let enough: String = (0..LIMITS.max_headers)
        .map(|i| format!("h{i}: v\r\n"))
        .collect();
    assert!(
        parsed(&format!("GET / HTTP/1.1\r\n{enough}\r\n"))
            .unwrap()
            .is_some()
    );
    assert_eq!(error.slug(), "head-too-large");
}

#[test]
fn a_head_of_exactly_max_header_size_is_served_and_one_byte_more_is_431() {
    let sized = |size: usize| {
        let frame = "GET / HTTP/1.1\r\nx: \r\n\r\n".len();
        format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(size - frame))
    };
    let exact = sized(LIMITS.max_size);
    assert_eq!(exact.len(), LIMITS.max_size);
    assert!(parsed(&exact).unwrap().is_some());
    assert_eq!(
        refused(&sized(LIMITS.max_size + 1)),
        HeadError::TooLarge(LIMITS.max_size)
    );
}

#[test]
fn more_headers_than_the_stack_holds_parse_on_the_heap() {
    let limits = HeadLimits {
        max_size: 64 * 1024,
        max_headers: STACK_HEADERS + 10,
    };
    let many: String = (0..STACK_HEADERS + 5)
        .map(|i| format!("h{i}: v\r\n"))
        .collect();
    let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\n{many}\r\n").as_str());
    let head = parse(&mut buf, limits).unwrap().unwrap();
    assert_eq!(head.request.headers().len(), STACK_HEADERS + 5);
}

#[test]
fn chunked_alone_is_the_only_transfer_encoding_accepted() {
    let chunked = head("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n");
    assert_eq!(chunked.framing, BodyFraming::Chunked);
    let listed = head("POST / HTTP/1.1\r\ntransfer-encoding: , chunked\r\n\r\n");
    assert_eq!(listed.framing, BodyFraming::Chunked);
    let cases = [
        ("transfer-encoding: gzip, chunked", HeadError::UnknownCoding),
        ("transfer-encoding: xchunked", HeadError::UnknownCoding),
        ("transfer-encoding: identity", HeadError::UnknownCoding),
        (
            "transfer-encoding: chunked, gzip",
            HeadError::ChunkedNotLast,
        ),
        (
            "transfer-encoding: chunked\r\ntransfer-encoding: identity",
            HeadError::ChunkedNotLast,
        ),
        (
            "transfer-encoding: chunked\r\ntransfer-encoding: chunked",
            HeadError::ChunkedNotLast,
        ),
        ("transfer-encoding: ", HeadError::ChunkedNotLast),
    ];
    for (header, expected) in cases {
        let error = refused(&format!("POST / HTTP/1.1\r\n{header}\r\n\r\n"));
        assert_eq!(error, expected, "{header}");
    }
    assert_eq!(
        HeadError::UnknownCoding.status(),
        StatusCode::NOT_IMPLEMENTED
    );
    assert_eq!(HeadError::ChunkedNotLast.status(), StatusCode::BAD_REQUEST);
    assert_eq!(HeadError::UnknownCoding.slug(), "unknown-transfer-coding");
    assert_eq!(HeadError::ChunkedNotLast.slug(), "malformed-request");
}

#[test]
fn the_smuggling_shapes_of_rfc_9112_are_refused() {
    // CL.TE and TE.CL
    assert_eq!(
        refused("POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"),
        HeadError::LengthAndEncoding
    );
    assert_eq!(
        refused("POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n"),
        HeadError::LengthAndEncoding
    );
    // Two different lengths, in two headers or one list.
    assert_eq!(
        refused("POST / HTTP/1.1\r\ncontent-length: 0\r\ncontent-length: 44\r\n\r\n"),
        HeadError::ContentLength
    );
    assert_eq!(
        refused("POST / HTTP/1.1\r\ncontent-length: 1, 2\r\n\r\n"),
        HeadError::ContentLength
    );
    // Signs, spaces inside, hex, overflow, empty.
    for value in ["+5", "-1", "5 5", "0x5", "99999999999999999999999", ""] {
        let error = refused(&format!(
            "POST / HTTP/1.1\r\ncontent-length: {value}\r\n\r\n"
        ));
        assert_eq!(error, HeadError::ContentLength, "{value:?}");
    }
    // A Transfer-Encoding on HTTP/1.0.
    assert_eq!(
        refused("POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n"),
        HeadError::EncodingOnHttp10
    );
    // obs-fold, whitespace before the colon, a bare CR.
    for text in [
        "PUT / HTTP/1.1\r\nfencing-token: 1\r\n 5\r\n\r\n",
        "PUT / HTTP/1.1\r\ntransfer-encoding : chunked\r\n\r\n",
        "PUT / HTTP/1.1\r\nfencing-token: 1\r5\r\n\r\n",
        "PUT / HTTP/1.1\rhost: a\r\n\r\n",
    ] {
        assert!(matches!(refused(text), HeadError::Malformed(_)), "{text:?}");
    }
}

#[test]
fn equal_repeated_lengths_are_one_length() {
    let repeated = head("POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3, 3\r\n\r\n");
    assert_eq!(repeated.framing, BodyFraming::Length(3));
    let zero = head("POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    assert_eq!(zero.framing, BodyFraming::None);
    let none = head("GET / HTTP/1.1\r\n\r\n");
    assert_eq!(none.framing, BodyFraming::None);
}

#[test]
fn keep_alive_follows_the_version_and_connection_options() {
    assert!(head("GET / HTTP/1.1\r\n\r\n").keep_alive);
    assert!(!head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive);
    assert!(!head("GET / HTTP/1.1\r\nConnection: te, close\r\n\r\n").keep_alive);
    assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
    assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    assert!(!head("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
}

#[test]
fn expect_continue_is_noticed_on_http_11_only() {
    assert!(
        head("PUT / HTTP/1.1\r\nExpect: 100-Continue\r\ncontent-length: 1\r\n\r\n").expect_continue
    );
    assert!(
        !head("PUT / HTTP/1.0\r\nExpect: 100-continue\r\ncontent-length: 1\r\n\r\n")
            .expect_continue
    );
    assert!(
        !head("PUT / HTTP/1.1\r\nExpect: something\r\ncontent-length: 1\r\n\r\n").expect_continue
    );
}

#[test]
fn targets_in_every_form_parse_and_bad_ones_are_refused() {
    assert_eq!(head("OPTIONS * HTTP/1.1\r\n\r\n").request.uri(), "*");
    let absolute = head("GET http://example.com/a?b HTTP/1.1\r\n\r\n");
    assert_eq!(absolute.request.uri().path(), "/a");
    assert_eq!(absolute.request.uri().host(), Some("example.com"));
    assert_eq!(
        refused("GET /a\u{7f}b HTTP/1.1\r\n\r\n").status(),
        StatusCode::BAD_REQUEST
    );
    assert!(matches!(
        refused("GET / HTTP/2.0\r\n\r\n"),
        HeadError::Malformed(_)
    ));
    assert!(matches!(
        refused("G@T / HTTP/1.1\r\n\r\n"),
        HeadError::Malformed(_)
    ));
}

#[test]
fn header_values_keep_their_bytes_and_names_are_lowercased() {
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nX-Thing: a\tb \xff\r\n\r\n"[..]);
    let head = parse(&mut buf, LIMITS).unwrap().unwrap();
    assert_eq!(head.request.headers()["x-thing"].as_bytes(), b"a\tb \xff");
}

#[test]
fn a_bare_lf_ends_a_line_as_crlf_would_and_nothing_else_does() {
    // RFC 9112 §2.2 lets a recipient take a lone LF as a line end, as hyper and nginx do; what is
    // forwarded is re-framed with CRLF, so the upstream never sees the difference.
    let mut buf = BytesMut::from("PUT /a HTTP/1.1\nhost: a\ncontent-length: 2\n\nhiGET");
    let head = parse(&mut buf, LIMITS).unwrap().unwrap();
    assert_eq!(head.framing, BodyFraming::Length(2));
    assert_eq!(&buf[..], b"hiGET");
    // A lone CR is never a line end.
    assert!(matches!(
        refused("PUT /a HTTP/1.1\rcontent-length: 2\r\n\r\n"),
        HeadError::Malformed(_)
    ));
}
