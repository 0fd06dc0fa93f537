//! Checkpoints and recovery with the real binary: views resume from their last checkpoint
//! after `kill -9` instead of replaying their sources' logs, and a topic sink publishes every
//! row exactly once across crashes.
//!
//! Each crashing run is compared with the same statements run on a server that never
//! crashes. Checkpoints are taken with the `CHECKPOINT` statement (the servers run with a
//! one-hour interval), so which epoch a crash falls after is decided by the test.

use tokio_postgres::Client;

use crate::harness::{
    BinaryServer, TestServer, assert_no_panics, simple_rows, simple_value, temp_dir_with_log,
};

const SOURCE: &str = "CREATE SOURCE bids (auction BIGINT, price BIGINT, ts TIMESTAMP, \
     WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) FORMAT JSON";

/// Views of every stateful operator kind: (name, definition, query that reads it in order).
const VIEWS: &[(&str, &str, &str)] = &[
    (
        "tumble_final",
        "CREATE MATERIALIZED VIEW tumble_final AS SELECT auction, window_start, count(*) AS n, \
         sum(price) AS total, max(price) AS top FROM TUMBLE(bids, ts, INTERVAL '10' SECOND) \
         GROUP BY auction, window_start, window_end EMIT ON WINDOW CLOSE",
        "SELECT * FROM tumble_final ORDER BY auction, window_start",
    ),
    (
        "per_auction",
        "CREATE MATERIALIZED VIEW per_auction AS SELECT auction, count(*) AS n, sum(price) AS \
         total, min(price) AS low, avg(price) AS mean, count(DISTINCT price) AS prices FROM bids \
         GROUP BY auction",
        "SELECT * FROM per_auction ORDER BY auction",
    ),
    (
        "overall",
        "CREATE MATERIALIZED VIEW overall AS SELECT count(*) AS n, max(price) AS top FROM bids",
        "SELECT * FROM overall",
    ),
    (
        "hop_updating",
        "CREATE MATERIALIZED VIEW hop_updating AS SELECT window_start, count(*) AS n, \
         max(price) AS top FROM HOP(bids, ts, INTERVAL '5' SECOND, INTERVAL '10' SECOND) \
         GROUP BY window_start, window_end",
        "SELECT * FROM hop_updating ORDER BY window_start",
    ),
    (
        "over_table",
        "CREATE MATERIALIZED VIEW over_table AS SELECT grp, count(*) AS n, sum(x) AS total, \
         avg(x) AS mean, min(x) AS low, max(x) AS high, count(DISTINCT x) AS xs \
         FROM readings GROUP BY grp",
        "SELECT * FROM over_table ORDER BY grp",
    ),
    (
        "sessions",
        "CREATE MATERIALIZED VIEW sessions AS SELECT window_start, window_end, auction, \
         count(*) AS n FROM SESSION(bids, ts, INTERVAL '4' SECOND, auction) \
         GROUP BY window_start, window_end, auction EMIT ON WINDOW CLOSE",
        "SELECT * FROM sessions ORDER BY auction, window_start",
    ),
];

/// Changes to `readings` for step `i`: inserts, then updates and deletes of earlier rows
/// (so the view over it retracts: sliding and recomputed aggregates).
fn table_changes(i: u64) -> String {
    let mut sql = String::new();
    for k in 0..20 {
        let id = i * 20 + k;
        sql.push_str(&format!(
            "INSERT INTO readings VALUES ({id}, {}, {});",
            id % 4,
            (id * 13) % 17
        ));
    }
    if i > 0 {
        let old = (i - 1) * 20;
        sql.push_str(&format!(
            "UPDATE readings SET x = x + 100 WHERE id = {old};"
        ));
        sql.push_str(&format!("DELETE FROM readings WHERE id = {};", old + 1));
    }
    sql
}

/// Deterministic bids `from..to`: a few auctions, event times mostly rising with some
/// disorder (so some rows are late), prices repeating (so DISTINCT matters).
fn bids(from: u64, to: u64) -> String {
    let rows: Vec<String> = (from..to)
        .map(|i| {
            let auction = i % 3;
            let price = (i * 7) % 11;
            let jitter = if i % 5 == 0 { 7 } else { 0 };
            let at = (i * 2).saturating_sub(jitter);
            format!(
                "({auction}, {price}, TIMESTAMP '2026-01-01 10:00:00' + INTERVAL '{at} seconds')"
            )
        })
        .collect();
    format!("INSERT INTO bids VALUES {}", rows.join(", "))
}

async fn run(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("`{sql}`: {e:?}"));
}

async fn setup(client: &Client) {
    run(client, SOURCE).await;
    run(
        client,
        "CREATE TABLE readings (id BIGINT PRIMARY KEY, grp BIGINT, x BIGINT)",
    )
    .await;
    run(client, "SET streaming_parallelism = 2").await;
    for (_, create, _) in VIEWS {
        run(client, create).await;
    }
}

async fn contents(client: &Client) -> Vec<(String, Vec<Vec<Option<String>>>)> {
    run(client, "FLUSH").await;
    let mut out = Vec::new();
    for (name, _, select) in VIEWS {
        out.push((name.to_string(), simple_rows(client, select).await));
    }
    out
}

fn assert_same(
    got: &[(String, Vec<Vec<Option<String>>>)],
    want: &[(String, Vec<Vec<Option<String>>>)],
    when: &str,
) {
    for ((name, g), (_, w)) in got.iter().zip(want) {
        assert_eq!(g, w, "view {name} {when}: crashed run vs reference");
        assert!(!w.is_empty(), "view {name} {when}: the reference is empty");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_resume_from_their_checkpoint_after_kill9() {
    let reference = TestServer::start().await;
    let r = reference.connect().await;
    setup(&r).await;

    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let args = ["--checkpoint-interval", "1h"];
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let c = server.connect().await;
    setup(&c).await;

    // Epoch 1 covers the first 300 bids; the next 200 are not checkpointed.
    for client in [&r, &c] {
        run(client, &bids(0, 150)).await;
        run(client, &table_changes(0)).await;
        run(client, &bids(150, 300)).await;
        run(client, &table_changes(1)).await;
        run(client, "FLUSH").await;
    }
    run(&c, "CHECKPOINT").await;
    let epochs = simple_rows(
        &c,
        "SELECT dataflow, epoch, bytes FROM weir_checkpoints ORDER BY dataflow",
    )
    .await;
    assert_eq!(
        epochs.len(),
        VIEWS.len(),
        "one checkpoint per view: {epochs:?}"
    );
    for row in &epochs {
        assert_eq!(row[1].as_deref(), Some("1"), "first epoch: {row:?}");
        let bytes: i64 = row[2].as_deref().unwrap_or("0").parse().unwrap();
        assert!(bytes > 0, "a checkpoint holds state: {row:?}");
    }
    for client in [&r, &c] {
        run(client, &bids(300, 500)).await;
        run(client, &table_changes(2)).await;
    }
    let before_crash = contents(&r).await;
    assert_same(&contents(&c).await, &before_crash, "before the crash");
    server.kill9().await;

    let server = BinaryServer::start_with(&data, &log, &args).await;
    let c = server.connect().await;
    // Views answer from the restored epoch at once (no FLUSH yet: the checkpoint's 300
    // bids at least), then catch up on the 200 later bids.
    let n: i64 = simple_value(&c, "SELECT n FROM overall")
        .await
        .parse()
        .unwrap();
    assert!((300..=500).contains(&n), "restored before serving: {n}");
    assert_same(&contents(&c).await, &before_crash, "after kill -9");
    let restored = simple_rows(
        &c,
        "SELECT dataflow FROM weir_checkpoints WHERE restored AND epoch = 1 ORDER BY dataflow",
    )
    .await;
    assert_eq!(
        restored.len(),
        VIEWS.len(),
        "every view restored epoch 1: {restored:?}"
    );
    // The views read only what followed the checkpoint: the source's counters (kept in
    // memory) saw the 200 later bids, not the whole log again.
    assert_eq!(
        simple_value(
            &c,
            "SELECT messages FROM weir_source_stats WHERE source = 'bids'"
        )
        .await,
        "200"
    );

    // And they go on: more bids, a second crash right after a checkpoint.
    for client in [&r, &c] {
        run(client, &bids(500, 700)).await;
        run(client, &table_changes(3)).await;
    }
    run(&c, "FLUSH").await;
    run(&c, "CHECKPOINT").await;
    server.kill9().await;
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let c = server.connect().await;
    for client in [&r, &c] {
        run(client, &bids(700, 800)).await;
        run(client, &table_changes(4)).await;
    }
    assert_same(
        &contents(&c).await,
        &contents(&r).await,
        "after the second crash",
    );
    drop(c);
    let status = server.stop().await;
    assert!(status.success(), "weir should exit cleanly, got {status}");
    assert_no_panics(&log);
}

/// The rows of a topic sink's topic, decoded, in a canonical order; and how many messages.
async fn sunk(client: &Client) -> (Vec<Vec<Option<String>>>, usize) {
    let rows = simple_rows(client, "SELECT payload FROM sunk ORDER BY payload").await;
    let n = rows.len();
    (rows, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_sink_publishes_each_row_once_across_crashes() {
    let reference = TestServer::start().await;
    let r = reference.connect().await;
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let args = ["--checkpoint-interval", "1h"];
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let c = server.connect().await;
    for client in [&r, &c] {
        run(client, SOURCE).await;
        run(client, VIEWS[0].1).await;
        run(client, "CREATE TOPIC sunk").await;
        run(
            client,
            "CREATE SINK out FROM tumble_final WITH (connector = 'builtin', topic = 'sunk') FORMAT JSON",
        )
        .await;
        run(client, &bids(0, 200)).await;
        run(client, "FLUSH").await;
    }
    run(&r, "CHECKPOINT").await;
    let (first, n) = sunk(&r).await;
    assert!(n > 10, "the reference published windows: {first:?}");
    // Nothing is visible before its epoch commits.
    assert_eq!(sunk(&c).await.1, 0, "no checkpoint yet, nothing published");
    run(&c, "CHECKPOINT").await;
    assert_eq!(sunk(&c).await.0, first, "after the first commit");

    // Rows of an epoch that was never checkpointed are published once, after recovery.
    for client in [&r, &c] {
        run(client, &bids(200, 400)).await;
        run(client, "FLUSH").await;
    }
    server.kill9().await;
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let c = server.connect().await;
    run(&c, "FLUSH").await;
    run(&c, "CHECKPOINT").await;
    run(&r, "CHECKPOINT").await;
    let (want, _) = sunk(&r).await;
    assert_eq!(sunk(&c).await.0, want, "after kill -9 and a new checkpoint");
    assert_eq!(
        simple_value(&c, "SELECT last_epoch FROM weir_sinks WHERE sink = 'out'").await,
        "2"
    );
    drop(c);
    server.kill9().await;
    assert_no_panics(&log);
}

/// Views of the incremental-checkpoint test: an updating aggregate over a table (groups
/// change, vanish and come back; `max` keeps its values), and one over a source behind a
/// two-instance exchange.
const INCREMENTAL_VIEWS: &[(&str, &str)] = &[
    ("per_g", "SELECT g, n, total, top FROM per_g ORDER BY g"),
    (
        "per_user",
        "SELECT user_id, n FROM per_user ORDER BY user_id",
    ),
];

async fn incremental_setup(client: &Client) {
    run(
        client,
        "CREATE TABLE kv (id BIGINT PRIMARY KEY, g BIGINT, v BIGINT);
         CREATE SOURCE clicks (user_id BIGINT, ts TIMESTAMP) FORMAT JSON;
         SET streaming_parallelism = 1;
         CREATE MATERIALIZED VIEW per_g AS SELECT g, count(*) AS n, sum(v) AS total, \
             max(v) AS top FROM kv GROUP BY g;
         SET streaming_parallelism = 2;
         CREATE MATERIALIZED VIEW per_user AS SELECT user_id, count(*) AS n FROM clicks \
             GROUP BY user_id",
    )
    .await;
    for chunk in 0..2u64 {
        let rows: Vec<String> = (chunk * 4000..(chunk + 1) * 4000)
            .map(|id| format!("({id}, {}, {})", id % 800, (id * 7) % 1000))
            .collect();
        run(
            client,
            &format!("INSERT INTO kv VALUES {}", rows.join(", ")),
        )
        .await;
        run(
            client,
            &clicks((chunk * 4000..(chunk + 1) * 4000).map(|i| i % 2000)),
        )
        .await;
    }
}

fn clicks(users: impl Iterator<Item = u64>) -> String {
    let rows: Vec<String> = users
        .map(|u| format!("({u}, TIMESTAMP '2026-01-01 10:00:00')"))
        .collect();
    format!("INSERT INTO clicks VALUES {}", rows.join(", "))
}

async fn incremental_contents(client: &Client) -> Vec<(String, Vec<Vec<Option<String>>>)> {
    run(client, "FLUSH").await;
    let mut out = Vec::new();
    for (name, select) in INCREMENTAL_VIEWS {
        out.push((name.to_string(), simple_rows(client, select).await));
    }
    out
}

/// The newest checkpoint of each incremental-test view: (incremental, bytes, chain_files,
/// epoch).
async fn newest_checkpoints(client: &Client) -> Vec<(bool, i64, i64, i64)> {
    let mut out = Vec::new();
    for (name, _) in INCREMENTAL_VIEWS {
        let row = simple_rows(
            client,
            &format!(
                "SELECT incremental, bytes, chain_files, epoch FROM weir_checkpoints \
                 WHERE dataflow = '{name}' ORDER BY epoch DESC LIMIT 1"
            ),
        )
        .await;
        let row = &row[0];
        let num = |i: usize| row[i].as_deref().unwrap().parse::<i64>().unwrap();
        out.push((row[0].as_deref() == Some("t"), num(1), num(2), num(3)));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_checkpoints_write_what_changed_and_recover_the_chain() {
    let reference = TestServer::start().await;
    let r = reference.connect().await;
    incremental_setup(&r).await;
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let args = ["--checkpoint-interval", "1h"];
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let c = server.connect().await;
    incremental_setup(&c).await;
    run(&c, "FLUSH").await;
    run(&c, "CHECKPOINT").await;
    let full = newest_checkpoints(&c).await;
    for (i, (incremental, bytes, files, epoch)) in full.iter().enumerate() {
        assert!(!incremental, "the first checkpoint is full: {full:?}");
        assert_eq!((*files, *epoch), (1, 1), "{:?}", INCREMENTAL_VIEWS[i]);
        assert!(
            *bytes > 20_000,
            "800 groups / 2000 users of state: {full:?}"
        );
    }

    // A few groups change, one disappears, a user is new: the next epoch writes those.
    let step2 = format!(
        "UPDATE kv SET v = v + 1 WHERE id < 10; DELETE FROM kv WHERE g = 7; {}",
        clicks((0..20).chain([9999]))
    );
    // The vanished group comes back, another goes.
    let step3 = format!(
        "INSERT INTO kv VALUES (100000, 7, 5); DELETE FROM kv WHERE g = 8; {}",
        clicks([9999, 3, 4].into_iter())
    );
    for (step, epoch) in [(&step2, 2), (&step3, 3)] {
        run(&r, step).await;
        run(&c, step).await;
        run(&c, "FLUSH").await;
        run(&c, "CHECKPOINT").await;
        let now = newest_checkpoints(&c).await;
        for ((incremental, bytes, files, e), (_, full_bytes, _, _)) in now.iter().zip(&full) {
            assert!(incremental, "epoch {epoch} is incremental: {now:?}");
            assert_eq!((*files, *e), (epoch, epoch), "{now:?}");
            assert!(
                bytes * 10 < *full_bytes,
                "epoch {epoch} writes what changed, not everything: {now:?} vs {full:?}"
            );
        }
    }
    // Changes after the last checkpoint are read again from the logs after the crash.
    let step4 = format!(
        "UPDATE kv SET v = 0 WHERE id >= 20 AND id < 30; {}",
        clicks(0..50)
    );
    run(&r, &step4).await;
    run(&c, &step4).await;
    let want = incremental_contents(&r).await;
    assert_eq!(incremental_contents(&c).await, want, "before the crash");
    server.kill9().await;

    let server = BinaryServer::start_with(&data, &log, &args).await;
    let c = server.connect().await;
    assert_eq!(incremental_contents(&c).await, want, "after kill -9");
    let restored = simple_rows(
        &c,
        "SELECT dataflow, chain_files FROM weir_checkpoints WHERE restored AND epoch = 3 \
         ORDER BY dataflow",
    )
    .await;
    assert_eq!(
        restored,
        vec![
            vec![Some("per_g".into()), Some("3".into())],
            vec![Some("per_user".into()), Some("3".into())],
        ],
        "both restored the three-file chain"
    );

    // Everything changes twice: the chain outgrows its full file and starts over.
    let mut chains = Vec::new();
    for round in 0..2 {
        let step = format!("UPDATE kv SET v = v + {round} + 1; {}", clicks(0..2000));
        run(&r, &step).await;
        run(&c, &step).await;
        run(&c, "FLUSH").await;
        run(&c, "CHECKPOINT").await;
        chains.push(newest_checkpoints(&c).await);
    }
    for v in 0..INCREMENTAL_VIEWS.len() {
        assert!(
            chains.iter().any(|epoch| !epoch[v].0 && epoch[v].2 == 1),
            "{}: a full checkpoint restarts the chain: {chains:?}",
            INCREMENTAL_VIEWS[v].0
        );
    }
    let step = format!("DELETE FROM kv WHERE g = 9; {}", clicks(7..9));
    run(&r, &step).await;
    run(&c, &step).await;
    run(&c, "FLUSH").await;
    run(&c, "CHECKPOINT").await;
    server.kill9().await;
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let c = server.connect().await;
    assert_eq!(
        incremental_contents(&c).await,
        incremental_contents(&r).await,
        "after the second crash"
    );
    drop(c);
    let status = server.stop().await;
    assert!(status.success(), "weir should exit cleanly, got {status}");
    assert_no_panics(&log);
}
