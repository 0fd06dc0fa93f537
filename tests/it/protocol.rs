//! The PostgreSQL wire protocol beyond plain queries: parameters and binary results, portals,
//! multi-statement and empty queries, errors mid-pipeline, garbage on the socket, query cancel;
//! plus the HTTP health and metrics endpoints.

use chrono::NaiveDateTime;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_postgres::types::Type;
use tokio_postgres::{NoTls, SimpleQueryMessage};

use crate::harness::{
    TestServer, expect_rejected, http_get, metric, read_backend_message, simple_rows, simple_value,
    sqlstate, startup_message, within,
};

fn at(text: &str) -> NaiveDateTime {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S").expect("a valid timestamp")
}

/// The rows of `readings` as Rust values, decoded from binary results.
type Reading = (i64, String, f64, bool, NaiveDateTime);

async fn readings_from(client: &tokio_postgres::Client, min_id: i64) -> Vec<Reading> {
    let select = "select id, sensor, value, ok, taken_at from readings where id >= $1 order by id";
    client
        .query(select, &[&min_id])
        .await
        .expect("select with a parameter")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .collect()
}

#[tokio::test]
async fn prepared_statements_bind_parameters_and_return_binary_results() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    client
        .batch_execute(
            "create table readings (id bigint primary key, sensor text, value double precision, \
             ok boolean, taken_at timestamp); \
             insert into readings values (1, 'north', 21.5, true, '2026-01-01 10:00:01'), \
             (2, 'south', -3.25, false, '2026-01-01 10:00:02'), \
             (3, 'east', 0.0, true, '2026-01-02 00:00:00')",
        )
        .await
        .expect("create and fill readings");

    // A parameter in WHERE; binary results decoded into Rust types by tokio-postgres.
    assert_eq!(
        readings_from(&client, 2).await,
        [
            (2, "south".into(), -3.25, false, at("2026-01-01 10:00:02")),
            (3, "east".into(), 0.0, true, at("2026-01-02 00:00:00")),
        ]
    );

    // Explicitly typed parameters of every kind in one predicate.
    let types = [
        Type::INT8,
        Type::TEXT,
        Type::FLOAT8,
        Type::BOOL,
        Type::TIMESTAMP,
    ];
    let typed = client
        .prepare_typed(
            "select count(*) from readings \
             where id <> $1 and sensor <> $2 and value > $3 and ok = $4 and taken_at < $5",
            &types,
        )
        .await
        .expect("prepare typed");
    let count: i64 = client
        .query_one(
            &typed,
            &[
                &99_i64,
                &"west",
                &-1.0_f64,
                &true,
                &at("2026-01-03 00:00:00"),
            ],
        )
        .await
        .expect("typed query")
        .get(0);
    assert_eq!(count, 2);

    // An INSERT whose parameter types the server infers from the target columns, executed
    // twice with different values.
    let insert = client
        .prepare(
            "insert into readings (id, sensor, value, ok, taken_at) values ($1, $2, $3, $4, $5)",
        )
        .await
        .expect("prepare the insert");
    assert_eq!(
        insert.params(),
        &types,
        "parameter types inferred from the target columns"
    );
    let new: [Reading; 2] = [
        (4, "west".into(), 1e-3, false, at("2026-02-01 12:30:00")),
        (5, "up".into(), 1e300, true, at("1999-12-31 23:59:59")),
    ];
    for (id, sensor, value, ok, taken_at) in &new {
        let n = client
            .execute(&insert, &[id, sensor, value, ok, taken_at])
            .await
            .expect("execute the prepared insert");
        assert_eq!(n, 1);
    }
    assert_eq!(readings_from(&client, 4).await, new);
    assert_eq!(
        simple_value(&client, "select count(*) from readings").await,
        "5"
    );
}

#[tokio::test]
async fn portal_fetches_rows_in_batches() {
    let server = TestServer::start().await;
    let mut client = server.connect().await;
    client
        .batch_execute(
            "create table ids (id bigint); insert into ids values (1), (2), (3), (4), (5)",
        )
        .await
        .expect("set up ids");

    let tx = client.transaction().await.expect("begin");
    let statement = tx
        .prepare("select id from ids order by id")
        .await
        .expect("prepare");
    let portal = tx.bind(&statement, &[]).await.expect("bind a portal");
    let mut batches = Vec::new();
    loop {
        let rows = tx
            .query_portal(&portal, 2)
            .await
            .expect("fetch from the portal");
        let batch: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
        let done = batch.len() < 2;
        batches.push(batch);
        if done {
            break;
        }
        assert!(
            batches.len() <= 3,
            "the portal should be exhausted after 3 fetches: {batches:?}"
        );
    }
    tx.commit().await.expect("commit");
    assert_eq!(batches, vec![vec![1, 2], vec![3, 4], vec![5]]);
}

#[tokio::test]
async fn simple_query_runs_several_statements_and_empty_queries() {
    let server = TestServer::start().await;
    let client = server.connect().await;

    let messages = client
        .simple_query(
            "create table m (a bigint, b text); insert into m values (1, 'x'), (2, NULL); \
             select a, b from m order by a",
        )
        .await
        .expect("three statements in one query");
    let summary: Vec<String> = messages
        .iter()
        .map(|message| match message {
            SimpleQueryMessage::CommandComplete(n) => format!("complete {n}"),
            SimpleQueryMessage::Row(row) => format!("row {:?} {:?}", row.get(0), row.get(1)),
            SimpleQueryMessage::RowDescription(columns) => {
                let names: Vec<_> = columns.iter().map(|c| c.name()).collect();
                format!("columns {names:?}")
            }
            _ => "other".to_string(),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "complete 0",
            "complete 2",
            r#"columns ["a", "b"]"#,
            r#"row Some("1") Some("x")"#,
            r#"row Some("2") None"#,
            "complete 2",
        ]
    );

    client
        .batch_execute("insert into m values (3, 'y'); update m set b = 'z' where a = 2; delete from m where a = 1")
        .await
        .expect("batch_execute");
    assert_eq!(
        simple_rows(&client, "select a, b from m order by a").await,
        [
            [Some("2".to_string()), Some("z".to_string())],
            [Some("3".to_string()), Some("y".to_string())]
        ]
    );

    for empty in ["", "   ", ";"] {
        // EmptyQueryResponse, which tokio-postgres reports as a completion of 0 rows.
        let messages = client
            .simple_query(empty)
            .await
            .expect("an empty query succeeds");
        assert!(
            matches!(messages[..], [SimpleQueryMessage::CommandComplete(0)]),
            "{empty:?} should get one empty response, got {} messages",
            messages.len()
        );
    }
    assert_eq!(simple_value(&client, "select 1").await, "1");
}

#[tokio::test]
async fn an_error_mid_pipeline_does_not_break_the_connection() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    // Polled together, tokio-postgres pipelines the three queries on one connection.
    let (first, bad, last) = tokio::join!(
        client.query("select 1::bigint", &[]),
        client.query("select * from no_such_table", &[]),
        client.query("select 3::bigint", &[]),
    );
    assert_eq!(
        first
            .expect("the first query")
            .first()
            .map(|r| r.get::<_, i64>(0)),
        Some(1)
    );
    assert_eq!(sqlstate(&bad.expect_err("the missing table")), "42P01");
    assert_eq!(
        last.expect("the last query")
            .first()
            .map(|r| r.get::<_, i64>(0)),
        Some(3)
    );

    // In a simple-protocol batch, the statements after an error do not run.
    client
        .batch_execute("create table p (a bigint)")
        .await
        .expect("create p");
    let err = client
        .batch_execute("select 1/0; insert into p values (2)")
        .await
        .expect_err("division by zero");
    assert_eq!(sqlstate(&err), "22012");
    assert_eq!(simple_value(&client, "select count(*) from p").await, "0");
}

/// Opens a connection and completes the startup handshake, returning the raw stream.
async fn started_raw_connection(server: &TestServer) -> TcpStream {
    let mut stream = TcpStream::connect(server.pg_addr()).await.expect("connect");
    stream
        .write_all(&startup_message())
        .await
        .expect("send startup");
    within("ReadyForQuery after startup", async {
        loop {
            match read_backend_message(&mut stream).await {
                Some((b'Z', _)) => break,
                Some((b'E', body)) => panic!("startup failed: {}", String::from_utf8_lossy(&body)),
                Some(_) => continue,
                None => panic!("the server closed the connection during startup"),
            }
        }
    })
    .await;
    stream
}

#[tokio::test]
async fn garbage_bytes_do_not_disturb_other_connections() {
    let server = TestServer::start().await;
    let before = server.connect().await;
    before
        .batch_execute("create table g (a bigint); insert into g values (7)")
        .await
        .expect("set up g");

    // A startup packet claiming to be 2 GiB long.
    let mut stream = TcpStream::connect(server.pg_addr()).await.expect("connect");
    stream
        .write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0, b'u', b's'])
        .await
        .expect("send bytes");
    expect_rejected(&mut stream, "a huge startup packet to be rejected").await;

    // One KiB of seeded random bytes, then end of input.
    let mut garbage = [0u8; 1024];
    StdRng::seed_from_u64(0x5eed).fill(&mut garbage[..]);
    let mut stream = TcpStream::connect(server.pg_addr()).await.expect("connect");
    // The server may hang up mid-write; only its verdict matters.
    let _ = stream.write_all(&garbage).await;
    let _ = stream.shutdown().await;
    expect_rejected(&mut stream, "random bytes to be rejected").await;

    // After a good startup: an unknown message type, then a query claiming to be 2 GiB long.
    let mut stream = started_raw_connection(&server).await;
    stream
        .write_all(&[b'~', 0, 0, 0, 4])
        .await
        .expect("send bytes");
    expect_rejected(&mut stream, "an unknown message type to be rejected").await;
    let mut stream = started_raw_connection(&server).await;
    stream
        .write_all(&[b'Q', 0x7f, 0xff, 0xff, 0xf0, b's', b'e'])
        .await
        .expect("send bytes");
    expect_rejected(&mut stream, "a huge query message to be rejected").await;

    assert_eq!(simple_value(&before, "select a from g").await, "7");
    let after = server.connect().await;
    assert_eq!(simple_value(&after, "select a + 1 from g").await, "8");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_request_stops_a_long_query() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    let token = client.cancel_token();
    // A sum over 10^12 rows: far longer than any deadline unless cancelled, and nothing the
    // planner can answer from statistics.
    let long = "select sum(a.value + b.value) from range(1000000) a cross join range(1000000) b";
    let mut query = tokio::spawn(async move {
        let result = client.simple_query(long).await;
        (client, result)
    });
    // The cancel request races with the query reaching the server, so it is repeated until the
    // query ends; a cancel that arrives while the session is idle is a no-op.
    let (client, result) = within("the long query to be cancelled", async {
        let mut every = tokio::time::interval(std::time::Duration::from_millis(200));
        loop {
            tokio::select! {
                finished = &mut query => break finished.expect("the query task"),
                _ = every.tick() => token.cancel_query(NoTls).await.expect("send a cancel request"),
            }
        }
    })
    .await;
    let err = result.expect_err("the long query should be cancelled");
    assert_eq!(sqlstate(&err), "57014");
    assert_eq!(simple_value(&client, "select 42").await, "42");
}

#[tokio::test]
async fn http_health_and_metrics() {
    let server = TestServer::start().await;
    let (status, body) = http_get(server.http_addr(), "/health").await;
    assert_eq!((status, body.trim()), (200, "ok"));

    let client = server.connect().await;
    assert_eq!(simple_value(&client, "select 1").await, "1");
    assert_eq!(simple_value(&client, "select 2").await, "2");
    let err = client
        .batch_execute("select * from missing")
        .await
        .expect_err("missing table");
    assert_eq!(sqlstate(&err), "42P01");

    let (status, metrics) = http_get(server.http_addr(), "/metrics").await;
    assert_eq!(status, 200, "metrics: {metrics}");
    assert!(
        metric(&metrics, "weir_connections_total") >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "weir_statements_total") >= 3.0,
        "{metrics}"
    );
    assert!(metric(&metrics, "weir_errors_total") >= 1.0, "{metrics}");

    let (status, _) = http_get(server.http_addr(), "/no-such-page").await;
    assert_eq!(status, 404);
}
