//! The data plane, row by row of the contract's table, and the proxy conventions.

mod common;

use std::time::Duration;

use reqwest::Method;

use common::{RecordingUpstream, TestApp, problem, raw, raw_request, standard_routes};

async fn setup() -> (RecordingUpstream, TestApp) {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&standard_routes(&upstream.url())).await;
    (upstream, app)
}

#[tokio::test]
async fn current_token_write_is_forwarded_with_its_token_and_answer_carries_highest() {
    let (upstream, app) = setup().await;
    let response = app.put("/wallets/1", 5, "balance=100").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["fencing-token-highest"], "5");
    assert_eq!(response.headers()["x-upstream"], "recording");
    assert_eq!(response.text().await.unwrap(), "balance=100");

    let again = app.put("/wallets/1", 5, "balance=150").await;
    assert_eq!(again.status(), 200);
    let arrivals = upstream.arrivals();
    assert_eq!(arrivals.len(), 2);
    assert_eq!(
        arrivals[0].headers["fencing-token"], "5",
        "the token is forwarded unchanged"
    );
    assert_eq!(arrivals[1].body, "balance=150");
    assert!(app.rejections().is_empty());
}

#[tokio::test]
async fn missing_token_is_428_and_audited_as_missing() {
    let (upstream, app) = setup().await;
    app.put("/wallets/1", 3, "").await;
    let response = app.client.put(app.url("/wallets/1")).send().await.unwrap();
    assert_eq!(response.status(), 428);
    assert_eq!(response.headers()["fencing-token-highest"], "3");
    let body = problem(response).await;
    assert_eq!(body["status"], 428);
    assert_eq!(body["resource"], "wallet:1");
    assert_eq!(body["highest"], 3);
    assert!(body.get("token").is_none(), "no token was parsed");
    assert_eq!(
        upstream.arrivals().len(),
        1,
        "only the tokened write reached the upstream"
    );
    assert_eq!(
        app.rejections(),
        vec![(
            "missing".into(),
            None,
            Some(3),
            "PUT".into(),
            "/wallets/1".into()
        )]
    );
}

#[tokio::test]
async fn non_canonical_or_repeated_token_is_400_and_audited_as_invalid() {
    let (upstream, app) = setup().await;
    for bad in [
        "abc",
        "01",
        "-1",
        "+1",
        "1 0",
        "1.0",
        "18446744073709551616",
        "",
    ] {
        let response = app.send(Method::POST, "/wallets/9", Some(bad)).await;
        assert_eq!(response.status(), 400, "{bad:?}");
        assert_eq!(
            response.headers()["fencing-token-highest"],
            "0",
            "never-seen resource"
        );
        let body = problem(response).await;
        assert_eq!(body["resource"], "wallet:9");
    }
    let twice = app
        .client
        .post(app.url("/wallets/9"))
        .header("fencing-token", "1")
        .header("fencing-token", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 400);
    assert!(upstream.arrivals().is_empty());
    let rejections = app.rejections();
    assert_eq!(rejections.len(), 9);
    assert!(rejections.iter().all(|r| r.0 == "invalid" && r.1.is_none()));
}

#[tokio::test]
async fn largest_u64_token_is_accepted() {
    let (_upstream, app) = setup().await;
    let response = app.put("/wallets/max", u64::MAX, "").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["fencing-token-highest"],
        "18446744073709551615"
    );
}

#[tokio::test]
async fn stale_token_is_rejected_with_409_and_highest_and_never_forwarded() {
    let (upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/1", 2, "new leader").await.status(), 200);
    let response = app.put("/wallets/1", 1, "zombie").await;
    assert_eq!(response.status(), 409);
    assert_eq!(response.headers()["fencing-token-highest"], "2");
    let body = problem(response).await;
    assert_eq!(body["type"], "urn:fencegate:problem:stale-token");
    assert_eq!(
        (body["token"].as_u64(), body["highest"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(body["resource"], "wallet:1");
    assert!(upstream.arrivals().iter().all(|a| a.body != "zombie"));
    assert_eq!(
        app.rejections(),
        vec![(
            "stale".into(),
            Some(1),
            Some(2),
            "PUT".into(),
            "/wallets/1".into()
        )]
    );
}

#[tokio::test]
async fn higher_token_is_durable_before_the_upstream_sees_it() {
    let (upstream, app) = setup().await;
    let db = app.db_path.clone();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    upstream.on_arrival(move |arrival| {
        record
            .lock()
            .unwrap()
            .push((arrival.token, common::durable_highest(&db, "wallet:1")));
    });
    for token in [1, 4, 9] {
        assert_eq!(app.put("/wallets/1", token, "").await.status(), 200);
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(Some(1), Some(1)), (Some(4), Some(4)), (Some(9), Some(9))]
    );
    let epochs = app.epochs();
    assert_eq!(
        epochs,
        vec![
            ("wallet:1".into(), None, 1, "write".into()),
            ("wallet:1".into(), Some(1), 4, "write".into()),
            ("wallet:1".into(), Some(4), 9, "write".into()),
        ]
    );
}

#[tokio::test]
async fn resources_are_fenced_independently() {
    let (_upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/a", 10, "").await.status(), 200);
    assert_eq!(app.put("/wallets/b", 1, "").await.status(), 200);
    assert_eq!(app.put("/wallets/a", 9, "").await.status(), 409);
}

#[tokio::test]
async fn client_cannot_choose_its_resource_through_query_or_headers() {
    let (_upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/1", 5, "").await.status(), 200);
    let response = app
        .client
        .put(app.url("/wallets/1?resource=elsewhere"))
        .header("fencing-token", "1")
        .header("fencing-resource", "elsewhere")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
}

#[tokio::test]
async fn percent_encoded_spelling_of_a_path_is_the_same_resource() {
    let (_upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/1", 5, "").await.status(), 200);
    let (status, headers, _) = raw_request(
        app.addr,
        &raw("PUT", "/%77allets/%31", &["fencing-token: 4"]),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(headers["fencing-token-highest"], "5");
}

#[tokio::test]
async fn reads_pass_through_unchecked_by_default() {
    let (upstream, app) = setup().await;
    app.put("/wallets/1", 5, "").await;
    let plain = app.client.get(app.url("/wallets/1")).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    let stale = app.send(Method::GET, "/wallets/1", Some("1")).await;
    assert_eq!(
        stale.status(),
        200,
        "GET is not a fenced method on this route"
    );
    assert_eq!(upstream.arrivals().len(), 3);
}

#[tokio::test]
async fn fence_reads_route_rejects_stale_reads_and_passes_untokened_ones() {
    let (upstream, app) = setup().await;
    app.put("/accounts/7", 5, "").await;
    let stale = app.send(Method::GET, "/accounts/7", Some("4")).await;
    assert_eq!(stale.status(), 409);
    let current = app.send(Method::GET, "/accounts/7", Some("5")).await;
    assert_eq!(current.status(), 200);
    assert_eq!(current.headers()["fencing-token-highest"], "5");
    let untokened = app.client.get(app.url("/accounts/7")).send().await.unwrap();
    assert_eq!(untokened.status(), 200);
    assert_eq!(upstream.arrivals().len(), 3);
}

#[tokio::test]
async fn method_override_headers_are_rejected_on_every_route() {
    let (upstream, app) = setup().await;
    for header in [
        "X-HTTP-Method-Override",
        "X-Method-Override",
        "X-HTTP-Method",
    ] {
        for path in ["/wallets/1", "/anything/else"] {
            let response = app
                .client
                .get(app.url(path))
                .header(header, "DELETE")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 400, "{header} on {path}");
            problem(response).await;
        }
    }
    assert!(upstream.arrivals().is_empty());
}

#[tokio::test]
async fn method_override_on_a_fenced_request_is_400_with_the_highest_token() {
    let (upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/1", 7, "x").await.status(), 200);
    let response = app
        .client
        .put(app.url("/wallets/1"))
        .header("fencing-token", "7")
        .header("x-http-method-override", "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["fencing-token-highest"], "7");
    assert_eq!(problem(response).await["resource"], "wallet:1");
    assert_eq!(upstream.arrivals().len(), 1);
}

/// Sends a raw request to `app` and returns its status and headers.
async fn raw_status(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, std::collections::HashMap<String, String>) {
    let (status, headers, _) = raw_request(app.addr, &raw(method, path, headers)).await;
    (status, headers)
}

#[tokio::test]
async fn every_method_but_get_head_and_options_needs_a_token() {
    let (upstream, app) = setup().await;
    for method in [
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
        "FROBNICATE",
    ] {
        let (status, headers) = raw_status(&app, method, "/wallets/9", &[]).await;
        assert_eq!(status, 428, "{method}");
        assert_eq!(headers["fencing-token-highest"], "0", "{method}");
    }
    assert!(
        upstream.arrivals().is_empty(),
        "no write went through without a token"
    );
    for method in ["GET", "HEAD", "OPTIONS"] {
        let (status, _) = raw_status(&app, method, "/wallets/9", &[]).await;
        assert_eq!(status, 200, "{method}");
    }
    assert_eq!(upstream.arrivals().len(), 3);
    let reasons: Vec<String> = app
        .rejected_resources()
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(reasons, vec!["missing"; 11]);
}

#[tokio::test]
async fn unfenced_methods_may_name_only_reads() {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        r#"
[[routes]]
path = "/{{*rest}}"
upstream = "{}"
resource = "default"
unfenced_methods = ["GET", "PROPFIND"]
"#,
        upstream.url()
    );
    let app = TestApp::spawn(&config).await;
    assert_eq!(raw_status(&app, "PROPFIND", "/a", &[]).await.0, 200);
    assert_eq!(
        raw_status(&app, "HEAD", "/a", &[]).await.0,
        428,
        "HEAD is fenced once the list leaves it out"
    );
    let refused = fencegate::config::Config::from_toml(
        &config.replace("\"PROPFIND\"", "\"MKCOL\""),
        std::path::Path::new("t.toml"),
        fencegate::config::Overrides::default(),
    )
    .unwrap_err();
    assert!(
        refused
            .to_string()
            .starts_with("routes[0].unfenced_methods: \"MKCOL\" can change state"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_method_in_another_case_is_400_and_never_forwarded() {
    let (upstream, app) = setup().await;
    for method in ["put", "Put", "pAtCh", "delete", "mkcol", "Get"] {
        let (status, _) = raw_status(&app, method, "/wallets/1", &[]).await;
        assert_eq!(status, 400, "{method}");
    }
    // The same over HTTP/2, where the method is a pseudo-header.
    let stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    for method in ["put", "Delete"] {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/wallets/1", app.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 400, "h2 {method}");
    }
    assert!(upstream.arrivals().is_empty());
}

#[tokio::test]
async fn a_connection_header_naming_the_token_is_400_and_the_token_reaches_the_upstream() {
    let (upstream, app) = setup().await;
    for connection in ["fencing-token", "keep-alive, Fencing-Token", "Destination"] {
        let line = format!("x-extra: 1\r\nconnection: {connection}");
        let (status, _) = raw_status(&app, "PUT", "/wallets/1", &["fencing-token: 3", &line]).await;
        assert_eq!(status, 400, "{connection}");
    }
    assert!(upstream.arrivals().is_empty());
    assert_eq!(app.put("/wallets/1", 3, "x").await.status(), 200);
    assert_eq!(upstream.arrivals()[0].headers["fencing-token"], "3");
}

#[tokio::test]
async fn copy_and_move_are_fenced_by_the_destinations_gate_in_every_spelling() {
    let (upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/1", 5, "leader").await.status(), 200);
    for method in ["COPY", "MOVE"] {
        for destination in [
            "/wallets/1",
            "/wallets/%31",
            "/%77allets/1",
            "http://fencegate.test/wallets/1",
            "HTTP://FENCEGATE.TEST:80/wallets/1",
        ] {
            let line = format!("destination: {destination}");
            let (status, headers) =
                raw_status(&app, method, "/scratch", &["fencing-token: 1", &line]).await;
            assert_eq!(status, 409, "{method} -> {destination}");
            assert_eq!(
                headers["fencing-token-highest"], "5",
                "{method} -> {destination}"
            );
        }
    }
    assert_eq!(upstream.arrivals().len(), 1, "only the leader's PUT");
    let rejected = app.rejected_resources();
    assert_eq!(rejected.len(), 10);
    assert!(
        rejected
            .iter()
            .all(|(resource, reason)| resource == "wallet:1" && reason == "stale")
    );
    // Refused by one gate, the request raised no resource: `default` was never advanced to 1.
    assert!(
        app.epochs()
            .iter()
            .all(|(resource, ..)| resource == "wallet:1")
    );
}

#[tokio::test]
async fn an_ambiguous_foreign_or_unroutable_destination_is_400() {
    let upstream = RecordingUpstream::start().await;
    let other = RecordingUpstream::start().await;
    let config = format!(
        r#"
[[routes]]
path = "/wallets/{{id}}"
upstream = "{}"
resource = "wallet:{{id}}"

[[routes]]
path = "/elsewhere/{{id}}"
upstream = "{}"
resource = "elsewhere:{{id}}"
"#,
        upstream.url(),
        other.url()
    );
    let app = TestApp::spawn(&config).await;
    for destination in [
        "/wallets//1",
        "/wallets/%2e%2e/x",
        "/wallets/a%2Fb",
        "http://another-host/wallets/2",
        "/wallets/2?x=1",
        "/nowhere",
        "/elsewhere/1",
        "not a url",
    ] {
        let line = format!("destination: {destination}");
        let (status, headers) =
            raw_status(&app, "COPY", "/wallets/1", &["fencing-token: 1", &line]).await;
        assert_eq!(status, 400, "{destination}");
        assert_eq!(headers["content-type"], "application/problem+json");
    }
    let twice = raw_status(
        &app,
        "MOVE",
        "/wallets/1",
        &[
            "fencing-token: 1",
            "destination: /wallets/2",
            "destination: /wallets/3",
        ],
    )
    .await;
    assert_eq!(twice.0, 400);
    assert!(upstream.arrivals().is_empty() && other.arrivals().is_empty());
}

#[tokio::test]
async fn the_leaders_copy_passes_both_gates_and_the_upstream_gets_the_fenced_destination() {
    let (upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/1", 5, "leader").await.status(), 200);
    let (status, headers) = raw_status(
        &app,
        "COPY",
        "/wallets/1",
        &[
            "fencing-token: 5",
            "destination: http://fencegate.test/wallets/%32",
        ],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(headers["fencing-token-highest"], "5");
    let copy = &upstream.arrivals()[1];
    assert_eq!(copy.method, "COPY");
    assert_eq!(
        copy.headers["destination"],
        format!("http://{}/wallets/%32", upstream.addr),
        "rewritten onto the upstream, path as fenced"
    );
    // The destination's resource was advanced with the source's, and now fences its zombies.
    assert_eq!(app.put("/wallets/2", 4, "zombie").await.status(), 409);
}

#[tokio::test]
async fn a_request_on_a_collection_above_other_resources_is_409_collection() {
    let (upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/1", 5, "leader").await.status(), 200);
    for (method, path, extra) in [
        ("DELETE", "/wallets/", ""),
        ("DELETE", "/wallets", ""),
        ("MOVE", "/wallets/", "destination: /scratch/"),
        ("PUT", "/wallets", ""),
        ("DELETE", "/", ""),
        ("DELETE", "/wallets/1/", ""),
        ("COPY", "/scratch/", "destination: /wallets/"),
    ] {
        let mut headers = vec!["fencing-token: 9"];
        if !extra.is_empty() {
            headers.push(extra);
        }
        let (status, response) = raw_status(&app, method, path, &headers).await;
        assert_eq!(status, 409, "{method} {path} {extra}");
        assert!(
            response.contains_key("fencing-token-highest"),
            "{method} {path}"
        );
    }
    assert_eq!(upstream.arrivals().len(), 1);
    let rejected = app.rejected_resources();
    assert_eq!(rejected.len(), 7);
    assert!(
        rejected.iter().all(|(_, reason)| reason == "collection"),
        "{rejected:?}"
    );
    assert_eq!(
        rejected[0].0, "default",
        "audited under the resource the path names"
    );
    // A token was never raised by a refused collection request.
    assert_eq!(app.epochs().len(), 1);
    // The leader's own collection work: MKCOL of a member, with the member's token.
    assert_eq!(
        raw_status(&app, "MKCOL", "/wallets/9/", &["fencing-token: 1"])
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn a_trailing_slash_names_the_same_resource() {
    let (upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/9", 5, "leader").await.status(), 200);
    let (status, headers) = raw_status(&app, "MKCOL", "/wallets/9/", &["fencing-token: 4"]).await;
    assert_eq!(status, 409);
    assert_eq!(headers["fencing-token-highest"], "5");
    assert_eq!(
        app.rejected_resources(),
        vec![("wallet:9".into(), "stale".into())]
    );
    assert_eq!(upstream.arrivals().len(), 1);
}

#[tokio::test]
async fn a_resource_name_over_max_resource_len_is_414_and_never_stored() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!(
        "max_resource_len = 64\n{}",
        standard_routes(&upstream.url())
    ))
    .await;
    let long = "x".repeat(60);
    assert_eq!(
        app.put(&format!("/wallets/{long}"), 1, "").await.status(),
        414
    );
    let response = app
        .put(&format!("/wallets/{}", "x".repeat(50)), 1, "")
        .await;
    assert_eq!(response.status(), 200, "wallet: and 50 bytes fit in 64");
    let exactly = app
        .put(&format!("/wallets/{}", "x".repeat(57)), 1, "")
        .await;
    assert_eq!(exactly.status(), 200, "wallet: and 57 bytes are 64 exactly");
    let one_over = app
        .put(&format!("/wallets/{}", "x".repeat(58)), 1, "")
        .await;
    assert_eq!(one_over.status(), 414, "65 bytes");
    let destination = format!("destination: /wallets/{long}");
    let (status, _) = raw_status(
        &app,
        "COPY",
        "/wallets/1",
        &["fencing-token: 1", &destination],
    )
    .await;
    assert_eq!(status, 414);
    let response = app
        .send(Method::PUT, &format!("/wallets/{long}"), None)
        .await;
    assert_eq!(response.status(), 414, "refused before the token check");
    assert_eq!(
        problem(response).await["type"],
        "urn:fencegate:problem:resource-too-long"
    );
    assert_eq!(upstream.arrivals().len(), 2, "the names that fit");
    assert!(
        app.rejections().is_empty(),
        "a refused name is not stored, not even in the audit log"
    );
    assert_eq!(app.epochs().len(), 2, "one epoch per name that fits");
}

#[tokio::test]
async fn ambiguous_paths_are_rejected_with_400_before_routing() {
    let (upstream, app) = setup().await;
    for target in [
        "/wallets/../admin",
        "/wallets/./1",
        "/wallets/%2e%2e/x",
        "/wallets/%2E",
        "/wallets/a%2Fb",
        "/wallets/a%2fb",
        "/wallets/a%5Cb",
        "/wallets//1",
        "/wallets/%zz",
    ] {
        let (status, headers, body) =
            raw_request(app.addr, &raw("PUT", target, &["fencing-token: 1"])).await;
        assert_eq!(status, 400, "{target}");
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{target}"
        );
        assert!(body.contains("\"status\":400"), "{target}: {body}");
    }
    assert!(upstream.arrivals().is_empty());
}

#[tokio::test]
async fn unrouted_path_is_404_problem() {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        "[[routes]]\npath = \"/wallets/{{id}}\"\nupstream = \"{}\"\nresource = \"wallet:{{id}}\"\n",
        upstream.url()
    );
    let app = TestApp::spawn(&config).await;
    let response = app.put("/elsewhere", 1, "").await;
    assert_eq!(response.status(), 404);
    problem(response).await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_forwarding_headers_added() {
    let (upstream, app) = setup().await;
    let request = raw(
        "PUT",
        "/wallets/1",
        &[
            "fencing-token: 1",
            "keep-alive: timeout=5",
            "connection: close, x-private",
            "x-private: secret",
            "x-kept: yes",
        ],
    );
    let (status, headers, _) = raw_request(app.addr, &request).await;
    assert_eq!(status, 200);
    assert!(
        !headers.contains_key("x-upstream-hop"),
        "upstream's Connection-named header is hop-by-hop"
    );
    let seen = &upstream.arrivals()[0].headers;
    assert!(!seen.contains_key("keep-alive"));
    assert!(!seen.contains_key("x-private"));
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(
        seen["forwarded"],
        "for=127.0.0.1;proto=http;host=\"fencegate.test\""
    );
    assert!(
        seen.contains_key("x-request-id"),
        "a request id is generated and passed on"
    );
}

#[tokio::test]
async fn request_id_is_kept_and_returned() {
    let (upstream, app) = setup().await;
    let response = app
        .client
        .put(app.url("/wallets/1"))
        .header("fencing-token", "1")
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-123");
    assert_eq!(upstream.arrivals()[0].headers["x-request-id"], "req-123");
}

#[tokio::test]
async fn large_bodies_stream_through_both_ways() {
    let (upstream, app) = setup().await;
    let body: String = (0..2_000_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let response = app.put("/wallets/big", 1, &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.text().await.unwrap(),
        body,
        "the upstream's echo comes back whole"
    );
    assert_eq!(upstream.arrivals()[0].body.len(), body.len());
}

#[tokio::test]
async fn body_over_max_body_is_413() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!(
        "max_body = 1024\n{}",
        standard_routes(&upstream.url())
    ))
    .await;
    let declared = app.put("/wallets/1", 1, &"x".repeat(2048)).await;
    assert_eq!(declared.status(), 413);
    assert_eq!(declared.headers()["fencing-token-highest"], "0");
    problem(declared).await;
    assert!(
        upstream.arrivals().is_empty(),
        "a declared oversize body is refused before forwarding"
    );

    let chunks: Vec<Result<String, std::io::Error>> = (0..8).map(|_| Ok("y".repeat(512))).collect();
    let streamed = app
        .client
        .put(app.url("/wallets/2"))
        .header("fencing-token", "1")
        .body(reqwest::Body::wrap_stream(futures_stream(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 413);
    problem(streamed).await;

    // The limit is exact.
    let at_limit = app.put("/wallets/3", 1, &"z".repeat(1024)).await;
    assert_eq!(at_limit.status(), 200, "max_body bytes exactly");
    let one_over = app.put("/wallets/3", 1, &"z".repeat(1025)).await;
    assert_eq!(one_over.status(), 413, "one byte over max_body");
    assert_eq!(upstream.arrivals().len(), 1, "only the body at the limit");
}

fn futures_stream(
    chunks: Vec<Result<String, std::io::Error>>,
) -> impl futures_core::Stream<Item = Result<String, std::io::Error>> {
    tokio_stream::iter(chunks)
}

#[tokio::test]
async fn unreachable_upstream_is_502_problem_with_highest() {
    let closed = common::closed_port();
    let app = TestApp::spawn(&standard_routes(&format!("http://{}", closed.addr))).await;
    let response = app.put("/wallets/1", 3, "").await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["fencing-token-highest"], "3");
    problem(response).await;
    // The request never reached the upstream, so nothing is in doubt: a newer token goes at once.
    let started = std::time::Instant::now();
    assert_eq!(app.put("/wallets/1", 4, "").await.status(), 502);
    assert!(started.elapsed() < Duration::from_millis(900));
    // Counted by route, status and cause, for the operator's dashboards.
    let metrics = app.admin_get("/metrics", None).await.text().await.unwrap();
    assert!(
        metrics.contains(
            "fencegate_upstream_failures_total{route=\"/wallets/{id}\",status=\"502\",cause=\"refused\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "fencegate_build_info{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn slow_upstream_is_504_problem() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!(
        "upstream_timeout = \"200ms\"\n{}",
        standard_routes(&upstream.url())
    ))
    .await;
    let response = app
        .slow_put("/wallets/1", 1, Duration::from_millis(2_000))
        .await;
    assert_eq!(response.status(), 504);
    assert_eq!(response.headers()["fencing-token-highest"], "1");
    problem(response).await;
    let metrics = app.admin_get("/metrics", None).await.text().await.unwrap();
    assert!(
        metrics.contains(
            "fencegate_upstream_failures_total{route=\"/wallets/{id}\",status=\"504\",cause=\"timeout\"} 1"
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let (_upstream, app) = setup().await;
    let client = app.client.clone();
    let url = app.url("/wallets/1");
    let slow = tokio::spawn(async move {
        client
            .put(url)
            .header("fencing-token", "1")
            .header(common::DELAY_HEADER, "400")
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let addr = app.addr;
    app.stop().await;
    assert_eq!(
        slow.await.unwrap(),
        200,
        "the in-flight request finished during shutdown"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn audit_row_keeps_a_bounded_client_request_id() {
    let (_upstream, app) = setup().await;
    app.put("/wallets/1", 2, "").await;
    let huge_id = "r".repeat(4_000);
    let response = app
        .client
        .put(app.url("/wallets/1"))
        .header("fencing-token", "1")
        .header("x-request-id", &huge_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let conn = rusqlite::Connection::open(&app.db_path).unwrap();
    let stored: String = conn
        .query_row("SELECT request_id FROM rejections", [], |r| r.get(0))
        .unwrap();
    assert_eq!(stored.len(), fencegate::audit::MAX_AUDITED_REQUEST_ID);
}

#[tokio::test]
async fn a_refused_request_with_a_body_tells_keep_alive_clients_to_reconnect() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&standard_routes(&upstream.url())).await;
    app.put("/wallets/1", 5, "").await;
    let with_body = app.put("/wallets/1", 4, "a zombie's write").await;
    assert_eq!(with_body.status(), 409);
    assert_eq!(with_body.headers()["connection"], "close");
    let without_body = app
        .send(reqwest::Method::DELETE, "/wallets/1", Some("4"))
        .await;
    assert_eq!(without_body.status(), 409);
    assert!(
        without_body.headers().get("connection").is_none(),
        "keep-alive stays"
    );
    // Many refusals in a row on one client all come back cleanly.
    for _ in 0..200 {
        assert_eq!(app.put("/wallets/1", 4, "again").await.status(), 409);
    }
    app.stop().await;
}

/// A zombie that streams a large body without waiting for an answer still reads its whole 409,
/// then a clean end of the connection, and nothing of the refused body reaches the storage.
#[tokio::test]
async fn a_zombie_streaming_a_large_body_still_reads_its_whole_409() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&standard_routes(&upstream.url())).await;
    app.put("/wallets/1", 5, "").await;
    const LENGTH: usize = 2 * 1024 * 1024;
    for attempt in 0..20 {
        let stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        let writer = tokio::spawn(async move {
            let head = format!(
                "PUT /wallets/1 HTTP/1.1\r\nhost: t\r\nfencing-token: 4\r\n\
                 content-length: {LENGTH}\r\n\r\n"
            );
            if write.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'z'; 64 * 1024];
            for _ in 0..LENGTH / chunk.len() {
                if write.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let mut answer = Vec::new();
        let read_result = read.read_to_end(&mut answer).await;
        writer.abort();
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 409"),
            "attempt {attempt}: {read_result:?} {answer}"
        );
        // A clean end (the write side shut), not a reset that may destroy the answer unread.
        assert!(read_result.is_ok(), "attempt {attempt}: {read_result:?}");
        let (_, body) = answer.split_once("\r\n\r\n").unwrap();
        let problem: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("attempt {attempt}: the answer is cut short ({e}): {body}"));
        assert_eq!(problem["highest"], 5, "attempt {attempt}");
    }
    assert_eq!(upstream.arrivals().len(), 1, "only the leader's write");
    app.stop().await;
}

/// A route with the etcd-v3 profile in front of the recording upstream, with small limits.
async fn etcd_profile_app(settings: &str) -> (RecordingUpstream, TestApp) {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        r#"{settings}
[[routes]]
path = "/v3/{{*rest}}"
upstream = "{}"
profile = "etcd-v3"
resource = "etcd:{{key}}"
[[routes.keys]]
prefix = "/wallets/"
resource = "wallet:{{segment}}"
"#,
        upstream.url()
    );
    (upstream, TestApp::spawn(&config).await)
}

fn etcd_put(key: &str) -> serde_json::Value {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    serde_json::json!({"request_put": {"key": key, "value": ""}})
}

/// The limit is exact: a profile reads a body of `max_inspect_body` bytes and refuses one byte more
/// with 413, whether the length is declared or the body is chunked; a chunked body that breaks
/// its own framing is 400 `body-unreadable`, not a 413.
#[tokio::test]
async fn a_profile_reads_exactly_max_inspect_body_and_refuses_one_byte_more_however_framed() {
    const LIMIT: usize = 2048;
    let (upstream, app) = etcd_profile_app(&format!("max_inspect_body = {LIMIT}")).await;
    // JSON allows trailing whitespace: the same put, padded to `length` bytes.
    let body_of = |length: usize| {
        let body = etcd_put("/wallets/1")["request_put"].to_string();
        format!("{body:<length$}")
    };
    let head = |token: u64, framing: &str| {
        format!(
            "POST /v3/kv/put HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\
             fencing-token: {token}\r\n{framing}\r\n\r\n"
        )
    };
    let declared = |token, length| {
        let body = body_of(length);
        format!(
            "{}{body}",
            head(token, &format!("content-length: {length}"))
        )
    };
    let chunked = |token, length| {
        let body = body_of(length);
        format!(
            "{}{length:x}\r\n{body}\r\n0\r\n\r\n",
            head(token, "transfer-encoding: chunked")
        )
    };
    let status_of = |request: String| {
        let addr = app.addr;
        async move {
            let (status, _, body) = raw_request(addr, &request).await;
            (status, body)
        }
    };
    assert_eq!(
        status_of(declared(1, LIMIT)).await.0,
        200,
        "declared, at the limit"
    );
    assert_eq!(
        status_of(chunked(2, LIMIT)).await.0,
        200,
        "chunked, at the limit"
    );
    for (request, what) in [
        (declared(3, LIMIT + 1), "declared, one byte over"),
        (chunked(3, LIMIT + 1), "chunked, one byte over"),
    ] {
        let (status, body) = status_of(request).await;
        assert_eq!(status, 413, "{what}: {body}");
        assert!(
            body.contains("urn:fencegate:problem:body-too-large"),
            "{what}: {body}"
        );
    }
    let broken = format!(
        "{}zz\r\n{{}}\r\n0\r\n\r\n",
        head(3, "transfer-encoding: chunked")
    );
    let (status, body) = status_of(broken).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("urn:fencegate:problem:body-unreadable"),
        "{body}"
    );
    assert_eq!(
        upstream.arrivals().len(),
        2,
        "only the bodies within the limit"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_profile_reads_at_most_max_inspect_body_and_names_at_most_max_resources_per_request() {
    let (upstream, app) =
        etcd_profile_app("max_inspect_body = 2048\nmax_resources_per_request = 3").await;
    let post = |path: &str, body: String| {
        app.client
            .post(app.url(path))
            .header("fencing-token", "1")
            .body(body)
            .send()
    };
    let three: Vec<_> = (1..=3)
        .map(|i| etcd_put(&format!("/wallets/{i}")))
        .collect();
    let response = post(
        "/v3/kv/txn",
        serde_json::json!({"success": three}).to_string(),
    )
    .await;
    assert_eq!(
        response.unwrap().status(),
        200,
        "three wallets, each fenced"
    );
    assert_eq!(upstream.arrivals()[0].token, Some(1));
    let four: Vec<_> = (1..=4)
        .map(|i| etcd_put(&format!("/wallets/{i}")))
        .collect();
    let response = post(
        "/v3/kv/txn",
        serde_json::json!({"success": four}).to_string(),
    )
    .await;
    let response = response.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        problem(response).await["type"],
        "urn:fencegate:problem:too-many-resources"
    );
    let padded = serde_json::json!({"success": [etcd_put("/wallets/1")], "pad": "x".repeat(4096)});
    let response = post("/v3/kv/txn", padded.to_string()).await.unwrap();
    assert_eq!(
        response.status(),
        413,
        "the body is read only up to max_inspect_body"
    );
    let response = post("/v3/kv/put", "not json".into()).await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        problem(response).await["type"],
        "urn:fencegate:problem:bad-body"
    );
    assert_eq!(upstream.arrivals().len(), 1);
    // A read is forwarded without a token, its body untouched.
    let read = app
        .client
        .post(app.url("/v3/kv/range"))
        .body(r#"{"key":"L3dhbGxldHMvMQ=="}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    assert_eq!(upstream.arrivals()[1].body, r#"{"key":"L3dhbGxldHMvMQ=="}"#);
}

#[tokio::test]
async fn an_unattributable_call_is_422_audited_and_never_forwarded() {
    let (upstream, app) = etcd_profile_app("").await;
    for call in ["/v3/kv/compaction", "/v3/lease/revoke", "/v3/auth/enable"] {
        let response = app
            .client
            .post(app.url(call))
            .header("fencing-token", "9")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{call}");
        assert_eq!(
            problem(response).await["type"],
            "urn:fencegate:problem:unattributable"
        );
    }
    assert!(upstream.arrivals().is_empty());
    let rejected = app.rejected_resources();
    assert_eq!(rejected.len(), 3);
    assert!(
        rejected
            .iter()
            .all(|(resource, reason)| resource == "/v3/{*rest}" && reason == "unattributable")
    );
}

#[tokio::test]
async fn generic_routes_name_resources_from_the_query_a_header_or_the_body() {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        r#"
[[routes]]
path = "/jobs"
upstream = "{0}"
resource = "job:{{query.id}}"
[[routes]]
path = "/tenants/{{*rest}}"
upstream = "{0}"
resource = "tenant:{{header.x-tenant}}"
[[routes]]
path = "/kv"
upstream = "{0}"
resource = "kv:{{body64./key}}"
"#,
        upstream.url()
    );
    let app = TestApp::spawn(&config).await;
    let send = |method: &str, path: &str, token: u64, headers: &[(&str, &str)], body: &str| {
        let mut request = app
            .client
            .request(method.parse().unwrap(), app.url(path))
            .header("fencing-token", token.to_string())
            .body(body.to_owned());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // Query: each job is its own resource.
    assert_eq!(send("POST", "/jobs?id=1", 5, &[], "").await, 200);
    assert_eq!(send("POST", "/jobs?id=1", 4, &[], "").await, 409);
    assert_eq!(send("POST", "/jobs?id=2", 4, &[], "").await, 200);
    assert_eq!(
        send("POST", "/jobs", 9, &[], "").await,
        422,
        "no id: unattributable"
    );
    assert_eq!(
        send("POST", "/jobs?id=1&id=2", 9, &[], "").await,
        400,
        "ambiguous"
    );
    // Header.
    let acme = [("x-tenant", "acme")];
    assert_eq!(send("PUT", "/tenants/a/b", 3, &acme, "").await, 200);
    assert_eq!(send("DELETE", "/tenants/c", 2, &acme, "").await, 409);
    assert_eq!(
        send("PUT", "/tenants/a/b", 2, &[("x-tenant", "other")], "").await,
        200
    );
    assert_eq!(send("PUT", "/tenants/a/b", 2, &[], "").await, 422);
    // Body, base64: the body is read before the gate and still reaches the upstream whole.
    let body = r#"{"key":"L3dhbGxldHMvMQ==","value":"120"}"#;
    assert_eq!(send("POST", "/kv", 8, &[], body).await, 200);
    assert_eq!(send("POST", "/kv", 7, &[], body).await, 409);
    assert_eq!(send("POST", "/kv", 7, &[], "not json").await, 400);
    assert_eq!(send("POST", "/kv", 7, &[], r#"{"value":"1"}"#).await, 422);
    // Reads pass untouched.
    assert_eq!(
        app.client
            .get(app.url("/jobs"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let arrivals = upstream.arrivals();
    let kv = arrivals.iter().find(|a| a.target == "/kv").unwrap();
    assert_eq!(kv.body, body.as_bytes());
    assert_eq!(
        arrivals.iter().filter(|a| a.method != "GET").count(),
        5,
        "only the current writes arrived"
    );
    assert_eq!(
        common::durable_highest(&app.db_path, "kv:/wallets/1"),
        Some(8)
    );
    assert_eq!(
        common::durable_highest(&app.db_path, "tenant:acme"),
        Some(3)
    );
    let reasons = app.rejected_resources();
    assert!(
        reasons.contains(&("job:1".into(), "stale".into())),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("job:".into(), "unattributable".into())),
        "{reasons:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_webdav_profile_passes_webdavs_reads_and_fences_the_rest_by_path_and_destination() {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        r#"
[[routes]]
path = "/files/{{name}}"
upstream = "{}"
profile = "webdav"
resource = "file:{{name}}"
"#,
        upstream.url()
    );
    let app = TestApp::spawn(&config).await;
    let send = |method: &str, path: &str, headers: &[(&str, &str)]| {
        let mut request = app.client.request(method.parse().unwrap(), app.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    for method in ["PROPFIND", "REPORT", "SEARCH", "GET"] {
        assert_eq!(
            send(method, "/files/a", &[]).await,
            200,
            "{method} is a read"
        );
    }
    assert_eq!(send("PROPPATCH", "/files/a", &[]).await, 428);
    assert_eq!(
        send("PUT", "/files/b", &[("fencing-token", "5")]).await,
        200
    );
    // A MOVE onto b needs b's gate too.
    let onto_b = [("fencing-token", "4"), ("destination", "/files/b")];
    assert_eq!(send("MOVE", "/files/a", &onto_b).await, 409);
    let written: Vec<String> = upstream
        .arrivals()
        .iter()
        .filter(|a| !["PROPFIND", "REPORT", "SEARCH", "GET"].contains(&a.method.as_str()))
        .map(|a| format!("{} {}", a.method, a.target))
        .collect();
    assert_eq!(written, ["PUT /files/b"]);
    app.stop().await;
}

#[tokio::test]
async fn a_profile_reads_only_bodies_that_name_resources_and_the_rest_stream_past_max_inspect_body()
{
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        r#"max_inspect_body = 1024
[[routes]]
path = "/bank/{{*rest}}"
upstream = "{0}"
profile = "couchdb"
resource = "couch:{{db}}/{{doc}}"
[[routes]]
path = "/bucket/{{*rest}}"
upstream = "{0}"
profile = "s3"
resource = "s3:{{bucket}}/{{key}}"
"#,
        upstream.url()
    );
    let app = TestApp::spawn(&config).await;
    let send = |method: &str, path: &str, body: String| {
        let request = app
            .client
            .request(method.parse().unwrap(), app.url(path))
            .header("fencing-token", "1")
            .body(body);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let large = "x".repeat(4096);
    assert_eq!(
        send("PUT", "/bank/wallet:1", format!(r#"{{"pad":"{large}"}}"#)).await,
        200
    );
    assert_eq!(send("PUT", "/bucket/wallets/1", large.clone()).await, 200);
    let bulk = format!(r#"{{"docs":[{{"_id":"wallet:1","pad":"{large}"}}]}}"#);
    assert_eq!(send("POST", "/bank/_bulk_docs", bulk).await, 413);
    let delete = format!("<Delete><Object><Key>{large}</Key></Object></Delete>");
    assert_eq!(send("POST", "/bucket?delete", delete).await, 413);
    let sizes: Vec<usize> = upstream.arrivals().iter().map(|a| a.body.len()).collect();
    assert_eq!(sizes, [4096 + 10, 4096], "the large writes arrived whole");
    app.stop().await;
}

// --- HTTP/1.1 as clients speak it (fencegate's own server, src/server/http1/) ---

/// The responses in `bytes`, in order: status, lower-cased headers and body, framed by
/// Content-Length or chunked coding as fencegate sends them.
fn responses(mut bytes: &[u8]) -> Vec<(u16, std::collections::HashMap<String, String>, String)> {
    let mut answers = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        bytes = &bytes[end + 4..];
        let mut lines = head.lines();
        let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
        let headers: std::collections::HashMap<String, String> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let status: u16 = status.parse().unwrap();
        let mut body = Vec::new();
        if status == 100 {
            answers.push((status, headers, String::new()));
            continue;
        }
        if let Some(length) = headers.get("content-length") {
            let length: usize = length.parse().unwrap();
            body.extend_from_slice(&bytes[..length]);
            bytes = &bytes[length..];
        } else if headers.contains_key("transfer-encoding") {
            loop {
                let line_end = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
                let size =
                    usize::from_str_radix(std::str::from_utf8(&bytes[..line_end]).unwrap(), 16)
                        .unwrap();
                bytes = &bytes[line_end + 2..];
                if size == 0 {
                    bytes = &bytes[2..];
                    break;
                }
                body.extend_from_slice(&bytes[..size]);
                bytes = &bytes[size + 2..];
            }
        }
        answers.push((status, headers, String::from_utf8_lossy(&body).into_owned()));
    }
    answers
}

/// Sends `text` in one write and reads until fencegate closes.
async fn exchange(app: &TestApp, text: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(text.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("fencegate answered and closed")
        .unwrap();
    answer
}

fn put_text(token: u64, body: &str, extra: &str) -> String {
    format!(
        "PUT /wallets/1 HTTP/1.1\r\nhost: t\r\nfencing-token: {token}\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn pipelined_requests_on_one_connection_are_answered_in_order() {
    let (upstream, app) = setup().await;
    let text = format!(
        "{}{}GET /wallets/1 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        put_text(1, "one", ""),
        put_text(2, "two", ""),
    );
    let answers = responses(&exchange(&app, &text).await);
    let statuses: Vec<u16> = answers.iter().map(|(status, _, _)| *status).collect();
    assert_eq!(statuses, [200, 200, 200]);
    assert_eq!(answers[1].1["fencing-token-highest"], "2");
    assert_eq!(answers[2].1["connection"], "close");
    let arrivals = upstream.arrivals();
    let tokens: Vec<Option<u64>> = arrivals.iter().map(|a| a.token).collect();
    assert_eq!(tokens, [Some(1), Some(2), None]);
    assert_eq!(arrivals[0].body, "one");
    assert_eq!(arrivals[1].body, "two");
}

#[tokio::test]
async fn a_chunked_request_body_arrives_whole_and_the_connection_serves_the_next_request() {
    let (upstream, app) = setup().await;
    let text = "PUT /wallets/1 HTTP/1.1\r\nhost: t\r\nfencing-token: 4\r\ntransfer-encoding: chunked\r\n\r\n\
                3;ext=1\r\nbal\r\n4\r\nance\r\n0\r\nx-checksum: 9\r\n\r\n\
                GET /wallets/1 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n";
    let answers = responses(&exchange(&app, text).await);
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[1].0, 200);
    assert_eq!(upstream.arrivals()[0].body, "balance");
}

#[tokio::test]
async fn a_client_waiting_for_100_continue_gets_it_once_its_body_is_wanted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, app) = setup().await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = "PUT /wallets/1 HTTP/1.1\r\nhost: t\r\nfencing-token: 3\r\nexpect: 100-continue\r\n\
                content-length: 5\r\nconnection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = vec![0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut interim))
        .await
        .expect("100 Continue before the body")
        .unwrap();
    assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(responses(&rest)[0].0, 200);
    assert_eq!(upstream.arrivals()[0].body, "hello");
}

#[tokio::test]
async fn a_stale_client_that_expects_100_continue_is_refused_without_sending_its_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, app) = setup().await;
    assert_eq!(app.put("/wallets/1", 5, "leader").await.status(), 200);
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let head = "PUT /wallets/1 HTTP/1.1\r\nhost: t\r\nfencing-token: 1\r\nexpect: 100-continue\r\n\
                content-length: 5\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let answers = responses(&answer);
    assert_eq!(
        answers.len(),
        1,
        "no 100 Continue for a stale token: {answers:?}"
    );
    assert_eq!(answers[0].0, 409);
    assert_eq!(upstream.arrivals().len(), 1);
}

#[tokio::test]
async fn http_10_clients_are_answered_and_kept_alive_only_when_they_ask() {
    let (_upstream, app) = setup().await;
    let plain = exchange(&app, "GET /wallets/1 HTTP/1.0\r\n\r\n").await;
    let answers = responses(&plain);
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].0, 200);
    assert_eq!(answers[0].1["connection"], "close");
    let kept = exchange(
        &app,
        "GET /wallets/1 HTTP/1.0\r\nconnection: keep-alive\r\n\r\nGET /wallets/1 HTTP/1.0\r\n\r\n",
    )
    .await;
    let answers = responses(&kept);
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0].1["connection"], "keep-alive");
    assert_eq!(answers[1].1["connection"], "close");
}

#[tokio::test]
async fn a_head_request_gets_headers_without_a_body_and_the_connection_goes_on() {
    let (_upstream, app) = setup().await;
    let answers = responses(
        &exchange(
            &app,
            "HEAD /wallets/1 HTTP/1.1\r\nhost: t\r\n\r\nGET /wallets/1 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
        )
        .await,
    );
    // `responses` frames the HEAD answer by its Content-Length: were a body sent, the second
    // answer would not parse.
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!(answers[0].0, 200);
    assert!(answers[0].1.contains_key("date"));
}

#[tokio::test]
async fn a_head_that_cannot_be_framed_is_answered_with_problem_json_and_closed() {
    let (upstream, app) = setup().await;
    let cases = [
        (
            "content-length: 5\r\ntransfer-encoding: chunked",
            400,
            "malformed-request",
        ),
        (
            "transfer-encoding: gzip, chunked",
            501,
            "unknown-transfer-coding",
        ),
        (
            "content-length: 5\r\ncontent-length: 6",
            400,
            "malformed-request",
        ),
    ];
    for (headers, status, slug) in cases {
        let text = format!(
            "PUT /wallets/1 HTTP/1.1\r\nhost: t\r\nfencing-token: 9\r\n{headers}\r\n\r\nhello"
        );
        let answers = responses(&exchange(&app, &text).await);
        assert_eq!(answers.len(), 1, "{headers}");
        let (got, headers_out, body) = &answers[0];
        assert_eq!(*got, status, "{headers}");
        assert_eq!(headers_out["content-type"], "application/problem+json");
        assert_eq!(headers_out["connection"], "close");
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["type"], format!("urn:fencegate:problem:{slug}"));
    }
    assert!(upstream.arrivals().is_empty());
}

#[tokio::test]
async fn a_head_dripped_byte_by_byte_within_the_header_timeout_is_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, app) = setup().await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    for byte in put_text(2, "drip", "connection: close\r\n").bytes() {
        stream.write_all(&[byte]).await.unwrap();
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert_eq!(responses(&answer)[0].0, 200);
    assert_eq!(upstream.arrivals()[0].body, "drip");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_does_not_hold_up_shutdown() {
    use tokio::io::AsyncWriteExt;
    let (_upstream, app) = setup().await;
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /wallets/1 HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), app.stop())
        .await
        .expect("stopped");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    drop(stream);
}

/// A route whose leaders send their token in another header (`token_header`): that header is
/// the token, read, audited and guarded exactly as `Fencing-Token` is; `Fencing-Token` itself
/// means nothing there.
#[tokio::test]
async fn a_routes_token_header_is_read_audited_and_guarded_like_fencing_token() {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        "[[routes]]\npath = \"/locks/{{id}}\"\nupstream = \"{}\"\nresource = \"lock:{{id}}\"\ntoken_header = \"X-Fencing-Token\"\n",
        upstream.url()
    );
    let app = TestApp::spawn(&config).await;
    let client = reqwest::Client::new();
    let put = |header: &'static str, token: &'static str| {
        client
            .put(app.url("/locks/1"))
            .header(header, token)
            .body("x")
            .send()
    };
    let leader = put("x-fencing-token", "5").await.unwrap();
    assert_eq!(leader.status(), 200);
    assert_eq!(leader.headers()["fencing-token-highest"], "5");
    let zombie = put("x-fencing-token", "4").await.unwrap();
    assert_eq!(zombie.status(), 409);
    assert_eq!(zombie.headers()["fencing-token-highest"], "5");
    let wrong_header = put("fencing-token", "9").await.unwrap();
    assert_eq!(
        wrong_header.status(),
        428,
        "Fencing-Token is not this route's token"
    );
    let rejections = app.rejections();
    let reasons: Vec<&str> = rejections.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(reasons, ["stale", "missing"]);
    let (status, _, _) = raw_request(
        app.addr,
        &raw(
            "PUT",
            "/locks/1",
            &["x-fencing-token: 6", "connection: x-fencing-token"],
        ),
    )
    .await;
    assert_eq!(status, 400, "Connection may not strip the token header");
    let arrivals = upstream.arrivals();
    assert_eq!(arrivals.len(), 1);
    assert_eq!(
        arrivals[0].headers["x-fencing-token"], "5",
        "forwarded unchanged"
    );
}
