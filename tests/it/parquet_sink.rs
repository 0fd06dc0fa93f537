//! The Parquet sink through pgwire: `CREATE SINK ... WITH (connector = 'parquet')` from a
//! windowed view to a local directory and to S3 (moto's server), read back with the `parquet`
//! crate's Arrow reader and with pyarrow's dataset discovery; the changelog mode; the targets
//! and views it refuses; and exactly-once output across a `kill -9` of the real binary.
//!
//! Files appear only when their epoch's checkpoint commits, after `rollover` closed them, which
//! follows wall-clock time: the tests poll the committed files under a deadline
//! ([`poll_until`]), running `CHECKPOINT` in the loop where the server checkpoints rarely.
//! The oracle is the view itself: the files must hold exactly its rows, each once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::{Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use tempfile::TempDir;
use tokio_postgres::Client;
use weir::format::pgtext::to_pg_text;

use crate::harness::{
    BinaryServer, TestServer, assert_no_panics, committed_parquet_files, files_under, poll_until,
    simple_rows, temp_dir_with_log, within,
};
use crate::s3::{self, MotoServer};

const SOURCE: &str = "CREATE SOURCE bids (auction BIGINT, price BIGINT, ts TIMESTAMP, \
     WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) FORMAT JSON";

/// Final rows once a window closes: each window's rows reach the sink once.
const WINDOW_VIEW: &str = "CREATE MATERIALIZED VIEW per_window AS \
     SELECT window_start, auction, count(*) AS n, max(price) AS top \
     FROM TUMBLE(bids, ts, INTERVAL '10' SECOND) \
     GROUP BY window_start, window_end, auction EMIT ON WINDOW CLOSE";

/// The view's rows in the files' column order.
const WINDOW_ROWS: &str = "SELECT window_start, auction, n, top FROM per_window";

/// Rows that close windows [10:00:00, 10:00:10) and [10:00:10, 10:00:20) (watermark 10:00:20).
const FIRST_BIDS: &[(i64, i64, i64)] =
    &[(1, 10, 1), (2, 20, 3), (1, 30, 12), (2, 5, 14), (1, 7, 25)];
/// Then [10:00:20, 10:00:30) closes too (watermark 10:00:33).
const MORE_BIDS: &[(i64, i64, i64)] = &[(3, 9, 27), (1, 4, 38)];

fn first_windows() -> Vec<String> {
    sorted(vec![
        "2026-01-01 10:00:00|1|1|10".into(),
        "2026-01-01 10:00:00|2|1|20".into(),
        "2026-01-01 10:00:10|1|1|30".into(),
        "2026-01-01 10:00:10|2|1|5".into(),
    ])
}

fn all_windows() -> Vec<String> {
    let mut rows = first_windows();
    rows.push("2026-01-01 10:00:20|1|1|7".into());
    rows.push("2026-01-01 10:00:20|3|1|9".into());
    sorted(rows)
}

/// `INSERT INTO bids` of `(auction, price, seconds after 10:00:00)`.
fn insert_bids(bids: &[(i64, i64, i64)]) -> String {
    let values: Vec<String> = bids
        .iter()
        .map(|(auction, price, at)| {
            format!(
                "({auction}, {price}, '2026-01-01 10:{:02}:{:02}')",
                at / 60,
                at % 60
            )
        })
        .collect();
    format!("INSERT INTO bids VALUES {}", values.join(", "))
}

fn sorted(mut rows: Vec<String>) -> Vec<String> {
    rows.sort();
    rows
}

async fn run(client: &Client, sql: &str) {
    within(sql, client.batch_execute(sql))
        .await
        .unwrap_or_else(|err| panic!("`{sql}` failed: {err:?}"));
}

/// The rows of `sql` as sorted `a|b|c` lines.
async fn lines(client: &Client, sql: &str) -> Vec<String> {
    sorted(
        simple_rows(client, sql)
            .await
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|v| v.unwrap_or_else(|| "NULL".into()))
                    .collect::<Vec<_>>()
                    .join("|")
            })
            .collect(),
    )
}

/// The sink `archive` of `per_window` into the local directory `dir`, rolling over quickly.
fn archive_sink(dir: &Path) -> String {
    format!(
        "CREATE SINK archive FROM per_window WITH (connector = 'parquet', \
         path = 'file://{}', rollover = '100ms')",
        dir.display()
    )
}

/// A `CREATE SINK` that fails: its SQLSTATE, message and hint.
async fn refused(client: &Client, sql: &str) -> (String, String, String) {
    match within(sql, client.batch_execute(sql)).await {
        Ok(()) => panic!("`{sql}` succeeded, expected an error"),
        Err(err) => {
            let db = err
                .as_db_error()
                .unwrap_or_else(|| panic!("`{sql}`: not a server error: {err}"));
            (
                db.code().code().to_string(),
                db.message().to_string(),
                db.hint().unwrap_or_default().to_string(),
            )
        }
    }
}

/// Decodes Hive's `%XX` escapes in a partition directory value.
fn unescape_hive(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = value
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).expect("partition values are UTF-8")
}

/// The rows of one Parquet file as `a|b|c` lines in PostgreSQL's text, with the Hive partition
/// value (from the file's directory, as `col=value`) first when there is one.
fn parquet_rows(bytes: Bytes, partition: Option<&str>) -> Vec<String> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).expect("a parquet file");
    let compression = builder.metadata().row_group(0).column(0).compression();
    assert_eq!(
        compression,
        parquet::basic::Compression::SNAPPY,
        "files are Snappy-compressed"
    );
    let reader = builder.build().expect("a parquet reader");
    let prefix = partition.map(|dir| {
        let (_, value) = dir.split_once('=').expect("a col=value directory");
        unescape_hive(value)
    });
    let mut rows = Vec::new();
    for batch in reader {
        let batch: RecordBatch = batch.expect("a record batch");
        let columns: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| cast(&to_pg_text(c), &DataType::Utf8).expect("text"))
            .collect();
        for row in 0..batch.num_rows() {
            let mut values: Vec<String> = prefix.iter().cloned().collect();
            for column in &columns {
                let text = column
                    .as_any()
                    .downcast_ref::<arrow::array::StringArray>()
                    .expect("utf8");
                values.push(if text.is_null(row) {
                    "NULL".into()
                } else {
                    text.value(row).to_string()
                });
            }
            rows.push(values.join("|"));
        }
    }
    rows
}

/// The committed rows under a local sink directory: every `.parquet` file outside the
/// `_`-prefixed staging directory, sorted.
fn local_rows(dir: &Path) -> Vec<String> {
    let mut rows = Vec::new();
    for file in committed_parquet_files(dir) {
        let partition = file
            .parent()
            .and_then(|p| p.to_str())
            .filter(|p| !p.is_empty());
        let bytes = std::fs::read(dir.join(&file)).expect("read a parquet file");
        rows.extend(parquet_rows(Bytes::from(bytes), partition));
    }
    sorted(rows)
}

/// The committed rows under `prefix` in an S3 bucket, and the keys they came from.
async fn s3_rows(store: &dyn ObjectStore, prefix: &str) -> (Vec<String>, Vec<String>) {
    let prefix = object_store::path::Path::from(prefix);
    let objects: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .expect("list the bucket");
    let mut rows = Vec::new();
    let mut keys = Vec::new();
    for object in objects {
        let key = object.location.as_ref().to_string();
        let rel = key
            .strip_prefix(prefix.as_ref())
            .unwrap_or(&key)
            .trim_start_matches('/');
        if rel.starts_with("_weir_staging") {
            continue;
        }
        let partition = rel.rsplit_once('/').map(|(dir, _)| dir.to_string());
        let bytes = store
            .get(&object.location)
            .await
            .expect("get an object")
            .bytes()
            .await
            .expect("read an object");
        rows.extend(parquet_rows(bytes, partition.as_deref()));
        keys.push(key);
    }
    (sorted(rows), keys)
}

/// A server with the source and the windowed view, checkpointing every 100 ms.
async fn server_with_window_view() -> (TestServer, Client) {
    let server = TestServer::start().await;
    let client = server.connect().await;
    run(&client, "SET checkpoint_interval = '100ms'").await;
    run(&client, SOURCE).await;
    run(&client, WINDOW_VIEW).await;
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_windows_reach_local_parquet_files_once() {
    let (server, client) = server_with_window_view().await;
    let out = TempDir::new().expect("a temp dir");
    // A directory that does not exist yet: the sink creates it.
    let dir = out.path().join("archive");
    run(&client, &archive_sink(&dir)).await;
    let shown = simple_rows(&client, "SHOW SINKS").await;
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(
        shown[0][3].as_deref(),
        Some(format!("parquet file://{}", dir.display()).as_str()),
        "SHOW SINKS shows the target: {shown:?}"
    );

    run(&client, &insert_bids(FIRST_BIDS)).await;
    run(&client, "FLUSH").await;
    assert_eq!(lines(&client, WINDOW_ROWS).await, first_windows());
    poll_until("the first windows' files to be committed", || async {
        (local_rows(&dir) == first_windows()).then_some(())
    })
    .await;

    run(&client, &insert_bids(MORE_BIDS)).await;
    run(&client, "FLUSH").await;
    let want = lines(&client, WINDOW_ROWS).await;
    assert_eq!(want, all_windows());
    poll_until("every window's file to be committed", || async {
        (local_rows(&dir) == want).then_some(())
    })
    .await;
    let files = files_under(&dir);
    assert!(
        files
            .iter()
            .all(|f| f.to_string_lossy().starts_with("part-archive-")
                && f.extension().is_some_and(|e| e == "parquet")),
        "only committed part files outside staging: {files:?}"
    );

    // Dropping the sink keeps what it committed.
    run(&client, "DROP SINK archive").await;
    assert!(simple_rows(&client, "SHOW SINKS").await.is_empty());
    assert_eq!(local_rows(&dir), want);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_files_are_a_hive_dataset_pyarrow_reads() {
    let (server, client) = server_with_window_view().await;
    let out = TempDir::new().expect("a temp dir");
    let dir = out.path();
    run(
        &client,
        &format!(
            "CREATE SINK by_auction FROM per_window WITH (connector = 'parquet', \
             path = 'file://{}', partition_by = 'auction', rollover = '100ms', \
             file_size_max = '64KiB')",
            dir.display()
        ),
    )
    .await;
    run(&client, &insert_bids(FIRST_BIDS)).await;
    run(&client, &insert_bids(MORE_BIDS)).await;
    run(&client, "FLUSH").await;
    // Partition value first, then the file's columns.
    let want = lines(
        &client,
        "SELECT auction, window_start, n, top FROM per_window",
    )
    .await;
    assert_eq!(want.len(), 6, "{want:?}");
    poll_until("the partitioned files to be committed", || async {
        (local_rows(dir) == want).then_some(())
    })
    .await;
    let dirs: std::collections::BTreeSet<String> = files_under(dir)
        .iter()
        .filter(|f| !f.starts_with("_weir_staging"))
        .filter_map(|f| f.parent().map(|p| p.display().to_string()))
        .collect();
    assert_eq!(
        dirs.into_iter().collect::<Vec<_>>(),
        ["auction=1", "auction=2", "auction=3"]
    );

    // pyarrow's dataset discovery sees the same rows: Hive partitions, staging skipped.
    if let Some(python) = s3::python() {
        let columns = ["auction", "window_start", "n", "top"];
        let read = pyarrow_rows(&python, &dir.display().to_string(), &columns, None).await;
        assert_eq!(read, want, "pyarrow reads what the view holds");
    }
    server.shutdown().await;
}

/// The rows pyarrow's dataset discovery (Hive partitioning) finds under `source`, a local
/// directory or, with `moto`, `bucket/prefix` there, as sorted `a|b|c` lines of `columns`.
async fn pyarrow_rows(
    python: &Path,
    source: &str,
    columns: &[&str],
    moto: Option<&MotoServer>,
) -> Vec<String> {
    const SCRIPT: &str = r#"
import sys, pyarrow.dataset as ds, pyarrow.fs as pafs
source, columns, endpoint = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
fs = None
if endpoint:
    host = endpoint.removeprefix("http://")
    fs = pafs.S3FileSystem(access_key=sys.argv[4], secret_key=sys.argv[5], region=sys.argv[6],
                           endpoint_override=host, scheme="http")
table = ds.dataset(source, filesystem=fs, format="parquet", partitioning="hive").to_table()
for row in table.to_pylist():
    print("|".join(str(row[c]) for c in columns))
"#;
    let mut command = tokio::process::Command::new(python);
    command
        .args(["-c", SCRIPT, source, &columns.join(",")])
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .kill_on_drop(true);
    match moto {
        Some(moto) => command.args([
            moto.endpoint(),
            s3::ACCESS_KEY_ID,
            s3::SECRET_ACCESS_KEY,
            s3::REGION,
        ]),
        None => command.arg(""),
    };
    let output = within("pyarrow to read the dataset", command.output())
        .await
        .expect("run pyarrow");
    assert!(
        output.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    sorted(
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_sink_partitions_by_window_start() {
    let Some(moto) = MotoServer::start().await else {
        return;
    };
    moto.create_bucket("lake").await;
    let (server, client) = server_with_window_view().await;
    run(
        &client,
        &format!(
            "CREATE SINK hot FROM per_window WITH (connector = 'parquet', \
             path = 's3://lake/hot/', partition_by = 'window_start', rollover = '100ms', {})",
            moto.sink_options()
        ),
    )
    .await;
    run(&client, &insert_bids(FIRST_BIDS)).await;
    run(&client, &insert_bids(MORE_BIDS)).await;
    run(&client, "FLUSH").await;
    let want = lines(&client, WINDOW_ROWS).await;
    assert_eq!(want, all_windows());
    let store = moto.store("lake");
    let keys = poll_until("the S3 files to be committed", || async {
        let (rows, keys) = s3_rows(store.as_ref(), "hot").await;
        (rows == want).then_some(keys)
    })
    .await;
    assert!(
        keys.iter()
            .all(|k| k.starts_with("hot/window_start=2026-01-01 10%3A00%3A")
                && k.contains("/part-hot-")),
        "Hive-escaped window directories: {keys:?}"
    );
    let windows: std::collections::BTreeSet<&str> = keys
        .iter()
        .filter_map(|k| k.rsplit_once('/').map(|(d, _)| d))
        .collect();
    assert_eq!(windows.len(), 3, "one directory per window: {keys:?}");
    // pyarrow over S3 decodes the Hive-escaped directories back to the window starts.
    if let Some(python) = s3::python() {
        let columns = ["window_start", "auction", "n", "top"];
        let read = pyarrow_rows(&python, "lake/hot", &columns, Some(&moto)).await;
        assert_eq!(read, want, "pyarrow reads what the view holds");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changelog_sink_writes_an_op_column() {
    let server = TestServer::start().await;
    let client = server.connect().await;
    run(&client, "SET checkpoint_interval = '100ms'").await;
    run(&client, SOURCE).await;
    run(
        &client,
        "CREATE MATERIALIZED VIEW per_auction AS \
         SELECT auction, count(*) AS n FROM bids GROUP BY auction",
    )
    .await;
    let out = TempDir::new().expect("a temp dir");
    let (state, message, hint) = refused(
        &client,
        &format!(
            "CREATE SINK counts FROM per_auction WITH (connector = 'parquet', path = 'file://{}')",
            out.path().display()
        ),
    )
    .await;
    assert_eq!(state, "0A000", "{message}");
    assert!(
        hint.contains("EMIT ON WINDOW CLOSE") && hint.contains("changelog = 'true'"),
        "the hint says what to do: {hint}"
    );

    run(
        &client,
        &format!(
            "CREATE SINK counts FROM per_auction WITH (connector = 'parquet', \
             path = 'file://{}', changelog = 'true', rollover = '100ms')",
            out.path().display()
        ),
    )
    .await;
    run(&client, &insert_bids(&[(1, 10, 1)])).await;
    run(&client, "FLUSH").await;
    poll_until("the first count to be committed", || async {
        (local_rows(out.path()) == ["1|1|insert"]).then_some(())
    })
    .await;
    // A second bid updates the count: the old row is deleted, the new one inserted.
    run(&client, &insert_bids(&[(1, 20, 2)])).await;
    run(&client, "FLUSH").await;
    assert_eq!(
        lines(&client, "SELECT auction, n FROM per_auction").await,
        ["1|2"]
    );
    poll_until(
        "the update to be committed as a delete and an insert",
        || async {
            (local_rows(out.path()) == ["1|1|delete", "1|1|insert", "1|2|insert"]).then_some(())
        },
    )
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sinks_that_cannot_write_are_refused() {
    let (server, client) = server_with_window_view().await;
    let out = TempDir::new().expect("a temp dir");
    let blocker = out.path().join("a-file");
    std::fs::write(&blocker, b"not a directory").expect("write a file");
    let sink = |with: &str| {
        format!("CREATE SINK bad FROM per_window WITH (connector = 'parquet', {with})")
    };
    // A sink into `out` with one more option.
    let into_out = |option: &str| {
        sink(&format!(
            "path = 'file://{}', {option}",
            out.path().display()
        ))
    };
    let mut cases: Vec<(String, &str, Vec<String>)> = vec![
        (
            sink(&format!("path = 'file://{}/sub'", blocker.display())),
            "58030",
            vec![blocker.display().to_string()],
        ),
        // /sys refuses new directories even to root.
        (
            sink("path = 'file:///sys/weir-parquet-sink'"),
            "42501",
            vec!["/sys/weir-parquet-sink".into()],
        ),
        (
            into_out("partition_by = 'region'"),
            "42703",
            vec!["region".into()],
        ),
        (into_out("colour = 'red'"), "22023", vec!["colour".into()]),
        (
            into_out("file_size_max = 'huge'"),
            "22023",
            vec!["file_size_max".into()],
        ),
        (
            sink("path = 'ftp://host/dir'"),
            "22023",
            vec!["ftp://host/dir".into()],
        ),
    ];
    let moto = MotoServer::start().await;
    if let Some(moto) = &moto {
        cases.push((
            sink(&format!("path = 's3://missing/x', {}", moto.sink_options())),
            "42704",
            vec!["missing".into(), moto.endpoint().to_string()],
        ));
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let nowhere = format!("http://127.0.0.1:{port}");
        cases.push((
            sink(&format!(
                "path = 's3://lake/x', endpoint = '{nowhere}', region = '{}', \
                 access_key_id = 'k', secret_access_key = 's', allow_http = 'true'",
                s3::REGION
            )),
            "08001",
            vec!["lake".into(), nowhere.clone()],
        ));
    }
    for (sql, want, named) in cases {
        let (state, message, hint) = refused(&client, &sql).await;
        assert_eq!(state, want, "`{sql}`: {message}");
        for name in named {
            let text = format!("{message} {hint}");
            assert!(text.contains(&name), "`{sql}`: `{text}` should name {name}");
        }
        assert!(!hint.is_empty(), "`{sql}`: no hint for {message}");
    }
    assert!(
        simple_rows(&client, "SHOW SINKS").await.is_empty(),
        "refused sinks leave nothing behind"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_sink_writes_each_row_once_across_kill_9() {
    let (dir, log) = temp_dir_with_log();
    let data = dir.path().join("data");
    let files = dir.path().join("files");
    // Checkpoints only when the test says so.
    let args = ["--checkpoint-interval", "1h"];
    let server = BinaryServer::start_with(&data, &log, &args).await;
    let client = server.connect().await;
    run(&client, SOURCE).await;
    run(&client, WINDOW_VIEW).await;
    run(&client, &archive_sink(&files)).await;
    run(&client, &insert_bids(FIRST_BIDS)).await;
    run(&client, "FLUSH").await;
    poll_until("the first windows to be committed", || async {
        run(&client, "CHECKPOINT").await;
        (local_rows(&files) == first_windows()).then_some(())
    })
    .await;

    // The next window closes and its file is staged, but no checkpoint commits it before
    // the crash.
    run(&client, &insert_bids(MORE_BIDS)).await;
    run(&client, "FLUSH").await;
    // Staged under `_weir_staging/<sink>-<id>/` (the id keeps a re-created sink's names apart).
    let staging = files.join("_weir_staging");
    poll_until("the next file to be staged", || async {
        (!files_under(&staging).is_empty()).then_some(())
    })
    .await;
    assert_eq!(local_rows(&files), first_windows(), "staged is not visible");
    drop(client);
    server.kill9().await;

    let server = BinaryServer::start_with(&data, &log, &args).await;
    let client = server.connect().await;
    run(&client, "FLUSH").await;
    poll_until(
        "every window to be committed once after recovery",
        || async {
            run(&client, "CHECKPOINT").await;
            let rows = local_rows(&files);
            assert!(
                rows.len() <= all_windows().len(),
                "duplicated rows after recovery: {rows:?}"
            );
            (rows == all_windows()).then_some(())
        },
    )
    .await;
    let by_file: BTreeMap<PathBuf, usize> = committed_parquet_files(&files)
        .into_iter()
        .map(|f| {
            let n = parquet_rows(
                Bytes::from(std::fs::read(files.join(&f)).expect("read")),
                None,
            )
            .len();
            (f, n)
        })
        .collect();
    assert_eq!(by_file.values().sum::<usize>(), 6, "{by_file:?}");
    drop(client);
    server.kill9().await;
    assert_no_panics(&log);
}
