//! The exactly-once bar, end to end with the real binary: events travel broker → source →
//! `EMIT ON WINDOW CLOSE` TUMBLE view → Parquet sink while the server is killed with SIGKILL
//! several times (once with a `CHECKPOINT` statement in flight), and the committed Parquet files
//! must end up holding every window exactly once, row for row what the events give.
//!
//! Three sources, 200,000 events each: (a) a RabbitMQ classic queue, (b) a built-in topic that a
//! producer fills over pgwire, retrying across the crashes, (c) a RabbitMQ stream queue. For (a)
//! and (c) the expected windows are computed from the events the producer generated (all on
//! time); for (b), where a publish whose reply was lost may or may not have landed, from the
//! batch query over what the topic holds at the end. Then the README's walk-through
//! (`sql/rabbitmq_to_parquet.sql`, `sql/rabbitmq_producer.py`, `sql/read_parquet.py`) is run as
//! a user would run it.
//!
//! Kills are triggered by conditions (messages ingested by this process, messages published, a
//! new commit), with a random delay only as fault-injection timing. Waits are deadline polls
//! ([`poll_until`]): ingest from a broker and file commits follow wall-clock time. Without
//! RabbitMQ (or the tests' Python, for the walk-through) the tests say why and pass, unless
//! `WEIR_REQUIRE_BROKERS=1`, when they fail.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tokio::sync::watch;
use tokio_postgres::Client;

use crate::harness::{
    BinaryServer, assert_no_error_lines, assert_no_panics, committed_parquet_files, poll_until,
    psql, simple_value, temp_dir_with_log, try_connect, within,
};
use crate::rabbitmq::{AMQP_URL, connect_or_skip, unique};
use crate::s3;

/// The server flags of every run here: checkpoints (and so commits) every 300 ms.
const SERVER_ARGS: &[&str] = &["--checkpoint-interval", "300ms"];
/// 2026-01-01 00:00:00 UTC in epoch milliseconds: event `n` happens at `BASE_MS + n`.
const BASE_MS: i64 = 1_767_225_600_000;
/// The last event's time: far past every other event, so every earlier window closes.
const CLOSING_MS: i64 = BASE_MS + 100_000_000;
const KEYS: u64 = 50;
/// RabbitMQ publishes in flight before the producer waits for the oldest confirm.
const CONFIRMS_IN_FLIGHT_MAX: usize = 1000;
/// Events per `INSERT` of the topic producer: 500 ms of event time, well inside the source's
/// 5 s watermark delay, so a batch published twice (a reply lost in a crash) is never late.
const TOPIC_BATCH_EVENTS: u64 = 500;

/// One output row: `(key, window_start in epoch ms, n, total)`.
type WindowRow = (i64, i64, i64, i64);

/// The event with id `n`, as JSON.
fn event_json(n: u64) -> String {
    format!(
        r#"{{"id": {n}, "key": {}, "value": {}, "ts": {}}}"#,
        n % KEYS,
        n % 97,
        BASE_MS + n as i64
    )
}

/// The event that closes every window before it (not part of any expected window).
fn closing_event_json(id: u64) -> String {
    format!(r#"{{"id": {id}, "key": 0, "value": 0, "ts": {CLOSING_MS}}}"#)
}

/// The view's rows for events `0..events`, sorted.
fn expected_windows(events: u64) -> Vec<WindowRow> {
    let mut windows: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
    for n in 0..events {
        let ts = BASE_MS + n as i64;
        let entry = windows
            .entry(((n % KEYS) as i64, ts - ts.rem_euclid(1000)))
            .or_default();
        entry.0 += 1;
        entry.1 += (n % 97) as i64;
    }
    windows
        .into_iter()
        .map(|((key, start), (n, total))| (key, start, n, total))
        .collect()
}

fn source_sql(with: &str, delay_s: u32) -> String {
    format!(
        "CREATE SOURCE src (id BIGINT, key BIGINT, value BIGINT, ts TIMESTAMP, \
         WATERMARK FOR ts AS ts - INTERVAL '{delay_s}' SECOND) WITH ({with}) FORMAT JSON"
    )
}

const VIEW_SQL: &str = "CREATE MATERIALIZED VIEW per_second AS \
     SELECT key, window_start, count(*) AS n, sum(value) AS total \
     FROM TUMBLE(src, ts, INTERVAL '1' SECOND) \
     GROUP BY key, window_start, window_end EMIT ON WINDOW CLOSE";

fn sink_sql(dir: &Path) -> String {
    format!(
        "CREATE SINK archive FROM per_second WITH (connector = 'parquet', \
         path = 'file://{}', rollover = '200ms')",
        dir.display()
    )
}

async fn run(client: &Client, sql: &str) {
    within(sql, client.batch_execute(sql))
        .await
        .unwrap_or_else(|err| panic!("`{sql}` failed: {err:?}"));
}

/// Deletes a test's queue when dropped, also when the test fails (a stream of 200,000
/// messages should not outlive its test).
struct QueueGuard(String);

impl Drop for QueueGuard {
    fn drop(&mut self) {
        let queue = self.0.clone();
        // Its own thread and runtime: drop may run inside (or outside) the test's runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime to delete the queue");
            runtime.block_on(async {
                let connect = Connection::connect(AMQP_URL, ConnectionProperties::default());
                let Ok(Ok(connection)) =
                    tokio::time::timeout(Duration::from_secs(5), connect).await
                else {
                    return;
                };
                if let Ok(channel) = connection.create_channel().await {
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "OK".into()).await;
            });
        })
        .join();
    }
}

/// Publishes `body` to `queue` (persistent, mandatory) without waiting for the confirm.
async fn publish(channel: &Channel, queue: &str, body: &[u8]) -> PublisherConfirm {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish to RabbitMQ")
}

/// Waits for a publish's confirm: an ack, and the message was routed to the queue.
async fn confirmed(confirm: PublisherConfirm) {
    match within("RabbitMQ's publisher confirm", confirm)
        .await
        .expect("RabbitMQ confirms the publish")
    {
        Confirmation::Ack(None) => {}
        other => panic!("RabbitMQ did not take a message: {other:?}"),
    }
}

/// Publishes events `0..events` to `queue` with up to [`CONFIRMS_IN_FLIGHT_MAX`] unconfirmed,
/// counting confirmed ones in `published`; returns when every one is confirmed.
async fn publish_events(
    channel: Channel,
    queue: String,
    events: u64,
    published: Arc<AtomicU64>,
) -> Channel {
    let mut in_flight = VecDeque::with_capacity(CONFIRMS_IN_FLIGHT_MAX);
    for n in 0..events {
        if in_flight.len() == CONFIRMS_IN_FLIGHT_MAX {
            confirmed(in_flight.pop_front().expect("a publish in flight")).await;
            published.fetch_add(1, Ordering::Relaxed);
        }
        in_flight.push_back(publish(&channel, &queue, event_json(n).as_bytes()).await);
    }
    for confirm in in_flight {
        confirmed(confirm).await;
        published.fetch_add(1, Ordering::Relaxed);
    }
    channel
}

/// The rows of one Parquet file of the sink, read with the `parquet` crate's Arrow reader.
fn parquet_windows(path: &Path) -> Vec<WindowRow> {
    let file = std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("open committed file {}: {e}", path.display()));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap_or_else(|e| panic!("{} is not a Parquet file: {e}", path.display()))
        .build()
        .expect("a Parquet reader");
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let int64 = |name: &str| {
            let column = batch
                .column_by_name(name)
                .unwrap_or_else(|| panic!("{} has no column {name}", path.display()));
            let column = if let DataType::Timestamp(_, _) = column.data_type() {
                cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))
                    .expect("timestamp to ms")
            } else {
                column.clone()
            };
            let column = cast(&column, &DataType::Int64).expect("a column as BIGINT");
            assert_eq!(column.null_count(), 0, "{name} has NULLs");
            column.as_primitive::<Int64Type>().values().to_vec()
        };
        let (key, start, n, total) = (
            int64("key"),
            int64("window_start"),
            int64("n"),
            int64("total"),
        );
        for i in 0..batch.num_rows() {
            rows.push((key[i], start[i], n[i], total[i]));
        }
    }
    rows
}

/// The committed output of a sink directory; files are immutable once committed, so each is
/// read once.
#[derive(Default)]
struct Committed {
    files: HashMap<PathBuf, Vec<WindowRow>>,
}

impl Committed {
    /// Every committed row, sorted; fails the test at once if a window appears twice.
    fn rows(&mut self, dir: &Path) -> Vec<WindowRow> {
        for file in committed_parquet_files(dir) {
            self.files
                .entry(dir.join(file))
                .or_insert_with_key(|file| parquet_windows(file));
        }
        let mut rows: Vec<WindowRow> = self.files.values().flatten().copied().collect();
        rows.sort();
        for pair in rows.windows(2) {
            assert!(
                (pair[0].0, pair[0].1) != (pair[1].0, pair[1].1),
                "window (key {}, start {}) committed twice: {:?} and {:?}",
                pair[0].0,
                pair[0].1,
                pair[0],
                pair[1]
            );
        }
        rows
    }
}

/// Waits until the committed files hold exactly `want` (sorted), failing at once on a
/// duplicate window or a row that is not in `want`.
async fn wait_for_committed(dir: &Path, want: &[WindowRow]) {
    let committed = std::sync::Mutex::new(Committed::default());
    poll_until("every window to be committed", || {
        let rows = committed.lock().expect("not poisoned").rows(dir);
        for row in &rows {
            assert!(
                want.binary_search(row).is_ok(),
                "committed row {row:?} is not an expected window (a wrong count or sum)"
            );
        }
        async move { (rows.as_slice() == want).then_some(()) }
    })
    .await;
}

/// Waits until the view has read the closing event: its source's watermark passed every
/// other event's window.
async fn wait_for_closing_event(client: &Client) {
    let closed = chrono::DateTime::from_timestamp_millis(CLOSING_MS - 60_000)
        .expect("a valid time")
        .naive_utc()
        .format("%Y-%m-%d %H:%M:%S")
        .to_string();
    let sql = format!(
        "SELECT count(*) FROM weir_source_stats WHERE source = 'src' AND watermark > TIMESTAMP '{closed}'"
    );
    poll_until("the view to read the closing event", || async {
        (simple_value(client, &sql).await == "1").then_some(())
    })
    .await;
}

/// How a kill is timed once its trigger holds.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// At once.
    Now,
    /// After a random 0–300 ms (fault-injection timing).
    Jittered,
    /// With a `CHECKPOINT` statement sent on a spawned task and not waited for (killed 0–20 ms
    /// after sending).
    DuringCheckpoint,
    /// Right after the sink committed a new file in this process.
    AfterCommit,
}

/// What must hold before a kill.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// The RabbitMQ ingest of this process appended this many messages.
    Appended(u64),
    /// The producer had this many messages accepted, counted from the test's start.
    Published(u64),
}

/// The binary, killed and restarted over the same data directory.
struct Crashing {
    data: PathBuf,
    log: PathBuf,
    server: Option<BinaryServer>,
    client: Client,
    /// Tells a producer publishing through pgwire where the current server listens.
    addr: watch::Sender<SocketAddr>,
}

impl Crashing {
    async fn start(data: PathBuf, log: PathBuf) -> Crashing {
        let server = BinaryServer::start_with(&data, &log, SERVER_ARGS).await;
        let client = server.connect().await;
        let (addr, _) = watch::channel(server.pg_addr());
        Crashing {
            data,
            log,
            server: Some(server),
            client,
            addr,
        }
    }

    /// Messages the RabbitMQ ingest appended in this process.
    async fn appended(&self) -> u64 {
        simple_value(
            &self.client,
            "SELECT coalesce(appended, 0) FROM weir_sources WHERE source = 'src'",
        )
        .await
        .parse()
        .expect("a count")
    }

    async fn wait_for(&self, trigger: Trigger, published: &AtomicU64) {
        match trigger {
            Trigger::Appended(n) => {
                poll_until(&format!("{n} messages appended"), || async {
                    (self.appended().await >= n).then_some(())
                })
                .await
            }
            Trigger::Published(n) => {
                poll_until(&format!("{n} messages published"), || async {
                    (published.load(Ordering::Relaxed) >= n).then_some(())
                })
                .await
            }
        }
    }

    /// Kills the server as `kill` says, starts it again and reconnects.
    async fn kill_and_restart(&mut self, kill: Kill, sink_dir: &Path) -> String {
        let server = self.server.take().expect("a running server");
        let mut note = String::new();
        match kill {
            Kill::Now => server.kill9().await,
            Kill::Jittered => {
                let ms = rand::random_range(0..=300);
                note = format!("{ms} ms after the trigger");
                tokio::time::sleep(Duration::from_millis(ms)).await; // fault-injection timing
                server.kill9().await;
            }
            Kill::DuringCheckpoint => {
                let client = server.connect().await;
                let checkpoint = tokio::spawn(async move {
                    let reply = client.batch_execute("CHECKPOINT").await;
                    drop(client);
                    reply
                });
                let ms = rand::random_range(0..=20);
                tokio::time::sleep(Duration::from_millis(ms)).await; // fault-injection timing
                server.kill9().await;
                let reply = within("the CHECKPOINT task", checkpoint)
                    .await
                    .expect("the CHECKPOINT task");
                note = match reply {
                    Ok(()) => format!("{ms} ms after CHECKPOINT; it had answered"),
                    Err(e) => format!("{ms} ms after CHECKPOINT; no answer ({e})"),
                };
            }
            Kill::AfterCommit => {
                let before = committed_parquet_files(sink_dir).len();
                poll_until("the sink to commit a new file", || async {
                    (committed_parquet_files(sink_dir).len() > before).then_some(())
                })
                .await;
                server.kill9().await;
            }
        }
        let server = BinaryServer::start_with(&self.data, &self.log, SERVER_ARGS).await;
        self.client = server.connect().await;
        self.addr.send_replace(server.pg_addr());
        self.server = Some(server);
        note
    }

    /// Runs `plan`, printing when each kill happened.
    async fn crash(
        &mut self,
        test: &str,
        plan: &[(Trigger, Kill)],
        published: &AtomicU64,
        sink: &Path,
    ) {
        for (i, (trigger, kill)) in plan.iter().enumerate() {
            self.wait_for(*trigger, published).await;
            let progress = match trigger {
                Trigger::Appended(_) => format!(
                    "{} appended in that process, {} published",
                    self.appended().await,
                    published.load(Ordering::Relaxed)
                ),
                Trigger::Published(_) => {
                    format!("{} published", published.load(Ordering::Relaxed))
                }
            };
            let started = Instant::now();
            let note = self.kill_and_restart(*kill, sink).await;
            eprintln!(
                "{test}: kill -9 #{} ({kill:?} at {trigger:?}; {note}) with {progress}; \
                 restarted in {:?}",
                i + 1,
                started.elapsed()
            );
        }
    }

    /// Stops the server gracefully and checks its log.
    async fn finish(mut self) {
        let server = self.server.take().expect("a running server");
        drop(self.client);
        let status = server.stop().await;
        assert!(status.success(), "weir should exit cleanly, got {status}");
        assert_no_panics(&self.log);
        assert_no_error_lines(&self.log);
    }
}

/// (a) and (c): a RabbitMQ queue (classic or stream) fed by a confirming producer while the
/// server is killed as `plan` says; the committed files must hold exactly the windows of
/// `events` events.
async fn rabbitmq_crash_run(test: &str, mode: &str, events: u64, plan: &[(Trigger, Kill)]) {
    let started = Instant::now();
    let Some((connection, channel)) = connect_or_skip(test).await else {
        return;
    };
    let queue = unique(mode);
    let _guard = QueueGuard(queue.clone());
    let (dir, log) = temp_dir_with_log();
    let sink_dir = dir.path().join("out");
    let mut weir = Crashing::start(dir.path().join("data"), log).await;
    let start = if mode == "stream" {
        ", start = 'first'"
    } else {
        ""
    };
    let with = format!(
        "connector = 'rabbitmq', url = '{AMQP_URL}', queue = '{queue}', declare = 'true', \
         mode = '{mode}', prefetch = '1000'{start}"
    );
    run(&weir.client, &source_sql(&with, 1)).await;
    run(&weir.client, VIEW_SQL).await;
    run(&weir.client, &sink_sql(&sink_dir)).await;

    // CREATE SOURCE declared the queue: the producer may start.
    let published = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(publish_events(
        channel,
        queue.clone(),
        events,
        published.clone(),
    ));
    weir.crash(test, plan, &published, &sink_dir).await;
    let channel = within("the producer to finish", producer)
        .await
        .expect("the producer task");
    let produced_at = started.elapsed();
    confirmed(publish(&channel, &queue, closing_event_json(events).as_bytes()).await).await;

    let want = expected_windows(events);
    wait_for_closing_event(&weir.client).await;
    let read_at = started.elapsed();
    wait_for_committed(&sink_dir, &want).await;
    let committed_at = started.elapsed();
    // The source's log holds every event once (the closing one too).
    let counts = simple_value(
        &weir.client,
        "SELECT count(*) || '/' || count(DISTINCT id) FROM src",
    )
    .await;
    assert_eq!(
        counts,
        format!("{0}/{0}", events + 1),
        "messages in the source's log"
    );
    eprintln!(
        "{test}: {events} events, {} windows; producer done at {produced_at:?}, \
         view read every event at {read_at:?}, every window committed at {committed_at:?}",
        want.len()
    );
    weir.finish().await;
    let _ = connection.close(200, "OK".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_queue_to_parquet_exactly_once_across_kill_9() {
    const EVENTS: u64 = 200_000;
    rabbitmq_crash_run(
        "rabbitmq_queue_to_parquet_exactly_once_across_kill_9",
        "queue",
        EVENTS,
        &[
            (Trigger::Appended(EVENTS / 10), Kill::Now),
            (Trigger::Appended(EVENTS / 8), Kill::DuringCheckpoint),
            (Trigger::Appended(EVENTS / 6), Kill::Jittered),
            (Trigger::Appended(EVENTS / 20), Kill::AfterCommit),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_stream_to_parquet_exactly_once_across_kill_9() {
    const EVENTS: u64 = 200_000;
    rabbitmq_crash_run(
        "rabbitmq_stream_to_parquet_exactly_once_across_kill_9",
        "stream",
        EVENTS,
        &[
            (Trigger::Appended(EVENTS / 8), Kill::DuringCheckpoint),
            (Trigger::Appended(EVENTS / 5), Kill::Now),
            (Trigger::Appended(EVENTS / 10), Kill::Jittered),
        ],
    )
    .await;
}

/// (b)'s producer: events `0..events` as `INSERT INTO ev (payload)` of
/// [`TOPIC_BATCH_EVENTS`] each, over pgwire to whichever server `addr` names, each batch
/// retried until one attempt is answered (an attempt whose answer a crash took may have
/// landed too). Counts answered events in `published`; returns the attempts that failed.
async fn publish_to_topic(
    mut addr: watch::Receiver<SocketAddr>,
    events: u64,
    published: Arc<AtomicU64>,
) -> u64 {
    // One prepared statement per connection: a batch is parsed once, not once per attempt.
    let placeholders: Vec<String> = (1..=TOPIC_BATCH_EVENTS)
        .map(|i| format!("(${i})"))
        .collect();
    let insert = format!(
        "INSERT INTO ev (payload) VALUES {}",
        placeholders.join(", ")
    );
    let mut client: Option<(Client, tokio_postgres::Statement)> = None;
    let mut failed = 0;
    assert_eq!(events % TOPIC_BATCH_EVENTS, 0, "whole batches");
    for first in (0..events).step_by(TOPIC_BATCH_EVENTS as usize) {
        let last = first + TOPIC_BATCH_EVENTS;
        let payloads: Vec<String> = (first..last).map(event_json).collect();
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = payloads
            .iter()
            .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let started = Instant::now();
        loop {
            if client.is_none() {
                let to = *addr.borrow_and_update();
                if let Ok(c) = try_connect(to).await
                    && let Ok(statement) = c.prepare(&insert).await
                {
                    client = Some((c, statement));
                }
            }
            if let Some((c, statement)) = &client {
                match c.execute(statement, &params).await {
                    Ok(n) => {
                        assert_eq!(n, TOPIC_BATCH_EVENTS, "messages published by one INSERT");
                        break;
                    }
                    Err(e) if e.as_db_error().is_some() => {
                        panic!("the server refused a publish: {e:?}")
                    }
                    // The connection died with the server.
                    Err(_) => client = None,
                }
            }
            failed += 1;
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "events {first}..{last}: no server took them for 60 s"
            );
            // Until the restarted server says where it listens, at most 1 s between attempts.
            let _ = tokio::time::timeout(Duration::from_secs(1), addr.changed()).await;
        }
        published.fetch_add(last - first, Ordering::Relaxed);
    }
    failed
}

/// What the source's topic holds at the end, through the batch query: the windows of
/// every event below `events` (the closing event left out), sorted.
async fn batch_windows(client: &Client, events: u64) -> Vec<WindowRow> {
    let sql = format!(
        "SELECT key, window_start, count(*) AS n, sum(value) AS total \
         FROM TUMBLE(src, ts, INTERVAL '1' SECOND) WHERE id < {events} \
         GROUP BY key, window_start, window_end"
    );
    let rows = within("the batch query", client.query(sql.as_str(), &[]))
        .await
        .unwrap_or_else(|e| panic!("`{sql}`: {e:?}"));
    let mut out: Vec<WindowRow> = rows
        .iter()
        .map(|row| {
            let start: chrono::NaiveDateTime = row.get(1);
            (
                row.get(0),
                start.and_utc().timestamp_millis(),
                row.get(2),
                row.get(3),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_to_parquet_exactly_once_across_kill_9() {
    const TEST: &str = "topic_to_parquet_exactly_once_across_kill_9";
    const EVENTS: u64 = 200_000;
    let started = Instant::now();
    let (dir, log) = temp_dir_with_log();
    let sink_dir = dir.path().join("out");
    let mut weir = Crashing::start(dir.path().join("data"), log).await;
    // One partition: the topic keeps the producer's order, so only a batch published twice
    // can go back in event time, by less than the watermark delay.
    run(&weir.client, "CREATE TOPIC ev WITH (partitions = 1)").await;
    run(
        &weir.client,
        &source_sql("connector = 'builtin', topic = 'ev'", 5),
    )
    .await;
    run(&weir.client, VIEW_SQL).await;
    run(&weir.client, &sink_sql(&sink_dir)).await;

    let published = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn(publish_to_topic(
        weir.addr.subscribe(),
        EVENTS,
        published.clone(),
    ));
    let plan = [
        (Trigger::Published(EVENTS / 10), Kill::Now),
        (Trigger::Published(EVENTS * 3 / 10), Kill::DuringCheckpoint),
        (Trigger::Published(EVENTS / 2), Kill::Jittered),
        (Trigger::Published(EVENTS * 7 / 10), Kill::AfterCommit),
    ];
    weir.crash(TEST, &plan, &published, &sink_dir).await;
    let failed = within("the producer to finish", producer)
        .await
        .expect("the producer task");
    let produced_at = started.elapsed();
    run(
        &weir.client,
        &format!(
            "INSERT INTO ev (payload) VALUES ('{}')",
            closing_event_json(EVENTS)
        ),
    )
    .await;

    // Every event landed at least once; a batch whose answer was lost may have landed twice.
    let counts = simple_value(
        &weir.client,
        &format!("SELECT count(*) || '/' || count(DISTINCT id) FROM src WHERE id < {EVENTS}"),
    )
    .await;
    let (total, distinct) = counts.split_once('/').expect("two counts");
    assert_eq!(distinct, EVENTS.to_string(), "every event is in the topic");
    let want = batch_windows(&weir.client, EVENTS).await;
    if total == distinct {
        assert_eq!(
            want,
            expected_windows(EVENTS),
            "the batch query over the topic"
        );
    }
    wait_for_closing_event(&weir.client).await;
    let read_at = started.elapsed();
    wait_for_committed(&sink_dir, &want).await;
    eprintln!(
        "{TEST}: {EVENTS} events ({total} in the topic after {failed} failed attempts), \
         {} windows; producer done at {produced_at:?}, view read every event at {read_at:?}, \
         every window committed at {:?}",
        want.len(),
        started.elapsed()
    );
    weir.finish().await;
}

/// What `sql/read_parquet.py` prints once `sql/rabbitmq_producer.py --count <readings>` went
/// through `sql/rabbitmq_to_parquet.sql`: reading `n` is sensor `n % 4`, value `n² % 97`, at
/// 10:00:00 + 25 ms × n; windows of 10 s.
fn walkthrough_rows(readings: u64) -> Vec<String> {
    let mut windows: BTreeMap<(u64, u64), (u64, u64, u64)> = BTreeMap::new();
    for n in 0..readings {
        let entry = windows.entry(((n * 25) / 10_000, n % 4)).or_default();
        entry.0 += 1;
        entry.1 += n * n % 97;
        entry.2 = entry.2.max(n * n % 97);
    }
    let mut lines = vec!["window_start|sensor|readings|total|top".to_string()];
    for ((window, sensor), (count, total, top)) in windows {
        let start = window * 10;
        lines.push(format!(
            "2026-01-01 10:{:02}:{:02}|sensor-{sensor}|{count}|{total}|{top}",
            start / 60,
            start % 60
        ));
    }
    lines
}

/// The README's "From RabbitMQ to Parquet" section: its commands (the ```sh block) and the
/// output it shows (the ```text block, without the `...` lines).
fn readme_walkthrough() -> (String, Vec<String>) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let section = readme
        .split("\n## From RabbitMQ to Parquet\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README.md has a \"From RabbitMQ to Parquet\" section");
    let block = |fence: &str| -> String {
        section
            .split(fence)
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap_or_else(|| panic!("the section has a {fence} block"))
            .to_string()
    };
    let shown = block("```text\n")
        .lines()
        .filter(|line| !line.contains("..."))
        .map(str::to_string)
        .collect();
    (block("```sh\n"), shown)
}

/// The README's walk-through as a user runs it: the binary, `psql -f
/// sql/rabbitmq_to_parquet.sql`, the pika producer, and the pyarrow reader until it prints
/// every window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_rabbitmq_to_parquet_walkthrough_runs() {
    const TEST: &str = "readme_rabbitmq_to_parquet_walkthrough_runs";
    const READINGS: u64 = 2400;
    let Some((connection, _channel)) = connect_or_skip(TEST).await else {
        return;
    };
    let Some(python) = s3::python() else {
        eprintln!("skipping {TEST}: no Python with pika and pyarrow");
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let queue = unique("readings");
    let _guard = QueueGuard(queue.clone());
    let (dir, log) = temp_dir_with_log();
    let out = dir.path().join("readings");
    let server = BinaryServer::start_with(&dir.path().join("data"), &log, SERVER_ARGS).await;

    let shown = psql(
        server.pg_addr(),
        &[
            "-v",
            &format!("out={}", out.display()),
            "-v",
            &format!("queue={queue}"),
            "-f",
            &format!("{root}/sql/rabbitmq_to_parquet.sql"),
        ],
    )
    .await
    .ok();
    assert!(
        shown.contains(&format!("parquet file://{}", out.display())),
        "SHOW SINKS lists the sink:\n{shown}"
    );

    let produced = within(
        "the producer script",
        tokio::process::Command::new(&python)
            .arg(format!("{root}/sql/rabbitmq_producer.py"))
            .args(["--queue", &queue, "--count", &READINGS.to_string()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run the producer script");
    assert!(
        produced.status.success(),
        "the producer failed: {}",
        String::from_utf8_lossy(&produced.stderr)
    );

    let want = walkthrough_rows(READINGS);
    assert_eq!(want.len(), 1 + 6 * 4, "six windows of four sensors");
    // The README shows these steps and (part of) this output.
    let (commands, shown) = readme_walkthrough();
    for step in [
        "-f sql/rabbitmq_to_parquet.sql",
        &format!("sql/rabbitmq_producer.py --count {READINGS}"),
        "sql/read_parquet.py",
    ] {
        assert!(
            commands.contains(step),
            "the README's commands lack `{step}`:\n{commands}"
        );
    }
    for line in &shown {
        assert!(
            want.contains(line),
            "the README shows `{line}`, which the reader never prints"
        );
    }
    // The reader runs again only when the set of committed files changed.
    let seen: std::sync::Mutex<(Vec<PathBuf>, Option<Vec<String>>)> = Default::default();
    poll_until("the reader to print every window", || async {
        let files = committed_parquet_files(&out);
        let stale = {
            let seen = seen.lock().expect("not poisoned");
            seen.1.is_none() || seen.0 != files
        };
        if stale {
            let read = within(
                "the reader script",
                tokio::process::Command::new(&python)
                    .arg(format!("{root}/sql/read_parquet.py"))
                    .arg(&out)
                    .kill_on_drop(true)
                    .output(),
            )
            .await
            .expect("run the reader script");
            assert!(
                read.status.success(),
                "the reader failed: {}",
                String::from_utf8_lossy(&read.stderr)
            );
            let lines = String::from_utf8_lossy(&read.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            *seen.lock().expect("not poisoned") = (files, Some(lines));
        }
        let seen = seen.lock().expect("not poisoned");
        (seen.1.as_deref() == Some(want.as_slice())).then_some(())
    })
    .await;
    drop(connection);
    let status = server.stop().await;
    assert!(status.success(), "weir should exit cleanly, got {status}");
    assert_no_panics(&log);
    assert_no_error_lines(&log);
}

/// The S3 objects a sink committed under `bucket` (not its staging area), with the `key`
/// partition value from each object's `key=<v>/` directory.
async fn s3_windows(store: &object_store::aws::AmazonS3) -> Vec<WindowRow> {
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let objects: Vec<_> = store
        .list(None)
        .try_collect()
        .await
        .expect("list the bucket");
    let mut rows = Vec::new();
    for object in objects {
        let path = object.location.to_string();
        if path.contains("/_weir_staging/") || !path.ends_with(".parquet") {
            continue;
        }
        let key: i64 = path
            .split('/')
            .find_map(|part| part.strip_prefix("key="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{path} is not under a key=<v>/ directory"));
        let bytes = store
            .get(&object.location)
            .await
            .expect("get a committed object")
            .bytes()
            .await
            .expect("read a committed object");
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap_or_else(|e| panic!("{path} is not Parquet: {e}"))
            .build()
            .expect("a Parquet reader");
        for batch in reader {
            let batch = batch.expect("a batch");
            assert!(
                batch.column_by_name("key").is_none(),
                "the partition column is in the path"
            );
            let int64 = |name: &str| {
                let column = batch.column_by_name(name).expect("a window column");
                let column = match column.data_type() {
                    DataType::Timestamp(_, _) => {
                        cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))
                            .expect("timestamp to ms")
                    }
                    _ => column.clone(),
                };
                cast(&column, &DataType::Int64)
                    .expect("as BIGINT")
                    .as_primitive::<Int64Type>()
                    .values()
                    .to_vec()
            };
            let (start, n, total) = (int64("window_start"), int64("n"), int64("total"));
            for i in 0..batch.num_rows() {
                rows.push((key, start[i], n[i], total[i]));
            }
        }
    }
    rows.sort();
    rows
}

/// The same pipeline into S3 (moto, started here) partitioned by key, and back out to a
/// RabbitMQ queue through a rabbitmq sink: both hold every window exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_to_s3_partitioned_and_back_to_rabbitmq() {
    const EVENTS: u64 = 20_000;
    let Some((connection, channel)) = connect_or_skip("rabbitmq_to_s3_partitioned").await else {
        return;
    };
    let Some(moto) = s3::MotoServer::start().await else {
        return;
    };
    let bucket = unique("bucket").replace('_', "-");
    moto.create_bucket(&bucket).await;
    let input = unique("s3_in");
    let output = unique("s3_out");
    channel
        .queue_declare(
            output.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare the output queue");

    let server = crate::harness::TestServer::start().await;
    let client = server.connect().await;
    run(&client, "SET checkpoint_interval = '300ms'").await;
    run(
        &client,
        &source_sql(
            &format!(
                "connector = 'rabbitmq', url = '{AMQP_URL}', queue = '{input}', declare = 'true'"
            ),
            5,
        ),
    )
    .await;
    run(&client, VIEW_SQL).await;
    run(
        &client,
        &format!(
            "CREATE SINK to_s3 FROM per_second WITH (connector = 'parquet', \
             path = 's3://{bucket}/windows', partition_by = 'key', rollover = '200ms', {})",
            moto.sink_options()
        ),
    )
    .await;
    run(
        &client,
        &format!(
            "CREATE SINK to_queue FROM per_second WITH (connector = 'rabbitmq', \
             url = '{AMQP_URL}', routing_key = '{output}') FORMAT JSON"
        ),
    )
    .await;
    let published = Arc::new(AtomicU64::new(0));
    let channel = publish_events(channel, input.clone(), EVENTS, published).await;
    confirmed(publish(&channel, &input, closing_event_json(EVENTS).as_bytes()).await).await;
    wait_for_closing_event(&client).await;

    let want = expected_windows(EVENTS);
    let store = moto.store(&bucket);
    let store = &store;
    let want_ref = &want;
    poll_until("every window in S3", || async move {
        let rows = s3_windows(store).await;
        (&rows == want_ref).then_some(())
    })
    .await;

    // The rabbitmq sink: one message per window, each message_id once.
    let mut got: Vec<WindowRow> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut deliveries = channel
        .basic_consume(
            output.as_str().into(),
            "weir-test".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume the output queue");
    within("every window in the output queue", async {
        while got.len() < want.len() {
            // Each commit publishes the windows closed in its epoch; the broker pushes them.
            let message = futures::StreamExt::next(&mut deliveries)
                .await
                .expect("the consumer is open")
                .expect("a delivery");
            let id = message
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .expect("a message_id");
            assert!(ids.insert(id.clone()), "message {id} published twice");
            let row: serde_json::Value = serde_json::from_slice(&message.data).expect("a JSON row");
            let start = chrono::NaiveDateTime::parse_from_str(
                row["window_start"].as_str().expect("window_start text"),
                "%Y-%m-%dT%H:%M:%S",
            )
            .expect("an ISO window_start")
            .and_utc()
            .timestamp_millis();
            got.push((
                row["key"].as_i64().expect("key"),
                start,
                row["n"].as_i64().expect("n"),
                row["total"].as_i64().expect("total"),
            ));
        }
    })
    .await;
    got.sort();
    assert_eq!(got, want, "the output queue holds every window once");
    let _ = channel
        .queue_delete(output.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .queue_delete(input.as_str().into(), QueueDeleteOptions::default())
        .await;
    drop(connection);
    server.shutdown().await;
}
