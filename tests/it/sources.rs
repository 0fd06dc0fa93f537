//! Sources over real pgwire and psql: `idle_timeout` closes windows of a source that went quiet
//! (wall-clock time, so the test waits for the condition with a deadline), a source no view
//! reads still lists its dead letters and counts its messages, and psql's `\copy` publishes
//! into a source.

use std::time::Instant;

use crate::harness::{TestServer, poll_until, psql, simple_rows};

fn text(v: &[&str]) -> Vec<Option<String>> {
    v.iter().map(|s| Some(s.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_windows_of_a_quiet_source() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE SOURCE quiet (k BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
               WITH (idle_timeout = '300ms') FORMAT JSON;
             CREATE SOURCE still (k BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) FORMAT JSON;
             CREATE MATERIALIZED VIEW quiet_w AS SELECT window_start, count(*) AS n \
               FROM TUMBLE(quiet, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end EMIT ON WINDOW CLOSE;
             CREATE MATERIALIZED VIEW still_w AS SELECT window_start, count(*) AS n \
               FROM TUMBLE(still, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end EMIT ON WINDOW CLOSE;
             INSERT INTO quiet VALUES (1, '2026-01-01 10:00:01'), (2, '2026-01-01 10:00:08');
             INSERT INTO still VALUES (1, '2026-01-01 10:00:01'), (2, '2026-01-01 10:00:08');
             FLUSH;",
        )
        .await
        .expect("set up");
    // Right after FLUSH the watermark is 10:00:07: nothing closed yet (unless the machine
    // stalled for the whole timeout, which the check below allows).
    let started = Instant::now();
    let rows = poll_until("the idle source's window to close", || async {
        let rows = simple_rows(&client, "SELECT * FROM quiet_w").await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows, vec![text(&["2026-01-01 10:00:00", "2"])]);
    assert!(
        started.elapsed().as_millis() >= 200,
        "closed before the idle timeout"
    );
    // The source without idle_timeout holds its watermark: its window stays open.
    assert!(
        simple_rows(&client, "SELECT * FROM still_w")
            .await
            .is_empty()
    );
    let late = simple_rows(
        &client,
        "SELECT source FROM weir_source_stats WHERE watermark > '2026-01-01 10:00:09' ORDER BY 1",
    )
    .await;
    assert_eq!(late, vec![text(&["quiet"])]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_without_views_still_lists_dead_letters() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE SOURCE lonely (k BIGINT, v TEXT) WITH (connector = 'builtin', topic = 'lonely_t') FORMAT JSON;
             INSERT INTO lonely_t (payload) VALUES ('{\"k\": 1, \"v\": \"a\"}'), ('{\"k\": \"x\"}'), ('[1, 2]'), ('{\"k\": 99999999999999999999}');
             INSERT INTO lonely VALUES (2, 'b');
             FLUSH;",
        )
        .await
        .expect("set up");
    assert_eq!(
        simple_rows(
            &client,
            "SELECT \"offset\" FROM weir_dead_letters ORDER BY 1"
        )
        .await,
        vec![text(&["1"]), text(&["2"]), text(&["3"])]
    );
    assert_eq!(
        simple_rows(
            &client,
            "SELECT messages, dead_letters FROM weir_source_stats"
        )
        .await,
        vec![text(&["5", "3"])]
    );
    assert_eq!(
        simple_rows(&client, "SELECT k, v FROM lonely ORDER BY k").await,
        vec![text(&["1", "a"]), text(&["2", "b"])]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_publishes_into_a_source() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE SOURCE readings (sensor TEXT, value DOUBLE PRECISION, at TIMESTAMP, \
               WATERMARK FOR at AS at - INTERVAL '1' SECOND) FORMAT CSV;
             CREATE MATERIALIZED VIEW per_sensor AS \
               SELECT sensor, count(*) AS n, avg(value) AS mean FROM readings GROUP BY sensor;",
        )
        .await
        .expect("set up");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("readings.csv");
    std::fs::write(
        &file,
        "sensor,value,at\nt1,1.5,2026-01-01 10:00:00\nt2,2,2026-01-01 10:00:01\nt1,2.5,2026-01-01 10:00:02\n",
    )
    .expect("write csv");
    let copy = format!(
        "\\copy readings from '{}' with (format csv, header)",
        file.display()
    );
    let out = psql(server.pg_addr(), &["-c", &copy]).await.ok();
    assert!(out.contains("COPY 3"), "psql said: {out}");
    client.batch_execute("FLUSH").await.expect("flush");
    assert_eq!(
        simple_rows(
            &client,
            "SELECT sensor, n, mean FROM per_sensor ORDER BY sensor"
        )
        .await,
        vec![text(&["t1", "2", "2"]), text(&["t2", "1", "2"])]
    );
    // The messages are CSV lines in the source's own topic.
    assert_eq!(
        simple_rows(&client, "SELECT count(*) FROM readings").await,
        vec![text(&["3"])]
    );
    server.shutdown().await;
}

/// While a view reads a source its monitor rests (the view records the counts); once the last
/// view is dropped the monitor reads again, and nothing is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_rests_while_views_read_and_resumes_after() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "CREATE SOURCE watched (k BIGINT) WITH (topic = 'watched_t') FORMAT JSON;
             CREATE MATERIALIZED VIEW watching AS SELECT count(*) AS n FROM watched;
             INSERT INTO watched_t (payload) VALUES ('{\"k\": 1}'), ('oops');
             FLUSH;
             DROP MATERIALIZED VIEW watching;
             INSERT INTO watched_t (payload) VALUES ('{\"k\": 2}'), ('oops again');
             FLUSH;",
        )
        .await
        .expect("set up");
    assert_eq!(
        simple_rows(
            &client,
            "SELECT \"offset\", payload FROM weir_dead_letters ORDER BY 1"
        )
        .await,
        vec![text(&["1", "oops"]), text(&["3", "oops again"])]
    );
    assert_eq!(
        simple_rows(
            &client,
            "SELECT messages, dead_letters FROM weir_source_stats"
        )
        .await,
        vec![text(&["4", "2"])]
    );
    server.shutdown().await;
}
