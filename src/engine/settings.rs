//! Session settings: `SET`, `SHOW`, and the defaults a new session reports.
//!
//! Weir accepts any setting name (drivers set many at connect time) and
//! reports the PostgreSQL-standard ones with their usual values.

use std::collections::BTreeMap;

use super::PG_VERSION;

/// Settings whose changes PostgreSQL reports to the client (GUC_REPORT).
pub const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "intervalstyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "timezone",
    "integer_datetimes",
];

/// The values a session starts with, keyed by lowercase name.
pub fn defaults() -> BTreeMap<String, String> {
    let version = format!("{PG_VERSION} (Weir {})", env!("CARGO_PKG_VERSION"));
    [
        ("server_version", version.as_str()),
        ("server_version_num", "160006"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("datestyle", "ISO, MDY"),
        ("intervalstyle", "postgres"),
        ("timezone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("search_path", "public"),
        ("transaction_isolation", "read committed"),
        ("default_transaction_isolation", "read committed"),
        ("transaction_read_only", "off"),
        ("statement_timeout", "0"),
        ("extra_float_digits", "1"),
        ("application_name", ""),
        ("is_superuser", "on"),
        ("max_identifier_length", "63"),
        ("lc_messages", "C"),
        ("lc_ctype", "C"),
        ("lc_collate", "C"),
        ("bytea_output", "hex"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain(std::iter::once((
        "streaming_parallelism".to_string(),
        super::stream::default_parallelism().to_string(),
    )))
    .collect()
}

/// The name as PostgreSQL spells it in ParameterStatus.
pub fn reported_name(name: &str) -> String {
    match name {
        "datestyle" => "DateStyle".to_string(),
        "timezone" => "TimeZone".to_string(),
        "intervalstyle" => "IntervalStyle".to_string(),
        other => other.to_string(),
    }
}
