//! Runs every `slt/**/*.slt` file over real pgwire, once with the simple query protocol and once
//! with the extended protocol (prepared statements, binary results), each file against a fresh
//! in-process server. All failing files are reported together.
//!
//! Files under `slt/streaming/` run twice more: with `SET streaming_parallelism = 1` and `= 2` on
//! every connection, so each view's results are checked with and without the hash exchange.
//!
//! Errors display as `{SQLSTATE}: {message}`, so a file writes `statement error 42P01`.
//! `WEIR_SLT_COMPLETE=1` rewrites the files with the actual output (simple protocol) for a human
//! to review; `WEIR_SLT_FILTER=substring` runs only the matching files.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use rust_decimal::Decimal;
use sqllogictest::{
    AsyncDB, ColumnType, DBOutput, Runner, default_column_validator, default_normalizer,
    default_validator,
};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, Row, SimpleQueryMessage};

use crate::harness::{TestServer, try_connect};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_simple_protocol() {
    if complete_mode() {
        complete_all().await;
        return;
    }
    run_all(|addr| async move { Ok::<_, SltError>(Simple(try_connect(addr).await?)) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slt_extended_protocol() {
    if complete_mode() {
        // The simple-protocol run is rewriting the files; reading them now would race with it.
        return;
    }
    run_all(|addr| async move { Ok::<_, SltError>(Extended(try_connect(addr).await?)) }).await;
}

fn complete_mode() -> bool {
    std::env::var("WEIR_SLT_COMPLETE").is_ok_and(|value| value == "1")
}

/// Runs every file with connections made by `connect`, then fails listing every failing file.
async fn run_all<D, F, Fut>(connect: F)
where
    D: AsyncDB<Error = SltError, ColumnType = SltType> + Send + 'static,
    F: Fn(SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<D, SltError>> + Send + 'static,
{
    let files = slt_files();
    assert!(
        !files.is_empty(),
        "no .slt files found under {}",
        slt_root().display()
    );
    let mut failures = Vec::new();
    for file in &files {
        let streaming = file.components().any(|c| c.as_os_str() == "streaming");
        let parallelisms: &[Option<usize>] = if streaming {
            &[Some(1), Some(2)]
        } else {
            &[None]
        };
        for &parallelism in parallelisms {
            let server = TestServer::start().await;
            let addr = server.pg_addr();
            let connect = connect.clone();
            let mut runner = Runner::new(move || {
                let connect = connect.clone();
                async move {
                    let mut db = connect(addr).await?;
                    if let Some(p) = parallelism {
                        db.run(&format!("SET streaming_parallelism = {p}")).await?;
                    }
                    Ok(db)
                }
            });
            if let Err(err) = runner.run_file_async(file).await {
                let at = parallelism.map_or(String::new(), |p| format!(" (parallelism {p})"));
                failures.push(format!("{}{at}:\n{}", file.display(), err.display(false)));
            }
            runner.shutdown_async().await;
            server.shutdown().await;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} slt files failed:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

/// Rewrites every file with the output of the simple protocol.
async fn complete_all() {
    for file in slt_files() {
        let server = TestServer::start().await;
        let addr = server.pg_addr();
        let mut runner =
            Runner::new(move || async move { Ok::<_, SltError>(Simple(try_connect(addr).await?)) });
        runner
            .update_test_file(
                &file,
                " ",
                default_validator,
                default_normalizer,
                default_column_validator,
            )
            .await
            .unwrap_or_else(|err| panic!("complete {}: {err}", file.display()));
        runner.shutdown_async().await;
        server.shutdown().await;
    }
}

fn slt_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("slt")
}

/// Every `.slt` file under `slt/`, sorted, narrowed by `WEIR_SLT_FILTER` if set.
fn slt_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|err| panic!("read {}: {err}", dir.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|ext| ext == "slt") {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&slt_root(), &mut files);
    if let Ok(filter) = std::env::var("WEIR_SLT_FILTER") {
        files.retain(|file| file.to_string_lossy().contains(&filter));
    }
    files.sort();
    files
}

/// An error from the server (with its SQLSTATE) or from rendering a result.
#[derive(Debug)]
pub struct SltError {
    sqlstate: Option<String>,
    message: String,
}

impl fmt::Display for SltError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sqlstate {
            Some(code) => write!(f, "{code}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for SltError {}

impl From<tokio_postgres::Error> for SltError {
    fn from(err: tokio_postgres::Error) -> Self {
        match err.as_db_error() {
            Some(db) => SltError {
                sqlstate: Some(db.code().code().to_string()),
                message: db.message().to_string(),
            },
            None => SltError {
                sqlstate: None,
                message: err.to_string(),
            },
        }
    }
}

impl SltError {
    fn render(message: String) -> Self {
        SltError {
            sqlstate: None,
            message,
        }
    }
}

/// Column type letters: `I` integer, `R` float or numeric, `B` boolean, `T` everything else.
/// Any other letter in a file is kept as written; the runner does not compare types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SltType {
    Integer,
    Float,
    Bool,
    Text,
    Other(char),
}

impl ColumnType for SltType {
    fn from_char(value: char) -> Option<Self> {
        Some(match value {
            'I' => SltType::Integer,
            'R' => SltType::Float,
            'B' => SltType::Bool,
            'T' => SltType::Text,
            other => SltType::Other(other),
        })
    }

    fn to_char(&self) -> char {
        match self {
            SltType::Integer => 'I',
            SltType::Float => 'R',
            SltType::Bool => 'B',
            SltType::Text => 'T',
            SltType::Other(c) => *c,
        }
    }
}

/// The simple query protocol: the server renders every value as text.
pub struct Simple(Client);

#[async_trait]
impl AsyncDB for Simple {
    type Error = SltError;
    type ColumnType = SltType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<SltType>, SltError> {
        let mut columns = None;
        let mut rows = Vec::new();
        let mut count = 0;
        for message in self.0.simple_query(sql).await? {
            match message {
                SimpleQueryMessage::RowDescription(description) => {
                    // The simple protocol names columns but not their types.
                    columns = Some(vec![SltType::Text; description.len()]);
                }
                SimpleQueryMessage::Row(row) => {
                    rows.push((0..row.len()).map(|i| text_cell(row.get(i))).collect());
                }
                SimpleQueryMessage::CommandComplete(n) => count = n,
                _ => {}
            }
        }
        Ok(match columns {
            Some(types) => DBOutput::Rows { types, rows },
            None => DBOutput::StatementComplete(count),
        })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "weir"
    }

    /// The runner calls this for an slt `sleep` record. Tests synchronise
    /// with `FLUSH` or a deadline, never by waiting (STYLE.md), so a `sleep`
    /// record fails its file.
    async fn sleep(_dur: std::time::Duration) {
        panic!("`sleep` in an .slt file: synchronise with FLUSH instead of waiting");
    }

    fn error_sql_state(err: &SltError) -> Option<String> {
        err.sqlstate.clone()
    }
}

/// The extended query protocol: Parse/Bind/Execute, results in binary, rendered here in
/// PostgreSQL's text format by column type.
pub struct Extended(Client);

#[async_trait]
impl AsyncDB for Extended {
    type Error = SltError;
    type ColumnType = SltType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<SltType>, SltError> {
        let statement = self.0.prepare(sql).await?;
        if statement.columns().is_empty() {
            let count = self.0.execute(&statement, &[]).await?;
            return Ok(DBOutput::StatementComplete(count));
        }
        let types = statement
            .columns()
            .iter()
            .map(|c| slt_type(c.type_()))
            .collect();
        let rows = self
            .0
            .query(&statement, &[])
            .await?
            .iter()
            .map(|row| (0..row.len()).map(|i| binary_cell(row, i)).collect())
            .collect::<Result<_, _>>()?;
        Ok(DBOutput::Rows { types, rows })
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "weir"
    }

    /// The runner calls this for an slt `sleep` record. Tests synchronise
    /// with `FLUSH` or a deadline, never by waiting (STYLE.md), so a `sleep`
    /// record fails its file.
    async fn sleep(_dur: std::time::Duration) {
        panic!("`sleep` in an .slt file: synchronise with FLUSH instead of waiting");
    }

    fn error_sql_state(err: &SltError) -> Option<String> {
        err.sqlstate.clone()
    }
}

fn slt_type(ty: &Type) -> SltType {
    match *ty {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => SltType::Integer,
        Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => SltType::Float,
        Type::BOOL => SltType::Bool,
        _ => SltType::Text,
    }
}

/// A text value as sqllogictest files write it: `NULL`, `(empty)`, or the text itself.
fn text_cell(value: Option<&str>) -> String {
    match value {
        None => "NULL".to_string(),
        Some("") => "(empty)".to_string(),
        Some(text) => text.to_string(),
    }
}

/// Renders column `i` of a binary-format row the way PostgreSQL prints it in text format.
fn binary_cell(row: &Row, i: usize) -> Result<String, SltError> {
    fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<Option<T>, SltError> {
        row.try_get::<_, Option<T>>(i)
            .map_err(|err| SltError::render(format!("decode column {i}: {err}")))
    }
    let ty = row.columns()[i].type_();
    let text = match *ty {
        Type::BOOL => get::<bool>(row, i)?.map(|b| if b { "t" } else { "f" }.to_string()),
        Type::INT2 => get::<i16>(row, i)?.map(|v| v.to_string()),
        Type::INT4 => get::<i32>(row, i)?.map(|v| v.to_string()),
        Type::INT8 => get::<i64>(row, i)?.map(|v| v.to_string()),
        Type::OID => get::<u32>(row, i)?.map(|v| v.to_string()),
        Type::FLOAT4 => get::<f32>(row, i)?.map(|v| pg_float(f64::from(v), &format!("{v:e}"), 6)),
        Type::FLOAT8 => get::<f64>(row, i)?.map(|v| pg_float(v, &format!("{v:e}"), 15)),
        Type::NUMERIC => get::<Decimal>(row, i)?.map(|v| v.to_string()),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            get::<String>(row, i)?
        }
        Type::TIMESTAMP => get::<NaiveDateTime>(row, i)?.map(|v| pg_timestamp(&v)),
        Type::TIMESTAMPTZ => {
            get::<DateTime<Utc>>(row, i)?.map(|v| format!("{}+00", pg_timestamp(&v.naive_utc())))
        }
        Type::DATE => get::<NaiveDate>(row, i)?.map(|v| v.format("%Y-%m-%d").to_string()),
        Type::TIME => get::<NaiveTime>(row, i)?.map(|v| pg_time(&v)),
        Type::BYTEA => get::<Vec<u8>>(row, i)?.map(|bytes| {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("\\x{hex}")
        }),
        Type::JSON | Type::JSONB => get::<serde_json::Value>(row, i)?.map(|v| v.to_string()),
        _ => {
            return Err(SltError::render(format!(
                "the slt harness cannot render column {i} of type {ty} (oid {})",
                ty.oid()
            )));
        }
    };
    Ok(text_cell(text.as_deref()))
}

/// PostgreSQL's float output: shortest round-trip digits, in exponent form when the decimal
/// exponent is below -4 or at least `max_exp` (15 for float8, 6 for float4). `scientific` is
/// Rust's `{:e}` rendering of the value at its own precision.
fn pg_float(value: f64, scientific: &str, max_exp: i32) -> String {
    if value.is_nan() {
        return "NaN".to_string();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let (mantissa, exp) = scientific.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} has a numeric exponent");
    if value != 0.0 && (exp < -4 || exp >= max_exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        // Rust's shortest fixed-point form; re-derived from the mantissa so float4 keeps its
        // own (shorter) digits.
        let digits: f64 = scientific.parse().expect("{:e} parses back");
        format!("{digits}")
    }
}

/// `2026-01-01 10:00:01`, with `.fraction` (trailing zeros trimmed) only when non-zero.
fn pg_timestamp(value: &NaiveDateTime) -> String {
    format!(
        "{} {}",
        value.date().format("%Y-%m-%d"),
        pg_time(&value.time())
    )
}

fn pg_time(value: &NaiveTime) -> String {
    let micros = value.nanosecond() / 1_000;
    let whole = value.format("%H:%M:%S").to_string();
    if micros == 0 {
        whole
    } else {
        format!("{whole}.{}", format!("{micros:06}").trim_end_matches('0'))
    }
}

#[test]
fn pg_float_matches_postgres() {
    let f8 = |v: f64| pg_float(v, &format!("{v:e}"), 15);
    let f4 = |v: f32| pg_float(f64::from(v), &format!("{v:e}"), 6);
    assert_eq!(f8(1e15), "1e+15");
    assert_eq!(f8(999_999_999_999_999.0), "999999999999999");
    assert_eq!(f8(0.0001), "0.0001");
    assert_eq!(f8(0.00001), "1e-05");
    assert_eq!(f8(1.5e300), "1.5e+300");
    assert_eq!(f8(1.25e-7), "1.25e-07");
    assert_eq!(f8(123_456_789_012_345_678.0), "1.2345678901234568e+17");
    assert_eq!(f8(-2.5e20), "-2.5e+20");
    assert_eq!(f8(0.1 + 0.2), "0.30000000000000004");
    assert_eq!(f8(f64::NAN), "NaN");
    assert_eq!(f8(f64::NEG_INFINITY), "-Infinity");
    assert_eq!(f8(0.0), "0");
    assert_eq!(f8(-3.0), "-3");
    assert_eq!(f4(1_000_000.0), "1e+06");
    assert_eq!(f4(100_000.0), "100000");
    assert_eq!(f4(1_234_567.0), "1.234567e+06");
    assert_eq!(f4(0.00001), "1e-05");
    assert_eq!(f4(2.1), "2.1");
}

#[test]
fn pg_timestamp_matches_postgres() {
    let at = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").expect("valid");
    assert_eq!(
        pg_timestamp(&at("2026-01-01 10:00:01")),
        "2026-01-01 10:00:01"
    );
    assert_eq!(
        pg_timestamp(&at("2026-01-01 10:00:01.5")),
        "2026-01-01 10:00:01.5"
    );
    assert_eq!(
        pg_timestamp(&at("2026-01-01 10:00:01.000123")),
        "2026-01-01 10:00:01.000123"
    );
}
