//! The operator commands, run as the real binary: `audit` and `epochs` against a live database,
//! `fence` through the admin API, `check-config`, and JSON logs that carry request ids.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{RecordingUpstream, TestApp, standard_routes};
use serde_json::Value;

fn fencegate(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fencegate"));
    command
        .args(args)
        .env_remove("FENCEGATE_ADMIN_TOKEN")
        .env_remove("FENCEGATE_DB");
    command
}

/// Runs the binary off the async threads, so the in-process server keeps serving meanwhile.
async fn run(args: &[&str]) -> Output {
    let mut command = fencegate(args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn db_arg(app: &TestApp) -> String {
    app.db_path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_streams_every_format_while_the_server_keeps_writing() {
    let upstream = RecordingUpstream::start().await;
    let app = Arc::new(TestApp::spawn(&standard_routes(&upstream.url())).await);
    app.put("/wallets/1", 5, "").await;
    for _ in 0..300 {
        app.put("/wallets/1", 4, "").await;
    }
    // A zombie keeps being refused the whole time the commands read.
    let stop = Arc::new(AtomicBool::new(false));
    let refused_meanwhile = Arc::new(AtomicU64::new(0));
    let zombie = {
        let (app, stop, refused) = (
            Arc::clone(&app),
            Arc::clone(&stop),
            Arc::clone(&refused_meanwhile),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(app.put("/wallets/1", 3, "").await.status(), 409);
                refused.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let db = db_arg(&app);
    for _ in 0..3 {
        let json = run(&["audit", "--db", &db, "--format", "json"]).await;
        assert!(json.status.success(), "{}", stderr(&json));
        let rows: Vec<Value> = serde_json::from_str(&stdout(&json)).unwrap();
        assert!(rows.len() >= 300);
        let ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] == w[1] + 1),
            "newest first, none lost or repeated"
        );
        assert_eq!(*ids.last().unwrap(), 1);
    }
    let csv = run(&["audit", "--db", &db, "--format", "csv"]).await;
    let text = stdout(&csv);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("id,at,resource,reason,token,highest,method,client,request_id,path,identity")
    );
    assert!(lines.next().unwrap().contains(",wallet:1,stale,"));
    let table = run(&["audit", "--db", &db]).await;
    assert!(stdout(&table).starts_with("ID "), "{}", stdout(&table));
    stop.store(true, Ordering::Relaxed);
    zombie.await.unwrap();
    assert!(
        refused_meanwhile.load(Ordering::Relaxed) > 0,
        "the server kept answering"
    );
}

#[tokio::test]
async fn audit_filters_by_resource_reason_and_since() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&standard_routes(&upstream.url())).await;
    app.put("/wallets/1", 5, "").await;
    app.put("/wallets/1", 4, "").await;
    app.send(reqwest::Method::PUT, "/wallets/2", None).await;
    let db = db_arg(&app);
    let count = |output: Output| {
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_str::<Vec<Value>>(&stdout(&output))
            .unwrap()
            .len()
    };
    let json = ["--db", &db, "--format", "json"];
    let audit = |extra: &[&str]| {
        let mut args = vec!["audit"];
        args.extend(json);
        args.extend(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let output = |args: Vec<String>| {
        fencegate(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap()
    };
    assert_eq!(count(output(audit(&[]))), 2);
    assert_eq!(count(output(audit(&["--resource", "wallet:1"]))), 1);
    assert_eq!(count(output(audit(&["--reason", "missing"]))), 1);
    assert_eq!(count(output(audit(&["--since", "1h"]))), 2);
    assert_eq!(
        count(output(audit(&["--since", "2999-01-01T00:00:00Z"]))),
        0
    );
    let bad = output(audit(&["--reason", "zombie"]));
    assert_eq!(bad.status.code(), Some(2), "a bad flag is a usage error");
    assert!(
        stderr(&bad).contains("not a rejection reason"),
        "{}",
        stderr(&bad)
    );
    app.stop().await;
}

#[tokio::test]
async fn epochs_lists_resources_and_their_highest_tokens() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&standard_routes(&upstream.url())).await;
    app.put("/wallets/2", 7, "").await;
    app.put("/wallets/1", 3, "").await;
    app.put("/wallets/1", 4, "").await;
    let db = db_arg(&app);
    let json = run(&["epochs", "--db", &db, "--format", "json"]).await;
    let rows: Vec<Value> = serde_json::from_str(&stdout(&json)).unwrap();
    let pairs: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["resource"].as_str().unwrap().to_owned(),
                r["highest"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [("wallet:1".to_owned(), 4), ("wallet:2".to_owned(), 7)]
    );
    let one = run(&[
        "epochs",
        "--db",
        &db,
        "--resource",
        "wallet:2",
        "--format",
        "csv",
    ])
    .await;
    let text = stdout(&one);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "resource,highest,updated_at");
    assert!(lines[1].starts_with("wallet:2,7,"), "{text}");
    assert_eq!(lines.len(), 2);
    app.stop().await;
}

/// `history` is the epoch history, as `GET /v1/epochs` serves it: every advance, newest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lists_every_advance_newest_first() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&standard_routes(&upstream.url())).await;
    app.put("/wallets/1", 3, "").await;
    app.put("/wallets/2", 7, "").await;
    app.put("/wallets/1", 4, "").await;
    app.put("/wallets/1", 4, "").await; // the same token: no advance
    let db = db_arg(&app);
    let json = run(&["history", "--db", &db, "--format", "json"]).await;
    assert!(json.status.success(), "{}", stderr(&json));
    let rows: Vec<Value> = serde_json::from_str(&stdout(&json)).unwrap();
    let advances: Vec<(&str, Option<u64>, u64, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["resource"].as_str().unwrap(),
                r["from"].as_u64(),
                r["to"].as_u64().unwrap(),
                r["via"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        advances,
        [
            ("wallet:1", Some(3), 4, "write"),
            ("wallet:2", None, 7, "write"),
            ("wallet:1", None, 3, "write"),
        ]
    );
    let one = run(&[
        "history",
        "--db",
        &db,
        "--resource",
        "wallet:2",
        "--format",
        "csv",
    ])
    .await;
    let text = stdout(&one);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "id,at,resource,from,to,via,reason");
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[1].contains(",wallet:2,,7,write,"), "{text}");
    app.stop().await;
}

#[test]
fn reading_a_missing_database_fails_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("nothing-here.db");
    for command in ["audit", "epochs", "history"] {
        let output = fencegate(&[command, "--db", db.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        assert!(
            stderr(&output).contains("no database at")
                && stderr(&output).contains("--db or FENCEGATE_DB"),
            "{}",
            stderr(&output)
        );
        assert!(!db.exists(), "{command} must not create the database");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_goes_through_the_admin_api_and_the_gate() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&format!(
        "admin_token = \"t0ken\"\n{}",
        standard_routes(&upstream.url())
    ))
    .await;
    app.put("/wallets/9", 1, "").await;
    let admin = format!("http://{}", app.admin_addr);
    let fence = |token: Option<&'static str>, new: &'static str| {
        let mut command = fencegate(&["fence", "--admin", &admin, "wallet:9", new]);
        if let Some(token) = token {
            command.env("FENCEGATE_ADMIN_TOKEN", token);
        }
        tokio::task::spawn_blocking(move || command.output().unwrap())
    };
    let fenced = fence(Some("t0ken"), "2").await.unwrap();
    assert!(fenced.status.success(), "{}", stderr(&fenced));
    assert_eq!(stdout(&fenced), "fenced wallet:9: highest token is now 2\n");
    assert_eq!(
        app.put("/wallets/9", 1, "").await.status(),
        409,
        "the gate knows at once"
    );

    let stale = fence(Some("t0ken"), "1").await.unwrap();
    assert_eq!(stale.status.code(), Some(1));
    assert!(stderr(&stale).contains("409"), "{}", stderr(&stale));
    let unauthorised = fence(Some("wrong"), "5").await.unwrap();
    assert_eq!(unauthorised.status.code(), Some(1));
    assert!(
        stderr(&unauthorised).contains("401")
            && stderr(&unauthorised).contains("the bearer token sent is not the admin token"),
        "{}",
        stderr(&unauthorised)
    );
    let tokenless = fence(None, "5").await.unwrap();
    assert!(
        stderr(&tokenless).contains("needs the header Authorization"),
        "{}",
        stderr(&tokenless)
    );
    let bad_url = fencegate(&["fence", "--admin", "not a url", "w", "1"])
        .output()
        .unwrap();
    assert_eq!(bad_url.status.code(), Some(2), "an unusable command line");
    let vias: Vec<String> = app.epochs().into_iter().map(|e| e.3).collect();
    assert_eq!(vias, ["write", "fence"]);

    // A name no write or fence ever used (a typo) is refused unless --create says it is meant.
    let typo = fencegate(&["fence", "--admin", &admin, "walet:9", "3"])
        .env("FENCEGATE_ADMIN_TOKEN", "t0ken")
        .output()
        .unwrap();
    assert_eq!(typo.status.code(), Some(1));
    assert!(
        stderr(&typo).contains("has never been seen"),
        "{}",
        stderr(&typo)
    );
    let created = fencegate(&["fence", "--create", "--admin", &admin, "wallet:10", "3"])
        .env("FENCEGATE_ADMIN_TOKEN", "t0ken")
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", stderr(&created));
    let closed = common::closed_port();
    let unreachable = fencegate(&[
        "fence",
        "--admin",
        &format!("http://{}", closed.addr),
        "w",
        "1",
    ])
    .output()
    .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(stderr(&unreachable).contains("cannot reach the admin plane"));
    app.stop().await;
}

#[test]
fn check_config_prints_the_routes_in_match_order_or_the_precise_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        r#"
[[routes]]
path = "/wallets/{id}"
upstream = "http://127.0.0.1:5984"
resource = "wallet:{id}"
max_token_jump = 1000

[[routes]]
path = "/{*rest}"
upstream = "http://127.0.0.1:5984"
resource = "default"
"#,
    )
    .unwrap();
    let output = fencegate(&["check-config", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    let wallets = text.find("[0] /wallets/{id} -> http://127.0.0.1:5984  resource wallet:{id}");
    let rest = text.find("[1] /{*rest} -> http://127.0.0.1:5984  resource default");
    assert!(
        wallets.is_some() && rest.is_some() && wallets < rest,
        "{text}"
    );
    assert!(
        text.contains("fenced every method but GET,HEAD,OPTIONS  max_token_jump 1000"),
        "{text}"
    );
    // Every label, the longest included, stands apart from its value.
    let setting = |key: &str| {
        text.lines()
            .find(|line| line.split_whitespace().next() == Some(key))
            .map(|line| {
                line.split_whitespace()
                    .skip(1)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
    };
    // What each plane serves: plain HTTP without a TLS table.
    assert_eq!(
        setting("listen").as_deref(),
        Some("127.0.0.1:8080 (plain HTTP)"),
        "{text}"
    );
    assert_eq!(
        setting("admin_listen").as_deref(),
        Some("127.0.0.1:9090 (plain HTTP; admin token not set)"),
        "{text}"
    );
    assert_eq!(
        setting("upstream_connect_timeout").as_deref(),
        Some("5s"),
        "{text}"
    );
    assert_eq!(
        setting("max_resources_per_request").as_deref(),
        Some("1000"),
        "{text}"
    );
    assert!(
        text.contains(
            "warning: routes[1] (/{*rest}) matches /, a collection above the paths of routes[0] (/wallets/{id})"
        ),
        "{text}"
    );

    let bad = dir.path().join("bad.toml");
    let broken = std::fs::read_to_string(&good)
        .unwrap()
        .replace("wallet:{id}", "wallet:{nope}");
    std::fs::write(&bad, broken).unwrap();
    let output = fencegate(&["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty());
    assert!(
        stderr(&output).ends_with(
            "routes[0].resource: uses {nope}, which path /wallets/{id} does not capture\n"
        ),
        "{}",
        stderr(&output)
    );
    let missing = fencegate(&["check-config", "/nonexistent/fencegate.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        stderr(&missing)
            .matches("/nonexistent/fencegate.toml")
            .count(),
        1,
        "the file is named once: {}",
        stderr(&missing)
    );
    let unparsable = dir.path().join("unparsable.toml");
    std::fs::write(&unparsable, "routes = [[[\n").unwrap();
    let output = fencegate(&["check-config", unparsable.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output).matches("unparsable.toml").count(),
        1,
        "{}",
        stderr(&output)
    );
}

/// `/wallets/:id` is an older router's placeholder; matchit 0.8 reads it as literal text, so the
/// route would serve only the path `/wallets/:id`. check-config says so and names `{id}`.
#[test]
fn check_config_warns_of_placeholders_in_the_old_router_syntax() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("colon.toml");
    std::fs::write(
        &file,
        "[[routes]]\npath = \"/wallets/:id\"\nupstream = \"http://127.0.0.1:1\"\nresource = \"wallet\"\n",
    )
    .unwrap();
    let output = fencegate(&["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains(
            "warning: routes[0] (/wallets/:id) has the segment :id, which matches only the literal text :id; to capture a segment write {id}"
        ),
        "{}",
        stdout(&output)
    );
}

/// `check-config FILE | head -1`: the reader closes the pipe early; no panic, exit 0.
#[test]
fn check_config_into_a_closed_pipe_does_not_panic() {
    use std::io::Read as _;
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/fencegate.toml"
    );
    for _ in 0..5 {
        let mut child = fencegate(&["check-config", example])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // closed before a byte is read
        let status = child.wait().unwrap();
        let mut errors = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut errors)
            .unwrap();
        assert!(!errors.contains("panicked"), "{errors}");
        assert!(status.success() || errors.is_empty(), "{status:?} {errors}");
    }
}

/// `fencegate --log-format json serve` with `extra` flags on free ports in front of `upstream`,
/// its database in `dir`: the child, its log lines, and the data plane's address once it serves.
fn serve_with_json_logs(
    upstream: &RecordingUpstream,
    dir: &Path,
    extra: &[&str],
) -> (
    std::process::Child,
    impl Iterator<Item = String> + Send + 'static,
    String,
) {
    let db = dir.join("fg.db");
    let mut args = vec!["--log-format", "json", "serve"];
    args.extend_from_slice(extra);
    let url = upstream.url();
    args.extend_from_slice(&["--upstream", &url, "--listen", "127.0.0.1:0"]);
    args.extend_from_slice(&[
        "--admin-listen",
        "127.0.0.1:0",
        "--db",
        db.to_str().unwrap(),
    ]);
    let mut child = fencegate(&args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let serving = json_line_with(&mut lines, "fencegate serving");
    let data = serving["data"].as_str().unwrap().to_owned();
    (child, lines, data)
}

/// Reads JSON log lines from `lines` until one has `message`; returns it.
fn json_line_with(lines: &mut impl Iterator<Item = String>, message: &str) -> Value {
    for line in lines {
        let value: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if value["message"] == message {
            return value;
        }
    }
    panic!("no log line with message {message:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_one_line_per_rejection_and_advance_with_the_request_id() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines, data) = serve_with_json_logs(&upstream, dir.path(), &[]);
    let client = reqwest::Client::new();
    let put = |token: &str, id: &str| {
        client
            .put(format!("http://{data}/w"))
            .header("fencing-token", token)
            .header("x-request-id", id)
            .send()
    };
    assert_eq!(put("5", "leader-write-1").await.unwrap().status(), 200);
    let stale = put("4", "zombie-write-1").await.unwrap();
    assert_eq!(stale.headers()["x-request-id"], "zombie-write-1");

    let advance = tokio::task::spawn_blocking(move || {
        let advance = json_line_with(&mut lines, "epoch advanced");
        let rejection = json_line_with(&mut lines, "fenced request rejected");
        (advance, rejection)
    });
    let waited = tokio::time::timeout(Duration::from_secs(10), advance).await;
    // Killed before the verdict: the reader blocks on the child's stderr until it closes, and
    // a test that gave up must not wait for it forever.
    let _ = child.kill();
    let _ = child.wait();
    let (advance, rejection) = waited.expect("both log lines within 10 s").unwrap();
    assert_eq!(advance["request_id"], "leader-write-1");
    assert_eq!(
        (advance["to"].as_u64(), advance["via"].as_str()),
        (Some(5), Some("write"))
    );
    assert_eq!(rejection["request_id"], "zombie-write-1");
    assert_eq!(rejection["reason"], "stale");
    assert_eq!(
        (rejection["token"].as_u64(), rejection["highest"].as_u64()),
        (Some(4), Some(5))
    );
    assert!(Path::new(&dir.path().join("fg.db")).exists());
}

#[test]
fn demo_shows_the_lost_update_then_fences_it_and_exits_0() {
    let output = fencegate(&["demo"]).output().unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        stderr(&output)
    );
    let text = stdout(&output);
    let act_two = text.find("Act 2").expect("two acts");
    let (unfenced, fenced) = text.split_at(act_two);
    assert!(unfenced.contains("wallet = $150"), "{text}");
    assert!(
        fenced.contains("409 Conflict, Fencing-Token-Highest: 2"),
        "{text}"
    );
    assert!(fenced.contains("wallet = $120"), "{text}");
    assert!(
        fenced.contains("rejected: stale token 1 < highest 2"),
        "{text}"
    );
    assert!(text.contains("Result: fenced correctly"), "{text}");
}

#[test]
fn every_example_config_in_deploy_passes_check_config() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "toml") {
            // As deploy/README says each is used: the container example exposes the admin plane,
            // so it gets the token from the environment, as compose and Kubernetes provide it;
            // the host example needs nothing.
            let mut command = fencegate(&["check-config", path.to_str().unwrap()]);
            command.env_remove("FENCEGATE_ADMIN_TOKEN");
            if path.ends_with("fencegate.container.toml") {
                command.env("FENCEGATE_ADMIN_TOKEN", "example");
            }
            let output = command.output().unwrap();
            assert!(
                output.status.success(),
                "{}: {}",
                path.display(),
                stderr(&output)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "the examples were found");
}

/// The image is built, run by compose and deployed by Kubernetes under one tag: the crate's
/// version.
#[test]
fn the_image_tag_is_the_crate_version_everywhere() {
    let expected = format!("fencegate:{}", env!("CARGO_PKG_VERSION"));
    for file in [
        "deploy/Dockerfile",
        "deploy/README.md",
        "deploy/docker-compose.yml",
        "deploy/k8s/fencegate.yaml",
    ] {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let tags: Vec<&str> = text
            .split(|c: char| c.is_whitespace() || c == '`')
            .filter(|word| word.starts_with("fencegate:") && word.len() > "fencegate:".len())
            .collect();
        assert!(!tags.is_empty(), "{file} names no fencegate image");
        for tag in tags {
            assert_eq!(tag, expected, "{file}");
        }
    }
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "_fencegate()"),
        ("zsh", "#compdef fencegate"),
        ("fish", "complete -c fencegate"),
    ] {
        let output = fencegate(&["completions", shell]).output().unwrap();
        assert!(output.status.success(), "{shell}: {}", stderr(&output));
        let text = stdout(&output);
        assert!(text.contains(marker), "{shell}: {text}");
        assert!(
            text.contains("history") && text.contains("check-config"),
            "{shell}"
        );
    }
    let unknown = fencegate(&["completions", "tcsh"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

/// `audit`, `epochs`, `history` and `fence` find the database and the admin plane in the config
/// file `serve` runs with (`--config` or `FENCEGATE_CONFIG`), unless a flag says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_commands_read_the_database_and_admin_address_from_the_config() {
    let upstream = RecordingUpstream::start().await;
    let app = TestApp::spawn(&standard_routes(&upstream.url())).await;
    app.put("/wallets/1", 3, "").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fencegate.toml");
    std::fs::write(
        &config,
        format!(
            "database = \"{}\"\nadmin_listen = \"{}\"\n{}",
            db_arg(&app),
            app.admin_addr,
            standard_routes(&upstream.url())
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    for command in ["audit", "epochs", "history"] {
        let output = fencegate(&[command, "--config", &config, "--format", "json"])
            .env_remove("FENCEGATE_DB")
            .output()
            .unwrap();
        assert!(output.status.success(), "{command}: {}", stderr(&output));
    }
    let epochs = fencegate(&["epochs", "--format", "csv"])
        .env("FENCEGATE_CONFIG", &config)
        .env_remove("FENCEGATE_DB")
        .output()
        .unwrap();
    assert!(
        stdout(&epochs).contains("wallet:1,3,"),
        "{}",
        stdout(&epochs)
    );
    let fenced = fencegate(&["fence", "--config", &config, "wallet:1", "5"])
        .env_remove("FENCEGATE_ADMIN_URL")
        .output()
        .unwrap();
    assert!(fenced.status.success(), "{}", stderr(&fenced));
    assert_eq!(app.put("/wallets/1", 4, "").await.status(), 409);
    // A flag still wins over the file.
    let elsewhere = dir.path().join("elsewhere.db");
    let missing = fencegate(&[
        "epochs",
        "--config",
        &config,
        "--db",
        elsewhere.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(
        stderr(&missing).contains("no database at"),
        "{}",
        stderr(&missing)
    );
    let broken = fencegate(&["audit", "--config", "/nonexistent.toml"])
        .env_remove("FENCEGATE_DB")
        .output()
        .unwrap();
    assert_eq!(broken.status.code(), Some(2));
    app.stop().await;
}

/// `--access-log`: one line per data-plane request with the client, method, target, resource and
/// token (fenced requests), status, the upstream's status (when the answer is the upstream's),
/// bytes, duration and request id; as JSON with `--log-format json`. Off by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_one_line_per_request() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, mut lines, data) =
        serve_with_json_logs(&upstream, dir.path(), &["--access-log"]);
    let client = reqwest::Client::new();
    let put = |token: &str, id: &str| {
        client
            .put(format!("http://{data}/w?x=1"))
            .header("fencing-token", token)
            .header("x-request-id", id)
            .body("hello")
            .send()
    };
    assert_eq!(put("5", "leader").await.unwrap().status(), 200);
    assert_eq!(put("4", "zombie").await.unwrap().status(), 409);
    let read = client.get(format!("http://{data}/w")).send().await.unwrap();
    assert_eq!(read.status(), 200);
    let access = tokio::task::spawn_blocking(move || {
        (0..3)
            .map(|_| json_line_with(&mut lines, "access"))
            .collect::<Vec<Value>>()
    });
    let waited = tokio::time::timeout(Duration::from_secs(10), access).await;
    // Killed before the verdict, as above.
    let _ = child.kill();
    let _ = child.wait();
    let access = waited.expect("three access lines within 10 s").unwrap();
    let leader = &access[0];
    assert_eq!(leader["method"], "PUT");
    assert_eq!(leader["path"], "/w?x=1");
    assert_eq!(leader["resource"], "default");
    assert_eq!(leader["token"], 5);
    assert_eq!(
        (
            leader["status"].as_u64(),
            leader["upstream_status"].as_u64()
        ),
        (Some(200), Some(200))
    );
    assert_eq!(leader["request_id"], "leader");
    assert!(leader["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(leader["duration_us"].as_u64().is_some());
    let zombie = &access[1];
    assert_eq!(
        (zombie["status"].as_u64(), zombie["token"].as_u64()),
        (Some(409), Some(4))
    );
    assert!(
        zombie["upstream_status"].is_null(),
        "fencegate's own answer: {zombie}"
    );
    assert!(zombie["bytes"].as_u64().is_some(), "{zombie}");
    let read = &access[2];
    assert_eq!(read["method"], "GET");
    assert!(
        read["resource"].is_null() && read["token"].is_null(),
        "{read}"
    );
}

#[test]
fn the_manual_page_is_roff_naming_every_subcommand() {
    let output = fencegate(&["man"]).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with(".ie") || text.contains(".TH fencegate"),
        "{text}"
    );
    for subcommand in [
        "serve",
        "audit",
        "epochs",
        "history",
        "fence",
        "check\\-config",
        "demo",
    ] {
        assert!(
            text.contains(subcommand),
            "{subcommand} missing from the man page"
        );
    }
}
