//! Statement text → parsed statements, with PostgreSQL-style syntax errors.
//!
//! Parsing is sqlparser's PostgreSQL dialect; queries that PostgreSQL clients
//! send about their catalogs (psql's `\d`, drivers' type lookups) are
//! rewritten by `datafusion-pg-catalog`'s compatibility parser into forms
//! DataFusion plans. Weir's own statements (topics, sources, ...) join here as
//! they arrive. This module never plans or executes anything.

use datafusion::sql::sqlparser::ast;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::{Parser, ParserError};
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

use crate::types::{SqlState, WeirError, WeirResult};

mod rewrite;
mod weir;

pub use weir::{Options, SeekTarget, WatermarkDef, WeirStatement, parse_bytes, parse_duration_ms};

/// One parsed statement: PostgreSQL's grammar (sqlparser) or Weir's own.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// Boxed: sqlparser's statement is tens of times larger than Weir's.
    Sql(Box<ast::Statement>),
    Weir(WeirStatement),
}

impl std::fmt::Display for Statement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Statement::Sql(s) => write!(f, "{s}"),
            Statement::Weir(w) => write!(f, "{w}"),
        }
    }
}

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
        let chunks = split_statements(text);
        if !chunks.iter().any(|c| weir::is_weir_statement(c)) {
            return Ok(self
                .parse_sql(text)?
                .into_iter()
                .map(|s| Statement::Sql(Box::new(s)))
                .collect());
        }
        let mut statements = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            if weir::is_weir_statement(chunk) {
                statements.push(Statement::Weir(weir::parse_weir(chunk)?));
            } else {
                statements.extend(
                    self.parse_sql(chunk)?
                        .into_iter()
                        .map(|s| Statement::Sql(Box::new(s))),
                );
            }
        }
        Ok(statements)
    }

    /// Parses PostgreSQL-grammar text with sqlparser.
    pub fn parse_sql(&self, text: &str) -> WeirResult<Vec<ast::Statement>> {
        let flink;
        let text = if text.to_ascii_uppercase().contains("DESCRIPTOR") {
            flink = flink_windows(text);
            flink.as_str()
        } else {
            text
        };
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

/// Rewrites Flink's window table functions, `TABLE(TUMBLE(TABLE src, DESCRIPTOR(ts), size))`,
/// into the RisingWave form Weir plans, `TUMBLE(src, ts, size)` (likewise HOP and SESSION).
/// Text that does not tokenize is returned unchanged for the parser to report.
pub fn flink_windows(text: &str) -> String {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, text).tokenize() else {
        return text.to_string();
    };
    let is_word = |t: &Token, w: &str| matches!(t, Token::Word(x) if x.quote_style.is_none() && x.value.eq_ignore_ascii_case(w));
    // Index of the next non-whitespace token at or after `i`.
    let next = |mut i: usize| {
        while i < tokens.len() && matches!(tokens[i], Token::Whitespace(_)) {
            i += 1;
        }
        i
    };
    let mut out = String::with_capacity(text.len());
    // Depths at which a dropped `TABLE(` wrapper's closing parenthesis is expected.
    let mut drop_close: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let t = &tokens[i];
        if is_word(t, "TABLE") {
            let a = next(i + 1);
            let b = next(a + 1);
            let wraps_window = tokens.get(a) == Some(&Token::LParen)
                && tokens
                    .get(b)
                    .is_some_and(|t| ["TUMBLE", "HOP", "SESSION"].iter().any(|w| is_word(t, w)));
            if wraps_window {
                depth += 1;
                drop_close.push(depth);
                i = a + 1;
                continue;
            }
            // `TABLE src` inside the window function: keep only the name.
            if tokens.get(a).is_some_and(|t| matches!(t, Token::Word(_))) {
                i = a;
                continue;
            }
        }
        if is_word(t, "DESCRIPTOR") {
            let a = next(i + 1);
            let b = next(a + 1);
            let c = next(b + 1);
            if tokens.get(a) == Some(&Token::LParen) && tokens.get(c) == Some(&Token::RParen) {
                out.push_str(&tokens[b].to_string());
                i = c + 1;
                continue;
            }
        }
        match t {
            Token::LParen => depth += 1,
            Token::RParen => {
                if drop_close.last() == Some(&depth) {
                    drop_close.pop();
                    depth -= 1;
                    i += 1;
                    continue;
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
        out.push_str(&t.to_string());
        i += 1;
    }
    out
}

/// Splits text at top-level `;` (not inside strings, identifiers or
/// comments), dropping empty pieces. Text that does not tokenize is one piece
/// (the parser then reports the error).
fn split_statements(text: &str) -> Vec<&str> {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, text).tokenize_with_location() else {
        return vec![text];
    };
    // Byte offset of each line start, to turn (line, column) into a byte index.
    let mut line_starts = vec![0usize];
    line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
    let byte_at = |line: u64, column: u64| -> Option<usize> {
        let start = *line_starts.get((line as usize).checked_sub(1)?)?;
        let rest = &text[start..];
        let chars = (column as usize).checked_sub(1)?;
        Some(
            start
                + rest
                    .char_indices()
                    .nth(chars)
                    .map(|(i, _)| i)
                    .unwrap_or(rest.len()),
        )
    };
    // A piece starts at its first token that is not whitespace or a comment,
    // so its leading words say what statement it is.
    let mut pieces = Vec::new();
    let mut begin: Option<usize> = None;
    for token in &tokens {
        let Some(at) = byte_at(token.span.start.line, token.span.start.column) else {
            return vec![text];
        };
        match &token.token {
            Token::SemiColon => {
                if let Some(start) = begin.take() {
                    pieces.push(&text[start..at]);
                }
            }
            Token::Whitespace(_) => {}
            _ => {
                begin.get_or_insert(at);
            }
        }
    }
    if let Some(start) = begin {
        pieces.push(&text[start..]);
    }
    pieces
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
