//! The object store behind a Parquet sink — a local directory or an S3-compatible bucket — and
//! the classification of its errors by what the user must do about them (SQLSTATE and hint).

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use super::config::{ParquetSinkConfig, ParquetTarget, S3Config};
use crate::types::{SqlState, WeirError, WeirResult};

/// Bounded retries for S3 requests, so an unreachable endpoint fails in seconds, not minutes.
const S3_MAX_RETRIES: usize = 3;
const S3_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
const S3_CONNECT_TIMEOUT: &str = "5s";
const S3_REQUEST_TIMEOUT: &str = "120s";

/// The store for `config.target` and the key prefix inside it.
pub(super) async fn build_store(
    config: &ParquetSinkConfig,
) -> WeirResult<(Arc<dyn ObjectStore>, ObjectPath)> {
    match &config.target {
        ParquetTarget::Local { dir } => {
            if let Err(e) = tokio::fs::create_dir_all(dir).await {
                let state = if e.kind() == std::io::ErrorKind::PermissionDenied {
                    SqlState::INSUFFICIENT_PRIVILEGE
                } else {
                    SqlState::IO_ERROR
                };
                return Err(WeirError::new(
                    state,
                    format!(
                        "could not create directory \"{}\" for a parquet sink: {e}",
                        dir.display()
                    ),
                )
                .with_hint("choose a path the server's user can write to"));
            }
            let store = LocalFileSystem::new_with_prefix(dir).map_err(|e| {
                WeirError::new(
                    SqlState::IO_ERROR,
                    format!(
                        "could not open directory \"{}\" for a parquet sink: {e}",
                        dir.display()
                    ),
                )
                .with_hint("choose a path the server's user can write to")
            })?;
            Ok((Arc::new(store), ObjectPath::default()))
        }
        ParquetTarget::S3 { bucket, prefix } => {
            let s3 = &config.s3;
            let http_endpoint = s3
                .endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://"));
            let env_allows_http = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true");
            if http_endpoint && s3.allow_http != Some(true) && !env_allows_http {
                return Err(WeirError::new(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!(
                        "endpoint \"{}\" is plain http, which a parquet sink refuses by default",
                        s3.endpoint.as_deref().unwrap_or_default()
                    ),
                )
                .with_hint("add allow_http = 'true', or use an https:// endpoint"));
            }
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(RetryConfig {
                    backoff: BackoffConfig::default(),
                    max_retries: S3_MAX_RETRIES,
                    retry_timeout: S3_RETRY_TIMEOUT,
                })
                .with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                    S3_CONNECT_TIMEOUT,
                )
                .with_config(
                    AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                    S3_REQUEST_TIMEOUT,
                );
            if let Some(region) = &s3.region {
                builder = builder.with_region(region);
            }
            if let Some(endpoint) = &s3.endpoint {
                builder = builder.with_endpoint(endpoint);
            }
            if let Some(key) = &s3.access_key_id {
                builder = builder.with_access_key_id(key);
            }
            if let Some(secret) = &s3.secret_access_key {
                builder = builder.with_secret_access_key(secret);
            }
            if let Some(token) = &s3.session_token {
                builder = builder.with_token(token);
            }
            if let Some(allow) = s3.allow_http {
                builder = builder.with_allow_http(allow);
            }
            let store = builder.build().map_err(|e| {
                WeirError::new(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("invalid S3 settings for bucket \"{bucket}\": {e}"),
                )
                .with_hint("check region, endpoint and the AWS_ environment variables")
            })?;
            let root = ObjectPath::parse(prefix).map_err(|e| {
                WeirError::new(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("invalid S3 prefix \"{prefix}\": {e}"),
                )
                .with_hint("write path = 's3://bucket/prefix'")
            })?;
            Ok((Arc::new(store), root))
        }
    }
}

/// Classifies an object store error by what the user must do about it.
pub(super) fn store_error(
    config: &ParquetSinkConfig,
    action: &str,
    err: &object_store::Error,
) -> WeirError {
    match &config.target {
        ParquetTarget::Local { .. } => {
            let denied = matches!(err, object_store::Error::PermissionDenied { .. })
                || io_error_kind(err) == Some(std::io::ErrorKind::PermissionDenied);
            let state = if denied {
                SqlState::INSUFFICIENT_PRIVILEGE
            } else {
                SqlState::IO_ERROR
            };
            WeirError::new(
                state,
                format!("parquet sink could not {action} \"{}\"", config.path),
            )
            .with_hint("check that the directory exists and the server's user can write to it")
        }
        ParquetTarget::S3 { bucket, .. } => {
            let endpoint = s3_endpoint_text(&config.s3);
            match err {
                object_store::Error::NotFound { .. } if action == "write to" => WeirError::new(
                    SqlState::UNDEFINED_OBJECT,
                    format!("S3 bucket \"{bucket}\" does not exist at {endpoint}"),
                )
                .with_hint("create the bucket first, or check the path, endpoint and region"),
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => WeirError::new(
                    SqlState::INSUFFICIENT_PRIVILEGE,
                    format!(
                        "S3 refused access to bucket \"{bucket}\" at {endpoint} (could not {action} it)"
                    ),
                )
                .with_hint(
                    "check access_key_id and secret_access_key (or the AWS_ environment \
                     variables) and the bucket's policy",
                ),
                _ if is_connect_error(err) => WeirError::new(
                    SqlState::UNABLE_TO_CONNECT,
                    format!("could not reach S3 endpoint {endpoint} for bucket \"{bucket}\""),
                )
                .with_hint("check endpoint, region and allow_http, and that the server is up"),
                _ => WeirError::new(
                    SqlState::IO_ERROR,
                    format!("parquet sink could not {action} S3 bucket \"{bucket}\" at {endpoint}"),
                )
                .with_hint("check the bucket, endpoint and credentials; the detail has S3's answer"),
            }
        }
    }
}

pub(super) fn s3_endpoint_text(s3: &S3Config) -> String {
    match (&s3.endpoint, &s3.region) {
        (Some(endpoint), _) => endpoint.clone(),
        (None, Some(region)) => format!("AWS region {region}"),
        (None, None) => match std::env::var("AWS_ENDPOINT") {
            Ok(endpoint) => endpoint,
            Err(_) => "the default AWS endpoint".to_string(),
        },
    }
}

/// The kind of the first `std::io::Error` in `err`'s source chain.
fn io_error_kind(err: &object_store::Error) -> Option<std::io::ErrorKind> {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = e.source();
    }
    None
}

/// Whether the request never reached a server (refused, timed out, no route, DNS).
fn is_connect_error(err: &object_store::Error) -> bool {
    if matches!(
        io_error_kind(err),
        Some(
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable
        )
    ) {
        return true;
    }
    let text = format!("{err}").to_ascii_lowercase();
    ["error sending request", "connect", "dns", "timed out"]
        .iter()
        .any(|needle| text.contains(needle))
}
