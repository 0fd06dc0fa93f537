//! DataFusion errors → [`WeirError`] with PostgreSQL SQLSTATEs and messages.
//!
//! DataFusion reports planning and execution failures as strings inside a
//! few variants; this is the one place that reads them. Weir's own errors
//! travel through DataFusion as `External` and come back out unchanged.

use arrow::error::ArrowError;
use datafusion::common::SchemaError;
use datafusion::error::DataFusionError;

use crate::types::{SqlState, WeirError};

/// Classifies a DataFusion error for the client. `sql` is the statement text,
/// used to point syntax errors at a position.
pub fn from_datafusion(err: DataFusionError, sql: &str) -> WeirError {
    if let Some(weir) = find_weir_error(&err) {
        return weir;
    }
    let root = err.find_root();
    match root {
        DataFusionError::SQL(parser_error, _) => crate::sql::syntax_error(sql, parser_error),
        DataFusionError::SchemaError(schema_error, _) => from_schema_error(schema_error),
        DataFusionError::ArrowError(arrow_error, _) => from_arrow(arrow_error),
        DataFusionError::NotImplemented(msg) => WeirError::unsupported(
            lower_first(msg),
            "see docs/sql.md for the SQL Weir supports",
        ),
        DataFusionError::Plan(msg) => from_plan_message(msg),
        DataFusionError::Execution(msg) => from_execution_message(msg),
        DataFusionError::ResourcesExhausted(msg) => {
            WeirError::new(SqlState("53200"), format!("out of memory: {msg}"))
                .with_hint("reduce the size of the query's intermediate results")
        }
        DataFusionError::Configuration(msg) => {
            WeirError::new(SqlState::INVALID_PARAMETER_VALUE, lower_first(msg))
        }
        DataFusionError::IoError(e) => WeirError::io("query i/o", e),
        DataFusionError::Internal(msg) => WeirError::internal(msg.clone()),
        other => WeirError::internal(other.to_string()),
    }
}

fn find_weir_error(err: &DataFusionError) -> Option<WeirError> {
    match err {
        DataFusionError::External(inner) => inner.downcast_ref::<WeirError>().cloned(),
        DataFusionError::Context(_, inner) => find_weir_error(inner),
        DataFusionError::ArrowError(arrow, _) => match arrow.as_ref() {
            ArrowError::ExternalError(inner) => inner.downcast_ref::<WeirError>().cloned(),
            _ => None,
        },
        DataFusionError::Shared(inner) => find_weir_error(inner),
        DataFusionError::Diagnostic(_, inner) => find_weir_error(inner),
        DataFusionError::Collection(errors) => errors.iter().find_map(find_weir_error),
        _ => None,
    }
}

fn from_schema_error(err: &SchemaError) -> WeirError {
    match err {
        SchemaError::FieldNotFound { field, .. } => WeirError::new(
            SqlState::UNDEFINED_COLUMN,
            format!("column \"{}\" does not exist", field.name),
        )
        .with_hint("check the column name; \\d <table> in psql lists the columns"),
        SchemaError::AmbiguousReference { field } => WeirError::new(
            SqlState::AMBIGUOUS_COLUMN,
            format!("column reference \"{}\" is ambiguous", field.name),
        )
        .with_hint("qualify the column with its table name or alias"),
        SchemaError::DuplicateQualifiedField { qualifier, name } => WeirError::new(
            SqlState::DUPLICATE_COLUMN,
            format!("column \"{qualifier}.{name}\" specified more than once"),
        ),
        SchemaError::DuplicateUnqualifiedField { name } => WeirError::new(
            SqlState::DUPLICATE_COLUMN,
            format!("column \"{name}\" specified more than once"),
        ),
    }
}

fn from_arrow(err: &ArrowError) -> WeirError {
    match err {
        ArrowError::DivideByZero => WeirError::new(SqlState::DIVISION_BY_ZERO, "division by zero"),
        ArrowError::ArithmeticOverflow(msg) => WeirError::new(
            SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
            format!("value out of range: {}", lower_first(msg)),
        )
        .with_hint("use a wider type, for example bigint or numeric"),
        ArrowError::CastError(msg) | ArrowError::ParseError(msg) => WeirError::new(
            SqlState::INVALID_TEXT_REPRESENTATION,
            format!("invalid input syntax: {}", lower_first(msg)),
        ),
        ArrowError::ComputeError(msg) if msg.contains("Overflow") || msg.contains("overflow") => {
            WeirError::new(SqlState::NUMERIC_VALUE_OUT_OF_RANGE, lower_first(msg))
        }
        ArrowError::InvalidArgumentError(msg) if msg.contains("non-nullable") => {
            WeirError::new(SqlState::NOT_NULL_VIOLATION, lower_first(msg))
        }
        other => WeirError::new(SqlState::DATA_EXCEPTION, lower_first(&other.to_string())),
    }
}

fn from_plan_message(msg: &str) -> WeirError {
    if let Some(name) = quoted_after(msg, "table '").filter(|_| msg.contains("not found")) {
        let short = name.rsplit('.').next().unwrap_or(&name).to_string();
        return WeirError::new(
            SqlState::UNDEFINED_TABLE,
            format!("relation \"{short}\" does not exist"),
        )
        .with_hint("check the name; \\dt in psql lists the tables");
    }
    if msg.contains("Invalid function") || msg.contains("not found in registry") {
        let name = quoted_after(msg, "function '").unwrap_or_default();
        return WeirError::new(
            SqlState::UNDEFINED_FUNCTION,
            format!("function {name} does not exist"),
        )
        .with_detail(msg.to_string())
        .with_hint("see docs/sql.md for the functions Weir provides");
    }
    if msg.contains("No function matches")
        || msg.contains("does not support")
        || msg.contains("coerce")
        || msg.contains("Cannot infer common")
        || msg.contains("not supported for")
    {
        return WeirError::new(SqlState::DATATYPE_MISMATCH, lower_first(msg))
            .with_hint("add an explicit cast, for example CAST(x AS bigint) or x::text");
    }
    if msg.contains("must appear in the GROUP BY") || msg.contains("GROUP BY") {
        return WeirError::new(SqlState::GROUPING_ERROR, lower_first(msg));
    }
    if msg.contains("Unsupported") || msg.contains("unsupported") {
        return WeirError::unsupported(lower_first(msg), "see docs/sql.md for supported SQL");
    }
    // The remaining planning failures are semantic errors in the statement.
    WeirError::new(SqlState("42000"), lower_first(msg))
}

fn from_execution_message(msg: &str) -> WeirError {
    let lower = msg.to_lowercase();
    if lower.contains("divide by zero") || lower.contains("division by zero") {
        return WeirError::new(SqlState::DIVISION_BY_ZERO, "division by zero");
    }
    if lower.contains("overflow") {
        return WeirError::new(SqlState::NUMERIC_VALUE_OUT_OF_RANGE, lower_first(msg));
    }
    if lower.contains("non-nullable") || lower.contains("not null") {
        return WeirError::new(SqlState::NOT_NULL_VIOLATION, lower_first(msg));
    }
    if lower.contains("cannot cast") || lower.contains("invalid") {
        return WeirError::new(SqlState::INVALID_TEXT_REPRESENTATION, lower_first(msg));
    }
    WeirError::new(SqlState::DATA_EXCEPTION, lower_first(msg))
}

/// The text between `prefix` and the next `'`.
fn quoted_after(msg: &str, prefix: &str) -> Option<String> {
    let start = msg.find(prefix)? + prefix.len();
    let rest = &msg[start..];
    let end = rest.find('\'')?;
    Some(rest[..end].to_string())
}

/// PostgreSQL messages start lowercase.
fn lower_first(msg: &str) -> String {
    let msg = msg.trim().trim_end_matches('.');
    let mut chars = msg.chars();
    match chars.next() {
        Some(first) if chars.clone().next().is_some_and(|c| c.is_lowercase()) => {
            first.to_lowercase().collect::<String>() + chars.as_str()
        }
        _ => msg.to_string(),
    }
}
