//! Statement text → parsed statements, with PostgreSQL-style syntax errors.
//!
//! Parsing is sqlparser's PostgreSQL dialect; queries that PostgreSQL clients
//! send about their catalogs (psql's `\d`, drivers' type lookups) are
//! rewritten by `datafusion-pg-catalog`'s compatibility parser into forms
//! DataFusion plans. Weir's own statements (topics, sources, ...) join here as
//! they arrive. This module never plans or executes anything.

use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

use crate::types::{SqlState, WeirError, WeirResult};

mod rewrite;

/// Parses statement text into statements, shared by all sessions.
#[derive(Debug, Default)]
pub struct SqlParser {
    compat: PostgresCompatibilityParser,
}

impl SqlParser {
    pub fn new() -> Self {
        SqlParser {
            compat: PostgresCompatibilityParser::new(),
        }
    }

    /// Parses `text` (one or more `;`-separated statements). An empty or
    /// all-whitespace text gives no statements.
    pub fn parse(&self, text: &str) -> WeirResult<Vec<Statement>> {
        // The plain parse keeps token positions, so syntax errors can point at
        // the offending character; the compatibility parse then rewrites.
        let statements = match Parser::parse_sql(&PostgreSqlDialect {}, text) {
            Ok(plain) if !is_catalog_query(text) => plain,
            Ok(plain) => self
                .compat
                .parse(text)
                .unwrap_or_else(|_| plain.into_iter().map(|s| self.compat.rewrite(s)).collect()),
            // Some client catalog queries only parse after the compatibility
            // parser's token substitutions.
            Err(err) => self
                .compat
                .parse(text)
                .map_err(|_| syntax_error(text, &err))?,
        };
        Ok(statements.into_iter().map(rewrite::rewrite).collect())
    }
}

/// Whether `text` looks like a client's catalog query. Only those go through
/// the compatibility rewrites: some of them (for example replacing subqueries
/// in a projection by NULL) keep psql and drivers working but would change
/// the answers of ordinary queries.
fn is_catalog_query(text: &str) -> bool {
    const MARKERS: &[&str] = &[
        "pg_",
        "information_schema",
        "::reg",
        "current_schema",
        "current_user",
        "session_user",
        "current_database",
        "format_type",
        "has_table_privilege",
        "has_schema_privilege",
        "has_database_privilege",
        "quote_ident",
        "collate",
        "operator(",
    ];
    let lower = text.to_ascii_lowercase();
    MARKERS.iter().any(|m| lower.contains(m))
}

/// Builds a 42601 error from sqlparser's message, with the 1-based character
/// position PostgreSQL clients use to draw a caret.
pub fn syntax_error(text: &str, err: &ParserError) -> WeirError {
    let raw = match err {
        ParserError::ParserError(m) | ParserError::TokenizerError(m) => m.clone(),
        ParserError::RecursionLimitExceeded => {
            return WeirError::new(
                SqlState::PROGRAM_LIMIT_EXCEEDED,
                "statement is too deeply nested",
            )
            .with_hint("simplify the expression or split the statement");
        }
    };
    let (body, position) = split_location(&raw, text);
    let near = body
        .rsplit_once("found: ")
        .map(|(_, found)| found.trim().to_string());
    let message = match &near {
        Some(tok) if tok == "EOF" => "syntax error at end of input".to_string(),
        Some(tok) => format!("syntax error at or near \"{tok}\""),
        None => format!("syntax error: {body}"),
    };
    let mut error = WeirError::new(SqlState::SYNTAX_ERROR, message).with_detail(body);
    match (position, &near) {
        (_, Some(tok)) if tok == "EOF" => {
            error = error.with_position(text.chars().count().max(1));
        }
        (Some(pos), _) => error = error.with_position(pos),
        _ => {}
    }
    error
}

/// Strips sqlparser's " at Line: L, Column: C" suffix and turns it into a
/// character position in `text`.
fn split_location(raw: &str, text: &str) -> (String, Option<usize>) {
    let Some((body, loc)) = raw.rsplit_once(" at Line: ") else {
        return (raw.to_string(), None);
    };
    let mut parts = loc.split(", Column: ");
    let line: Option<usize> = parts.next().and_then(|l| l.trim().parse().ok());
    let column: Option<usize> = parts.next().and_then(|c| c.trim().parse().ok());
    let position = match (line, column) {
        (Some(line), Some(column)) if line >= 1 => {
            let before: usize = text
                .split('\n')
                .take(line - 1)
                .map(|l| l.chars().count() + 1)
                .sum();
            Some(before + column)
        }
        _ => None,
    };
    (body.to_string(), position)
}
