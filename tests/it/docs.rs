//! Runs every ```sql block of docs/sql.md, in order, against a fresh server,
//! so the SQL reference cannot drift from what Weir accepts.

use crate::harness::TestServer;

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

#[tokio::test]
async fn sql_reference_examples_run() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/sql.md"))
        .expect("docs/sql.md");
    let blocks = sql_blocks(&doc);
    assert!(blocks.len() >= 4, "docs/sql.md lost its examples");
    let server = TestServer::start().await;
    let client = server.connect().await;
    for block in &blocks {
        if let Err(e) = client.simple_query(block).await {
            panic!("docs/sql.md example failed: {e:?}\n{block}");
        }
    }
    // The examples leave known data behind; check one result end to end.
    let rows = client
        .query("SELECT owner, balance FROM accounts ORDER BY id", &[])
        .await
        .expect("query accounts");
    let owners: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(owners, ["ada", "grace", "edsger"]);
    server.shutdown().await;
}
