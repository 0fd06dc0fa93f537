//! `cargo bench --bench nexmark -- [--bids N] [--runs R] [--queries q0,q1,...]`: Weir's streaming
//! views over a Nexmark bid stream, against DataFusion's batch query over the same rows and
//! against arrow-json alone decoding the same bytes. Method and results: `docs/benchmarks.md`.
//!
//! The bid file is `../shared/nexmark/gen_nexmark.py --bids N --bids-only` (JSON lines, made
//! once into a cache directory). Every measurement runs in this process, so CPU time is the
//! process's (user + system, from /proc/self/stat) over the timed part, and peak RSS is the
//! process's high-water mark, reset before each query (/proc/self/clear_refs); for Weir it is
//! reported as growth over the resident set at the start of the view's run.
//!
//! - *decode*: arrow-json (through Weir's `RowDecoder`) over the file's lines, 4096 a batch.
//! - *batch*: the query in DataFusion over the decoded rows in a `MemTable` (TUMBLE/HOP
//!   through Weir's window table functions over that table), plan and run.
//! - *weir*: the bids are published to a topic first (not timed); then `CREATE MATERIALIZED
//!   VIEW` + `FLUSH` is timed: the view backfills the whole topic (read, decode, watermark,
//!   operators, view state).
//! - *generator*: the same views over `connector = 'nexmark'` with as many bids (no bytes to
//!   read or decode: the operators' own cost).
//!
//! Medians of `--runs` runs. Nothing is written into the repository.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use bytes::Bytes;
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use weir::engine::{Message, Output, Session, Weir, WeirConfig};
use weir::format::decode::{RowDecoder, SourceFormat};
use weir::plan::window::WindowFunction;

const USAGE: &str = "\
usage: cargo bench --bench nexmark -- [--bids N] [--runs R] [--queries LIST]
  --bids N        bids in the stream (default 2000000)
  --runs R        runs per measurement; the median is reported (default 3)
  --queries LIST  any of q0,q1,q2,tumble_count,tumble_count_updating,hop_count,tumble_max
                  (default all)
environment:
  WEIR_NEXMARK_DIR  where generated bid files are kept (default $HOME/.cache/weir-nexmark)";

struct Query {
    name: &'static str,
    what: &'static str,
    /// The view's query (over source `bids`).
    sql: &'static str,
    emit_on_window_close: bool,
}

const QUERIES: &[Query] = &[
    Query {
        name: "q0",
        what: "pass-through",
        sql: "SELECT auction, bidder, price, date_time FROM bids",
        emit_on_window_close: false,
    },
    Query {
        name: "q1",
        what: "projection (price in euros)",
        sql: "SELECT auction, bidder, price * 908 / 1000 AS price, date_time FROM bids",
        emit_on_window_close: false,
    },
    Query {
        name: "q2",
        what: "filter (auction % 123 = 0)",
        sql: "SELECT auction, price FROM bids WHERE auction % 123 = 0",
        emit_on_window_close: false,
    },
    Query {
        name: "tumble_count",
        what: "TUMBLE(10 s) count per auction, EOWC",
        sql: "SELECT window_start, window_end, auction, count(*) AS bids \
              FROM TUMBLE(bids, date_time, INTERVAL '10' SECOND) \
              GROUP BY window_start, window_end, auction",
        emit_on_window_close: true,
    },
    Query {
        name: "tumble_count_updating",
        what: "TUMBLE(10 s) count per auction, updating",
        sql: "SELECT window_start, window_end, auction, count(*) AS bids \
              FROM TUMBLE(bids, date_time, INTERVAL '10' SECOND) \
              GROUP BY window_start, window_end, auction",
        emit_on_window_close: false,
    },
    Query {
        name: "hop_count",
        what: "HOP(2 s, 10 s) count per auction, EOWC",
        sql: "SELECT window_start, window_end, auction, count(*) AS bids \
              FROM HOP(bids, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) \
              GROUP BY window_start, window_end, auction",
        emit_on_window_close: true,
    },
    Query {
        name: "tumble_max",
        what: "TUMBLE(10 s) max(price), EOWC",
        sql: "SELECT window_start, window_end, max(price) AS top \
              FROM TUMBLE(bids, date_time, INTERVAL '10' SECOND) \
              GROUP BY window_start, window_end",
        emit_on_window_close: true,
    },
];

struct Options {
    bids: usize,
    runs: usize,
    queries: Vec<&'static Query>,
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        bids: 2_000_000,
        runs: 3,
        queries: QUERIES.iter().collect(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--bench" => {}
            "--bids" => options.bids = value()?.parse().context("--bids")?,
            "--runs" => options.runs = value()?.parse().context("--runs")?,
            "--queries" => {
                let wanted = value()?;
                options.queries = QUERIES
                    .iter()
                    .filter(|q| wanted.split(',').any(|w| w == q.name))
                    .collect();
                if options.queries.is_empty() {
                    bail!("no known query in {wanted}\n{USAGE}");
                }
            }
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(options)
}

/// The bid file for `n` bids, generated once.
fn bid_file(n: usize) -> Result<PathBuf> {
    let root = std::env::var_os("WEIR_NEXMARK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/weir-nexmark")
        });
    let dir = root.join(format!("bids-{n}"));
    let file = dir.join("bids.jsonl");
    if file.exists() {
        return Ok(file);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/nexmark/gen_nexmark.py");
    eprintln!("generating {n} bids with {}", script.display());
    let status = std::process::Command::new("python3")
        .arg(&script)
        .args([
            "--bids",
            &n.to_string(),
            "--bids-only",
            "--shards",
            "1",
            "--out",
        ])
        .arg(&dir)
        .status()
        .context("running gen_nexmark.py")?;
    if !status.success() || !file.exists() {
        bail!("gen_nexmark.py failed ({status})");
    }
    Ok(file)
}

/// Process CPU time (user + system) from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields after the command: state is 0, utime is 11, stime 12 (clock ticks of 1/100 s).
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[derive(Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    rss_mib: f64,
}

fn median(mut samples: Vec<Sample>) -> Sample {
    samples.sort_by_key(|s| s.wall);
    samples[samples.len() / 2]
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Sample)> {
    reset_peak_rss();
    let (w, c) = (Instant::now(), cpu_time());
    let value = f()?;
    Ok((
        value,
        Sample {
            wall: w.elapsed(),
            cpu: cpu_time().saturating_sub(c),
            rss_mib: peak_rss_mib(),
        },
    ))
}

fn bid_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, true),
        Field::new("bidder", DataType::Int64, true),
        Field::new("price", DataType::Int64, true),
        Field::new("channel", DataType::Utf8, true),
        Field::new("url", DataType::Utf8, true),
        Field::new(
            "date_time",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            true,
        ),
        Field::new("extra", DataType::Utf8, true),
    ]))
}

fn decode_all(lines: &[&[u8]]) -> Result<Vec<RecordBatch>> {
    let decoder = RowDecoder::try_new(SourceFormat::Json, bid_schema(), vec![5])?;
    let mut out = Vec::new();
    for chunk in lines.chunks(4096) {
        let decoded = decoder.decode(chunk)?;
        if !decoded.errors.is_empty() {
            bail!("bid file has undecodable lines: {:?}", decoded.errors[0]);
        }
        out.push(decoded.rows);
    }
    Ok(out)
}

async fn run_sql(session: &mut Session, sql: &str) -> Result<u64> {
    let mut rows = 0;
    for statement in session.parse(sql)? {
        let prepared = session.prepare(statement, sql).await?;
        match session.execute(&prepared, None).await? {
            Output::Rows { stream, .. } => {
                let batches: Vec<RecordBatch> = stream.try_collect().await?;
                rows += batches.iter().map(|b| b.num_rows() as u64).sum::<u64>();
            }
            Output::Command { rows: r, .. } => rows += r.unwrap_or(0),
            _ => {}
        }
    }
    Ok(rows)
}

/// DataFusion over the decoded rows, with Weir's TUMBLE/HOP over the same table.
async fn batch_query(batches: &[RecordBatch], sql: &str) -> Result<u64> {
    let ctx = SessionContext::new();
    let table: Arc<dyn TableProvider> =
        Arc::new(MemTable::try_new(bid_schema(), vec![batches.to_vec()])?);
    ctx.register_table("bids", table.clone())?;
    let relations = Arc::new(Mutex::new(HashMap::from([("bids".to_string(), table)])));
    let lookup = Arc::new(move |name: &str| relations.lock().ok()?.get(name).cloned());
    for (name, function) in WindowFunction::all(lookup) {
        ctx.register_udtf(&name.to_uppercase(), function);
    }
    let frame = ctx.sql(sql).await?;
    let out = frame.collect().await?;
    Ok(out.iter().map(|b| b.num_rows() as u64).sum())
}

fn per_cpu_s(n: usize, s: &Sample) -> f64 {
    n as f64 / s.cpu.as_secs_f64().max(1e-9) / 1e6
}

fn per_s(n: usize, s: &Sample) -> f64 {
    n as f64 / s.wall.as_secs_f64().max(1e-9) / 1e6
}

async fn bench(options: Options) -> Result<()> {
    let file = bid_file(options.bids)?;
    let read_lines = |bytes: &[u8]| -> Vec<Vec<u8>> {
        bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let n = read_lines(&bytes).len();
    eprintln!("{n} bids, {} MiB", bytes.len() >> 20);

    // 1. Weir: publish the bids (not timed), let the source's monitor read them, then time
    //    each view's backfill. The file's bytes are dropped first so RSS is Weir's.
    let data_dir = tempfile::Builder::new()
        .prefix("weir-nexmark-")
        .tempdir_in("/var/tmp")?;
    let weir = Weir::open(WeirConfig::new(data_dir.path())).await?;
    let mut session = weir.session();
    run_sql(
        &mut session,
        "CREATE SOURCE bids (auction BIGINT, bidder BIGINT, price BIGINT, channel VARCHAR, \
         url VARCHAR, date_time TIMESTAMP, extra VARCHAR, \
         WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND) \
         WITH (connector = 'builtin', topic = 'bids_topic') FORMAT JSON",
    )
    .await?;
    run_sql(
        &mut session,
        &format!(
            "CREATE SOURCE nxbids (auction BIGINT, bidder BIGINT, price BIGINT, channel VARCHAR, \
             url VARCHAR, date_time TIMESTAMP, extra VARCHAR, \
             WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND) \
             WITH (connector = 'nexmark', events = '{n}')"
        ),
    )
    .await?;
    for chunk in read_lines(&bytes).chunks(10_000) {
        let messages = chunk
            .iter()
            .map(|l| Message {
                key: None,
                payload: Bytes::copy_from_slice(l),
                headers: Vec::new(),
            })
            .collect();
        weir.publish("bids_topic", messages).await?;
    }
    drop(bytes);
    run_sql(&mut session, "FLUSH").await?;

    let mut weir_results = Vec::new();
    for (i, q) in options.queries.iter().enumerate() {
        let emit = if q.emit_on_window_close {
            " EMIT ON WINDOW CLOSE"
        } else {
            ""
        };
        let mut topic_samples = Vec::new();
        let mut generator_samples = Vec::new();
        for run in 0..options.runs {
            for (source, samples) in [
                ("bids", &mut topic_samples),
                ("nxbids", &mut generator_samples),
            ] {
                let view = format!("v_{}_{source}_{i}_{run}", q.name);
                let sql = q
                    .sql
                    .replace("FROM bids", &format!("FROM {source}"))
                    .replace("(bids,", &format!("({source},"));
                let create = format!("CREATE MATERIALIZED VIEW {view} AS {sql}{emit}");
                reset_peak_rss();
                let before = rss_mib();
                let (w, c) = (Instant::now(), cpu_time());
                run_sql(&mut session, &create).await?;
                run_sql(&mut session, "FLUSH").await?;
                samples.push(Sample {
                    wall: w.elapsed(),
                    cpu: cpu_time().saturating_sub(c),
                    // What the view's run added at its peak: state, buffers, batches.
                    rss_mib: peak_rss_mib() - before,
                });
                run_sql(&mut session, &format!("DROP MATERIALIZED VIEW {view}")).await?;
                eprintln!(
                    "{} over {source}, run {run}: {:?}",
                    q.name, samples[run].wall
                );
            }
        }
        weir_results.push((median(topic_samples), median(generator_samples)));
    }
    drop(session);
    drop(weir);

    // 2. arrow-json alone over the same bytes, then DataFusion over the decoded rows.
    let bytes = std::fs::read(&file)?;
    let lines = read_lines(&bytes);
    drop(bytes);
    let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
    let mut decode = Vec::new();
    let mut decoded = Vec::new();
    for _ in 0..options.runs {
        decoded.clear();
        let (batches, s) = timed(|| decode_all(&refs))?;
        decode.push(s);
        decoded = batches;
    }
    let decode = median(decode);
    drop(refs);
    drop(lines);

    println!(
        "| query | what | Weir M bids/s | Weir M bids/CPU-s | Weir peak RSS growth MiB | over the generator M bids/CPU-s | DataFusion batch M bids/s | batch CPU s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| decode | arrow-json alone, same bytes | {:.2} | {:.2} | | | | {:.2} |",
        per_s(n, &decode),
        per_cpu_s(n, &decode),
        decode.cpu.as_secs_f64()
    );
    for (q, (ws, gs)) in options.queries.iter().zip(weir_results) {
        let mut batch_samples = Vec::new();
        for _ in 0..options.runs {
            reset_peak_rss();
            let (w, c) = (Instant::now(), cpu_time());
            batch_query(&decoded, q.sql).await?;
            batch_samples.push(Sample {
                wall: w.elapsed(),
                cpu: cpu_time().saturating_sub(c),
                rss_mib: peak_rss_mib(),
            });
        }
        let bs = median(batch_samples);
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {:.1} | {:.2} |",
            q.name,
            q.what,
            per_s(n, &ws),
            per_cpu_s(n, &ws),
            ws.rss_mib,
            per_cpu_s(n, &gs),
            per_s(n, &bs),
            bs.cpu.as_secs_f64(),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(bench(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nexmark bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
