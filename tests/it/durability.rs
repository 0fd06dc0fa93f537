//! Durability of the real `weir` binary: what a client saw acknowledged survives a clean restart
//! and a `kill -9`, whole and exactly once, and the catalog comes back with it.

use std::collections::{HashMap, HashSet};

use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::harness::{
    BinaryServer, assert_no_error_lines, assert_no_panics, expect_sqlstate, http_get, simple_rows,
    temp_dir_with_log, within,
};

const CREATE_EVENTS: &str = "create table events (id bigint primary key, writer bigint not null, \
                             seq bigint not null, payload text not null)";
const WRITERS: i64 = 4;
/// Acknowledged inserts (over all writers) to wait for before killing the server.
const ACKS_BEFORE_KILL: usize = 1000;

/// The row writer `writer` sends as its `seq`-th insert; ids are unique across writers.
fn event(writer: i64, seq: i64) -> (i64, i64, i64, String) {
    let id = writer * 1_000_000 + seq;
    let payload = format!("writer {writer} seq {seq} ").repeat(8);
    (id, writer, seq, payload)
}

/// `INSERT` of one event as literal SQL (parameters are covered in `protocol.rs`; here the
/// subject is what survives a restart).
fn insert_sql(event: &(i64, i64, i64, String)) -> String {
    let (id, writer, seq, payload) = event;
    format!(
        "insert into events (id, writer, seq, payload) values ({id}, {writer}, {seq}, '{payload}')"
    )
}

async fn insert_event(
    client: &Client,
    writer: i64,
    seq: i64,
) -> Result<u64, tokio_postgres::Error> {
    client.execute(&insert_sql(&event(writer, seq)), &[]).await
}

/// Every row of `events` as (id, writer, seq, payload), in id order.
async fn all_events(client: &Client) -> Vec<(i64, i64, i64, String)> {
    client
        .query(
            "select id, writer, seq, payload from events order by id",
            &[],
        )
        .await
        .expect("read events")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect()
}

/// After a restart: the table still has its primary key and NOT NULL constraints and accepts
/// new writes.
async fn assert_catalog_intact(client: &Client, existing_id: i64) {
    let duplicate = format!("insert into events values ({existing_id}, 0, 0, 'dup')");
    assert_eq!(expect_sqlstate(client, &duplicate).await, "23505");
    let null = "insert into events values (999999999, 0, 0, null)";
    assert_eq!(expect_sqlstate(client, null).await, "23502");
    let new = event(9, 1);
    let inserted = client
        .execute(&insert_sql(&new), &[])
        .await
        .expect("insert after restart");
    assert_eq!(inserted, 1);
    let rows = simple_rows(
        client,
        &format!("select payload from events where id = {}", new.0),
    )
    .await;
    assert_eq!(rows, vec![vec![Some(new.3)]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_survive_a_clean_restart() {
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");

    let server = BinaryServer::start(&data, &log).await;
    assert_eq!(http_get(server.http_addr(), "/health").await.0, 200);
    let client = server.connect().await;
    client
        .batch_execute(CREATE_EVENTS)
        .await
        .expect("create events");
    let mut expected = Vec::new();
    for seq in 0..50 {
        assert_eq!(insert_event(&client, 1, seq).await.expect("insert"), 1);
        expected.push(event(1, seq));
    }
    let values: Vec<String> = (50..100)
        .map(|seq| {
            let (id, writer, seq, payload) = event(1, seq);
            format!("({id}, {writer}, {seq}, '{payload}')")
        })
        .collect();
    let multi_row = format!("insert into events values {}", values.join(", "));
    let inserted = client
        .execute(&multi_row, &[])
        .await
        .expect("multi-row insert");
    assert_eq!(inserted, 50);
    expected.extend((50..100).map(|seq| event(1, seq)));
    drop(client);
    let status = server.stop().await;
    assert!(
        status.success(),
        "weir should exit cleanly on SIGTERM, got {status}"
    );

    let server = BinaryServer::start(&data, &log).await;
    let client = server.connect().await;
    assert_eq!(all_events(&client).await, expected);
    assert_catalog_intact(&client, expected[0].0).await;
    drop(client);
    let status = server.stop().await;
    assert!(
        status.success(),
        "weir should exit cleanly on SIGTERM, got {status}"
    );
    assert_no_panics(&log);
    assert_no_error_lines(&log);
}

/// What one writer saw: the ids the server acknowledged, and the insert that was in flight
/// when the connection died (it may or may not have been applied).
struct WriterReport {
    acknowledged: Vec<i64>,
    in_flight: Option<i64>,
}

/// Inserts rows one statement at a time, from `first_seq` on, until the connection fails,
/// reporting each ack. An error the server answered with (rather than a dead connection) is a
/// failure of its own.
async fn write_until_killed(
    client: Client,
    writer: i64,
    first_seq: i64,
    acks: mpsc::Sender<()>,
) -> Result<WriterReport, String> {
    let mut acknowledged = Vec::new();
    for seq in first_seq.. {
        match insert_event(&client, writer, seq).await {
            Ok(1) => {
                acknowledged.push(event(writer, seq).0);
                // The receiver goes away once enough rows are in; keep writing regardless.
                let _ = acks.send(()).await;
            }
            Ok(n) => {
                return Err(format!(
                    "writer {writer}: an insert of one row reported {n}"
                ));
            }
            Err(err) if err.as_db_error().is_some() => {
                return Err(format!("writer {writer}: insert {seq} failed: {err}"));
            }
            Err(_) => {
                let in_flight = Some(event(writer, seq).0);
                return Ok(WriterReport {
                    acknowledged,
                    in_flight,
                });
            }
        }
    }
    unreachable!("a writer runs until the server is killed")
}

/// Runs [`WRITERS`] concurrent writers against `server` and kills it with SIGKILL once
/// [`ACKS_BEFORE_KILL`] inserts are acknowledged; adds what the writers saw to `seen`.
async fn write_then_kill(server: BinaryServer, first_seq: i64, seen: &mut WriterReports) {
    let (acks_tx, mut acks_rx) = mpsc::channel(64);
    let mut writers = Vec::new();
    for writer in 0..WRITERS {
        let client = server.connect().await;
        writers.push(tokio::spawn(write_until_killed(
            client,
            writer,
            first_seq,
            acks_tx.clone(),
        )));
    }
    drop(acks_tx);
    // If every writer fails early the channel closes before enough acks arrive; their errors
    // are reported below either way.
    within("writers to get rows acknowledged", async {
        let mut acks = 0;
        while acks < ACKS_BEFORE_KILL && acks_rx.recv().await.is_some() {
            acks += 1;
        }
    })
    .await;
    drop(acks_rx);
    server.kill9().await;

    let mut errors = Vec::new();
    for writer in writers {
        match within("a writer to notice the kill", writer)
            .await
            .expect("writer task")
        {
            Ok(report) => {
                seen.acknowledged.extend(report.acknowledged);
                seen.in_flight.extend(report.in_flight);
            }
            Err(err) => errors.push(err),
        }
    }
    assert!(
        errors.is_empty(),
        "writers failed before the kill: {errors:#?}"
    );
}

/// What all writers of all rounds saw.
#[derive(Default)]
struct WriterReports {
    acknowledged: HashSet<i64>,
    in_flight: HashSet<i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_rows_survive_kill_9() {
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let mut server = BinaryServer::start(&data, &log).await;
    server
        .connect()
        .await
        .batch_execute(CREATE_EVENTS)
        .await
        .expect("create events");

    // Two crashes: the second one hits a log that was itself recovered from a crash.
    let mut seen = WriterReports::default();
    let mut recovered_before = HashSet::new();
    for round in 0..2 {
        write_then_kill(server, round * 100_000, &mut seen).await;
        assert!(seen.acknowledged.len() >= ACKS_BEFORE_KILL * (round as usize + 1));

        server = BinaryServer::start(&data, &log).await;
        let rows = all_events(&server.connect().await).await;
        assert_recovered(&rows, &seen.acknowledged, &seen.in_flight);
        // A row that was visible after one recovery stays visible after the next.
        let recovered: HashSet<i64> = rows.iter().map(|row| row.0).collect();
        let vanished: Vec<_> = recovered_before.difference(&recovered).collect();
        assert!(
            vanished.is_empty(),
            "rows vanished in a later recovery: {vanished:?}"
        );
        recovered_before = recovered;
    }

    let client = server.connect().await;
    let any_acknowledged = *seen
        .acknowledged
        .iter()
        .next()
        .expect("some acknowledged rows");
    assert_catalog_intact(&client, any_acknowledged).await;
    drop(client);
    let status = server.stop().await;
    assert!(
        status.success(),
        "weir should exit cleanly on SIGTERM, got {status}"
    );
    assert_no_panics(&log);
    assert_no_error_lines(&log);
}

/// Every acknowledged row is present exactly once and whole; the only other rows allowed are
/// the writers' in-flight inserts.
fn assert_recovered(
    rows: &[(i64, i64, i64, String)],
    acknowledged: &HashSet<i64>,
    in_flight: &HashSet<i64>,
) {
    let mut seen = HashMap::new();
    for row in rows {
        *seen.entry(row.0).or_insert(0) += 1;
        let expected = event(row.1, row.2);
        assert_eq!(row, &expected, "row {} came back torn or altered", row.0);
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "rows recovered more than once: {duplicated:?}"
    );
    let mut lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !seen.contains_key(id))
        .collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} acknowledged rows lost after kill -9: {lost:?}",
        lost.len()
    );
    let mut phantom: Vec<_> = seen
        .keys()
        .filter(|id| !acknowledged.contains(id) && !in_flight.contains(id))
        .collect();
    phantom.sort();
    assert!(
        phantom.is_empty(),
        "rows never sent or never in flight appeared: {phantom:?}"
    );
}
