//! The built-in queue under a `kill -9` and under volume: concurrent producers over SQL and
//! HTTP, a stream and a queue consumer, a crash in the middle of all of it, and what the
//! restarted server owes each of them; then 100,000 messages from four HTTP producers read
//! back whole, in order, by two subscriptions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::harness::{
    BinaryServer, TestServer, assert_no_error_lines, assert_no_panics, http_post, simple_rows,
    simple_value, temp_dir_with_log, within,
};

const PRODUCERS: usize = 4;
/// Messages per INSERT or POST in the crash test.
const BATCH: usize = 10;
/// Acknowledged publishes (over all producers) to wait for before the kill.
const PUBLISHES_BEFORE_KILL: usize = 2_000;
/// Committed (stream) and acked (queue) messages to wait for before the kill, so the crash
/// hits consumers that are in the middle of their work too.
const CONSUMED_BEFORE_KILL: usize = 200;

/// One fetched message: (partition, offset, payload, lease_id).
type Fetched = (i64, i64, String, Option<String>);

/// What the producers and consumers have had acknowledged so far, and a wake-up for the test
/// waiting on it.
#[derive(Default)]
struct Progress {
    published: AtomicUsize,
    committed: AtomicUsize,
    acked: AtomicUsize,
    /// Notified after every change above and when a task ends.
    changed: Notify,
}

impl Progress {
    fn add(&self, counter: &AtomicUsize, n: usize) {
        counter.fetch_add(n, Ordering::SeqCst);
        self.changed.notify_one();
    }

    fn enough(&self) -> bool {
        self.published.load(Ordering::SeqCst) >= PUBLISHES_BEFORE_KILL
            && self.committed.load(Ordering::SeqCst) >= CONSUMED_BEFORE_KILL
            && self.acked.load(Ordering::SeqCst) >= CONSUMED_BEFORE_KILL
    }
}

/// What one task saw: the payloads whose publish / commit / ack the server acknowledged, and
/// those of the one request in flight when the server died (it may or may not have taken
/// effect).
#[derive(Default)]
struct Report {
    acknowledged: Vec<String>,
    in_flight: Vec<String>,
}

/// Whether a client error is the server going away (expected once it is killed) rather than
/// an error response, which fails the test.
fn server_answered(err: &tokio_postgres::Error) -> bool {
    err.as_db_error().is_some()
}

/// Runs a FETCH; `Ok(None)` if the connection died.
async fn try_fetch(client: &Client, sql: &str) -> Result<Option<Vec<Fetched>>, String> {
    let messages = match client.simple_query(sql).await {
        Ok(messages) => messages,
        Err(err) if server_answered(&err) => return Err(format!("`{sql}` failed: {err}")),
        Err(_) => return Ok(None),
    };
    Ok(Some(
        messages
            .iter()
            .filter_map(|message| match message {
                SimpleQueryMessage::Row(row) => Some(fetched(
                    &(0..row.len())
                        .map(|i| row.get(i).map(str::to_string))
                        .collect::<Vec<_>>(),
                )),
                _ => None,
            })
            .collect(),
    ))
}

/// A FETCH row (topic, partition, offset, key, payload, headers, delivery_count, lease_id).
fn fetched(row: &[Option<String>]) -> Fetched {
    let num = |i: usize| -> i64 {
        row[i]
            .as_deref()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("column {i} of {row:?} is not a number"))
    };
    (
        num(1),
        num(2),
        row[4].clone().expect("a payload"),
        row[7].clone(),
    )
}

/// Runs a statement whose outcome decides whether `batch` counts as acknowledged.
async fn settle(
    client: &Client,
    sql: &str,
    batch: Vec<String>,
    report: &mut Report,
) -> Result<bool, String> {
    match client.batch_execute(sql).await {
        Ok(()) => {
            report.acknowledged.extend(batch);
            Ok(true)
        }
        Err(err) if server_answered(&err) => Err(format!("`{sql}` failed: {err}")),
        Err(_) => {
            report.in_flight = batch;
            Ok(false)
        }
    }
}

/// POSTs `body` as text/plain; `Err` if the connection failed or the reply was cut short.
async fn try_post_lines(addr: SocketAddr, path: &str, body: &str) -> Result<(u16, String), String> {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("a cut-off HTTP response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body).ok_or_else(|| format!("a cut-off chunked body: {body:?}"))?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Decodes an HTTP/1.1 chunked body; `None` if it is cut short.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The number of `messages` positions in a publish response.
fn positions(body: &str) -> Option<usize> {
    serde_json::from_str::<Value>(body).ok()?["messages"]
        .as_array()
        .map(Vec::len)
}

/// Publishes batches of "p{producer}-{seq}" until the server dies: producers 0 and 1 with
/// `INSERT INTO t (key, payload)`, 2 and 3 with `POST /v1/topics/t/messages`.
async fn produce(
    client: Client,
    http: SocketAddr,
    producer: usize,
    progress: Arc<Progress>,
) -> Result<Report, String> {
    let mut report = Report::default();
    for round in 0.. {
        let batch: Vec<String> = (round * BATCH..(round + 1) * BATCH)
            .map(|seq| format!("p{producer}-{seq}"))
            .collect();
        let delivered = if producer < 2 {
            let values: Vec<String> = batch
                .iter()
                .enumerate()
                .map(|(i, payload)| format!("('k{}', '{payload}')", i % 7))
                .collect();
            let sql = format!("INSERT INTO t (key, payload) VALUES {}", values.join(", "));
            settle(&client, &sql, batch, &mut report).await?
        } else {
            let lines = batch.join("\n") + "\n";
            match try_post_lines(http, "/v1/topics/t/messages", &lines).await {
                Ok((200, body)) if positions(&body) == Some(BATCH) => {
                    report.acknowledged.extend(batch);
                    true
                }
                Ok((status, body)) => {
                    return Err(format!("producer {producer}: POST got {status}: {body}"));
                }
                Err(_) => {
                    report.in_flight = batch;
                    false
                }
            }
        };
        if !delivered {
            return Ok(report);
        }
        progress.add(&progress.published, BATCH);
    }
    unreachable!("a producer runs until the server is killed")
}

/// `FETCH 50 FROM SUBSCRIPTION s` + `COMMIT SUBSCRIPTION s` until the server dies.
async fn consume_stream(client: Client, progress: Arc<Progress>) -> Result<Report, String> {
    let mut report = Report::default();
    loop {
        let Some(batch) = try_fetch(&client, "FETCH 50 FROM SUBSCRIPTION s WAIT '200ms'").await?
        else {
            return Ok(report);
        };
        if batch.is_empty() {
            continue;
        }
        let n = batch.len();
        let payloads = batch.into_iter().map(|m| m.2).collect();
        if !settle(&client, "COMMIT SUBSCRIPTION s", payloads, &mut report).await? {
            return Ok(report);
        }
        progress.add(&progress.committed, n);
    }
}

/// `FETCH 50 FROM SUBSCRIPTION q` + `ACK SUBSCRIPTION q '<lease>', ...` until the server dies.
async fn consume_queue(client: Client, progress: Arc<Progress>) -> Result<Report, String> {
    let mut report = Report::default();
    loop {
        let Some(batch) = try_fetch(&client, "FETCH 50 FROM SUBSCRIPTION q WAIT '200ms'").await?
        else {
            return Ok(report);
        };
        if batch.is_empty() {
            continue;
        }
        let n = batch.len();
        let leases: Vec<String> = batch
            .iter()
            .map(|m| format!("'{}'", m.3.as_deref().expect("queue mode has leases")))
            .collect();
        let sql = format!("ACK SUBSCRIPTION q {}", leases.join(", "));
        let payloads = batch.into_iter().map(|m| m.2).collect();
        if !settle(&client, &sql, payloads, &mut report).await? {
            return Ok(report);
        }
        progress.add(&progress.acked, n);
    }
}

/// Runs `task` and wakes the test when it ends, so a task failing early is reported at once
/// instead of after the deadline.
fn spawn_reporting<F>(
    progress: &Arc<Progress>,
    task: F,
) -> tokio::task::JoinHandle<Result<Report, String>>
where
    F: std::future::Future<Output = Result<Report, String>> + Send + 'static,
{
    let progress = Arc::clone(progress);
    tokio::spawn(async move {
        let result = task.await;
        progress.changed.notify_one();
        result
    })
}

/// Fetches `subscription` until a FETCH comes back empty, acking leases in queue mode;
/// returns every payload delivered.
async fn drain(client: &Client, subscription: &str) -> Vec<String> {
    within(&format!("draining {subscription}"), async {
        let mut payloads = Vec::new();
        loop {
            let batch = try_fetch(
                client,
                &format!("FETCH 500 FROM SUBSCRIPTION {subscription}"),
            )
            .await
            .unwrap_or_else(|err| panic!("{err}"))
            .unwrap_or_else(|| panic!("the connection died while draining {subscription}"));
            if batch.is_empty() {
                return payloads;
            }
            let leases: Vec<String> = batch
                .iter()
                .filter_map(|m| m.3.as_ref().map(|lease| format!("'{lease}'")))
                .collect();
            if !leases.is_empty() {
                client
                    .batch_execute(&format!(
                        "ACK SUBSCRIPTION {subscription} {}",
                        leases.join(", ")
                    ))
                    .await
                    .unwrap_or_else(|err| panic!("ack while draining {subscription}: {err}"));
            }
            payloads.extend(batch.into_iter().map(|m| m.2));
        }
    })
    .await
}

/// Payloads that occur more than once in `payloads`.
fn duplicates(payloads: &[String]) -> Vec<&String> {
    let mut seen = HashSet::new();
    let mut twice: Vec<&String> = payloads.iter().filter(|p| !seen.insert(*p)).collect();
    twice.sort();
    twice
}

/// Fails with at most a few examples of `items`, and how many there are.
fn assert_none<T: std::fmt::Debug + Ord>(mut items: Vec<T>, what: &str) {
    items.sort();
    assert!(
        items.is_empty(),
        "{} {what}, e.g. {:?}",
        items.len(),
        &items[..items.len().min(20)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_publishing_and_consuming_loses_nothing() {
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let server = BinaryServer::start(&data, &log).await;
    server
        .connect()
        .await
        .batch_execute(
            "CREATE TOPIC t WITH (partitions = 4);
             CREATE SUBSCRIPTION s ON TOPIC t WITH (mode = 'stream');
             CREATE SUBSCRIPTION q ON TOPIC t WITH (mode = 'queue', ack_timeout = '60s')",
        )
        .await
        .expect("setup");

    let progress = Arc::new(Progress::default());
    let mut producers = Vec::new();
    for producer in 0..PRODUCERS {
        let client = server.connect().await;
        let task = produce(client, server.http_addr(), producer, Arc::clone(&progress));
        producers.push(spawn_reporting(&progress, task));
    }
    let stream_consumer = spawn_reporting(
        &progress,
        consume_stream(server.connect().await, Arc::clone(&progress)),
    );
    let queue_consumer = spawn_reporting(
        &progress,
        consume_queue(server.connect().await, Arc::clone(&progress)),
    );
    within("publishes, commits and acks before the kill", async {
        while !progress.enough()
            && !producers
                .iter()
                .chain([&stream_consumer, &queue_consumer])
                .any(|task| task.is_finished())
        {
            progress.changed.notified().await;
        }
    })
    .await;
    server.kill9().await;

    let mut errors = Vec::new();
    let mut published = Report::default();
    for producer in producers {
        match within("a producer to notice the kill", producer)
            .await
            .expect("producer task")
        {
            Ok(report) => {
                published.acknowledged.extend(report.acknowledged);
                published.in_flight.extend(report.in_flight);
            }
            Err(err) => errors.push(err),
        }
    }
    let mut consumed = Vec::new();
    for consumer in [stream_consumer, queue_consumer] {
        match within("a consumer to notice the kill", consumer)
            .await
            .expect("consumer task")
        {
            Ok(report) => consumed.push(report),
            Err(err) => errors.push(err),
        }
    }
    assert!(errors.is_empty(), "failures before the kill: {errors:#?}");
    let (queue, stream) = (
        consumed.pop().expect("queue"),
        consumed.pop().expect("stream"),
    );
    assert!(
        published.acknowledged.len() >= PUBLISHES_BEFORE_KILL
            && stream.acknowledged.len() >= CONSUMED_BEFORE_KILL
            && queue.acknowledged.len() >= CONSUMED_BEFORE_KILL,
        "too little work before the kill: {} published, {} committed, {} acked",
        published.acknowledged.len(),
        stream.acknowledged.len(),
        queue.acknowledged.len()
    );
    // One live consumer on a stream subscription reads each message once; a lease is given
    // to one consumer at a time and acked ones are gone.
    assert_none(duplicates(&stream.acknowledged), "payloads committed twice");
    assert_none(duplicates(&queue.acknowledged), "payloads acked twice");

    let server = BinaryServer::start(&data, &log).await;
    let client = server.connect().await;

    // The topic: every acknowledged publish, once; nothing that was never sent.
    let stored: Vec<String> = simple_rows(&client, "SELECT payload FROM t")
        .await
        .into_iter()
        .map(|row| row[0].clone().expect("a payload"))
        .collect();
    assert_none(duplicates(&stored), "payloads stored twice after kill -9");
    let stored_set: HashSet<&String> = stored.iter().collect();
    let acknowledged: HashSet<&String> = published.acknowledged.iter().collect();
    let in_flight: HashSet<&String> = published.in_flight.iter().collect();
    assert_none(
        acknowledged
            .iter()
            .filter(|p| !stored_set.contains(*p))
            .collect(),
        "acknowledged publishes lost after kill -9",
    );
    assert_none(
        stored_set
            .iter()
            .filter(|p| !acknowledged.contains(*p) && !in_flight.contains(*p))
            .collect(),
        "stored payloads never published",
    );

    // Stream: resumes at the committed offset. Nothing committed comes back; what was fetched
    // but not committed does, so committed ∪ redelivered is everything published (the one
    // COMMIT in flight at the kill may or may not have taken effect).
    let redelivered = drain(&client, "s").await;
    assert_none(
        duplicates(&redelivered),
        "payloads delivered twice by `s` after the restart",
    );
    let committed: HashSet<&String> = stream.acknowledged.iter().collect();
    let commit_in_flight: HashSet<&String> = stream.in_flight.iter().collect();
    let redelivered: HashSet<&String> = redelivered.iter().collect();
    assert_none(
        redelivered.intersection(&committed).collect(),
        "committed payloads redelivered by `s` after the restart",
    );
    assert_none(
        acknowledged
            .iter()
            .filter(|p| {
                !committed.contains(*p)
                    && !redelivered.contains(*p)
                    && !commit_in_flight.contains(*p)
            })
            .collect(),
        "acknowledged publishes neither committed nor redelivered by `s`",
    );
    assert_none(
        redelivered.difference(&stored_set).collect(),
        "payloads `s` delivered that the topic does not hold",
    );

    // Queue: exactly the messages not acked come back (the one ACK in flight at the kill may
    // or may not have taken effect).
    let requeued = drain(&client, "q").await;
    assert_none(
        duplicates(&requeued),
        "payloads delivered twice by `q` after the restart",
    );
    let acked: HashSet<&String> = queue.acknowledged.iter().collect();
    let ack_in_flight: HashSet<&String> = queue.in_flight.iter().collect();
    let requeued: HashSet<&String> = requeued.iter().collect();
    assert_none(
        requeued.intersection(&acked).collect(),
        "acked payloads redelivered by `q` after the restart",
    );
    assert_none(
        acknowledged
            .iter()
            .filter(|p| {
                !acked.contains(*p) && !requeued.contains(*p) && !ack_in_flight.contains(*p)
            })
            .collect(),
        "acknowledged publishes neither acked nor redelivered by `q`",
    );
    assert_none(
        requeued.difference(&stored_set).collect(),
        "payloads `q` delivered that the topic does not hold",
    );

    drop(client);
    let status = server.stop().await;
    assert!(
        status.success(),
        "weir should exit cleanly on SIGTERM, got {status}"
    );
    assert_no_panics(&log);
    assert_no_error_lines(&log);
}

const BIG_PRODUCERS: usize = 4;
const POSTS_PER_PRODUCER: usize = 25;
const LINES_PER_POST: usize = 1_000;
const BIG_TOTAL: usize = BIG_PRODUCERS * POSTS_PER_PRODUCER * LINES_PER_POST;

/// Reads `subscription` to the end with `FETCH 10000` and checks it got every message of
/// `big` once, at the position its publish returned, each partition from offset 0 up by 1.
async fn read_all(client: &Client, subscription: &str, positions: &HashMap<String, (i64, i64)>) {
    let mut offsets: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut payloads = HashSet::new();
    within(
        &format!("{subscription} to read {BIG_TOTAL} messages"),
        async {
            loop {
                let batch: Vec<Fetched> = simple_rows(
                    client,
                    &format!("FETCH 10000 FROM SUBSCRIPTION {subscription}"),
                )
                .await
                .iter()
                .map(|row| fetched(row))
                .collect();
                if batch.is_empty() {
                    break;
                }
                for (partition, offset, payload, lease) in batch {
                    assert!(lease.is_none(), "stream mode has no leases");
                    assert_eq!(
                        positions.get(&payload),
                        Some(&(partition, offset)),
                        "{subscription}: {payload} is not where its publish said"
                    );
                    offsets.entry(partition).or_default().push(offset);
                    assert!(
                        payloads.insert(payload.clone()),
                        "{subscription}: {payload} twice"
                    );
                }
            }
        },
    )
    .await;
    assert_eq!(
        payloads.len(),
        BIG_TOTAL,
        "{subscription} read every message"
    );
    for (partition, offsets) in &offsets {
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert!(
            offsets == &expected,
            "{subscription}: partition {partition} is not offsets 0..{} in order",
            offsets.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_messages_from_four_producers() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE TOPIC big WITH (partitions = 4);
             CREATE SUBSCRIPTION a ON TOPIC big WITH (mode = 'stream')",
        )
        .await
        .expect("setup");

    let http = server.http_addr();
    let mut producers = Vec::new();
    for producer in 0..BIG_PRODUCERS {
        producers.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for post in 0..POSTS_PER_PRODUCER {
                let lines: Vec<String> = (0..LINES_PER_POST)
                    .map(|i| format!("w{producer}-{}", post * LINES_PER_POST + i))
                    .collect();
                let body = lines.join("\n") + "\n";
                let (status, answer) =
                    http_post(http, "/v1/topics/big/messages", "text/plain", &body).await;
                assert_eq!(status, 200, "producer {producer} post {post}: {answer}");
                let answer = json(&answer);
                let returned = answer["messages"].as_array().expect("positions");
                assert_eq!(
                    returned.len(),
                    LINES_PER_POST,
                    "producer {producer} post {post}"
                );
                for (payload, position) in lines.into_iter().zip(returned) {
                    let field = |name: &str| position[name].as_i64().expect("a position");
                    positions.push((payload, (field("partition"), field("offset"))));
                }
            }
            positions
        }));
    }
    let mut positions = HashMap::new();
    for producer in producers {
        for (payload, position) in within("a producer to publish", producer)
            .await
            .expect("producer task")
        {
            assert!(positions.insert(payload, position).is_none());
        }
    }
    assert_eq!(positions.len(), BIG_TOTAL);
    let distinct: HashSet<&(i64, i64)> = positions.values().collect();
    assert_eq!(
        distinct.len(),
        BIG_TOTAL,
        "two publishes got the same position"
    );

    read_all(&client, "a", &positions).await;
    client
        .batch_execute("CREATE SUBSCRIPTION b ON TOPIC big WITH (mode = 'stream')")
        .await
        .expect("create b");
    read_all(&client, "b", &positions).await;

    assert_eq!(
        simple_value(&client, "SELECT count(*) FROM big").await,
        BIG_TOTAL.to_string()
    );
    let topics = simple_rows(&client, "SHOW TOPICS").await;
    let big = topics
        .iter()
        .find(|row| row[0].as_deref() == Some("big"))
        .unwrap_or_else(|| panic!("no `big` in SHOW TOPICS: {topics:?}"));
    assert_eq!(
        big[2],
        Some(BIG_TOTAL.to_string()),
        "SHOW TOPICS: {topics:?}"
    );
    drop(client);
    server.shutdown().await;
}
