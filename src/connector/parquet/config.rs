//! The options of a Parquet sink: `CREATE SINK ... WITH (connector = 'parquet', path = ...,
//! partition_by, file_size_max, rollover, changelog, and S3 settings)`, checked into a
//! [`ParquetSinkConfig`]. Parsing only: nothing here touches a file or the network.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use object_store::path::Path as ObjectPath;

use crate::types::{SqlState, WeirError, WeirResult};

/// Every option `CREATE SINK ... WITH (connector = 'parquet', ...)` accepts: the sink's own,
/// then the S3 settings ([`S3_OPTIONS`]).
pub const OPTIONS: &[&str] = &[
    "connector",
    "path",
    "partition_by",
    "file_size_max",
    "rollover",
    "changelog",
    "region",
    "endpoint",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "allow_http",
];

/// How many of [`OPTIONS`] come before the S3 settings.
const SINK_OPTIONS_LEN: usize = 6;

/// The options that only mean something for an `s3://` path: the tail of [`OPTIONS`].
const S3_OPTIONS: &[&str] = OPTIONS.split_at(SINK_OPTIONS_LEN).1;

const FILE_SIZE_MAX_DEFAULT_BYTES: u64 = 128 * 1024 * 1024;
const FILE_SIZE_MIN_BYTES: u64 = 1024;
/// Files are encoded in memory before the upload, so one file is bounded.
const FILE_SIZE_MAX_BYTES: u64 = 1024 * 1024 * 1024;
const ROLLOVER_DEFAULT: Duration = Duration::from_secs(60);
const ROLLOVER_MIN: Duration = Duration::from_millis(100);

/// Where the files go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParquetTarget {
    /// `file:///abs/dir`: a local directory, created if missing.
    Local { dir: PathBuf },
    /// `s3://bucket/prefix`: a bucket (which must exist) and a key prefix (may be empty).
    S3 { bucket: String, prefix: String },
}

/// Connection settings for an `s3://` target. Unset fields fall back to the standard `AWS_…`
/// environment variables of the server process.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Config {
    pub region: Option<String>,
    /// e.g. `http://127.0.0.1:9000` for an S3-compatible server.
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub allow_http: Option<bool>,
}

impl fmt::Debug for S3Config {
    /// Secrets are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Config")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redacted(&self.secret_access_key))
            .field("session_token", &redacted(&self.session_token))
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// A Parquet sink's options, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParquetSinkConfig {
    /// The `path` option as written, for messages and `describe`.
    pub path: String,
    pub target: ParquetTarget,
    /// One column of the view: files go to `col=value/` directories.
    pub partition_by: Option<String>,
    pub file_size_max_bytes: u64,
    pub rollover: Duration,
    /// Write deletes too: every row carries an `op` column (`insert` / `delete`).
    pub changelog: bool,
    pub s3: S3Config,
}

impl ParquetSinkConfig {
    /// Parses `CREATE SINK`'s `WITH (...)` options. Keys are case-insensitive; an unknown key or
    /// a bad value is 22023 with the accepted forms.
    pub fn from_options(options: &[(String, String)]) -> WeirResult<ParquetSinkConfig> {
        let mut path = None;
        let mut partition_by = None;
        let mut file_size_max_bytes = FILE_SIZE_MAX_DEFAULT_BYTES;
        let mut rollover = ROLLOVER_DEFAULT;
        let mut changelog = false;
        let mut s3 = S3Config::default();
        let mut s3_keys = Vec::new();
        for (key, value) in options {
            let key = key.to_ascii_lowercase();
            if S3_OPTIONS.contains(&key.as_str()) {
                s3_keys.push(key.clone());
            }
            match key.as_str() {
                "connector" => {
                    if !value.eq_ignore_ascii_case("parquet") {
                        return Err(bad_option("connector", value, "'parquet'"));
                    }
                }
                "path" => path = Some(value.clone()),
                "partition_by" => {
                    let column = value.trim();
                    if column.is_empty() || column.contains(',') {
                        return Err(bad_option(
                            "partition_by",
                            value,
                            "the name of one column of the view",
                        ));
                    }
                    partition_by = Some(column.to_string());
                }
                "file_size_max" => {
                    let bytes = parse_bytes(value).ok_or_else(|| {
                        bad_option(
                            "file_size_max",
                            value,
                            "a size such as '128MB', '64KiB' or '1GB' (1KiB to 1GiB)",
                        )
                    })?;
                    if !(FILE_SIZE_MIN_BYTES..=FILE_SIZE_MAX_BYTES).contains(&bytes) {
                        return Err(bad_option(
                            "file_size_max",
                            value,
                            "a size from '1KiB' to '1GiB'",
                        ));
                    }
                    file_size_max_bytes = bytes;
                }
                "rollover" => {
                    let duration = parse_duration(value).ok_or_else(|| {
                        bad_option(
                            "rollover",
                            value,
                            "a duration such as '500ms', '10s', '1 min' or '1 hour'",
                        )
                    })?;
                    if duration < ROLLOVER_MIN {
                        return Err(bad_option(
                            "rollover",
                            value,
                            "a duration of at least '100ms'",
                        ));
                    }
                    rollover = duration;
                }
                "changelog" => changelog = parse_bool("changelog", value)?,
                "region" => s3.region = Some(value.clone()),
                "endpoint" => s3.endpoint = Some(value.trim_end_matches('/').to_string()),
                "access_key_id" => s3.access_key_id = Some(value.clone()),
                "secret_access_key" => s3.secret_access_key = Some(value.clone()),
                "session_token" => s3.session_token = Some(value.clone()),
                "allow_http" => s3.allow_http = Some(parse_bool("allow_http", value)?),
                _ => {
                    return Err(WeirError::new(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("unknown option \"{key}\" for a parquet sink"),
                    )
                    .with_hint(format!("valid options: {}", OPTIONS.join(", "))));
                }
            }
        }
        let path = path.ok_or_else(|| {
            WeirError::new(
                SqlState::INVALID_PARAMETER_VALUE,
                "a parquet sink needs a path",
            )
            .with_hint("add path = 'file:///absolute/dir' or path = 's3://bucket/prefix'")
        })?;
        let target = parse_target(&path)?;
        if let (ParquetTarget::Local { .. }, Some(key)) = (&target, s3_keys.first()) {
            return Err(WeirError::new(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("option \"{key}\" applies only to s3:// paths"),
            )
            .with_hint(format!(
                "remove it, or write to path = 's3://bucket/prefix' (path is '{path}')"
            )));
        }
        Ok(ParquetSinkConfig {
            path,
            target,
            partition_by,
            file_size_max_bytes,
            rollover,
            changelog,
            s3,
        })
    }
}

fn bad_option(key: &str, value: &str, accepted: &str) -> WeirError {
    WeirError::new(
        SqlState::INVALID_PARAMETER_VALUE,
        format!("invalid value for parquet sink option \"{key}\": \"{value}\""),
    )
    .with_hint(format!("{key} takes {accepted}"))
}

fn parse_bool(key: &str, value: &str) -> WeirResult<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(bad_option(key, value, "'true' or 'false'")),
    }
}

/// `'128MB'`, `'64KiB'`, `'1 GB'`, `'4096'` → bytes; units as Weir's other size settings
/// read them (KB = KiB = 1024 bytes, as PostgreSQL does).
fn parse_bytes(text: &str) -> Option<u64> {
    let (number, unit) = split_number(text)?;
    let factor: f64 = match unit.as_str() {
        "" | "b" | "bytes" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// `'500ms'`, `'10s'`, `'1 min'`, `'2 hours'`: the forms Weir's other duration settings take.
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, unit) = split_number(text)?;
    let factor_ms: f64 = match unit.as_str() {
        "ms" | "millisecond" | "milliseconds" => 1.0,
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1_000.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000.0,
        "h" | "hour" | "hours" => 3_600_000.0,
        "d" | "day" | "days" => 86_400_000.0,
        _ => return None,
    };
    let ms = number * factor_ms;
    (ms.is_finite() && ms >= 0.0 && ms < u64::MAX as f64).then(|| Duration::from_millis(ms as u64))
}

/// `" 1.5 MB"` → `(1.5, "mb")`.
fn split_number(text: &str) -> Option<(f64, String)> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    Some((number.parse().ok()?, unit.trim().to_ascii_lowercase()))
}

fn parse_target(path: &str) -> WeirResult<ParquetTarget> {
    let bad = |why: &str| {
        WeirError::new(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("invalid parquet sink path \"{path}\": {why}"),
        )
        .with_hint("write path = 'file:///absolute/dir' or path = 's3://bucket/prefix'")
    };
    if let Some(rest) = path.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(bad("a file:// path must be absolute (file:///dir)"));
        }
        let dir = PathBuf::from(rest);
        if dir
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(bad("'..' is not allowed"));
        }
        return Ok(ParquetTarget::Local { dir });
    }
    if let Some(rest) = path.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket name"));
        }
        let prefix = prefix.trim_matches('/');
        ObjectPath::parse(prefix).map_err(|e| bad(&e.to_string()))?;
        return Ok(ParquetTarget::S3 {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        });
    }
    Err(bad("unknown scheme"))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `WITH (...)` options as the engine passes them (shared with the sink's own tests).
    pub(in crate::connector::parquet) fn options(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_are_checked() {
        let config = ParquetSinkConfig::from_options(&options(&[
            ("connector", "parquet"),
            ("path", "s3://bucket/a/b/"),
            ("file_size_max", "64KiB"),
            ("rollover", "500ms"),
            ("changelog", "true"),
            ("endpoint", "http://127.0.0.1:9000/"),
        ]))
        .expect("valid options");
        assert_eq!(
            config.target,
            ParquetTarget::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(config.file_size_max_bytes, 64 * 1024);
        assert_eq!(config.rollover, Duration::from_millis(500));
        assert!(config.changelog);
        assert_eq!(
            S3_OPTIONS.first(),
            Some(&"region"),
            "the S3 settings end OPTIONS"
        );
        assert_eq!(config.s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        for bad in [
            vec![("path", "file:///tmp/x"), ("colour", "red")],
            vec![("path", "relative/dir")],
            vec![("path", "file:///tmp/x"), ("file_size_max", "lots")],
            vec![("path", "file:///tmp/x"), ("rollover", "1 fortnight")],
            vec![("path", "file:///tmp/x"), ("region", "eu-west-1")],
            vec![("rollover", "1s")],
        ] {
            let err = ParquetSinkConfig::from_options(&options(&bad)).expect_err("refused");
            assert_eq!(err.sqlstate, SqlState::INVALID_PARAMETER_VALUE, "{bad:?}");
            assert!(err.hint.is_some(), "{bad:?} has no hint");
        }
    }
}
