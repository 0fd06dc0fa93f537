//! Streaming SQL end to end: sources over topics, windowed materialized views (`TUMBLE`, `HOP`,
//! `EMIT ON WINDOW CLOSE`), watermarks and late rows, dead letters, and views across a clean
//! restart and a `kill -9` of the real binary.
//!
//! Every test synchronises with `FLUSH`, which returns once every view reflects every message
//! accepted before it. The property test checks each incremental view against the same window
//! query run in batch over a plain table that holds exactly the rows the test computed to be on
//! time.

use std::net::SocketAddr;
use std::ops::Range;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use crate::harness::{
    BinaryServer, TestServer, assert_no_error_lines, assert_no_panics, psql, simple_rows,
    temp_dir_with_log, within,
};

/// Every source here holds its watermark this far behind the largest event time it has seen.
const DELAY_S: i64 = 5;

/// The plain table the batch oracle reads: the sources' columns, only the on-time rows.
const ORACLE_TABLE: &str = "bid_rows";

/// One bid. `at` is its event time in seconds after 2026-01-01 10:00:00, an instant whose epoch
/// seconds are a multiple of every window size and slide here, so window bounds fall on round
/// offsets.
#[derive(Clone, Copy, Debug)]
struct Bid {
    auction: i64,
    price: i64,
    at: i64,
}

/// Bids from `(auction, price, at)` triples.
fn bids(rows: &[(i64, i64, i64)]) -> Vec<Bid> {
    rows.iter()
        .map(|&(auction, price, at)| Bid { auction, price, at })
        .collect()
}

/// The text of the TIMESTAMP `at` seconds after 2026-01-01 10:00:00, as Weir prints it.
fn ts(at: i64) -> String {
    let second_of_day = 10 * 3600 + at;
    assert!(
        (0..86_400).contains(&second_of_day),
        "test event times stay within 2026-01-01, got {at}"
    );
    format!(
        "2026-01-01 {:02}:{:02}:{:02}",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// View rows as `window_start|window_end|rest` lines, for windows of `size_s` seconds given as
/// (start, rest).
fn windows(size_s: i64, rows: &[(i64, &str)]) -> Vec<String> {
    rows.iter()
        .map(|&(start, rest)| format!("{}|{}|{rest}", ts(start), ts(start + size_s)))
        .collect()
}

/// `INSERT INTO relation VALUES ...` of `bids`: a publish when `relation` is a source.
fn insert_sql(relation: &str, bids: &[Bid]) -> String {
    let values: Vec<String> = bids
        .iter()
        .map(|bid| format!("({}, {}, '{}')", bid.auction, bid.price, ts(bid.at)))
        .collect();
    format!("INSERT INTO {relation} VALUES {}", values.join(", "))
}

/// Publishes `payloads` byte for byte to `topic`, one message each, bypassing any source.
fn raw_publish_sql(topic: &str, payloads: &[&str]) -> String {
    let values: Vec<String> = payloads
        .iter()
        .map(|payload| format!("('{}')", payload.replace('\'', "''")))
        .collect();
    format!("INSERT INTO {topic} (payload) VALUES {}", values.join(", "))
}

/// `CREATE SOURCE bids` decoding JSON from `topic` (created with the source unless it exists),
/// or from a topic of its own (named `bids`) when `None`; its watermark trails event time by
/// [`DELAY_S`].
fn create_source(topic: Option<&str>) -> String {
    let with = topic
        .map(|topic| format!(" WITH (connector = 'builtin', topic = '{topic}')"))
        .unwrap_or_default();
    format!(
        "CREATE SOURCE bids (auction BIGINT, price BIGINT, ts TIMESTAMP, \
         WATERMARK FOR ts AS ts - INTERVAL '{DELAY_S}' SECOND){with} FORMAT JSON"
    )
}

async fn run(client: &Client, sql: &str) {
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|err| panic!("`{sql}` failed: {err:?}"));
}

async fn flush(client: &Client) {
    within("FLUSH to return", client.batch_execute("FLUSH"))
        .await
        .unwrap_or_else(|err| panic!("FLUSH failed: {err:?}"));
}

/// The rows of `sql` as `a|b|c` lines (NULL as `NULL`), sorted, so results compare whatever
/// order they come in.
async fn lines(client: &Client, sql: &str) -> Vec<String> {
    let mut lines: Vec<String> = simple_rows(client, sql)
        .await
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|value| value.unwrap_or_else(|| "NULL".to_string()))
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect();
    lines.sort();
    lines
}

/// Asserts `sql` returns exactly `expected`, in any order.
async fn assert_lines(client: &Client, sql: &str, expected: &[String], what: &str) {
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(lines(client, sql).await, expected, "{what}: `{sql}`");
}

/// The watermark rule the sources implement, in publish order on one partition: the largest
/// event time so far minus [`DELAY_S`]. A row is late when its event time is below the watermark
/// left by the rows before it; a row exactly at the watermark is on time.
#[derive(Default)]
struct Watermark {
    max_at: Option<i64>,
}

impl Watermark {
    /// The current watermark; `None` before the first row.
    fn get(&self) -> Option<i64> {
        self.max_at.map(|max_at| max_at - DELAY_S)
    }

    /// Accounts for the next published row and says whether it is on time.
    fn admit(&mut self, at: i64) -> bool {
        let on_time = self.get().is_none_or(|watermark| at >= watermark);
        self.max_at = Some(self.max_at.map_or(at, |max_at| max_at.max(at)));
        on_time
    }
}

/// A materialized view of per-auction aggregates over event-time windows of source `bids`.
struct WindowView {
    name: &'static str,
    /// A tumbling window when the slide equals the size, else a hopping one.
    slide_s: i64,
    size_s: i64,
    /// The aggregate columns after `window_start, window_end, auction`; the first is always
    /// `count(*) AS n`.
    aggregates: &'static str,
    /// `EMIT ON WINDOW CLOSE`: only windows the watermark has passed, final once shown.
    on_close: bool,
}

impl WindowView {
    fn select(&self, relation: &str, filter: &str) -> String {
        let window = if self.slide_s == self.size_s {
            format!("TUMBLE({relation}, ts, INTERVAL '{}' SECOND)", self.size_s)
        } else {
            format!(
                "HOP({relation}, ts, INTERVAL '{}' SECOND, INTERVAL '{}' SECOND)",
                self.slide_s, self.size_s
            )
        };
        format!(
            "SELECT window_start, window_end, auction, {} FROM {window} {filter} \
             GROUP BY window_start, window_end, auction",
            self.aggregates
        )
    }

    fn create_sql(&self) -> String {
        let emit = if self.on_close {
            " EMIT ON WINDOW CLOSE"
        } else {
            ""
        };
        format!(
            "CREATE MATERIALIZED VIEW {} AS {}{emit}",
            self.name,
            self.select("bids", "")
        )
    }

    fn contents_sql(&self) -> String {
        format!("SELECT * FROM {}", self.name)
    }

    /// The batch query over [`ORACLE_TABLE`] that the view must equal while the source's
    /// watermark is `watermark`: a window is closed once the watermark reaches its end.
    fn oracle_sql(&self, watermark: i64) -> String {
        let filter = if self.on_close {
            format!("WHERE window_end <= TIMESTAMP '{}'", ts(watermark))
        } else {
            String::new()
        };
        self.select(ORACLE_TABLE, &filter)
    }

    /// The starts of the windows holding event time `at`: half open, aligned to the epoch.
    fn window_starts(&self, at: i64) -> impl Iterator<Item = i64> + use<> {
        let (slide, last) = (self.slide_s, at.div_euclid(self.slide_s) * self.slide_s);
        (0..self.size_s / self.slide_s).map(move |i| last - i * slide)
    }

    /// The sum the view's `n` column must have over `on_time` rows: one per row per window
    /// that holds it (and, on close, has closed), counted by the test without SQL.
    fn expected_n(&self, on_time: &[Bid], watermark: i64) -> usize {
        on_time
            .iter()
            .flat_map(|bid| self.window_starts(bid.at))
            .filter(|start| !self.on_close || start + self.size_s <= watermark)
            .count()
    }
}

// 1. The README's streaming session, typed into psql.

/// Runs `statements` in one psql session, one `-c` each, stopping at the first error.
async fn psql_run(addr: SocketAddr, statements: &[String]) {
    let args: Vec<&str> = statements
        .iter()
        .flat_map(|sql| ["-c", sql.as_str()])
        .collect();
    psql(addr, &args).await.ok();
}

/// One query through psql, unaligned and tuples only: one `a|b|c` line per row.
async fn psql_query(addr: SocketAddr, sql: &str) -> String {
    psql(addr, &["-A", "-t", "-c", sql]).await.ok()
}

/// What psql prints for `lines` with `-A -t`.
fn psql_text(lines: &[String]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_session_through_psql() {
    let server = TestServer::start().await;
    let addr = server.pg_addr();
    let closed = WindowView {
        name: "closed_windows",
        slide_s: 10,
        size_s: 10,
        aggregates: "count(*) AS n, max(price) AS top",
        on_close: true,
    };
    psql_run(
        addr,
        &[
            // The source creates its topic; raw messages can be published to it as well.
            create_source(Some("bids_topic")),
            closed.create_sql(),
            "CREATE MATERIALIZED VIEW sliding AS \
             SELECT window_start, window_end, count(*) AS n, max(price) AS top \
             FROM HOP(bids, ts, INTERVAL '5' SECOND, INTERVAL '10' SECOND) \
             GROUP BY window_start, window_end"
                .to_string(),
            // Offsets 0-2; the watermark ends at 10:00:03.
            insert_sql("bids", &bids(&[(1, 100, 1), (2, 50, 3), (1, 120, 8)])),
            // Offsets 3-6. After 10:00:12 the watermark is 10:00:07: the bid at 10:00:02 is
            // late, the one at exactly 10:00:07 is on time. The watermark ends at 10:00:11.
            insert_sql(
                "bids",
                &bids(&[(2, 70, 12), (1, 90, 2), (2, 80, 7), (1, 130, 16)]),
            ),
            "FLUSH".to_string(),
        ],
    )
    .await;

    let closed_query = "SELECT * FROM closed_windows ORDER BY window_start, auction";
    let sliding_query = "SELECT * FROM sliding ORDER BY window_start";
    // Only [10:00:00, 10:00:10) has closed.
    let mut closed_rows = windows(10, &[(0, "1|2|120"), (0, "2|2|80")]);
    let mut sliding_rows = windows(
        10,
        &[
            (-5, "2|100"),
            (0, "4|120"),
            (5, "3|120"),
            (10, "2|130"),
            (15, "1|130"),
        ],
    );
    assert_eq!(
        psql_query(addr, closed_query).await,
        psql_text(&closed_rows)
    );
    assert_eq!(
        psql_query(addr, sliding_query).await,
        psql_text(&sliding_rows)
    );
    assert_eq!(
        psql_query(
            addr,
            "SELECT source, partition, \"offset\", event_time, watermark FROM weir_late_rows"
        )
        .await,
        format!("bids|0|4|{}|{}\n", ts(2), ts(7))
    );

    // A message that is not JSON, straight to the topic: offset 7 is dead-lettered and no view
    // moves.
    psql_run(
        addr,
        &[
            raw_publish_sql("bids_topic", &["not json"]),
            "FLUSH".to_string(),
        ],
    )
    .await;
    assert_eq!(
        psql_query(
            addr,
            "SELECT source, partition, \"offset\", payload, reason <> '' FROM weir_dead_letters"
        )
        .await,
        "bids|0|7|not json|t\n"
    );
    assert_eq!(
        psql_query(
            addr,
            "SELECT late_rows, dead_letters FROM weir_source_stats WHERE source = 'bids'"
        )
        .await,
        "1|1\n"
    );
    assert_eq!(
        psql_query(addr, closed_query).await,
        psql_text(&closed_rows)
    );
    assert_eq!(
        psql_query(addr, sliding_query).await,
        psql_text(&sliding_rows)
    );

    // The source reads on past the bad message: 10:00:27 moves the watermark to 10:00:22.
    psql_run(
        addr,
        &[
            insert_sql("bids", &bids(&[(1, 60, 27)])),
            "FLUSH".to_string(),
        ],
    )
    .await;
    closed_rows.extend(windows(10, &[(10, "1|1|130"), (10, "2|1|70")]));
    sliding_rows.extend(windows(10, &[(20, "1|60"), (25, "1|60")]));
    assert_eq!(
        psql_query(addr, closed_query).await,
        psql_text(&closed_rows)
    );
    assert_eq!(
        psql_query(addr, sliding_query).await,
        psql_text(&sliding_rows)
    );
    server.shutdown().await;
}

// 2. Incremental views equal the batch query over the on-time rows.

/// The views the property test maintains; each has a batch twin in [`WindowView::oracle_sql`].
const ORACLE_VIEWS: [WindowView; 3] = [
    WindowView {
        name: "tumble_stats",
        slide_s: 10,
        size_s: 10,
        aggregates: "count(*) AS n, sum(price) AS total, max(price) AS top, min(price) AS bottom",
        on_close: false,
    },
    WindowView {
        name: "hop_counts",
        slide_s: 2,
        size_s: 10,
        aggregates: "count(*) AS n",
        on_close: false,
    },
    WindowView {
        name: "closed_counts",
        slide_s: 10,
        size_s: 10,
        aggregates: "count(*) AS n",
        on_close: true,
    },
];

/// 150-300 bids over 1-4 auctions. Event time advances 0-2 s per bid; three bids in ten are
/// pulled back 1-8 s, so against the 5 s delay some are late and some land exactly on the
/// watermark or a window bound.
fn generate_bids(rng: &mut StdRng) -> Vec<Bid> {
    let auctions = rng.random_range(1..=4);
    let count = rng.random_range(150..=300);
    let mut clock = 0;
    (0..count)
        .map(|_| {
            clock += rng.random_range(0..=2);
            let jitter = if rng.random_bool(0.3) {
                rng.random_range(1..=8)
            } else {
                0
            };
            Bid {
                auction: rng.random_range(1..=auctions),
                price: rng.random_range(1..=1000),
                at: clock - jitter,
            }
        })
        .collect()
}

/// Splits `0..len` into the ranges of INSERT statements of 1-20 rows.
fn split_into_statements(rng: &mut StdRng, len: usize) -> Vec<Range<usize>> {
    let mut statements = Vec::new();
    let mut start = 0;
    while start < len {
        let end = (start + rng.random_range(1..=20)).min(len);
        statements.push(start..end);
        start = end;
    }
    statements
}

/// FLUSHes, then checks every view in `views` against its batch oracle over [`ORACLE_TABLE`],
/// and its `n` column against the count the test makes itself.
async fn check_views(
    client: &Client,
    context: &str,
    views: &[&WindowView],
    on_time: &[Bid],
    watermark: i64,
) {
    flush(client).await;
    for view in views {
        let oracle = view.oracle_sql(watermark);
        let streamed = lines(client, &view.contents_sql()).await;
        let batch = lines(client, &oracle).await;
        assert_eq!(
            streamed, batch,
            "{context}: view {} differs from `{oracle}`",
            view.name
        );
        let n: usize = streamed
            .iter()
            .map(|line| {
                let n = line.split('|').nth(3).expect("an n column");
                n.parse::<usize>().expect("n is a count")
            })
            .sum();
        assert_eq!(
            n,
            view.expected_n(on_time, watermark),
            "{context}: view {} counts each on-time row once per window",
            view.name
        );
    }
}

/// One seeded run: publish, maintain a table of the on-time rows, compare midway and at the end.
async fn check_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let all_bids = generate_bids(&mut rng);
    let statements = split_into_statements(&mut rng, all_bids.len());
    // Before which statement each view is created (`statements.len()`: after the last): one
    // view sees every message live, one only by backfilling the topic, one joins in between.
    let mut created_before = vec![0, statements.len(), rng.random_range(0..=statements.len())];
    created_before.shuffle(&mut rng);
    let midway = rng.random_range(0..statements.len() - 1);

    let server = TestServer::start().await;
    let client = server.connect().await;
    // Views are created with a random parallelism: the exchange must not change any result.
    let parallelism = rng.random_range(1..=3);
    run(
        &client,
        &format!("SET streaming_parallelism = {parallelism}"),
    )
    .await;
    run(&client, &create_source(None)).await;
    run(
        &client,
        &format!("CREATE TABLE {ORACLE_TABLE} (auction BIGINT, price BIGINT, ts TIMESTAMP)"),
    )
    .await;

    let mut watermark = Watermark::default();
    let mut on_time = Vec::new();
    // weir_late_rows as the test expects it: partition|offset|event_time|watermark.
    let mut late = Vec::new();
    for step in 0..=statements.len() {
        for (view, &before) in ORACLE_VIEWS.iter().zip(&created_before) {
            if before == step {
                run(&client, &view.create_sql()).await;
            }
        }
        let Some(range) = statements.get(step) else {
            break;
        };
        let published = &all_bids[range.clone()];
        run(&client, &insert_sql("bids", published)).await;
        // One message per row on one partition: a bid's offset is its index.
        let mut admitted = Vec::new();
        for (offset, bid) in range.clone().zip(published) {
            let before = watermark.get();
            if watermark.admit(bid.at) {
                admitted.push(*bid);
            } else {
                let before = before.expect("a late row has a watermark before it");
                late.push(format!("0|{offset}|{}|{}", ts(bid.at), ts(before)));
            }
        }
        if !admitted.is_empty() {
            run(&client, &insert_sql(ORACLE_TABLE, &admitted)).await;
        }
        on_time.extend(admitted);
        if step == midway {
            let live: Vec<&WindowView> = ORACLE_VIEWS
                .iter()
                .zip(&created_before)
                .filter(|&(_, &before)| before <= step)
                .map(|(view, _)| view)
                .collect();
            let context = format!(
                "seed {seed}, after statement {step} of {}",
                statements.len()
            );
            let now = watermark.get().expect("rows were published");
            check_views(&client, &context, &live, &on_time, now).await;
        }
    }

    let context = format!(
        "seed {seed}, parallelism {parallelism}, after all {} statements",
        statements.len()
    );
    let watermark = watermark.get().expect("rows were published");
    let all_views: Vec<&WindowView> = ORACLE_VIEWS.iter().collect();
    check_views(&client, &context, &all_views, &on_time, watermark).await;
    assert!(
        !late.is_empty() && late.len() < all_bids.len() / 3,
        "{context}: the generator should make some rows late, made {} of {}",
        late.len(),
        all_bids.len()
    );
    assert!(
        ORACLE_VIEWS[2].expected_n(&on_time, watermark) > 0,
        "{context}: some windows should have closed"
    );
    assert_lines(
        &client,
        "SELECT partition, \"offset\", event_time, watermark FROM weir_late_rows \
         WHERE source = 'bids'",
        &late,
        &context,
    )
    .await;
    assert_lines(
        &client,
        "SELECT messages, late_rows, dead_letters, watermark FROM weir_source_stats \
         WHERE source = 'bids'",
        &[format!(
            "{}|{}|0|{}",
            all_bids.len(),
            late.len(),
            ts(watermark)
        )],
        &context,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windowed_views_match_batch_oracle() {
    for seed in [7, 19, 2026, 90_001] {
        check_seed(seed).await;
    }
}

// 3. Views across a clean restart and a kill -9 of the real binary.

/// FLUSHes, then checks that each view holds exactly its expected lines.
async fn assert_views(client: &Client, expected: &[(&WindowView, Vec<String>)], when: &str) {
    flush(client).await;
    for (view, rows) in expected {
        let what = format!("{} {when}", view.name);
        assert_lines(client, &view.contents_sql(), rows, &what).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_survive_restart() {
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let totals = WindowView {
        name: "totals",
        slide_s: 10,
        size_s: 10,
        aggregates: "count(*) AS n, sum(price) AS total",
        on_close: false,
    };
    let closed = WindowView {
        name: "closed",
        slide_s: 10,
        size_s: 10,
        aggregates: "count(*) AS n",
        on_close: true,
    };

    let server = BinaryServer::start(&data, &log).await;
    let client = server.connect().await;
    run(&client, &create_source(None)).await;
    run(&client, &totals.create_sql()).await;
    run(&client, &closed.create_sql()).await;
    run(
        &client,
        &insert_sql("bids", &bids(&[(1, 10, 1), (2, 20, 4)])),
    )
    .await;
    // The watermark reaches 10:00:11 and closes [10:00:00, 10:00:10).
    run(
        &client,
        &insert_sql("bids", &bids(&[(1, 30, 12), (2, 40, 16)])),
    )
    .await;
    let first = [
        (
            &totals,
            windows(
                10,
                &[(0, "1|1|10"), (0, "2|1|20"), (10, "1|1|30"), (10, "2|1|40")],
            ),
        ),
        (&closed, windows(10, &[(0, "1|1"), (0, "2|1")])),
    ];
    assert_views(&client, &first, "before any restart").await;
    drop(client);
    let status = server.stop().await;
    assert!(status.success(), "weir should exit cleanly, got {status}");

    let server = BinaryServer::start(&data, &log).await;
    let client = server.connect().await;
    assert_views(&client, &first, "after a clean restart").await;
    // 10:00:09 is late only if the watermark (10:00:11) survived the restart; 10:00:25 moves it
    // to 10:00:20, which closes [10:00:10, 10:00:20).
    run(
        &client,
        &insert_sql("bids", &bids(&[(1, 50, 9), (1, 60, 18), (2, 70, 25)])),
    )
    .await;
    let second = [
        (
            &totals,
            windows(
                10,
                &[
                    (0, "1|1|10"),
                    (0, "2|1|20"),
                    (10, "1|2|90"),
                    (10, "2|1|40"),
                    (20, "2|1|70"),
                ],
            ),
        ),
        (
            &closed,
            windows(10, &[(0, "1|1"), (0, "2|1"), (10, "1|2"), (10, "2|1")]),
        ),
    ];
    assert_views(&client, &second, "after inserts following a clean restart").await;
    drop(client);
    server.kill9().await;

    let server = BinaryServer::start(&data, &log).await;
    let client = server.connect().await;
    assert_views(&client, &second, "after kill -9").await;
    // After the crash: 10:00:14 is late, 10:00:20 is exactly at the watermark (on time), and
    // 10:00:36 moves it to 10:00:31, which closes [10:00:20, 10:00:30).
    run(
        &client,
        &insert_sql("bids", &bids(&[(1, 80, 14), (1, 1, 20), (2, 5, 36)])),
    )
    .await;
    let third = [
        (
            &totals,
            windows(
                10,
                &[
                    (0, "1|1|10"),
                    (0, "2|1|20"),
                    (10, "1|2|90"),
                    (10, "2|1|40"),
                    (20, "1|1|1"),
                    (20, "2|1|70"),
                    (30, "2|1|5"),
                ],
            ),
        ),
        (
            &closed,
            windows(
                10,
                &[
                    (0, "1|1"),
                    (0, "2|1"),
                    (10, "1|2"),
                    (10, "2|1"),
                    (20, "1|1"),
                    (20, "2|1"),
                ],
            ),
        ),
    ];
    assert_views(&client, &third, "after inserts following kill -9").await;
    drop(client);
    let status = server.stop().await;
    assert!(status.success(), "weir should exit cleanly, got {status}");
    assert_no_panics(&log);
    assert_no_error_lines(&log);
}

// 4. Bad messages are dead-lettered one by one; the source reads on.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_do_not_stop_the_source() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    let per_auction = WindowView {
        name: "per_auction",
        slide_s: 10,
        size_s: 10,
        aggregates: "count(*) AS n, count(price) AS priced, sum(price) AS total",
        on_close: false,
    };
    // A source binds a topic that already exists, as one more reader of it.
    run(&client, "CREATE TOPIC raw_bids").await;
    run(&client, &create_source(Some("raw_bids"))).await;
    run(&client, &per_auction.create_sql()).await;

    let payloads = [
        r#"{"auction": 1, "price": 10, "ts": "2026-01-01 10:00:01"}"#,
        // Malformed JSON: the object never closes.
        r#"{"auction": 1, "price": 20, "ts": "2026-01-01 10:00:02""#,
        // A string where a BIGINT belongs.
        r#"{"auction": 1, "price": "abc", "ts": "2026-01-01 10:00:02"}"#,
        // No event time: NULL, then missing.
        r#"{"auction": 1, "price": 5, "ts": null}"#,
        r#"{"auction": 1, "price": 5}"#,
        // Missing non-time fields are NULL; extra fields are ignored.
        r#"{"auction": 2, "ts": "2026-01-01 10:00:03", "bidder": 99}"#,
        r#"{"price": 7, "ts": "2026-01-01 10:00:04", "channel": "web"}"#,
        r#"{"auction": 1, "price": 30, "ts": "2026-01-01 10:00:05"}"#,
    ];
    run(&client, &raw_publish_sql("raw_bids", &payloads)).await;
    flush(&client).await;

    let dead_letters: Vec<String> = (1..5)
        .map(|offset| format!("bids|0|{offset}|{}", payloads[offset]))
        .collect();
    assert_lines(
        &client,
        "SELECT source, partition, \"offset\", payload FROM weir_dead_letters",
        &dead_letters,
        "one dead letter per bad message",
    )
    .await;
    for reason in lines(&client, "SELECT reason FROM weir_dead_letters").await {
        assert!(
            reason != "NULL" && !reason.trim().is_empty(),
            "a dead letter says why: {reason:?}"
        );
    }
    let stats = "SELECT dead_letters, late_rows FROM weir_source_stats WHERE source = 'bids'";
    assert_lines(&client, stats, &["4|0".to_string()], "source stats").await;
    assert_lines(
        &client,
        &per_auction.contents_sql(),
        &windows(10, &[(0, "1|2|2|40"), (0, "2|1|0|NULL"), (0, "NULL|1|1|7")]),
        "only the valid messages count",
    )
    .await;

    // Still reading: a publish through the source lands in the view.
    run(&client, &insert_sql("bids", &bids(&[(2, 9, 6)]))).await;
    flush(&client).await;
    let expected = windows(10, &[(0, "1|2|2|40"), (0, "2|2|1|9"), (0, "NULL|1|1|7")]);
    assert_lines(
        &client,
        &per_auction.contents_sql(),
        &expected,
        "after a valid publish following the bad messages",
    )
    .await;

    // A view created now backfills the same history: same rows, and no second dead letter for
    // any bad message.
    let backfilled = WindowView {
        name: "per_auction_backfilled",
        ..per_auction
    };
    run(&client, &backfilled.create_sql()).await;
    flush(&client).await;
    assert_lines(
        &client,
        &backfilled.contents_sql(),
        &expected,
        "a backfilled view over the same messages",
    )
    .await;
    assert_lines(
        &client,
        "SELECT source, partition, \"offset\", payload FROM weir_dead_letters",
        &dead_letters,
        "a backfilling view dead-letters nothing twice",
    )
    .await;
    assert_lines(
        &client,
        stats,
        &["4|0".to_string()],
        "source stats after backfill",
    )
    .await;
    server.shutdown().await;
}
