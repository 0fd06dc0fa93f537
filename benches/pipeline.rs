//! `cargo bench --bench pipeline -- [flags]`: what checkpoints cost, and the RabbitMQ → window →
//! Parquet pipeline with checkpoints on and off. Method and results: `docs/benchmarks.md`.
//!
//! Two parts, each run `--runs` times on a fresh data directory (under `/var/tmp`, the disk
//! RabbitMQ writes to) and, for part 2, a fresh randomly named queue; medians are reported.
//! Within a run the configurations are measured one after the other, so each ratio compares
//! numbers of the same run.
//!
//! 1. *checkpoint*: `--events` JSON events over `--keys` distinct keys are published to a
//!    built-in source's topic (not timed); then `CREATE MATERIALIZED VIEW` (count and sum per
//!    key, an updating view) + `FLUSH` is timed with checkpoints effectively off (interval 1 h)
//!    and with `SET checkpoint_interval = '1s'`. Then a `CHECKPOINT` statement is timed at that
//!    state, and its duration and bytes are read from `weir_checkpoints`; beside it, writing and
//!    fsyncing a file of the same size on the same disk. Then 1 % of the keys get one more
//!    event and one more `CHECKPOINT` (incremental: only those groups) is timed.
//! 2. *rabbitmq*: a durable queue is filled with `--rabbit-events` persistent JSON events, with
//!    publisher confirms (not timed). Timed: `CREATE SOURCE` (rabbitmq) + an `EMIT ON WINDOW
//!    CLOSE` TUMBLE(1 s) view + a Parquet sink, until every window is in a committed file: a
//!    deadline poll of `weir_sources.appended` and `weir_sinks.rows`, then `CHECKPOINT` repeated
//!    until the committed files hold every window (a file is committed by the first checkpoint
//!    after its rollover). Three configurations ([`PIPELINES`]): `ack = 'append'` with the
//!    interval 1 h (no checkpoint during the run: the baseline) and 1 s, and the default
//!    `ack = 'checkpoint'` with 1 s (acks wait for the readers' checkpoints, which the source
//!    asks for early when half the prefetch waits). Baselines: lapin alone draining as many pre-filled messages (consume,
//!    `basic.ack` multiple per batch), and DataFusion's batch query over the decoded rows.
//!
//! Output: Markdown tables on stdout, progress on stderr. Nothing is written into the repository,
//! and every queue the bench declares is deleted before it moves on. If RabbitMQ does not answer,
//! part 2 is skipped (exit 0), unless `WEIR_REQUIRE_BROKERS=1`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, TimeUnit};
use bytes::Bytes;
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use futures::{FutureExt, StreamExt, TryStreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use weir::engine::{Message, Output, Session, Weir, WeirConfig};
use weir::format::decode::{RowDecoder, SourceFormat};
use weir::plan::window::WindowFunction;

const USAGE: &str = "\
usage: cargo bench --bench pipeline -- [--runs R] [--events N] [--keys LIST]
                                       [--rabbit-events N] [--rabbit-keys K] [--checkpoints C]
                                       [--parts checkpoint,rabbitmq]
  --runs R           runs per measurement; medians are reported (default 3)
  --events N         events of part 1 (default 2000000)
  --keys LIST        distinct keys of part 1, one measurement each (default 100000,1000000)
  --rabbit-events N  events pre-filled into the queue in part 2 (default 500000)
  --rabbit-keys K    distinct keys in part 2 (default 1000)
  --checkpoints C    CHECKPOINT statements at the end of each part-1 run, at the same state;
                     their median is reported (default 1; more for profiling)
  --parts LIST       checkpoint (part 1), rabbitmq (part 2); default both
environment:
  WEIR_BENCH_AMQP       RabbitMQ URI (default amqp://guest:guest@127.0.0.1:5672/%2f)
  WEIR_REQUIRE_BROKERS  =1: fail instead of skipping part 2 when RabbitMQ does not answer";

const DEFAULT_AMQP_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// CPU time below this (five of /proc's 10 ms ticks) is not reported as a rate.
const CPU_MEASURABLE: Duration = Duration::from_millis(50);
/// Where data directories go: a real disk (not tmpfs), the one /var/lib/rabbitmq is on.
const DATA_PARENT: &str = "/var/tmp";
/// "Checkpoints off": longer than any run, so only the explicit `CHECKPOINT` takes one.
const INTERVAL_OFF: Duration = Duration::from_secs(3600);
/// "Checkpoints on", as `SET checkpoint_interval` takes it.
const INTERVAL_ON: &str = "1s";
/// Messages per `Weir::publish` call while filling part 1's topic (one fsync each).
const PUBLISH_CHUNK: usize = 10_000;
/// RabbitMQ publishes in flight before the filler waits for the oldest confirm.
const CONFIRMS_IN_FLIGHT_MAX: usize = 1000;
/// The source's and the lapin baseline's prefetch, and so their largest batch.
const PREFETCH: u16 = 1000;
/// How often the pipeline's progress is polled (each poll is a query of two system relations).
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How often the end of a pipeline run repeats `CHECKPOINT` until the last file is committed.
const CHECKPOINT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// A pipeline run, a queue fill or a drain that takes longer is declared broken.
const RUN_DEADLINE: Duration = Duration::from_secs(900);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// 2026-01-01 00:00:00 UTC in epoch milliseconds: part 2's event `i` happens at
/// `BASE_MS + i / EVENTS_PER_MS`.
const BASE_MS: i64 = 1_767_225_600_000;
/// 10,000 events per second of event time.
const EVENTS_PER_MS: u64 = 10;
/// The last event of part 2: far past every other event, so every window before it closes.
const CLOSING_MS: i64 = BASE_MS + 100_000_000;

const VIEW_SQL: &str = "CREATE MATERIALIZED VIEW per_key AS \
     SELECT k, count(*) AS n, sum(v) AS total FROM src GROUP BY k";

const WINDOW_QUERY: &str = "SELECT k, window_start, count(*) AS n, sum(v) AS total \
     FROM TUMBLE(src, ts, INTERVAL '1' SECOND) GROUP BY k, window_start, window_end";

struct Options {
    runs: usize,
    events: usize,
    keys: Vec<usize>,
    rabbit_events: usize,
    rabbit_keys: usize,
    checkpoints: usize,
    checkpoint_part: bool,
    rabbitmq_part: bool,
    amqp_uri: String,
    require_brokers: bool,
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        runs: 3,
        events: 2_000_000,
        keys: vec![100_000, 1_000_000],
        rabbit_events: 500_000,
        rabbit_keys: 1000,
        checkpoints: 1,
        checkpoint_part: true,
        rabbitmq_part: true,
        amqp_uri: std::env::var("WEIR_BENCH_AMQP").unwrap_or_else(|_| DEFAULT_AMQP_URI.into()),
        require_brokers: std::env::var("WEIR_REQUIRE_BROKERS").is_ok_and(|v| v == "1"),
    };
    let positive = |name: &str, value: String| -> Result<usize> {
        match value.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("{name} must be a positive whole number, not {value:?}\n{USAGE}"),
        }
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            // `cargo bench` passes --bench to every bench binary.
            "--bench" => {}
            "--runs" => options.runs = positive("--runs", value()?)?,
            "--events" => options.events = positive("--events", value()?)?,
            "--keys" => {
                options.keys = value()?
                    .split(',')
                    .map(|k| positive("--keys", k.trim().to_string()))
                    .collect::<Result<_>>()?;
            }
            "--rabbit-events" => options.rabbit_events = positive("--rabbit-events", value()?)?,
            "--rabbit-keys" => options.rabbit_keys = positive("--rabbit-keys", value()?)?,
            "--checkpoints" => options.checkpoints = positive("--checkpoints", value()?)?,
            "--parts" => {
                let parts = value()?;
                options.checkpoint_part = false;
                options.rabbitmq_part = false;
                for part in parts.split(',') {
                    match part.trim() {
                        "checkpoint" => options.checkpoint_part = true,
                        "rabbitmq" => options.rabbitmq_part = true,
                        other => bail!("unknown part {other:?}\n{USAGE}"),
                    }
                }
            }
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(options)
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

/// Threads of this process: a run that leaves its dataflows or ingest behind shows here.
fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Wall and CPU time of a timed part.
#[derive(Clone, Copy, Debug)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

struct Stopwatch {
    wall: Instant,
    cpu: Duration,
}

impl Stopwatch {
    fn start() -> Stopwatch {
        Stopwatch {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    fn sample(&self) -> Sample {
        Sample {
            wall: self.wall.elapsed(),
            cpu: cpu_time().saturating_sub(self.cpu),
        }
    }
}

/// Events per CPU-second; NaN when the CPU time is too short for 10 ms ticks to mean much.
fn per_cpu_s(events: f64, s: &Sample) -> f64 {
    if s.cpu < CPU_MEASURABLE {
        return f64::NAN;
    }
    events / s.cpu.as_secs_f64()
}

/// `v` with `precision` decimals; `n/a` for NaN.
fn num(v: f64, precision: usize) -> String {
    if v.is_nan() {
        "n/a".to_string()
    } else {
        format!("{v:.precision$}")
    }
}

/// The median of the values that are not NaN (NaN if none is).
fn median_f64(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|v| !v.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn list(values: impl IntoIterator<Item = f64>, precision: usize) -> String {
    values
        .into_iter()
        .map(|v| format!("{v:.precision$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn query(session: &mut Session, sql: &str) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for statement in session.parse(sql)? {
        let prepared = session.prepare(statement, sql).await?;
        if let Output::Rows { stream, .. } = session.execute(&prepared, None).await? {
            out.extend(stream.try_collect::<Vec<_>>().await?);
        }
    }
    Ok(out)
}

async fn run_sql(session: &mut Session, sql: &str) -> Result<()> {
    query(session, sql)
        .await
        .with_context(|| format!("running {sql}"))?;
    Ok(())
}

/// The first row's columns as BIGINT (NULL as `None`); no row: an empty vector.
async fn first_row(session: &mut Session, sql: &str) -> Result<Vec<Option<i64>>> {
    let batches = query(session, sql)
        .await
        .with_context(|| format!("running {sql}"))?;
    let Some(batch) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(Vec::new());
    };
    batch
        .columns()
        .iter()
        .map(|c| {
            let c = cast(c, &DataType::Int64)?;
            let c = c.as_primitive::<Int64Type>();
            Ok((!c.is_null(0)).then(|| c.value(0)))
        })
        .collect()
}

async fn first_text(session: &mut Session, sql: &str) -> Result<Option<String>> {
    let batches = query(session, sql)
        .await
        .with_context(|| format!("running {sql}"))?;
    let Some(batch) = batches.iter().find(|b| b.num_rows() > 0) else {
        return Ok(None);
    };
    let c = cast(batch.column(0), &DataType::Utf8)?;
    let c = c.as_string::<i32>();
    Ok((!c.is_null(0)).then(|| c.value(0).to_string()))
}

async fn open_weir(dir: &Path) -> Result<Weir> {
    let mut config = WeirConfig::new(dir);
    config.checkpoint_interval = INTERVAL_OFF;
    Ok(Weir::open(config).await?)
}

fn data_dir(prefix: &str) -> Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(DATA_PARENT)?)
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Checkpoints {
    /// The server's interval, 1 h: no checkpoint happens during the run.
    Off,
    /// `SET checkpoint_interval = '1s'` before the view (and sink) is created.
    On,
}

impl Checkpoints {
    fn label(self) -> &'static str {
        match self {
            Checkpoints::Off => "interval 1 h (off)",
            Checkpoints::On => "interval 1 s",
        }
    }

    async fn apply(self, session: &mut Session) -> Result<()> {
        if self == Checkpoints::On {
            run_sql(
                session,
                &format!("SET checkpoint_interval = '{INTERVAL_ON}'"),
            )
            .await?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: checkpoint cost over an updating view with many keys.

/// Event `i` of part 1: key `(i mod keys) * KEY_STRIDE mod keys`, a permutation of
/// `0..keys` when the stride is coprime with `keys` (checked), so every key gets
/// `events / keys` events, spread over the stream rather than in key order.
fn keyed_event(i: u64, keys: u64) -> String {
    format!(
        r#"{{"k":{},"v":{}}}"#,
        (i % keys) * KEY_STRIDE % keys,
        i % 97
    )
}

const KEY_STRIDE: u64 = 2_654_435_761;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

struct CheckpointRun {
    /// `CREATE MATERIALIZED VIEW` + `FLUSH`, and the `CREATE` alone.
    backfill: Sample,
    create: Duration,
    /// Checkpoints the view took during the backfill (its last epoch before `CHECKPOINT`).
    backfill_checkpoints: u64,
    /// Their total `duration_ms`, as far as `weir_checkpoints` keeps them (the newest 32).
    backfill_checkpoint_ms: u64,
    /// The `CHECKPOINT` statement's wall time, and its checkpoint's `duration_ms` and `bytes`
    /// from `weir_checkpoints` (medians over `--checkpoints` statements).
    statement_ms: f64,
    duration_ms: f64,
    bytes: u64,
    /// Then 1 % of the keys change and one more `CHECKPOINT` is timed: its wall time,
    /// `duration_ms`, `bytes`, and whether it was incremental.
    changed_statement_ms: f64,
    changed_duration_ms: f64,
    changed_bytes: u64,
    changed_incremental: bool,
}

/// One run of part 1: a fresh data directory, the events published, the view timed.
async fn checkpoint_run(
    events: usize,
    keys: usize,
    mode: Checkpoints,
    lines: &[Bytes],
    checkpoints: usize,
) -> Result<CheckpointRun> {
    let dir = data_dir("weir-bench-ckpt-")?;
    let weir = open_weir(dir.path()).await?;
    let mut session = weir.session();
    run_sql(
        &mut session,
        "CREATE SOURCE src (k BIGINT, v BIGINT) \
         WITH (connector = 'builtin', topic = 'events') FORMAT JSON",
    )
    .await?;
    for chunk in lines.chunks(PUBLISH_CHUNK) {
        let messages = chunk
            .iter()
            .map(|payload| Message {
                key: None,
                payload: payload.clone(),
                headers: Vec::new(),
            })
            .collect();
        weir.publish("events", messages).await?;
    }
    run_sql(&mut session, "FLUSH").await?;
    mode.apply(&mut session).await?;

    let clock = Stopwatch::start();
    run_sql(&mut session, VIEW_SQL).await?;
    let create = clock.wall.elapsed();
    run_sql(&mut session, "FLUSH").await?;
    let backfill = clock.sample();

    let check = first_row(&mut session, "SELECT count(*), sum(n) FROM per_key").await?;
    if check != [Some(keys as i64), Some(events as i64)] {
        bail!("the view holds {check:?} (groups, events), not {keys} groups of {events} events");
    }
    let during = first_row(
        &mut session,
        "SELECT max(epoch), sum(duration_ms) FROM weir_checkpoints WHERE dataflow = 'per_key'",
    )
    .await?;
    let backfill_checkpoints = during.first().copied().flatten().unwrap_or(0) as u64;
    let backfill_checkpoint_ms = during.get(1).copied().flatten().unwrap_or(0) as u64;

    // The first CHECKPOINT at this state, then (for profiling) more at the same state.
    let (mut statements, mut durations, mut bytes) = (Vec::new(), Vec::new(), 0);
    let mut last_epoch = backfill_checkpoints;
    for _ in 0..checkpoints {
        let started = Instant::now();
        run_sql(&mut session, "CHECKPOINT").await?;
        statements.push(started.elapsed().as_secs_f64() * 1e3);
        let last = first_row(
            &mut session,
            "SELECT epoch, duration_ms, bytes FROM weir_checkpoints \
             WHERE dataflow = 'per_key' ORDER BY epoch DESC LIMIT 1",
        )
        .await?;
        let [Some(epoch), Some(duration_ms), Some(b)] = last[..] else {
            bail!("weir_checkpoints has no checkpoint of per_key after CHECKPOINT ({last:?})");
        };
        // With the 1 s interval a periodic checkpoint may slip in (the view's last changes
        // came just before FLUSH returned): the epoch then moves on by more than one.
        if (epoch as u64) <= last_epoch {
            bail!("CHECKPOINT made no new epoch (the newest is {epoch}, it was {last_epoch})");
        }
        last_epoch = epoch as u64;
        durations.push(duration_ms as f64);
        bytes = b as u64;
    }
    // 1 % of the keys change (one event each); the next checkpoint writes those groups.
    let changed = (keys / 100).max(1) as u64;
    let messages = (0..changed)
        .map(|i| Message {
            key: None,
            payload: Bytes::from(format!(r#"{{"k":{},"v":1}}"#, i * 100 % keys as u64)),
            headers: Vec::new(),
        })
        .collect();
    weir.publish("events", messages).await?;
    run_sql(&mut session, "FLUSH").await?;
    let started = Instant::now();
    run_sql(&mut session, "CHECKPOINT").await?;
    let changed_statement_ms = started.elapsed().as_secs_f64() * 1e3;
    let last = first_row(
        &mut session,
        "SELECT epoch, duration_ms, bytes, incremental::int FROM weir_checkpoints \
         WHERE dataflow = 'per_key' ORDER BY epoch DESC LIMIT 1",
    )
    .await?;
    let [
        Some(epoch),
        Some(changed_duration_ms),
        Some(changed_bytes),
        Some(incremental),
    ] = last[..]
    else {
        bail!("weir_checkpoints has no checkpoint of per_key after CHECKPOINT ({last:?})");
    };
    if (epoch as u64) <= last_epoch {
        bail!("CHECKPOINT made no new epoch (the newest is {epoch}, it was {last_epoch})");
    }
    let check = first_row(&mut session, "SELECT sum(n) FROM per_key").await?;
    if check != [Some((events as u64 + changed) as i64)] {
        bail!(
            "the view counts {check:?} events after the change, not {}",
            events as u64 + changed
        );
    }
    // Stop the dataflow before the data directory goes.
    run_sql(&mut session, "DROP MATERIALIZED VIEW per_key").await?;
    run_sql(&mut session, "DROP SOURCE src").await?;
    drop(session);
    drop(weir);
    Ok(CheckpointRun {
        backfill,
        create,
        backfill_checkpoints,
        backfill_checkpoint_ms,
        statement_ms: median_f64(statements),
        duration_ms: median_f64(durations),
        bytes,
        changed_statement_ms,
        changed_duration_ms: changed_duration_ms as f64,
        changed_bytes: changed_bytes as u64,
        changed_incremental: incremental == 1,
    })
}

/// Writes `bytes` bytes to a new file on the data disk and fsyncs it (and its directory): the
/// I/O a checkpoint of that size cannot avoid.
fn write_and_sync(bytes: u64) -> Result<Duration> {
    use std::io::Write;
    let dir = data_dir("weir-bench-fsync-")?;
    let data = vec![0x5a_u8; bytes as usize];
    let started = Instant::now();
    let path = dir.path().join("state");
    let mut file = std::fs::File::create(&path)?;
    file.write_all(&data)?;
    file.sync_all()?;
    std::fs::File::open(dir.path())?.sync_all()?;
    Ok(started.elapsed())
}

/// DataFusion over the decoded rows of part 1: the view's query as one batch query.
async fn batch_group_by(batches: &[RecordBatch]) -> Result<u64> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .context("no decoded rows")?;
    let ctx = SessionContext::new();
    ctx.register_table(
        "src",
        Arc::new(MemTable::try_new(schema, vec![batches.to_vec()])?),
    )?;
    let out = ctx
        .sql("SELECT k, count(*) AS n, sum(v) AS total FROM src GROUP BY k")
        .await?
        .collect()
        .await?;
    Ok(out.iter().map(|b| b.num_rows() as u64).sum())
}

fn decode(schema: Arc<Schema>, required: Vec<usize>, lines: &[Bytes]) -> Result<Vec<RecordBatch>> {
    let decoder = RowDecoder::try_new(SourceFormat::Json, schema, required)?;
    let mut out = Vec::new();
    for chunk in lines.chunks(4096) {
        let refs: Vec<&[u8]> = chunk.iter().map(|b| b.as_ref()).collect();
        let decoded = decoder.decode(&refs)?;
        if !decoded.errors.is_empty() {
            bail!("undecodable event: {:?}", decoded.errors[0]);
        }
        out.push(decoded.rows);
    }
    Ok(out)
}

async fn checkpoint_part(options: &Options) -> Result<()> {
    let mut rows = Vec::new();
    for &keys in &options.keys {
        if gcd(KEY_STRIDE, keys as u64) != 1 {
            bail!("--keys {keys} shares a factor with the key stride {KEY_STRIDE}");
        }
        let lines: Vec<Bytes> = (0..options.events as u64)
            .map(|i| Bytes::from(keyed_event(i, keys as u64)))
            .collect();
        let payload_bytes: usize = lines.iter().map(Bytes::len).sum();
        eprintln!(
            "part 1: {} events over {keys} keys, {:.1} MiB of JSON",
            options.events,
            payload_bytes as f64 / (1 << 20) as f64
        );
        let mut off = Vec::new();
        let mut on = Vec::new();
        let mut io = Vec::new();
        for run in 0..options.runs {
            // Alternate which configuration goes first, so drift (page cache, the other
            // builds on this machine) does not always favour the same one.
            let order = if run % 2 == 0 {
                [Checkpoints::Off, Checkpoints::On]
            } else {
                [Checkpoints::On, Checkpoints::Off]
            };
            for mode in order {
                let r =
                    checkpoint_run(options.events, keys, mode, &lines, options.checkpoints).await?;
                eprintln!(
                    "  {keys} keys, {}, run {run}: backfill {:.2} s (CREATE {:.0} ms; {:.2} CPU-s; {} checkpoints, {} ms), \
                     CHECKPOINT {:.0} ms (duration_ms {}, {:.1} MiB); {} threads after, load {}",
                    mode.label(),
                    r.backfill.wall.as_secs_f64(),
                    r.create.as_secs_f64() * 1e3,
                    r.backfill.cpu.as_secs_f64(),
                    r.backfill_checkpoints,
                    r.backfill_checkpoint_ms,
                    r.statement_ms,
                    r.duration_ms,
                    r.bytes as f64 / (1 << 20) as f64,
                    threads(),
                    load_average()
                );
                match mode {
                    Checkpoints::Off => {
                        io.push(write_and_sync(r.bytes)?);
                        off.push(r);
                    }
                    Checkpoints::On => on.push(r),
                }
            }
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new("v", DataType::Int64, true),
        ]));
        let mut batch_runs = Vec::new();
        for _ in 0..options.runs {
            let clock = Stopwatch::start();
            let decoded = decode(schema.clone(), Vec::new(), &lines)?;
            let groups = batch_group_by(&decoded).await?;
            if groups != keys as u64 {
                bail!("DataFusion found {groups} groups, not {keys}");
            }
            batch_runs.push(clock.sample());
        }
        rows.push((keys, payload_bytes, off, on, io, batch_runs));
    }

    let n = options.events as f64;
    let rate = |s: &Sample| n / s.wall.as_secs_f64() / 1e6;
    let cpu_rate = |s: &Sample| per_cpu_s(n, s) / 1e6;
    println!(
        "\n### Checkpoint cost: `{}` over {} events\n",
        VIEW_SQL.trim_start_matches("CREATE MATERIALIZED VIEW per_key AS "),
        options.events
    );
    println!(
        "| keys | checkpoints | M events/s | M events/CPU-s | checkpoints taken during the backfill | × of off (same run) | M events/s of the runs |"
    );
    println!("| ---: | --- | ---: | ---: | ---: | ---: | --- |");
    for (keys, _, off, on, _, batch) in &rows {
        let ratios: Vec<f64> = off
            .iter()
            .zip(on)
            .map(|(o, c)| o.backfill.wall.as_secs_f64() / c.backfill.wall.as_secs_f64())
            .collect();
        for (mode, runs) in [(Checkpoints::Off, off), (Checkpoints::On, on)] {
            let ratio = match mode {
                Checkpoints::Off => "1".to_string(),
                Checkpoints::On => format!(
                    "{:.2} ({})",
                    median_f64(ratios.clone()),
                    list(ratios.clone(), 2)
                ),
            };
            println!(
                "| {keys} | {} | {:.2} | {} | {} | {ratio} | {} |",
                mode.label(),
                median_f64(runs.iter().map(|r| rate(&r.backfill))),
                num(median_f64(runs.iter().map(|r| cpu_rate(&r.backfill))), 2),
                list(runs.iter().map(|r| r.backfill_checkpoints as f64), 0),
                list(runs.iter().map(|r| rate(&r.backfill)), 2),
            );
        }
        println!(
            "| {keys} | DataFusion batch (decode + GROUP BY) | {:.2} | {} | | | {} |",
            median_f64(batch.iter().map(rate)),
            num(median_f64(batch.iter().map(cpu_rate)), 2),
            list(batch.iter().map(rate), 2),
        );
    }
    println!(
        "\n| keys | `CHECKPOINT` wall ms | `duration_ms` | state MiB | write + fsync of as many bytes, ms | MB/s of the checkpoint | `CHECKPOINT` ms of the runs (after off, after on) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for (keys, _, off, on, io, _) in &rows {
        let all: Vec<&CheckpointRun> = off.iter().chain(on).collect();
        let wall = median_f64(all.iter().map(|r| r.statement_ms));
        let duration = median_f64(all.iter().map(|r| r.duration_ms));
        let bytes = median_f64(all.iter().map(|r| r.bytes as f64));
        println!(
            "| {keys} | {wall:.0} | {duration:.0} | {:.1} | {:.1} | {:.0} | {}; {} |",
            bytes / (1 << 20) as f64,
            median_f64(io.iter().map(|d| d.as_secs_f64() * 1e3)),
            bytes / 1e6 / (duration.max(1.0) / 1e3),
            list(off.iter().map(|r| r.statement_ms), 0),
            list(on.iter().map(|r| r.statement_ms), 0),
        );
    }
    println!(
        "\n| keys | full: `duration_ms`, MiB | after 1 % of the keys changed: incremental | `CHECKPOINT` wall ms | `duration_ms` | MiB | × of full `duration_ms` | × of full bytes | `duration_ms` of the runs |"
    );
    println!("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for (keys, _, off, on, _, _) in &rows {
        let all: Vec<&CheckpointRun> = off.iter().chain(on).collect();
        let full_ms = median_f64(all.iter().map(|r| r.duration_ms));
        let full_bytes = median_f64(all.iter().map(|r| r.bytes as f64));
        let ms = median_f64(all.iter().map(|r| r.changed_duration_ms));
        let bytes = median_f64(all.iter().map(|r| r.changed_bytes as f64));
        let incremental = all.iter().filter(|r| r.changed_incremental).count();
        println!(
            "| {keys} | {full_ms:.0}, {:.1} | {incremental} of {} runs | {:.0} | {ms:.0} | {:.2} | {:.3} | {:.3} | {} |",
            full_bytes / (1 << 20) as f64,
            all.len(),
            median_f64(all.iter().map(|r| r.changed_statement_ms)),
            bytes / (1 << 20) as f64,
            ms / full_ms.max(1.0),
            bytes / full_bytes.max(1.0),
            list(all.iter().map(|r| r.changed_duration_ms), 0),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Part 2: RabbitMQ → TUMBLE(1 s) EOWC → Parquet.

/// Event `i` of part 2: key `i % keys`, 10 events per millisecond of event time.
fn timed_event(i: u64, keys: u64) -> String {
    format!(
        r#"{{"k":{},"v":{},"ts":{}}}"#,
        i % keys,
        i % 97,
        BASE_MS + (i / EVENTS_PER_MS) as i64
    )
}

fn closing_event() -> String {
    format!(r#"{{"k":0,"v":0,"ts":{CLOSING_MS}}}"#)
}

/// The windows the view must emit for events `0..events`: `(key, window start)` pairs.
fn expected_windows(events: u64, keys: u64) -> usize {
    let mut windows = HashSet::new();
    for i in 0..events {
        let ts = BASE_MS + (i / EVENTS_PER_MS) as i64;
        windows.insert((i % keys, ts - ts.rem_euclid(1000)));
    }
    windows.len()
}

fn queue_name() -> String {
    format!("weir_bench_pipeline_{:08x}", rand::random::<u32>())
}

async fn amqp_connect(uri: &str) -> Result<Connection> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| anyhow!("no answer within {CONNECT_TIMEOUT:?}"))?
    .map_err(|e| anyhow!("{e}"))
}

async fn confirmed(confirm: PublisherConfirm) -> Result<()> {
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("RabbitMQ did not take a message: {other:?}"),
    }
}

/// Declares `queue` (durable, classic) and fills it with `lines`, persistent, each confirmed.
async fn fill_queue(connection: &Connection, queue: &str, lines: &[Bytes]) -> Result<()> {
    let channel: Channel = connection.create_channel().await?;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut in_flight = std::collections::VecDeque::with_capacity(CONFIRMS_IN_FLIGHT_MAX);
    for line in lines {
        if in_flight.len() == CONFIRMS_IN_FLIGHT_MAX {
            confirmed(in_flight.pop_front().context("a publish in flight")?).await?;
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                line,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
        in_flight.push_back(confirm);
    }
    for confirm in in_flight {
        confirmed(confirm).await?;
    }
    channel.close(200, "OK".into()).await?;
    Ok(())
}

async fn delete_queue(connection: &Connection, queue: &str) {
    let deleted = async {
        let channel = connection.create_channel().await?;
        channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await?;
        channel.close(200, "OK".into()).await?;
        Ok::<_, lapin::Error>(())
    };
    if let Err(e) = deleted.await {
        eprintln!("could not delete RabbitMQ queue {queue}: {e}");
    }
}

/// Runs `f` over a fresh queue filled with `lines` (not timed), deleting the queue afterwards
/// whatever `f` returned.
async fn with_filled_queue<T>(
    connection: &Connection,
    lines: &[Bytes],
    f: impl AsyncFnOnce(&str) -> Result<T>,
) -> Result<T> {
    let queue = queue_name();
    let filled = tokio::time::timeout(RUN_DEADLINE, fill_queue(connection, &queue, lines))
        .await
        .map_err(|_| anyhow!("filling {queue} took longer than {RUN_DEADLINE:?}"));
    let result = match filled {
        Ok(Ok(())) => f(&queue).await,
        Ok(Err(e)) | Err(e) => Err(e),
    };
    delete_queue(connection, &queue).await;
    result
}

/// lapin alone: drain `count` pre-filled messages (batches of up to the prefetch, one
/// `basic.ack` multiple per batch, as Weir's ingest does), then one `basic.qos` round trip so
/// the last ack has reached the broker. Returns the time and the payload bytes read.
async fn lapin_drain(uri: &str, queue: &str, count: usize) -> Result<(Sample, u64)> {
    let clock = Stopwatch::start();
    let connection = amqp_connect(uri).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + RUN_DEADLINE;
    let (mut received, mut bytes) = (0usize, 0u64);
    while received < count {
        let first = tokio::time::timeout_at(deadline, consumer.next())
            .await
            .map_err(|_| anyhow!("drained {received} of {count} before the deadline"))?
            .context("the consumer ended")??;
        let mut last_tag = first.delivery_tag;
        received += 1;
        bytes += first.data.len() as u64;
        while received < count {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => {
                    let delivery = delivery?;
                    last_tag = delivery.delivery_tag;
                    received += 1;
                    bytes += delivery.data.len() as u64;
                }
                Some(None) => bail!("the consumer ended"),
                None => break,
            }
        }
        channel
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await?;
    }
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let sample = clock.sample();
    channel.close(200, "OK".into()).await?;
    connection.close(200, "OK".into()).await?;
    Ok((sample, bytes))
}

struct PipelineRun {
    /// `CREATE SOURCE` to the `CHECKPOINT` that commits the last files.
    total: Sample,
    /// `CREATE SOURCE` until the source had acknowledged every message (each after its append).
    ingested: Duration,
    /// `CREATE SOURCE` until the sink had written every window.
    written: Duration,
    /// `CHECKPOINT` statements until the last file was committed.
    final_checkpoints: u64,
    /// Checkpoints the sink took (its last epoch), and the median `duration_ms` of those
    /// `weir_checkpoints` keeps.
    sink_checkpoints: u64,
    sink_checkpoint_ms: f64,
    /// Parquet files committed.
    files: usize,
}

/// Every committed `.parquet` file under `dir` (not the `_weir_staging` area).
fn committed_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.file_name().is_some_and(|n| n == "_weir_staging") {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet") {
                out.push(path);
            }
        }
    }
    out
}

/// The rows of the committed files, from their footers; each file is read once.
#[derive(Default)]
struct CommittedFiles {
    rows: HashMap<PathBuf, usize>,
}

impl CommittedFiles {
    fn rows(&mut self, dir: &Path) -> Result<usize> {
        for path in committed_files(dir) {
            if let std::collections::hash_map::Entry::Vacant(entry) = self.rows.entry(path) {
                let file = std::fs::File::open(entry.key())?;
                let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
                entry.insert(builder.metadata().file_metadata().num_rows() as usize);
            }
        }
        Ok(self.rows.values().sum())
    }
}

/// Rows and the sum of column `n` over the committed files.
fn committed_rows(dir: &Path) -> Result<(usize, usize, i64)> {
    let files = committed_files(dir);
    let (mut rows, mut events) = (0usize, 0i64);
    for path in &files {
        let file = std::fs::File::open(path)?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
        for batch in reader {
            let batch = batch?;
            rows += batch.num_rows();
            let n = batch
                .column_by_name("n")
                .with_context(|| format!("{} has no column n", path.display()))?;
            let n = cast(n, &DataType::Int64)?;
            events += n.as_primitive::<Int64Type>().iter().flatten().sum::<i64>();
        }
    }
    Ok((files.len(), rows, events))
}

/// Part 2's configurations: a label, the checkpoint interval, the source's `ack`.
const PIPELINES: [(&str, Checkpoints, &str); 3] = [
    (
        "interval 1 h (off), ack = 'append'",
        Checkpoints::Off,
        "append",
    ),
    ("interval 1 s, ack = 'append'", Checkpoints::On, "append"),
    (
        "interval 1 s, ack = 'checkpoint' (default)",
        Checkpoints::On,
        "checkpoint",
    ),
];

/// One run of part 2 over a filled queue.
async fn pipeline_run(
    uri: &str,
    queue: &str,
    events: usize,
    windows: usize,
    (mode, ack): (Checkpoints, &str),
) -> Result<PipelineRun> {
    let dir = data_dir("weir-bench-pipeline-")?;
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out)?;
    let weir = open_weir(&dir.path().join("data")).await?;
    let mut session = weir.session();
    mode.apply(&mut session).await?;
    let messages = events as i64 + 1;

    let clock = Stopwatch::start();
    run_sql(
        &mut session,
        &format!(
            "CREATE SOURCE src (k BIGINT, v BIGINT, ts TIMESTAMP, \
             WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
             WITH (connector = 'rabbitmq', url = '{uri}', queue = '{queue}', declare = 'true', \
             prefetch = '{PREFETCH}', ack = '{ack}') FORMAT JSON"
        ),
    )
    .await?;
    run_sql(
        &mut session,
        &format!("CREATE MATERIALIZED VIEW per_second AS {WINDOW_QUERY} EMIT ON WINDOW CLOSE"),
    )
    .await?;
    run_sql(
        &mut session,
        &format!(
            "CREATE SINK archive FROM per_second WITH (connector = 'parquet', \
             path = 'file://{}', rollover = '1s')",
            out.display()
        ),
    )
    .await?;
    let deadline = Instant::now() + RUN_DEADLINE;
    let mut ingested = None;
    let written = loop {
        if ingested.is_none() {
            let appended = first_row(
                &mut session,
                "SELECT appended FROM weir_sources WHERE source = 'src'",
            )
            .await?;
            if appended.first().copied().flatten() >= Some(messages) {
                ingested = Some(clock.wall.elapsed());
            }
        }
        let rows = first_row(
            &mut session,
            "SELECT rows FROM weir_sinks WHERE sink = 'archive'",
        )
        .await?
        .first()
        .copied()
        .flatten()
        .unwrap_or(0);
        if rows >= windows as i64 {
            break clock.wall.elapsed();
        }
        if Instant::now() > deadline {
            let status = first_text(
                &mut session,
                "SELECT status FROM weir_sinks WHERE sink = 'archive'",
            )
            .await?;
            bail!(
                "after {RUN_DEADLINE:?} the sink wrote {rows} of {windows} windows (status {status:?})"
            );
        }
        for (what, sql) in [
            (
                "source",
                "SELECT status FROM weir_sources WHERE source = 'src'",
            ),
            (
                "sink",
                "SELECT status FROM weir_sinks WHERE sink = 'archive'",
            ),
        ] {
            if let Some(status) = first_text(&mut session, sql).await?
                && status.starts_with("stopped")
            {
                bail!("the {what} stopped: {status}");
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    // A file becomes visible when it has closed (`rollover` after it opened) and a checkpoint
    // after that has committed it; the rows still open at a checkpoint are kept in its state.
    // So: CHECKPOINT, look at the committed files (their footers), again until all are there.
    let mut committed = CommittedFiles::default();
    let mut final_checkpoints = 0u64;
    loop {
        run_sql(&mut session, "CHECKPOINT").await?;
        final_checkpoints += 1;
        if committed.rows(&out)? >= windows {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "after {RUN_DEADLINE:?} the committed files hold {} of {windows} windows",
                committed.rows(&out)?
            );
        }
        tokio::time::sleep(CHECKPOINT_POLL_INTERVAL).await;
    }
    let total = clock.sample();
    let ingested = ingested.unwrap_or(written);

    let (files, rows, counted) = committed_rows(&out)?;
    if rows != windows || counted != events as i64 {
        bail!(
            "the committed files hold {rows} windows of {counted} events, not {windows} of {events}"
        );
    }
    let sink = first_row(
        &mut session,
        "SELECT max(epoch) FROM weir_checkpoints WHERE dataflow = 'archive'",
    )
    .await?;
    let sink_checkpoints = sink.first().copied().flatten().unwrap_or(0) as u64;
    let durations = query(
        &mut session,
        "SELECT duration_ms FROM weir_checkpoints WHERE dataflow = 'archive'",
    )
    .await?;
    let sink_checkpoint_ms = median_f64(durations.iter().flat_map(|b| {
        let c = cast(b.column(0), &DataType::Int64).expect("duration_ms is BIGINT");
        c.as_primitive::<Int64Type>()
            .iter()
            .flatten()
            .map(|v| v as f64)
            .collect::<Vec<_>>()
    }));
    // Stop the sink, the view and the ingest (its AMQP consumer) before the queue goes.
    run_sql(&mut session, "DROP SINK archive").await?;
    run_sql(&mut session, "DROP MATERIALIZED VIEW per_second").await?;
    run_sql(&mut session, "DROP SOURCE src").await?;
    drop(session);
    drop(weir);
    Ok(PipelineRun {
        total,
        ingested,
        written,
        final_checkpoints,
        sink_checkpoints,
        sink_checkpoint_ms,
        files,
    })
}

/// DataFusion over the decoded rows of part 2, with Weir's TUMBLE over the same table.
async fn batch_tumble(batches: &[RecordBatch]) -> Result<u64> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .context("no decoded rows")?;
    let ctx = SessionContext::new();
    let table: Arc<dyn TableProvider> =
        Arc::new(MemTable::try_new(schema, vec![batches.to_vec()])?);
    ctx.register_table("src", table.clone())?;
    let relations = Arc::new(Mutex::new(HashMap::from([("src".to_string(), table)])));
    let lookup = Arc::new(move |name: &str| relations.lock().ok()?.get(name).cloned());
    for (name, function) in WindowFunction::all(lookup) {
        ctx.register_udtf(&name.to_uppercase(), function);
    }
    let out = ctx.sql(WINDOW_QUERY).await?.collect().await?;
    Ok(out.iter().map(|b| b.num_rows() as u64).sum())
}

async fn rabbitmq_part(options: &Options) -> Result<()> {
    let connection = match amqp_connect(&options.amqp_uri).await {
        Ok(c) => c,
        Err(e) if options.require_brokers => {
            bail!(
                "RabbitMQ at {} did not answer ({e}) and WEIR_REQUIRE_BROKERS=1",
                options.amqp_uri
            )
        }
        Err(e) => {
            eprintln!(
                "skipping part 2 (RabbitMQ → Parquet): RabbitMQ at {} did not answer ({e})",
                options.amqp_uri
            );
            println!(
                "\nPart 2 skipped: RabbitMQ at {} did not answer ({e}).",
                options.amqp_uri
            );
            return Ok(());
        }
    };
    let (events, keys) = (options.rabbit_events, options.rabbit_keys as u64);
    let mut lines: Vec<Bytes> = (0..events as u64)
        .map(|i| Bytes::from(timed_event(i, keys)))
        .collect();
    lines.push(Bytes::from(closing_event()));
    let windows = expected_windows(events as u64, keys);
    let payload_bytes: usize = lines.iter().map(Bytes::len).sum();
    eprintln!(
        "part 2: {events} events (+1 closing) over {keys} keys, {windows} windows, {:.1} MiB",
        payload_bytes as f64 / (1 << 20) as f64
    );

    let mut all: Vec<Vec<PipelineRun>> = PIPELINES.iter().map(|_| Vec::new()).collect();
    let mut drains = Vec::new();
    for run in 0..options.runs {
        let (sample, bytes) = with_filled_queue(&connection, &lines, async |queue: &str| {
            lapin_drain(&options.amqp_uri, queue, lines.len()).await
        })
        .await?;
        if bytes != payload_bytes as u64 {
            bail!("lapin drained {bytes} bytes, not {payload_bytes}");
        }
        eprintln!(
            "  lapin drain, run {run}: {:.2} s",
            sample.wall.as_secs_f64()
        );
        drains.push(sample);
        // Rotate which configuration goes first, so drift does not favour one.
        for c in (0..PIPELINES.len()).map(|i| (i + run) % PIPELINES.len()) {
            let (label, mode, ack) = PIPELINES[c];
            let r = with_filled_queue(&connection, &lines, async |queue: &str| {
                pipeline_run(&options.amqp_uri, queue, events, windows, (mode, ack)).await
            })
            .await?;
            eprintln!(
                "  weir, {label}, run {run}: committed at {:.2} s (ingested {:.2} s, written {:.2} s, \
                 {} CHECKPOINT statements, {} sink checkpoints of {:.0} ms, {} files); {} threads after, load {}",
                r.total.wall.as_secs_f64(),
                r.ingested.as_secs_f64(),
                r.written.as_secs_f64(),
                r.final_checkpoints,
                r.sink_checkpoints,
                r.sink_checkpoint_ms,
                r.files,
                threads(),
                load_average()
            );
            all[c].push(r);
        }
    }
    let _ = connection.close(200, "OK".into()).await;

    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, true),
        Field::new("v", DataType::Int64, true),
        Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), true),
    ]));
    let real = &lines[..events];
    let mut decode_runs = Vec::new();
    let mut batch_runs = Vec::new();
    for _ in 0..options.runs {
        let clock = Stopwatch::start();
        let decoded = decode(schema.clone(), vec![2], real)?;
        decode_runs.push(clock.sample());
        let clock = Stopwatch::start();
        let groups = batch_tumble(&decoded).await?;
        batch_runs.push(clock.sample());
        if groups != windows as u64 {
            bail!("DataFusion found {groups} windows, not {windows}");
        }
    }

    let n = events as f64;
    let rate = |d: Duration| n / d.as_secs_f64() / 1e3;
    let cpu_rate = |s: &Sample| per_cpu_s(n, s) / 1e3;
    println!(
        "\n### RabbitMQ → TUMBLE(1 s) count/sum per key, EOWC → Parquet: {events} events, {keys} keys, {windows} windows\n"
    );
    println!(
        "| what | k events/s | k events/CPU-s (this process) | × of the first configuration (same run) | seconds of the runs |"
    );
    println!("| --- | ---: | ---: | ---: | --- |");
    type Phase = fn(&PipelineRun) -> Duration;
    let phases: [(&str, Phase); 3] = [
        ("CREATE SOURCE → every window in a committed file", |r| {
            r.total.wall
        }),
        (
            "CREATE SOURCE → the sink wrote every window (not yet committed)",
            |r| r.written,
        ),
        (
            "CREATE SOURCE → every message appended to Weir's log",
            |r| r.ingested,
        ),
    ];
    for (what, phase) in phases {
        for (c, config_runs) in all.iter().enumerate() {
            let ratios: Vec<f64> = config_runs
                .iter()
                .zip(&all[0])
                .map(|(r, first)| phase(first).as_secs_f64() / phase(r).as_secs_f64())
                .collect();
            let ratio = if c == 0 {
                "1".to_string()
            } else {
                format!(
                    "{:.2} ({})",
                    median_f64(ratios.clone()),
                    list(ratios.clone(), 2)
                )
            };
            // CPU time is only measured over the whole run.
            let cpu = if phase(&config_runs[0]) == config_runs[0].total.wall {
                num(
                    median_f64(config_runs.iter().map(|r| cpu_rate(&r.total))),
                    1,
                )
            } else {
                String::new()
            };
            println!(
                "| Weir, {}: {what} | {:.1} | {cpu} | {ratio} | {} |",
                PIPELINES[c].0,
                median_f64(config_runs.iter().map(|r| rate(phase(r)))),
                list(config_runs.iter().map(|r| phase(r).as_secs_f64()), 2),
            );
        }
    }
    for (what, runs, precision) in [
        (
            "lapin alone: consume + ack multiple, same messages",
            &drains,
            2,
        ),
        (
            "arrow-json decode alone (Weir's RowDecoder), same bytes",
            &decode_runs,
            3,
        ),
        (
            "DataFusion batch TUMBLE over the decoded rows",
            &batch_runs,
            3,
        ),
    ] {
        println!(
            "| {what} | {:.1} | {} | | {} |",
            median_f64(runs.iter().map(|s| rate(s.wall))),
            num(median_f64(runs.iter().map(cpu_rate)), 1),
            list(runs.iter().map(|s| s.wall.as_secs_f64()), precision),
        );
    }
    println!(
        "\n| Weir | ingested s | windows written s | committed s | CHECKPOINT statements at the end | sink checkpoints | sink checkpoint median ms | committed files |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for ((label, _, _), runs) in PIPELINES.iter().zip(&all) {
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
            median_f64(runs.iter().map(|r| r.ingested.as_secs_f64())),
            median_f64(runs.iter().map(|r| r.written.as_secs_f64())),
            median_f64(runs.iter().map(|r| r.total.wall.as_secs_f64())),
            median_f64(runs.iter().map(|r| r.final_checkpoints as f64)),
            median_f64(runs.iter().map(|r| r.sink_checkpoints as f64)),
            median_f64(runs.iter().map(|r| r.sink_checkpoint_ms)),
            median_f64(runs.iter().map(|r| r.files as f64)),
        );
    }
    Ok(())
}

/// The 1-minute load average: the bench shares the machine, and says how busy it was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".to_string())
}

async fn bench(options: Options) -> Result<()> {
    println!("Load average (1 min) at the start: {}.", load_average());
    if options.checkpoint_part {
        checkpoint_part(&options).await?;
    }
    if options.rabbitmq_part {
        rabbitmq_part(&options).await?;
    }
    println!("\nLoad average (1 min) at the end: {}.", load_average());
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
            eprintln!("pipeline bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
