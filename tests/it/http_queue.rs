//! The queue over HTTP (curl's view): publish lines and JSON, fetch, ack,
//! commit, and 4xx JSON errors for bad input.

use std::collections::HashSet;

use serde_json::Value;

use crate::harness::{TestServer, http_post, simple_value};

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn publish_fetch_ack_commit_over_http() {
    let server = TestServer::start().await;
    let sql = server.connect().await;
    sql.batch_execute(
        "CREATE TOPIC logs WITH (partitions = 2);
         CREATE SUBSCRIPTION tail ON TOPIC logs;
         CREATE SUBSCRIPTION jobs ON TOPIC logs WITH (mode = 'queue')",
    )
    .await
    .expect("setup");
    let http = server.http_addr();

    // Plain lines: one message each, stored byte for byte (even if not JSON).
    let (status, body) = http_post(
        http,
        "/v1/topics/logs/messages",
        "application/x-ndjson",
        "{\"a\":1}\nnot json\n{\"a\":3}\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["messages"].as_array().map(Vec::len), Some(3));
    // JSON envelope with keys and headers.
    let (status, body) = http_post(
        http,
        "/v1/topics/logs/messages",
        "application/json",
        r#"{"messages": [{"key": "k1", "payload": "p1", "headers": {"h": "v"}}, {"key": "k1", "payload": {"n": 2}}]}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let positions = json(&body)["messages"]
        .as_array()
        .cloned()
        .expect("positions");
    assert_eq!(
        positions[0]["partition"], positions[1]["partition"],
        "same key, same partition"
    );
    assert_eq!(simple_value(&sql, "SELECT count(*) FROM logs").await, "5");
    assert_eq!(
        simple_value(&sql, "SELECT payload FROM logs WHERE payload = 'not json'").await,
        "not json"
    );

    // Stream subscription over HTTP, then commit.
    let (status, body) = http_post(
        http,
        "/v1/subscriptions/tail/fetch",
        "application/json",
        r#"{"max": 100}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let fetched = json(&body)["messages"]
        .as_array()
        .cloned()
        .expect("messages");
    assert_eq!(fetched.len(), 5);
    let (status, body) = http_post(
        http,
        "/v1/subscriptions/tail/commit",
        "application/json",
        "{}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let committed: u64 = json(&body)["committed"]
        .as_array()
        .expect("committed")
        .iter()
        .map(|c| c["offset"].as_u64().expect("offset"))
        .sum();
    assert_eq!(committed, 5);

    // Queue subscription: fetch leases, ack them, nothing comes back.
    let (_, body) = http_post(
        http,
        "/v1/subscriptions/jobs/fetch",
        "application/json",
        r#"{"max": 10, "wait_ms": 1000}"#,
    )
    .await;
    let leases: Vec<String> = json(&body)["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["lease_id"].as_str().expect("lease").to_string())
        .collect();
    assert_eq!(leases.len(), 5);
    assert_eq!(leases.iter().collect::<HashSet<_>>().len(), 5);
    let ack_body = serde_json::json!({"lease_ids": leases}).to_string();
    let (status, body) = http_post(
        http,
        "/v1/subscriptions/jobs/ack",
        "application/json",
        &ack_body,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["acked"], 5);
    let (_, body) = http_post(
        http,
        "/v1/subscriptions/jobs/fetch",
        "application/json",
        r#"{"max": 10}"#,
    )
    .await;
    assert_eq!(json(&body)["messages"].as_array().map(Vec::len), Some(0));
    server.shutdown().await;
}

#[tokio::test]
async fn http_errors_are_json_with_sqlstates() {
    let server = TestServer::start().await;
    let sql = server.connect().await;
    sql.batch_execute("CREATE TOPIC small WITH (message_bytes_max = '16'); CREATE SUBSCRIPTION q ON TOPIC small WITH (mode = 'queue')")
        .await
        .expect("setup");
    let http = server.http_addr();
    let cases = [
        ("/v1/topics/nope/messages", "text/plain", "x", 404, "42704"),
        (
            "/v1/topics/small/messages",
            "application/json",
            "{not json",
            400,
            "22023",
        ),
        (
            "/v1/topics/small/messages",
            "application/json",
            r#"{"messages": [{"payload": "x", "colour": 1}]}"#,
            400,
            "22023",
        ),
        (
            "/v1/topics/small/messages",
            "text/plain",
            "this line is longer than sixteen bytes",
            413,
            "54000",
        ),
        (
            "/v1/subscriptions/nope/fetch",
            "application/json",
            "{}",
            404,
            "42704",
        ),
        (
            "/v1/subscriptions/q/ack",
            "application/json",
            r#"{"lease_ids": ["unknown"]}"#,
            404,
            "42704",
        ),
        (
            "/v1/subscriptions/q/commit",
            "application/json",
            "{}",
            409,
            "55000",
        ),
    ];
    for (path, content_type, body, status, sqlstate) in cases {
        let (got, answer) = http_post(http, path, content_type, body).await;
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert_eq!(json(&answer)["sqlstate"], sqlstate, "{path}: {answer}");
    }
    // Nothing oversize was published, and the server still serves.
    assert_eq!(simple_value(&sql, "SELECT count(*) FROM small").await, "0");
    server.shutdown().await;
}
