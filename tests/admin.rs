//! The admin plane, call by call, as the contract's "Admin plane" section states it: auth, every
//! endpoint, strict parameters, pagination under writes, fence and reset through the gate,
//! metrics and retention.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RecordingUpstream, TestApp, problem, spawn_slow_put, standard_routes};
use serde_json::{Value, json};

const TOKEN: &str = "s3cret-admin";

async fn app_with_token(upstream: &RecordingUpstream) -> TestApp {
    TestApp::spawn(&format!(
        "admin_token = \"{TOKEN}\"\n{}",
        standard_routes(&upstream.url())
    ))
    .await
}

async fn app_without_token(upstream: &RecordingUpstream) -> TestApp {
    TestApp::spawn(&standard_routes(&upstream.url())).await
}

#[tokio::test]
async fn every_call_but_the_probes_needs_the_bearer_token() {
    let upstream = RecordingUpstream::start().await;
    let app = app_with_token(&upstream).await;
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(app.admin_get(probe, None).await.status(), 200, "{probe}");
    }
    let guarded_gets = [
        "/metrics",
        "/v1/resources",
        "/v1/resources/wallet%3A1",
        "/v1/rejections",
        "/v1/epochs",
    ];
    for path in guarded_gets {
        for token in [None, Some("wrong"), Some("s3cret-admiN"), Some("")] {
            let response = app.admin_get(path, token).await;
            assert_eq!(response.status(), 401, "GET {path} with {token:?}");
            assert_eq!(
                response.headers()["www-authenticate"],
                "Bearer realm=\"fencegate\""
            );
            assert_eq!(problem(response).await["status"], 401);
        }
    }
    for call in ["fence", "reset"] {
        let path = format!("/v1/resources/w/{call}");
        let body = json!({"token": 1, "reason": "x"});
        let response = app.admin_post(&path, body, Some("wrong")).await;
        assert_eq!(response.status(), 401, "POST {path}");
    }
    let lower_case_scheme = app
        .client
        .get(app.admin_url("/v1/resources"))
        .header("authorization", format!("bearer {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        lower_case_scheme.status(),
        200,
        "the scheme is case-insensitive"
    );
    assert_eq!(app.admin_get("/v1/epochs", Some(TOKEN)).await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn resources_are_listed_by_prefix_and_fetched_by_encoded_name() {
    let upstream = RecordingUpstream::start().await;
    let app = app_without_token(&upstream).await;
    app.put("/wallets/1", 4, "a").await;
    app.put("/wallets/2", 9, "b").await;
    app.put("/accounts/1", 2, "c").await;

    let wallets = app.admin_json("/v1/resources?prefix=wallet%3A", None).await;
    let names: Vec<&str> = wallets["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["resource"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["wallet:1", "wallet:2"]);
    assert_eq!(wallets["next"], Value::Null);

    let one = app.admin_json("/v1/resources/wallet%3A2", None).await;
    assert_eq!(one["resource"], "wallet:2");
    assert_eq!(one["highest"], 9);
    assert!(one["updated_at"].as_str().unwrap().ends_with('Z'), "{one}");

    let unknown = app.admin_get("/v1/resources/wallet%3A404", None).await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        problem(unknown).await["type"],
        "urn:fencegate:problem:unknown-resource"
    );

    let everything = app
        .admin_json("/v1/resources?prefix=&after=&limit=", None)
        .await;
    assert_eq!(everything["resources"].as_array().unwrap().len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn fence_returns_after_older_writes_drain_and_then_refuses_them() {
    let upstream = RecordingUpstream::start().await;
    let app = Arc::new(app_without_token(&upstream).await);
    app.put("/wallets/7", 1, "first").await;
    let slow = spawn_slow_put(&app, "/wallets/7", 1, Duration::from_millis(600));
    while upstream.arrivals().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let fence = app
        .admin_post("/v1/resources/wallet%3A7/fence", json!({"token": 2}), None)
        .await;
    let fenced_at = Instant::now();
    assert_eq!(fence.status(), 200);
    assert_eq!(fence.headers()["fencing-token-highest"], "2");
    assert_eq!(
        fence.json::<Value>().await.unwrap(),
        json!({"resource": "wallet:7", "highest": 2})
    );
    let answered = upstream.arrivals()[1]
        .answered
        .expect("the old write was answered");
    assert!(
        answered <= fenced_at,
        "fence answered before the older write drained"
    );
    assert_eq!(
        slow.await.unwrap(),
        200,
        "the write already in flight completes"
    );

    let zombie = app.put("/wallets/7", 1, "late").await;
    assert_eq!(zombie.status(), 409);
    assert_eq!(zombie.headers()["fencing-token-highest"], "2");

    let lower = app
        .admin_post("/v1/resources/wallet%3A7/fence", json!({"token": 1}), None)
        .await;
    assert_eq!(lower.status(), 409);
    let lower = problem(lower).await;
    assert_eq!(
        (lower["highest"].as_u64(), lower["token"].as_u64()),
        (Some(2), Some(1))
    );

    let again = app
        .admin_post(
            "/v1/resources/wallet%3A7/fence",
            json!({"token": "2"}),
            None,
        )
        .await;
    assert_eq!(
        again.status(),
        200,
        "fencing to the current token is a no-op"
    );
    let vias: Vec<String> = app.epochs().into_iter().map(|e| e.3).collect();
    assert_eq!(vias, ["write", "fence"]);
    assert_eq!(upstream.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn fence_and_reset_bodies_are_checked_field_by_field() {
    let upstream = RecordingUpstream::start().await;
    let app = app_with_token(&upstream).await;
    let cases = [
        ("fence", json!({}), "token"),
        ("fence", json!({"token": -1}), "token"),
        ("fence", json!({"token": "07"}), "token"),
        ("fence", json!({"token": 1, "force": true}), "force"),
        ("fence", json!([1]), "body"),
        ("reset", json!({"token": 1}), "reason"),
        ("reset", json!({"token": 1, "reason": " "}), "reason"),
        ("reset", json!({"reason": "why"}), "token"),
    ];
    for (call, body, parameter) in cases {
        let path = format!("/v1/resources/w/{call}");
        let response = app.admin_post(&path, body.clone(), Some(TOKEN)).await;
        assert_eq!(response.status(), 400, "{call} {body}");
        let problem = problem(response).await;
        assert_eq!(problem["parameter"], parameter, "{call} {body}: {problem}");
    }
    let not_json = app
        .client
        .post(app.admin_url("/v1/resources/w/fence"))
        .bearer_auth(TOKEN)
        .body("token=1")
        .send()
        .await
        .unwrap();
    assert_eq!(problem(not_json).await["parameter"], "body");
    // Repeated keys are ambiguous (serde_json would keep the last): refused, not guessed at.
    let repeated = app
        .client
        .post(app.admin_url("/v1/resources/w/fence"))
        .bearer_auth(TOKEN)
        .body(r#"{"token":11,"token":999}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(repeated.status(), 400);
    let detail = problem(repeated).await["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        detail.contains("\"token\" is given more than once"),
        "{detail}"
    );
    assert!(app.epochs().is_empty(), "no bad call changed anything");
    app.stop().await;
}

#[tokio::test]
async fn resource_names_are_held_to_the_data_planes_limits() {
    let upstream = RecordingUpstream::start().await;
    let app = app_with_token(&upstream).await;
    let long = "w".repeat(20_000);
    for name in [long.as_str(), "bad%01name", "tab%09"] {
        for call in ["fence", "reset"] {
            let body = json!({"token": 1, "reason": "test"});
            let body = if call == "fence" {
                json!({"token": 1})
            } else {
                body
            };
            let response = app
                .admin_post(&format!("/v1/resources/{name}/{call}"), body, Some(TOKEN))
                .await;
            assert_eq!(
                response.status(),
                400,
                "{call} {}",
                &name[..name.len().min(20)]
            );
            assert_eq!(problem(response).await["parameter"], "resource");
        }
        let response = app
            .admin_get(&format!("/v1/resources/{name}"), Some(TOKEN))
            .await;
        assert_eq!(response.status(), 400);
    }
    assert!(app.epochs().is_empty());
    let fine = app
        .admin_post(
            &format!("/v1/resources/{}/fence", "w".repeat(512)),
            json!({"token": 1}),
            Some(TOKEN),
        )
        .await;
    assert_eq!(fine.status(), 200, "max_resource_len bytes exactly");
    app.stop().await;
}

#[tokio::test]
async fn since_in_the_last_second_of_9999_is_an_empty_page() {
    let upstream = RecordingUpstream::start().await;
    let app = app_without_token(&upstream).await;
    app.put("/wallets/1", 5, "").await;
    app.put("/wallets/1", 1, "").await;
    let page = app
        .admin_json("/v1/rejections?since=9999-12-31T23:59:59Z", None)
        .await;
    assert_eq!(page["rejections"], json!([]));
    app.stop().await;
}

#[tokio::test]
async fn reset_lowers_a_runaway_token_and_is_recorded_with_its_reason() {
    let upstream = RecordingUpstream::start().await;
    let app = app_with_token(&upstream).await;
    assert_eq!(app.put("/wallets/1", 5, "ok").await.status(), 200);
    assert_eq!(
        app.put("/wallets/1", u64::MAX, "runaway").await.status(),
        200
    );
    assert_eq!(app.put("/wallets/1", 6, "fenced out").await.status(), 409);

    let reset = app
        .admin_post(
            "/v1/resources/wallet%3A1/reset",
            json!({"token": 6, "reason": "leader sent u64::MAX by mistake"}),
            Some(TOKEN),
        )
        .await;
    assert_eq!(reset.status(), 200);
    assert_eq!(reset.headers()["fencing-token-highest"], "6");
    let reset: Value = reset.json().await.unwrap();
    assert_eq!(reset["from"], u64::MAX);
    assert_eq!(reset["highest"], 6);

    assert_eq!(
        app.put("/wallets/1", 6, "back in business").await.status(),
        200
    );
    assert_eq!(app.put("/wallets/1", 5, "still stale").await.status(), 409);
    let history = app
        .admin_json("/v1/epochs?resource=wallet%3A1", Some(TOKEN))
        .await;
    let newest = &history["epochs"][0];
    assert_eq!(newest["via"], "reset");
    assert_eq!(newest["from"], u64::MAX);
    assert_eq!(newest["to"], 6);
    assert_eq!(newest["reason"], "leader sent u64::MAX by mistake");
    app.stop().await;

    let open = app_without_token(&upstream).await;
    let refused = open
        .admin_post(
            "/v1/resources/w/reset",
            json!({"token": 1, "reason": "x"}),
            None,
        )
        .await;
    assert_eq!(
        refused.status(),
        403,
        "reset needs an admin token configured"
    );
    assert_eq!(
        problem(refused).await["type"],
        "urn:fencegate:problem:reset-disabled"
    );
    open.stop().await;
}

#[tokio::test]
async fn rejections_filter_by_resource_reason_and_since() {
    let upstream = RecordingUpstream::start().await;
    let app = app_without_token(&upstream).await;
    app.put("/wallets/1", 5, "").await;
    app.put("/wallets/1", 4, "").await; // stale
    app.send(reqwest::Method::PUT, "/wallets/2", None).await; // missing
    app.send(reqwest::Method::PUT, "/wallets/2", Some("x"))
        .await; // invalid
    app.put("/wallets/1", 3, "").await; // stale

    let all = app.admin_json("/v1/rejections", None).await;
    let reasons: Vec<&str> = all["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        ["stale", "invalid", "missing", "stale"],
        "newest first"
    );
    let newest = &all["rejections"][0];
    for field in [
        "id",
        "at",
        "resource",
        "reason",
        "token",
        "highest",
        "method",
        "path",
        "client",
        "request_id",
    ] {
        assert!(newest.get(field).is_some(), "{field} missing from {newest}");
    }
    assert_eq!(
        (newest["token"].as_u64(), newest["highest"].as_u64()),
        (Some(3), Some(5))
    );

    let count = |value: Value| value["rejections"].as_array().unwrap().len();
    let stale = "/v1/rejections?resource=wallet%3A1&reason=stale";
    assert_eq!(count(app.admin_json(stale, None).await), 2);
    assert_eq!(
        count(
            app.admin_json("/v1/rejections?resource=wallet%3A2", None)
                .await
        ),
        2
    );
    assert_eq!(
        count(app.admin_json("/v1/rejections?since=1h", None).await),
        4
    );
    let future = "/v1/rejections?since=2999-01-01T00:00:00%2B01:00";
    assert_eq!(count(app.admin_json(future, None).await), 0);
    app.stop().await;
}

#[tokio::test]
async fn every_bad_query_parameter_is_named_in_a_400() {
    let upstream = RecordingUpstream::start().await;
    let app = app_without_token(&upstream).await;
    let cases = [
        ("/v1/rejections?reason=zombie", "reason"),
        ("/v1/rejections?since=yesterday", "since"),
        ("/v1/rejections?after=abc", "after"),
        ("/v1/rejections?limit=0", "limit"),
        ("/v1/rejections?limit=1001", "limit"),
        ("/v1/rejections?resouce=a", "resouce"),
        ("/v1/rejections?limit=5&limit=6", "limit"),
        ("/v1/epochs?after=-1", "after"),
        ("/v1/epochs?reason=stale", "reason"),
        ("/v1/resources?limit=many", "limit"),
        ("/v1/resources?resource=a", "resource"),
    ];
    for (path, parameter) in cases {
        let response = app.admin_get(path, None).await;
        assert_eq!(response.status(), 400, "{path}");
        let problem = problem(response).await;
        assert_eq!(problem["parameter"], parameter, "{path}: {problem}");
        assert!(problem["detail"].as_str().unwrap().starts_with(parameter));
    }
    app.stop().await;
}

#[tokio::test]
async fn unknown_paths_and_methods_get_problem_json() {
    let upstream = RecordingUpstream::start().await;
    let app = app_without_token(&upstream).await;
    let missing = app.admin_get("/v2/everything", None).await;
    assert_eq!(missing.status(), 404);
    problem(missing).await;
    let wrong_method = app
        .client
        .delete(app.admin_url("/v1/resources"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    problem(wrong_method).await;
    app.stop().await;
}

/// Walks every page of `path` (which must already have a `?`) from the cursor `after`,
/// returning the `key` of each row in order.
async fn walk_ids(app: &TestApp, path: &str, list: &str, key: &str, after: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut after = after.to_owned();
    loop {
        let page = app.admin_json(&format!("{path}&after={after}"), None).await;
        for row in page[list].as_array().unwrap() {
            ids.push(row[key].to_string());
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => return ids,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_over_thousands_of_rows_loses_and_repeats_nothing_while_writes_go_on() {
    const ROWS: u64 = 1_200;
    let upstream = RecordingUpstream::start().await;
    let app = Arc::new(app_without_token(&upstream).await);
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let app = Arc::clone(&app);
            tokio::spawn(async move {
                for i in (writer..ROWS).step_by(8) {
                    // One new resource per request, and one stale rejection for each.
                    app.put(&format!("/wallets/{i}"), 10, "").await;
                    app.put(&format!("/wallets/{i}"), 9, "").await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }

    // More rejections keep arriving while the pages are walked; they are newer than the
    // cursor, so the walk neither sees them nor loses anything to them.
    let noise = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            for _ in 0..200 {
                app.put("/wallets/0", 1, "").await;
            }
        })
    };
    let first = app.admin_json("/v1/rejections?limit=1", None).await;
    let newest: u64 = first["rejections"][0]["id"].as_u64().unwrap();
    let cursor = (newest + 1).to_string();
    let ids = walk_ids(
        &app,
        "/v1/rejections?limit=250",
        "rejections",
        "id",
        &cursor,
    )
    .await;
    noise.await.unwrap();
    let expected: Vec<String> = (1..=newest).rev().map(|id| id.to_string()).collect();
    assert!(newest >= ROWS);
    assert_eq!(ids, expected, "every row exactly once, newest first");

    let names = walk_ids(&app, "/v1/resources?limit=333", "resources", "resource", "").await;
    let unique: HashSet<&String> = names.iter().collect();
    assert_eq!(names.len(), ROWS as usize);
    assert_eq!(unique.len(), names.len());
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "resources come in name order");

    let epochs = walk_ids(&app, "/v1/epochs?limit=1000", "epochs", "id", "").await;
    assert_eq!(epochs.len(), ROWS as usize, "one advance per resource");
}

/// The value of the sample `name` (with its labels) in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// Waits until background retention has pruned the audit log down to `rows`.
async fn until_pruned_to(app: &TestApp, rows: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.rejections().len() > rows {
        assert!(
            Instant::now() < deadline,
            "{} rows left",
            app.rejections().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_counters_move_as_requests_flow() {
    let upstream = RecordingUpstream::start().await;
    let app = app_with_token(&upstream).await;
    let scrape = || async {
        let response = app.admin_get("/metrics", Some(TOKEN)).await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .contains("openmetrics-text")
        );
        response.text().await.unwrap()
    };
    let before = scrape().await;
    app.put("/wallets/1", 3, "").await;
    app.put("/wallets/1", 3, "").await;
    app.put("/wallets/1", 2, "").await;
    app.send(reqwest::Method::PUT, "/wallets/1", None).await;
    app.send(reqwest::Method::GET, "/wallets/1", None).await;
    app.admin_post(
        "/v1/resources/wallet%3A1/fence",
        json!({"token": 4}),
        Some(TOKEN),
    )
    .await;
    let after = scrape().await;

    let moved = |name: &str| sample(&after, name) - sample(&before, name);
    assert_eq!(
        moved("fencegate_requests_forwarded_total{fenced=\"true\"}"),
        2.0
    );
    assert_eq!(
        moved("fencegate_requests_forwarded_total{fenced=\"false\"}"),
        1.0
    );
    assert_eq!(
        moved("fencegate_requests_rejected_total{reason=\"stale\"}"),
        1.0
    );
    assert_eq!(
        moved("fencegate_requests_rejected_total{reason=\"missing\"}"),
        1.0
    );
    assert_eq!(
        moved("fencegate_requests_rejected_total{reason=\"invalid\"}"),
        0.0
    );
    assert_eq!(moved("fencegate_epoch_advances_total{via=\"write\"}"), 1.0);
    assert_eq!(moved("fencegate_epoch_advances_total{via=\"fence\"}"), 1.0);
    assert_eq!(moved("fencegate_upstream_response_seconds_count"), 3.0);
    assert_eq!(sample(&after, "fencegate_upstream_in_flight"), 0.0);
    assert_eq!(sample(&after, "fencegate_resources_resident"), 1.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_the_audit_log_down_to_its_limit_in_the_background() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!(
        "audit_max_rows = 50\naudit_prune_interval = \"100ms\"\n{}",
        standard_routes(&upstream.url())
    ))
    .await;
    app.put("/wallets/1", 5, "").await;
    for _ in 0..1_500 {
        assert_eq!(app.put("/wallets/1", 1, "").await.status(), 409);
    }
    until_pruned_to(&app, 50).await;
    let kept = app.admin_json("/v1/rejections?limit=1000", None).await;
    let ids: Vec<u64> = kept["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        (1_451..=1_500).rev().collect::<Vec<_>>(),
        "the newest 50 are kept"
    );
    let metrics = app.admin_get("/metrics", None).await.text().await.unwrap();
    assert_eq!(
        sample(&metrics, "fencegate_audit_rows_pruned_total"),
        1_450.0
    );
    app.stop().await;
}

#[tokio::test]
async fn requests_without_a_token_cannot_prune_the_record_of_a_zombie_write() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!(
        "audit_max_rows = 50\naudit_prune_interval = \"100ms\"\n{}",
        standard_routes(&upstream.url())
    ))
    .await;
    app.put("/wallets/1", 5, "").await;
    assert_eq!(app.put("/wallets/1", 1, "zombie").await.status(), 409);
    for _ in 0..1_500 {
        let junk = app.send(reqwest::Method::PUT, "/wallets/1", None).await;
        assert_eq!(junk.status(), 428);
    }
    until_pruned_to(&app, 51).await;
    let stale = app.admin_json("/v1/rejections?reason=stale", None).await;
    assert_eq!(
        stale["rejections"].as_array().unwrap().len(),
        1,
        "the evidence stays"
    );
    let missing = app
        .admin_json("/v1/rejections?reason=missing&limit=1000", None)
        .await;
    assert_eq!(missing["rejections"].as_array().unwrap().len(), 50);
    app.stop().await;
}

#[tokio::test]
async fn a_single_node_answers_the_cluster_call_with_404() {
    let upstream = RecordingUpstream::start().await;
    let app = app_with_token(&upstream).await;
    assert_eq!(app.admin_get("/v1/cluster", None).await.status(), 401);
    let response = app.admin_get("/v1/cluster", Some(TOKEN)).await;
    assert_eq!(response.status(), 404);
    let body = problem(response).await;
    assert_eq!(
        body["type"], "urn:fencegate:problem:not-a-cluster",
        "{body}"
    );
}
