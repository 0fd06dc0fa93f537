//! `connector = 'rabbitmq'` sources against the real RabbitMQ at 127.0.0.1:5672 (guest/guest),
//! over real pgwire: queue mode into an `EMIT ON WINDOW CLOSE` view with dead letters, an
//! exchange binding, stream mode across a `kill -9` of the binary, queue mode killed while
//! messages keep arriving (every message exactly once afterwards), the errors `CREATE SOURCE`
//! gives for bad settings, recovery after RabbitMQ drops the consumer or the connection, and
//! the queue-mode crash window (appended, not acknowledged) made to happen through the
//! connector's own API over a real topic.
//!
//! Messages travel broker → ingest → the source's log asynchronously, so tests wait for the
//! log with a deadline ([`poll_until`]) and then use `FLUSH` for the views. Without a broker the
//! tests print a line and pass, unless `WEIR_REQUIRE_BROKERS=1` (CI), when they fail. Every
//! queue and exchange is named at random and deleted at the end.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio_postgres::Client;
use weir::connector::rabbitmq::{
    self, AckGate, IngestLog, IngestMessage, IngestStatus, RabbitMqConfig,
};
use weir::queue::topic::{Message, Topic, TopicConfig};
use weir::types::{WeirError, WeirResult};

use crate::harness::{
    BinaryServer, TestServer, assert_no_error_lines, assert_no_panics, expect_sqlstate, poll_until,
    simple_rows, simple_value, temp_dir_with_log, within,
};
use crate::s3;

pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The test's own connection to RabbitMQ, with a confirming channel to publish on and the
/// queues and exchanges to delete at the end.
struct Broker {
    connection: Connection,
    channel: Channel,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

/// Connects to RabbitMQ with a confirming channel, or returns `None` (the test then passes,
/// having said why) when it does not answer; with `WEIR_REQUIRE_BROKERS=1` a missing broker
/// fails the test instead. Shared with [`crate::exactly_once`].
pub(crate) async fn connect_or_skip(test: &str) -> Option<(Connection, Channel)> {
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(AMQP_URL, ConnectionProperties::default()),
    )
    .await;
    let why = match attempt {
        Ok(Ok(connection)) => {
            let channel = connection
                .create_channel()
                .await
                .expect("open a RabbitMQ channel");
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("enable publisher confirms");
            return Some((connection, channel));
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5s".to_string(),
    };
    if s3::require_brokers() {
        panic!("RabbitMQ at {AMQP_URL} did not answer ({why}) and WEIR_REQUIRE_BROKERS=1");
    }
    eprintln!("skipping {test}: RabbitMQ at {AMQP_URL} did not answer ({why})");
    None
}

/// [`connect_or_skip`] as a [`Broker`].
async fn require_rabbitmq(test: &str) -> Option<Broker> {
    let (connection, channel) = connect_or_skip(test).await?;
    Some(Broker {
        connection,
        channel,
        queues: Vec::new(),
        exchanges: Vec::new(),
    })
}

/// A name no other test run uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!("weir_it_{prefix}_{:08x}", rand::random::<u32>())
}

impl Broker {
    /// A queue name to delete at the end (the source may declare it).
    fn queue_name(&mut self, prefix: &str) -> String {
        let name = unique(prefix);
        self.queues.push(name.clone());
        name
    }

    /// Declares a durable queue (a stream queue if `stream`).
    async fn declare_queue(&mut self, prefix: &str, stream: bool) -> String {
        let name = self.queue_name(prefix);
        let mut arguments = FieldTable::default();
        if stream {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("stream".into()),
            );
        }
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .expect("declare a test queue");
        name
    }

    /// Declares a durable classic queue with a given name (again, after it was deleted).
    async fn declare_queue_named(&self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare the queue again");
    }

    async fn declare_exchange(&mut self, prefix: &str) -> String {
        let name = unique(prefix);
        self.channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare a test exchange");
        self.exchanges.push(name.clone());
        name
    }

    /// Publishes `body` to `exchange` with `routing_key` and waits for the broker's confirm.
    async fn publish_to(&self, exchange: &str, routing_key: &str, body: &[u8]) {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish to RabbitMQ");
        within("RabbitMQ's publisher confirm", confirm)
            .await
            .expect("RabbitMQ confirmed the publish");
    }

    /// Publishes to a queue through the default exchange.
    async fn publish(&self, queue: &str, body: &str) {
        self.publish_to("", queue, body.as_bytes()).await;
    }

    /// Messages ready in `queue` (not counting unacknowledged ones).
    async fn ready(&self, queue: &str) -> u32 {
        let channel = self
            .connection
            .create_channel()
            .await
            .expect("open a channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the queue exists");
        q.message_count()
    }

    async fn delete_queue(&self, queue: &str) {
        let channel = self
            .connection
            .create_channel()
            .await
            .expect("open a channel");
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .expect("delete the queue");
    }

    /// Waits until `queue` has no ready messages.
    async fn wait_until_drained(&self, queue: &str) {
        poll_until(&format!("{queue} to be drained"), || async {
            (self.ready(queue).await == 0).then_some(())
        })
        .await;
    }

    /// Deletes what the test created (best effort: a test that failed may have left less).
    async fn cleanup(self) {
        for queue in &self.queues {
            if let Ok(channel) = self.connection.create_channel().await {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for exchange in &self.exchanges {
            if let Ok(channel) = self.connection.create_channel().await {
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = self.connection.close(200, "OK".into()).await;
    }
}

fn text(v: &[&str]) -> Vec<Option<String>> {
    v.iter().map(|s| Some(s.to_string())).collect()
}

/// Waits until `sql` (one value) gives `want`.
async fn wait_for_value(client: &Client, what: &str, sql: &str, want: &str) {
    poll_until(what, || async {
        (simple_value(client, sql).await == want).then_some(())
    })
    .await;
}

/// Waits until the source's log holds `n` rows (the ingest appended them).
async fn wait_for_rows(client: &Client, source: &str, n: usize) {
    let sql = format!("SELECT count(*) FROM {source}");
    wait_for_value(
        client,
        &format!("{n} rows in {source}"),
        &sql,
        &n.to_string(),
    )
    .await;
}

/// `(count(*), count(DISTINCT id))` of a source.
async fn counts(client: &Client, source: &str) -> (i64, i64) {
    let rows = simple_rows(
        client,
        &format!("SELECT count(*), count(DISTINCT id) FROM {source}"),
    )
    .await;
    let get = |i: usize| -> i64 {
        rows[0][i]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .expect("a count")
    };
    (get(0), get(1))
}

fn create_source(name: &str, columns: &str, with: &str) -> String {
    format!(
        "CREATE SOURCE {name} ({columns}) WITH (connector = 'rabbitmq', url = '{AMQP_URL}', {with}) FORMAT JSON"
    )
}

/// Runs [`create_source`]'s statement, which must succeed.
async fn run_create_source(client: &Client, name: &str, columns: &str, with: &str) {
    client
        .batch_execute(&create_source(name, columns, with))
        .await
        .unwrap_or_else(|e| panic!("create the source {name}: {e}"));
}

/// The real binary over `data`, and a client of it.
async fn start_binary(data: &Path, log: &Path) -> (BinaryServer, Client) {
    let server = BinaryServer::start(data, log).await;
    let client = server.connect().await;
    (server, client)
}

/// Publishes `body(id)` for every id in `ids` to `queue` from a task with its own connection,
/// so that publishing goes on while the test kills the server.
fn spawn_publisher(
    queue: &str,
    ids: Range<i64>,
    body: fn(i64) -> String,
) -> tokio::task::JoinHandle<()> {
    let queue = queue.to_string();
    tokio::spawn(async move {
        let broker = require_rabbitmq("publisher").await.expect("broker");
        for id in ids {
            broker.publish(&queue, &body(id)).await;
        }
        broker.cleanup().await;
    })
}

/// A message told apart from the others only by its id.
fn same_note(id: i64) -> String {
    format!(r#"{{"id": {id}, "note": "same"}}"#)
}

/// Prints a source's counters after a `kill -9` and a restart, for the test's output.
async fn report_after_restart(client: &Client, source: &str) {
    let counters = simple_rows(
        client,
        &format!(
            "SELECT received, appended, duplicates FROM weir_sources WHERE source = '{source}'"
        ),
    )
    .await;
    eprintln!("{source} after kill -9: received, appended, duplicates = {counters:?}");
}

/// Stops the binary, which must exit cleanly with neither a panic nor an `ERROR` in its log.
async fn stop_cleanly(server: BinaryServer, log: &Path) {
    let status = server.stop().await;
    assert!(status.success(), "weir should exit cleanly, got {status}");
    assert_no_panics(log);
    assert_no_error_lines(log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_source_feeds_a_window_view_and_dead_letters_bad_messages() {
    let Some(mut broker) = require_rabbitmq("queue_source_feeds_a_window_view").await else {
        return;
    };
    let queue = broker.queue_name("clicks");
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(&format!(
            "{};
             CREATE MATERIALIZED VIEW per_window AS SELECT window_start, count(*) AS n, max(id) AS top \
               FROM TUMBLE(clicks, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end \
               EMIT ON WINDOW CLOSE;",
            create_source(
                "clicks",
                "id BIGINT, page TEXT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND",
                &format!("queue = '{queue}', declare = 'true', prefetch = 50"),
            )
        ))
        .await
        .expect("create the source and the view");
    // 30 events in the first window, 20 in the second, two undecodable messages among them, and
    // one event at 10:00:25 that moves the watermark past both windows.
    for i in 0..50 {
        let second = if i < 30 { i / 3 } else { 10 + (i - 30) / 2 };
        broker
            .publish(
                &queue,
                &format!(
                    r#"{{"id": {i}, "page": "/p{}", "ts": "2026-01-01 10:00:{second:02}"}}"#,
                    i % 4
                ),
            )
            .await;
        if i == 10 {
            broker.publish(&queue, "not json at all").await;
        }
        if i == 40 {
            broker.publish(&queue, r#"{"id": "forty", "ts": 7}"#).await;
        }
    }
    broker
        .publish(
            &queue,
            r#"{"id": 99, "page": "/", "ts": "2026-01-01 10:00:25"}"#,
        )
        .await;
    wait_for_value(
        &client,
        "all 53 messages appended",
        "SELECT appended FROM weir_sources WHERE source = 'clicks'",
        "53",
    )
    .await;
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(
        simple_rows(&client, "SELECT * FROM per_window ORDER BY window_start").await,
        vec![
            text(&["2026-01-01 10:00:00", "30", "29"]),
            text(&["2026-01-01 10:00:10", "20", "49"]),
        ]
    );
    assert_eq!(
        simple_value(&client, "SELECT count(*) FROM clicks").await,
        "51"
    );
    let dead = simple_rows(
        &client,
        "SELECT \"offset\", payload FROM weir_dead_letters WHERE source = 'clicks' ORDER BY 1",
    )
    .await;
    assert_eq!(
        dead,
        vec![
            text(&["11", "not json at all"]),
            text(&["42", r#"{"id": "forty", "ts": 7}"#]),
        ]
    );
    // Everything is acknowledged once a checkpoint covers it: the queue is empty and the
    // counters add up.
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    wait_for_value(
        &client,
        "all 53 messages acknowledged",
        "SELECT acked FROM weir_sources WHERE source = 'clicks'",
        "53",
    )
    .await;
    let status = simple_rows(
        &client,
        "SELECT status, received, appended, acked, duplicates, reconnects, topic, delivery \
         FROM weir_sources WHERE source = 'clicks'",
    )
    .await;
    let origin = format!("rabbitmq amqp://guest@127.0.0.1:5672/%2f queue \"{queue}\"");
    assert_eq!(
        status,
        vec![text(&[
            "running",
            "53",
            "53",
            "53",
            "0",
            "0",
            &origin,
            "exactly once: acknowledged after the checkpoints that cover it; redeliveries deduplicated",
        ])]
    );
    broker.wait_until_drained(&queue).await;
    // SHOW SOURCES shows the ingest state too; a broker source refuses writes.
    let show = simple_rows(&client, "SHOW SOURCES").await;
    assert_eq!(
        show[0].last().cloned().flatten().as_deref(),
        Some("running")
    );
    assert_eq!(
        expect_sqlstate(
            &client,
            "INSERT INTO clicks VALUES (1, '/', '2026-01-01 10:00:00')"
        )
        .await,
        "0A000"
    );
    client
        .batch_execute("DROP SOURCE clicks CASCADE")
        .await
        .expect("drop the source");
    server.shutdown().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_binding_routes_only_the_routing_key() {
    let Some(mut broker) = require_rabbitmq("exchange_binding_routes_only_the_routing_key").await
    else {
        return;
    };
    let exchange = broker.declare_exchange("orders_x").await;
    let queue = broker.queue_name("eu_orders");
    let server = TestServer::start().await;
    let client = server.connect().await;
    run_create_source(
        &client,
        "eu_orders",
        "id BIGINT, region TEXT",
        &format!(
            "queue = '{queue}', declare = 'true', exchange = '{exchange}', routing_key = 'orders.eu'"
        ),
    )
    .await;
    for (id, key) in [
        (1, "orders.eu"),
        (2, "orders.us"),
        (3, "orders.eu"),
        (4, "orders.us"),
    ] {
        let region = key.trim_start_matches("orders.");
        let body = format!(r#"{{"id": {id}, "region": "{region}"}}"#);
        broker.publish_to(&exchange, key, body.as_bytes()).await;
    }
    // A last eu order: once it is in, the earlier ones were routed (or not) before it.
    broker
        .publish_to(&exchange, "orders.eu", br#"{"id": 5, "region": "eu"}"#)
        .await;
    wait_for_rows(&client, "eu_orders", 3).await;
    assert_eq!(
        simple_rows(&client, "SELECT id, region FROM eu_orders ORDER BY id").await,
        vec![text(&["1", "eu"]), text(&["3", "eu"]), text(&["5", "eu"])]
    );
    // A message over the source log's 1 MiB limit is rejected (RabbitMQ would dead-letter it
    // with a dead-letter exchange) and counted; the source goes on.
    let huge = format!(r#"{{"id": 6, "region": "{}"}}"#, "e".repeat(1_200_000));
    broker
        .publish_to(&exchange, "orders.eu", huge.as_bytes())
        .await;
    broker
        .publish_to(&exchange, "orders.eu", br#"{"id": 7, "region": "eu"}"#)
        .await;
    wait_for_rows(&client, "eu_orders", 4).await;
    let rows = simple_rows(
        &client,
        "SELECT rejected, received, appended, last_error FROM weir_sources \
         WHERE source = 'eu_orders'",
    )
    .await;
    assert_eq!(rows[0][..3], text(&["1", "5", "4"])[..], "{rows:?}");
    assert!(
        rows[0][3].as_deref().unwrap_or("").contains("larger than"),
        "{rows:?}"
    );
    assert_eq!(
        simple_value(&client, "SELECT max(id) FROM eu_orders").await,
        "7"
    );
    let origin = simple_value(
        &client,
        "SELECT topic FROM weir_sources WHERE source = 'eu_orders'",
    )
    .await;
    assert!(
        origin.ends_with(&format!(
            "bound to exchange \"{exchange}\" with key \"orders.eu\""
        )),
        "{origin}"
    );
    server.shutdown().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_source_resumes_after_kill_9_without_loss_or_duplicates() {
    let Some(mut broker) = require_rabbitmq("stream_source_resumes_after_kill_9").await else {
        return;
    };
    let stream = broker.declare_queue("events_stream", true).await;
    for id in 0..300 {
        broker.publish(&stream, &format!(r#"{{"id": {id}}}"#)).await;
    }
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let (server, client) = start_binary(&data, &log).await;
    run_create_source(
        &client,
        "events",
        "id BIGINT",
        &format!("queue = '{stream}', mode = 'stream', start = 'first', prefetch = 64"),
    )
    .await;
    wait_for_rows(&client, "events", 300).await;
    assert_eq!(
        simple_value(
            &client,
            "SELECT delivery FROM weir_sources WHERE source = 'events'"
        )
        .await,
        "exactly once: stream offset stored with each message"
    );
    // More messages arrive while the server reads; kill it in the middle of them.
    let publisher = spawn_publisher(&stream, 300..1500, |id| format!(r#"{{"id": {id}}}"#));
    poll_until("the server to read past 400", || async {
        let (n, _) = counts(&client, "events").await;
        (n > 400).then_some(())
    })
    .await;
    drop(client);
    server.kill9().await;
    within("the publisher to finish", publisher)
        .await
        .expect("publisher task");
    let (server, client) = start_binary(&data, &log).await;
    // A stream is read in order: once the last message is in, all before it are.
    broker.publish(&stream, r#"{"id": 1500}"#).await;
    poll_until("the last message after the restart", || async {
        let last = simple_value(&client, "SELECT coalesce(max(id), -1) FROM events").await;
        (last == "1500").then_some(())
    })
    .await;
    assert_eq!(counts(&client, "events").await, (1501, 1501));
    report_after_restart(&client, "events").await;
    assert_eq!(
        simple_value(
            &client,
            "SELECT count(*) FROM events WHERE id BETWEEN 0 AND 1500"
        )
        .await,
        "1501"
    );
    drop(client);
    stop_cleanly(server, &log).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_source_killed_while_publishing_keeps_every_message_exactly_once() {
    let Some(mut broker) = require_rabbitmq("queue_source_killed_while_publishing").await else {
        return;
    };
    let queue = broker.declare_queue("orders_q", false).await;
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let (server, client) = start_binary(&data, &log).await;
    run_create_source(
        &client,
        "orders",
        "id BIGINT, note TEXT",
        &format!("queue = '{queue}', prefetch = 100"),
    )
    .await;
    const TOTAL: i64 = 3000;
    // Equal notes: only the id tells messages apart.
    let publisher = spawn_publisher(&queue, 0..TOTAL, same_note);
    poll_until("the server to have read 500 messages", || async {
        let (n, _) = counts(&client, "orders").await;
        (n >= 500).then_some(())
    })
    .await;
    drop(client);
    server.kill9().await;
    let (server, client) = start_binary(&data, &log).await;
    within("the publisher to finish", publisher)
        .await
        .expect("publisher task");
    poll_until("every message after the restart", || async {
        let (_, distinct) = counts(&client, "orders").await;
        (distinct == TOTAL).then_some(())
    })
    .await;
    broker.wait_until_drained(&queue).await;
    // A last message after all others: anything redelivered came before it.
    broker
        .publish(&queue, &format!(r#"{{"id": {TOTAL}, "note": "last"}}"#))
        .await;
    wait_for_value(
        &client,
        "the last message",
        "SELECT count(*) FROM orders WHERE note = 'last'",
        "1",
    )
    .await;
    assert_eq!(counts(&client, "orders").await, (TOTAL + 1, TOTAL + 1));
    report_after_restart(&client, "orders").await;
    drop(client);
    stop_cleanly(server, &log).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_source_reports_broker_problems_with_sqlstates() {
    let Some(mut broker) = require_rabbitmq("create_source_reports_broker_problems").await else {
        return;
    };
    let classic = broker.declare_queue("classic", false).await;
    let stream = broker.declare_queue("stream", true).await;
    let missing = unique("missing"); // never created
    let server = TestServer::start().await;
    let client = server.connect().await;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing queue",
            create_source("s", "id BIGINT", &format!("queue = '{missing}'")),
            "42704",
        ),
        (
            "wrong password",
            format!(
                "CREATE SOURCE s (id BIGINT) WITH (connector = 'rabbitmq', \
                 url = 'amqp://guest:wrong@127.0.0.1:5672/%2f', queue = '{classic}') FORMAT JSON"
            ),
            "28P01",
        ),
        (
            "unreachable port",
            format!(
                "CREATE SOURCE s (id BIGINT) WITH (connector = 'rabbitmq', \
                 url = 'amqp://guest:guest@127.0.0.1:1/%2f', queue = '{classic}') FORMAT JSON"
            ),
            "08001",
        ),
        (
            "unknown option",
            create_source(
                "s",
                "id BIGINT",
                &format!("queue = '{classic}', topic = 't'"),
            ),
            "22023",
        ),
        (
            "start on a queue",
            create_source(
                "s",
                "id BIGINT",
                &format!("queue = '{classic}', start = 'first'"),
            ),
            "22023",
        ),
        (
            "bad prefetch",
            create_source(
                "s",
                "id BIGINT",
                &format!("queue = '{classic}', prefetch = 0"),
            ),
            "22023",
        ),
        (
            "no queue",
            create_source("s", "id BIGINT", "declare = 'true'"),
            "22023",
        ),
        (
            "missing exchange",
            create_source(
                "s",
                "id BIGINT",
                &format!("queue = '{classic}', exchange = '{}'", unique("nox")),
            ),
            "42704",
        ),
        (
            "declaring a queue that is a stream",
            create_source(
                "s",
                "id BIGINT",
                &format!("queue = '{stream}', declare = 'true'"),
            ),
            "42809",
        ),
        (
            "stream mode on a classic queue",
            create_source(
                "s",
                "id BIGINT",
                &format!("queue = '{classic}', mode = 'stream'"),
            ),
            "42809",
        ),
        (
            "amqps",
            format!(
                "CREATE SOURCE s (id BIGINT) WITH (connector = 'rabbitmq', \
                 url = 'amqps://guest:guest@127.0.0.1:5671/%2f', queue = '{classic}') FORMAT JSON"
            ),
            "0A000",
        ),
    ];
    for (what, sql, want) in &cases {
        let err = client
            .batch_execute(sql)
            .await
            .expect_err(&format!("{what}: CREATE SOURCE should fail"));
        let db = err
            .as_db_error()
            .unwrap_or_else(|| panic!("{what}: not a server error: {err}"));
        assert_eq!(db.code().code(), *want, "{what}: {}", db.message());
        assert!(db.hint().is_some(), "{what}: no hint for {}", db.message());
        assert!(
            !db.message().contains("guest:") && !db.detail().unwrap_or("").contains("guest:"),
            "{what}: the error shows the password: {}",
            db.message()
        );
    }
    let missing_err = client
        .batch_execute(&cases[0].1)
        .await
        .expect_err("missing queue");
    let db = missing_err.as_db_error().expect("a server error");
    assert_eq!(db.hint(), Some("create the queue or set declare = 'true'"));
    let unreachable = client
        .batch_execute(&cases[2].1)
        .await
        .expect_err("unreachable");
    let message = unreachable.as_db_error().expect("a server error").message();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    // Nothing was created by the failures: the name is free and the source works.
    run_create_source(&client, "s", "id BIGINT", &format!("queue = '{classic}'")).await;
    broker.publish(&classic, r#"{"id": 1}"#).await;
    wait_for_rows(&client, "s", 1).await;
    // A stream read in queue mode cannot be told at CREATE time without touching the queue;
    // the first delivery tells, nothing is stored, and the status says what to do.
    run_create_source(
        &client,
        "wrong_mode",
        "id BIGINT",
        &format!("queue = '{stream}'"),
    )
    .await;
    // Consuming from a stream without an offset starts at the next message: publish once the
    // consumer is there.
    wait_for_value(
        &client,
        "the ingest to consume",
        "SELECT status FROM weir_sources WHERE source = 'wrong_mode'",
        "running",
    )
    .await;
    broker.publish(&stream, r#"{"id": 2}"#).await;
    let status = poll_until("the ingest to notice the stream", || async {
        let status = simple_value(
            &client,
            "SELECT status FROM weir_sources WHERE source = 'wrong_mode'",
        )
        .await;
        status.contains("is a stream queue").then_some(status)
    })
    .await;
    assert!(status.contains("mode = 'stream'"), "{status}");
    assert_eq!(
        simple_value(&client, "SELECT count(*) FROM wrong_mode").await,
        "0"
    );
    server.shutdown().await;
    broker.cleanup().await;
}

/// The RabbitMQ connection whose client-given name is `name`, by `rabbitmqctl`, if that tool
/// is here and works (it needs the broker's Erlang cookie, so usually root on the broker's
/// machine).
async fn rabbitmqctl_connection(name: &str) -> Option<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new("rabbitmqctl")
            .args([
                "list_connections",
                "pid",
                "client_properties",
                "--quiet",
                "--no-table-headers",
            ])
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !output.status.success() {
        return None;
    }
    let listing = String::from_utf8_lossy(&output.stdout).into_owned();
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    listing
        .lines()
        .find(|line| line.contains(&needle))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_reconnects_after_the_broker_drops_it() {
    let Some(mut broker) = require_rabbitmq("ingest_reconnects_after_the_broker_drops_it").await
    else {
        return;
    };
    let queue = broker.declare_queue("flaky", false).await;
    let server = TestServer::start().await;
    let client = server.connect().await;
    run_create_source(&client, "flaky", "id BIGINT", &format!("queue = '{queue}'")).await;
    for id in 0..5 {
        broker.publish(&queue, &format!(r#"{{"id": {id}}}"#)).await;
    }
    wait_for_rows(&client, "flaky", 5).await;

    // Deleting the queue cancels the consumer; without declare the queue stays missing, so the
    // ingest keeps retrying and says why.
    broker.delete_queue(&queue).await;
    let status = poll_until("the ingest to report the missing queue", || async {
        let status = simple_value(
            &client,
            "SELECT status FROM weir_sources WHERE source = 'flaky'",
        )
        .await;
        (status.starts_with("reconnecting (attempt ") && status.contains("does not exist"))
            .then_some(status)
    })
    .await;
    assert!(status.contains(&queue), "{status}");
    let reconnects: i64 = simple_value(
        &client,
        "SELECT reconnects FROM weir_sources WHERE source = 'flaky'",
    )
    .await
    .parse()
    .expect("a count");
    assert!(reconnects >= 1);
    // The queue comes back: the ingest recovers by itself.
    broker.declare_queue_named(&queue).await;
    wait_for_value(
        &client,
        "the ingest to run again",
        "SELECT status FROM weir_sources WHERE source = 'flaky'",
        "running",
    )
    .await;
    for id in 5..10 {
        broker.publish(&queue, &format!(r#"{{"id": {id}}}"#)).await;
    }
    wait_for_rows(&client, "flaky", 10).await;

    // RabbitMQ closes the connection itself (as on a broker restart), if rabbitmqctl works here.
    let connection_name = format!("weir source flaky (queue {queue})");
    match rabbitmqctl_connection(&connection_name).await {
        None => eprintln!(
            "ingest_reconnects_after_the_broker_drops_it: rabbitmqctl is not usable here; \
             skipping the forced connection close"
        ),
        Some(pid) => {
            let closed = tokio::process::Command::new("rabbitmqctl")
                .args(["close_connection", &pid, "weir test: forced close"])
                .output();
            let closed = within("rabbitmqctl close_connection", closed)
                .await
                .expect("run rabbitmqctl");
            assert!(
                closed.status.success(),
                "rabbitmqctl close_connection failed"
            );
            poll_until("the ingest to reconnect", || async {
                let rows = simple_rows(
                    &client,
                    "SELECT status, reconnects, last_error FROM weir_sources WHERE source = 'flaky'",
                )
                .await;
                let row = &rows[0];
                let reconnects: i64 = row[1].as_deref().unwrap_or("0").parse().unwrap_or(0);
                let forced = row[2].as_deref().unwrap_or("").contains("forced close");
                (row[0].as_deref() == Some("running") && reconnects > 1 && forced).then_some(())
            })
            .await;
            for id in 10..15 {
                broker.publish(&queue, &format!(r#"{{"id": {id}}}"#)).await;
            }
            wait_for_rows(&client, "flaky", 15).await;
        }
    }
    let (n, distinct) = counts(&client, "flaky").await;
    assert_eq!(n, distinct, "no message twice");
    server.shutdown().await;
    broker.cleanup().await;
}

/// The ingest's write-ahead log over a real topic, with the crash window made to happen: the
/// `freeze_on`-th append is stored (fsync'd) but reported failed, as if the process died
/// right after the fsync and before the ack; later appends then fail without storing until
/// `unfreeze`; and the first acknowledged-through marker write is lost.
struct CrashWindowLog {
    topic: Topic,
    marker: std::sync::Mutex<Option<u64>>,
    appends: AtomicUsize,
    marker_writes: AtomicUsize,
    freeze_on: usize,
    frozen: AtomicBool,
    /// Messages of the append reported failed.
    failed_batch: AtomicUsize,
}

impl CrashWindowLog {
    fn open(dir: &std::path::Path, freeze_on: usize) -> CrashWindowLog {
        CrashWindowLog {
            topic: Topic::open(dir, TopicConfig::default()).expect("open a topic"),
            marker: std::sync::Mutex::new(None),
            appends: AtomicUsize::new(0),
            marker_writes: AtomicUsize::new(0),
            freeze_on,
            frozen: AtomicBool::new(false),
            failed_batch: AtomicUsize::new(0),
        }
    }

    /// The `id` field of every stored message, in log order.
    fn ids(&self) -> Vec<i64> {
        self.topic
            .read(0, 0, 100_000)
            .expect("read the topic")
            .iter()
            .map(|r| {
                let v: serde_json::Value =
                    serde_json::from_slice(&r.payload).expect("a JSON payload");
                v["id"].as_i64().expect("an id")
            })
            .collect()
    }
}

impl IngestLog for CrashWindowLog {
    fn append(&self, messages: Vec<IngestMessage>) -> WeirResult<u64> {
        if self.frozen.load(Ordering::SeqCst) {
            return Err(WeirError::io("test log", "frozen after the crash window"));
        }
        let n = messages.len();
        let published = self
            .topic
            .publish(
                &messages
                    .into_iter()
                    .map(|m| Message {
                        key: None,
                        payload: m.payload,
                        headers: m.headers,
                    })
                    .collect::<Vec<_>>(),
            )
            .expect("publish to the test topic");
        if self.appends.fetch_add(1, Ordering::SeqCst) + 1 == self.freeze_on {
            self.failed_batch.store(n, Ordering::SeqCst);
            self.frozen.store(true, Ordering::SeqCst);
            return Err(WeirError::io("test log", "crash right after the fsync"));
        }
        Ok(published.last().expect("a message").offset)
    }

    fn fits(&self, _message: &IngestMessage) -> bool {
        true
    }

    fn end_offset(&self) -> u64 {
        self.topic.end_offset(0)
    }

    // The same mapping as the engine's topic-backed log (private to `weir::engine`); this one
    // exists to inject the crash window, so it cannot wrap that one.
    fn read(&self, from: u64, max: usize) -> WeirResult<Vec<(u64, IngestMessage)>> {
        Ok(self
            .topic
            .read(0, from, max)
            .expect("read the test topic")
            .into_iter()
            .map(|r| {
                let message = IngestMessage {
                    payload: r.payload,
                    headers: r.headers,
                };
                (r.offset, message)
            })
            .collect())
    }

    fn acked_through(&self) -> WeirResult<Option<u64>> {
        Ok(*self.marker.lock().expect("marker lock"))
    }

    fn set_acked_through(&self, offset: u64) -> WeirResult<()> {
        if self.marker_writes.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(WeirError::io("test log", "marker write lost"));
        }
        *self.marker.lock().expect("marker lock") = Some(offset);
        Ok(())
    }
}

/// The queue-mode crash window, made to happen rather than hoped for: a batch is durably
/// appended but never acknowledged (and an earlier marker write was lost), the ingest is
/// stopped and a fresh one started over the same log. RabbitMQ redelivers the batch; the new
/// ingest skips exactly those messages, and every message is in the log once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_of_a_batch_appended_but_not_acknowledged_are_skipped() {
    let Some(mut broker) = require_rabbitmq("redeliveries_of_a_batch_appended").await else {
        return;
    };
    let queue = broker.declare_queue("window", false).await;
    const TOTAL: i64 = 300;
    for id in 0..TOTAL {
        broker.publish(&queue, &same_note(id)).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let log = Arc::new(CrashWindowLog::open(dir.path(), 2));
    let options: Vec<(String, String)> = [
        ("connector", "rabbitmq"),
        ("url", AMQP_URL),
        ("queue", queue.as_str()),
        ("prefetch", "50"),
        // No dataflow reads this log: acknowledge after the append (with the default
        // 'checkpoint' nothing would be acknowledged without readers).
        ("ack", "append"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = RabbitMqConfig::from_options(&options).expect("valid options");

    let first = tokio::spawn(rabbitmq::run(
        config.clone(),
        "window_1".to_string(),
        log.clone(),
        Arc::new(IngestStatus::new()),
        AckGate::new(),
    ));
    poll_until("the crash window", || async {
        log.frozen.load(Ordering::SeqCst).then_some(())
    })
    .await;
    first.abort();
    let _ = first.await; // cancelled
    let failed_batch = log.failed_batch.load(Ordering::SeqCst);
    assert!(failed_batch > 0);
    let before_restart = log.ids().len();
    log.frozen.store(false, Ordering::SeqCst);

    let status = Arc::new(IngestStatus::new());
    let second = tokio::spawn(rabbitmq::run(
        config,
        "window_2".to_string(),
        log.clone(),
        status.clone(),
        AckGate::new(),
    ));
    broker.wait_until_drained(&queue).await;
    // A last message after all others: the redeliveries came before it.
    broker
        .publish(&queue, &format!(r#"{{"id": {TOTAL}, "note": "last"}}"#))
        .await;
    poll_until("the last message in the log", || async {
        log.ids().contains(&TOTAL).then_some(())
    })
    .await;
    second.abort();
    let mut ids = log.ids();
    assert_eq!(ids.len() as i64, TOTAL + 1, "no message twice or lost");
    ids.sort_unstable();
    assert_eq!(ids, (0..=TOTAL).collect::<Vec<_>>());
    let snapshot = status.snapshot();
    assert_eq!(
        snapshot.duplicates as usize, failed_batch,
        "exactly the appended, unacknowledged batch was skipped ({before_restart} messages \
         were in the log before the restart): {snapshot:?}"
    );
    broker.cleanup().await;
}

/// `ack = 'checkpoint'` (the default): RabbitMQ keeps every message until the checkpoints of the
/// source's readers cover it — nothing is acknowledged before, a crash before the next
/// checkpoint has RabbitMQ redeliver exactly what followed it, and a small `prefetch` does not
/// stall the source (it asks its readers for checkpoints early). `ack = 'append'` acknowledges
/// after the durable append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_acks_wait_for_the_checkpoint_that_covers_them() {
    let Some(mut broker) = require_rabbitmq("queue_acks_wait_for_the_checkpoint").await else {
        return;
    };
    let queue = broker.declare_queue("acks", false).await;
    let small = broker.declare_queue("acks_small", false).await;
    let eager = broker.declare_queue("acks_append", false).await;
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    // Checkpoints only when asked for (CHECKPOINT, or a source wanting one).
    let args = ["--checkpoint-interval", "1h"];
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let client = server.connect().await;
    let acked = |source: &str| format!("SELECT acked FROM weir_sources WHERE source = '{source}'");
    let appended =
        |source: &str| format!("SELECT appended FROM weir_sources WHERE source = '{source}'");
    run_create_source(
        &client,
        "orders",
        "id BIGINT, note TEXT",
        &format!("queue = '{queue}'"),
    )
    .await;
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW per_note AS SELECT note, count(*) AS n, \
             count(DISTINCT id) AS ids FROM orders GROUP BY note",
        )
        .await
        .expect("create the view");
    for id in 0..100 {
        broker.publish(&queue, &same_note(id)).await;
    }
    wait_for_value(&client, "100 appended", &appended("orders"), "100").await;
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(
        simple_rows(&client, "SELECT n, ids FROM per_note").await,
        vec![text(&["100", "100"])]
    );
    // Durable in Weir's log, counted by the view, but no checkpoint covers it yet.
    assert_eq!(simple_value(&client, &acked("orders")).await, "0");
    assert_eq!(
        broker.ready(&queue).await,
        0,
        "all delivered, none acknowledged"
    );
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    wait_for_value(&client, "100 acknowledged", &acked("orders"), "100").await;

    // 40 more, then a crash before any checkpoint covers them: RabbitMQ still holds exactly
    // those 40 and redelivers them; they are in the log already, so they are skipped, and the
    // view (restored at the checkpoint, replaying the log) counts each message once.
    for id in 100..140 {
        broker.publish(&queue, &same_note(id)).await;
    }
    wait_for_value(&client, "140 appended", &appended("orders"), "140").await;
    assert_eq!(simple_value(&client, &acked("orders")).await, "100");
    drop(client);
    server.kill9().await;
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let client = server.connect().await;
    wait_for_value(
        &client,
        "the 40 redeliveries skipped",
        "SELECT duplicates FROM weir_sources WHERE source = 'orders'",
        "40",
    )
    .await;
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(
        simple_rows(&client, "SELECT n, ids FROM per_note").await,
        vec![text(&["140", "140"])]
    );
    assert_eq!(simple_value(&client, &appended("orders")).await, "0");
    client
        .batch_execute("CHECKPOINT")
        .await
        .expect("checkpoint");
    wait_for_value(
        &client,
        "the redeliveries acknowledged",
        &acked("orders"),
        "40",
    )
    .await;

    // prefetch = 20 with hour-long intervals: only the checkpoints the source asks for let
    // RabbitMQ deliver more than 20 messages.
    run_create_source(
        &client,
        "small",
        "id BIGINT, note TEXT",
        &format!("queue = '{small}', prefetch = 20"),
    )
    .await;
    client
        .batch_execute("CREATE MATERIALIZED VIEW small_count AS SELECT count(*) AS n FROM small")
        .await
        .expect("create the view");
    for id in 0..300 {
        broker.publish(&small, &same_note(id)).await;
    }
    wait_for_value(
        &client,
        "300 appended past prefetch 20",
        &appended("small"),
        "300",
    )
    .await;
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(
        simple_value(&client, "SELECT n FROM small_count").await,
        "300"
    );
    let epochs: i64 = simple_value(
        &client,
        "SELECT max(epoch) FROM weir_checkpoints WHERE dataflow = 'small_count'",
    )
    .await
    .parse()
    .expect("an epoch");
    assert!(epochs >= 5, "the source asked for checkpoints: {epochs}");

    // ack = 'append': acknowledged once durable, with no checkpoint.
    run_create_source(
        &client,
        "eager",
        "id BIGINT, note TEXT",
        &format!("queue = '{eager}', ack = 'append'"),
    )
    .await;
    for id in 0..10 {
        broker.publish(&eager, &same_note(id)).await;
    }
    wait_for_value(
        &client,
        "10 acknowledged after the append",
        &acked("eager"),
        "10",
    )
    .await;
    let delivery = simple_rows(
        &client,
        "SELECT source, delivery FROM weir_sources WHERE source IN ('eager', 'orders') ORDER BY 1",
    )
    .await;
    assert_eq!(
        delivery,
        vec![
            text(&[
                "eager",
                "exactly once: acknowledged after the durable append; redeliveries deduplicated"
            ]),
            text(&[
                "orders",
                "exactly once: acknowledged after the checkpoints that cover it; redeliveries deduplicated"
            ]),
        ]
    );
    assert_eq!(
        expect_sqlstate(
            &client,
            &create_source("bad_ack", "id BIGINT", "queue = 'x', ack = 'later'")
        )
        .await,
        "22023"
    );
    assert_eq!(
        expect_sqlstate(
            &client,
            &create_source(
                "bad_ack",
                "id BIGINT",
                "queue = 'x', mode = 'stream', ack = 'append'"
            )
        )
        .await,
        "22023"
    );
    drop(client);
    stop_cleanly(server, &log).await;
    broker.cleanup().await;
}
