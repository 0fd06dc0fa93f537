//! Runs every ```sql block of docs/sql.md and docs/queue.md, in order, against
//! a fresh server per page, so the references cannot drift from what Weir
//! accepts.

use crate::harness::{self, TestServer};

fn sql_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```sql") => current = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

/// Runs a page's examples on a fresh server; returns the server and a client.
async fn run_examples(page: &str) -> (TestServer, tokio_postgres::Client) {
    let path = format!("{}/docs/{page}", env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(&path).expect("read the docs page");
    let blocks = sql_blocks(&doc);
    assert!(blocks.len() >= 4, "docs/{page} lost its examples");
    let server = TestServer::start().await;
    let client = server.connect().await;
    for block in &blocks {
        if let Err(e) = client.simple_query(block).await {
            panic!("docs/{page} example failed: {e:?}\n{block}");
        }
    }
    (server, client)
}

#[tokio::test]
async fn queue_reference_examples_run() {
    let (server, client) = run_examples("queue.md").await;
    let rows = client
        .query("SELECT count(*) FROM orders", &[])
        .await
        .expect("count orders");
    let count: i64 = rows[0].get(0);
    assert_eq!(count, 2);
    server.shutdown().await;
}

#[tokio::test]
async fn sql_reference_examples_run() {
    let (server, client) = run_examples("sql.md").await;
    // The examples leave known data behind; check one result end to end.
    let rows = client
        .query("SELECT owner, balance FROM accounts ORDER BY id", &[])
        .await
        .expect("query accounts");
    let owners: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(owners, ["ada", "grace", "edsger"]);
    // The streaming examples: the first window closed (watermark 10:00:11) with the
    // late 10:00:02 bid dropped and listed, and the bad CSV line dead-lettered.
    let hot = harness::simple_rows(
        &client,
        "SELECT window_start, auction, bids, top FROM hot_auctions ORDER BY 1, 2",
    )
    .await;
    let text = |v: &[&str]| v.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
    assert_eq!(
        hot,
        vec![
            text(&["2026-01-01 10:00:00", "1", "2", "150"]),
            text(&["2026-01-01 10:00:00", "2", "1", "80"]),
        ]
    );
    let late = harness::simple_rows(&client, "SELECT event_time FROM weir_late_rows").await;
    assert_eq!(late, vec![text(&["2026-01-01 10:00:02"])]);
    let dead =
        harness::simple_rows(&client, "SELECT source, \"offset\" FROM weir_dead_letters").await;
    assert_eq!(dead, vec![text(&["clicks", "1"])]);
    let pages = harness::simple_rows(&client, "SELECT page, clicks FROM pages").await;
    assert_eq!(pages, vec![text(&["/home", "1"])]);
    // After the examples' CHECKPOINT, one more click: the next checkpoint of the updating
    // `pages` view writes only what changed, as a second file of its chain.
    client
        .batch_execute(
            "INSERT INTO clicks_raw (payload) VALUES ('/cart,2026-01-01 10:00:05'); \
             FLUSH; CHECKPOINT",
        )
        .await
        .expect("one more click, checkpointed");
    let newest = harness::simple_rows(
        &client,
        "SELECT incremental, chain_files > 1, bytes < chain_bytes FROM weir_checkpoints \
         WHERE dataflow = 'pages' ORDER BY epoch DESC LIMIT 1",
    )
    .await;
    assert_eq!(
        newest,
        vec![text(&["t", "t", "t"])],
        "pages' newest checkpoint"
    );
    // The sink published each closed window once, at the checkpoint.
    let sunk = harness::simple_rows(&client, "SELECT payload FROM closed_windows ORDER BY 1").await;
    assert_eq!(
        sunk.len(),
        hot.len(),
        "one message per closed window: {sunk:?}"
    );
    assert!(
        sunk[0][0]
            .as_deref()
            .is_some_and(|p| p.contains("\"top\":150")),
        "{sunk:?}"
    );
    server.shutdown().await;
}

/// The README's first session, every ```sql block in order, through the real psql binary;
/// then the streaming part's results are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_session_runs_through_psql() {
    let readme = std::fs::read_to_string(format!("{}/README.md", env!("CARGO_MANIFEST_DIR")))
        .expect("read README.md");
    let blocks = sql_blocks(&readme);
    assert!(blocks.len() >= 3, "README lost its session blocks");
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("session.sql");
    std::fs::write(&script, blocks.concat()).expect("write the session script");
    let server = TestServer::start().await;
    let out = harness::psql(
        server.pg_addr(),
        &["-f", script.to_str().expect("utf-8 path")],
    )
    .await
    .ok();
    // psql printed the window that closed, and the late bid.
    assert!(
        out.contains("2026-01-01 10:00:03"),
        "late row missing:\n{out}"
    );
    let client = server.connect().await;
    let text = |v: &[&str]| v.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
    assert_eq!(
        harness::simple_rows(&client, "SELECT * FROM per_window ORDER BY 1, 2").await,
        vec![
            text(&["2026-01-01 10:00:00", "1", "1", "100"]),
            text(&["2026-01-01 10:00:00", "2", "1", "50"]),
        ]
    );
    assert_eq!(
        harness::simple_rows(&client, "SELECT * FROM sliding ORDER BY 1").await,
        vec![
            text(&["2026-01-01 09:59:55", "2"]),
            text(&["2026-01-01 10:00:00", "2"]),
            text(&["2026-01-01 10:00:10", "1"]),
            text(&["2026-01-01 10:00:15", "1"]),
        ]
    );
    assert_eq!(
        harness::simple_rows(&client, "SELECT source, \"offset\" FROM weir_dead_letters").await,
        vec![text(&["bid_events", "4"])]
    );
    server.shutdown().await;
}
