//! HTTP: `GET /health`, Prometheus text at `GET /metrics`, and the queue:
//! `POST /v1/topics/{name}/messages` (publish), and
//! `POST /v1/subscriptions/{name}/fetch|ack|nack|commit` (consume).
//!
//! Bodies and answers are JSON; every error is a 4xx/5xx with
//! `{"error": ..., "sqlstate": ..., "hint": ...}`. Handlers only translate:
//! the engine does the work.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::TaskHandle;
use crate::engine::{Delivery, Message, Weir};
use crate::types::{SqlState, WeirError};

/// Largest request body accepted (one publish request).
const BODY_BYTES_MAX: usize = 64 << 20;

pub(super) fn serve(listener: TcpListener, weir: Weir) -> TaskHandle {
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/topics/{name}/messages", post(publish))
        .route("/v1/subscriptions/{name}/fetch", post(fetch))
        .route("/v1/subscriptions/{name}/ack", post(ack))
        .route("/v1/subscriptions/{name}/nack", post(nack))
        .route("/v1/subscriptions/{name}/commit", post(commit))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(weir);
    TaskHandle::spawn("http", async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "http server stopped");
        }
    })
}

/// A `WeirError` as an HTTP answer.
struct HttpError(WeirError);

impl From<WeirError> for HttpError {
    fn from(e: WeirError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let e = self.0;
        let status = match e.sqlstate.code() {
            "42704" | "42P01" => StatusCode::NOT_FOUND,
            "54000" => StatusCode::PAYLOAD_TOO_LARGE,
            "55000" => StatusCode::CONFLICT,
            code if code.starts_with("XX") || code.starts_with("58") => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        };
        let body = json!({"error": e.message, "sqlstate": e.sqlstate.code(), "detail": e.detail, "hint": e.hint});
        (status, Json(body)).into_response()
    }
}

fn bad_request(message: impl Into<String>, hint: &str) -> HttpError {
    HttpError(WeirError::new(SqlState::INVALID_PARAMETER_VALUE, message).with_hint(hint))
}

/// Parses a JSON body, answering 400 with serde's reason when it is not.
fn json_body<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        bad_request(
            format!("malformed JSON body: {e}"),
            "send a JSON object, see docs/queue.md",
        )
    })
}

async fn health() -> &'static str {
    "ok\n"
}

async fn metrics(State(weir): State<Weir>) -> impl IntoResponse {
    let m = weir.metrics();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "weir_connections_total",
        "counter",
        "pgwire sessions opened since start",
        m.connections_total.load(Ordering::Relaxed),
    );
    metric(
        "weir_connections_active",
        "gauge",
        "pgwire sessions open now",
        m.connections_active.load(Ordering::Relaxed),
    );
    metric(
        "weir_statements_total",
        "counter",
        "statements run since start",
        m.statements_total.load(Ordering::Relaxed),
    );
    metric(
        "weir_errors_total",
        "counter",
        "statements that ended in an error since start",
        m.errors_total.load(Ordering::Relaxed),
    );
    queue_metrics(&weir, &mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// Per-topic and per-subscription series, labelled like Prometheus expects.
fn queue_metrics(weir: &Weir, out: &mut String) {
    let topics = weir.topic_stats();
    let subs = weir.subscription_stats();
    let families: [(&str, &str, &str); 7] = [
        (
            "weir_topic_messages",
            "gauge",
            "retained messages per topic partition",
        ),
        ("weir_topic_bytes", "gauge", "retained bytes per topic"),
        (
            "weir_topic_next_offset",
            "gauge",
            "offset the next message of a partition gets",
        ),
        (
            "weir_subscription_lag",
            "gauge",
            "messages not yet committed or acked, per partition",
        ),
        (
            "weir_subscription_in_flight",
            "gauge",
            "leased (queue) or fetched but uncommitted (stream) messages",
        ),
        (
            "weir_subscription_redeliveries_total",
            "counter",
            "deliveries after the first",
        ),
        (
            "weir_subscription_dead_lettered_total",
            "counter",
            "messages moved to the dead-letter topic",
        ),
    ];
    for (name, kind, help) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        match name {
            "weir_topic_messages" | "weir_topic_next_offset" => {
                for t in &topics {
                    let value = if name == "weir_topic_messages" {
                        t.messages
                    } else {
                        t.next_offset
                    };
                    let _ = writeln!(
                        out,
                        "{name}{{topic=\"{}\",partition=\"{}\"}} {value}",
                        t.topic, t.partition
                    );
                }
            }
            "weir_topic_bytes" => {
                for t in topics.iter().filter(|t| t.partition == 0) {
                    let _ = writeln!(out, "{name}{{topic=\"{}\"}} {}", t.topic, t.topic_bytes);
                }
            }
            "weir_subscription_lag" => {
                for s in &subs {
                    let _ = writeln!(
                        out,
                        "{name}{{subscription=\"{}\",partition=\"{}\"}} {}",
                        s.subscription, s.partition, s.lag
                    );
                }
            }
            _ => {
                for s in subs.iter().filter(|s| s.partition == 0) {
                    let value = match name {
                        "weir_subscription_in_flight" => s.in_flight,
                        "weir_subscription_redeliveries_total" => s.redeliveries,
                        _ => s.dead_lettered,
                    };
                    let _ = writeln!(out, "{name}{{subscription=\"{}\"}} {value}", s.subscription);
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    messages: Vec<PublishMessage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishMessage {
    key: Option<String>,
    payload: Value,
    #[serde(default)]
    headers: serde_json::Map<String, Value>,
}

fn json_text(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// `application/json`: `{"messages": [{"key", "payload", "headers"}]}`;
/// anything else: one message per line, stored byte for byte.
async fn publish(
    State(weir): State<Weir>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain")
        .to_ascii_lowercase();
    let messages: Vec<Message> = if content_type.starts_with("application/json") {
        let parsed: PublishBody = json_body(&body)?;
        parsed
            .messages
            .into_iter()
            .map(|m| Message {
                key: m.key.map(bytes::Bytes::from),
                payload: bytes::Bytes::from(json_text(m.payload)),
                headers: m
                    .headers
                    .into_iter()
                    .map(|(k, v)| (k, bytes::Bytes::from(json_text(v))))
                    .collect(),
            })
            .collect()
    } else {
        body.split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.is_empty())
            .map(|line| Message {
                key: None,
                payload: body.slice_ref(line),
                headers: Vec::new(),
            })
            .collect()
    };
    if messages.is_empty() {
        return Err(bad_request(
            "no messages in the request",
            "send one message per line, or {\"messages\": [...]}",
        ));
    }
    let published = weir.publish(&name, messages).await?;
    let positions: Vec<Value> = published
        .iter()
        .map(|p| json!({"partition": p.partition, "offset": p.offset}))
        .collect();
    Ok(Json(json!({"messages": positions})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FetchBody {
    max: Option<u64>,
    wait_ms: Option<u64>,
    /// Which consumer of the subscription this is (default "http").
    consumer: Option<String>,
}

fn delivery_json(topic: &str, d: &Delivery) -> Value {
    let headers: serde_json::Map<String, Value> = d
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    json!({
        "topic": topic,
        "partition": d.partition,
        "offset": d.offset,
        "key": d.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "payload": String::from_utf8_lossy(&d.payload),
        "headers": headers,
        "timestamp_ms": d.timestamp_ms,
        "delivery_count": d.delivery_count,
        "lease_id": d.lease_id,
    })
}

async fn fetch(
    State(weir): State<Weir>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    let request: FetchBody = json_body(&body)?;
    let consumer = request.consumer.unwrap_or_else(|| "http".to_string());
    let (topic, deliveries) = weir
        .fetch(
            &name,
            &format!("http:{consumer}"),
            request.max.unwrap_or(1),
            request.wait_ms.unwrap_or(0),
        )
        .await?;
    let messages: Vec<Value> = deliveries
        .iter()
        .map(|d| delivery_json(&topic, d))
        .collect();
    Ok(Json(json!({"messages": messages})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SettleBody {
    lease_ids: Vec<String>,
}

async fn settle(
    weir: Weir,
    name: String,
    body: Bytes,
    ack: bool,
) -> Result<Json<Value>, HttpError> {
    let request: SettleBody = json_body(&body)?;
    if request.lease_ids.is_empty() {
        return Err(bad_request(
            "lease_ids is empty",
            "send {\"lease_ids\": [\"...\"]} from a fetch",
        ));
    }
    let n = weir.settle(&name, request.lease_ids, ack).await?;
    let key = if ack { "acked" } else { "nacked" };
    let mut answer = serde_json::Map::new();
    answer.insert(key.to_string(), json!(n));
    Ok(Json(Value::Object(answer)))
}

async fn ack(
    State(weir): State<Weir>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    settle(weir, name, body, true).await
}

async fn nack(
    State(weir): State<Weir>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    settle(weir, name, body, false).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CommitBody {
    consumer: Option<String>,
}

async fn commit(
    State(weir): State<Weir>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, HttpError> {
    let request: CommitBody = json_body(&body)?;
    let consumer = request.consumer.unwrap_or_else(|| "http".to_string());
    let committed = weir
        .commit_subscription(&name, &format!("http:{consumer}"))
        .await?;
    let positions: Vec<Value> = committed
        .iter()
        .map(|(p, o)| json!({"partition": p, "offset": o}))
        .collect();
    Ok(Json(json!({"committed": positions})))
}
