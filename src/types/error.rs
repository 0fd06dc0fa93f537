//! [`WeirError`]: the error every client sees, in PostgreSQL's shape (SQLSTATE,
//! message, detail, hint, position).
//!
//! Messages are lowercase without a trailing period, as PostgreSQL writes them.
//! Module errors convert into this at the module boundary; nothing here logs.

use std::fmt;

/// A PostgreSQL error code (SQLSTATE), see
/// <https://www.postgresql.org/docs/current/errcodes-appendix.html>.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    pub const UNDEFINED_TABLE: SqlState = SqlState("42P01");
    pub const UNDEFINED_COLUMN: SqlState = SqlState("42703");
    pub const UNDEFINED_FUNCTION: SqlState = SqlState("42883");
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    pub const DUPLICATE_TABLE: SqlState = SqlState("42P07");
    pub const DUPLICATE_COLUMN: SqlState = SqlState("42701");
    pub const AMBIGUOUS_COLUMN: SqlState = SqlState("42702");
    pub const DATATYPE_MISMATCH: SqlState = SqlState("42804");
    pub const GROUPING_ERROR: SqlState = SqlState("42803");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    pub const UNIQUE_VIOLATION: SqlState = SqlState("23505");
    pub const NOT_NULL_VIOLATION: SqlState = SqlState("23502");
    pub const DIVISION_BY_ZERO: SqlState = SqlState("22012");
    pub const NUMERIC_VALUE_OUT_OF_RANGE: SqlState = SqlState("22003");
    pub const INVALID_TEXT_REPRESENTATION: SqlState = SqlState("22P02");
    pub const INVALID_DATETIME_FORMAT: SqlState = SqlState("22007");
    pub const BAD_COPY_FILE_FORMAT: SqlState = SqlState("22P04");
    pub const DATA_EXCEPTION: SqlState = SqlState("22000");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const UNDEFINED_PARAMETER: SqlState = SqlState("42704");
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const IO_ERROR: SqlState = SqlState("58030");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
    pub const CONNECTION_EXCEPTION: SqlState = SqlState("08000");
    pub const UNABLE_TO_CONNECT: SqlState = SqlState("08001");
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    pub const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState("55000");
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
    pub const DATA_CORRUPTED: SqlState = SqlState("XX001");

    pub fn code(&self) -> &'static str {
        self.0
    }
}

/// The error a client sees. Construct with the helpers ([`WeirError::new`],
/// [`WeirError::internal`], ...) and refine with `with_detail`/`with_hint`.
#[derive(Debug, Clone)]
pub struct WeirError {
    pub sqlstate: SqlState,
    /// Lowercase, no trailing period, PostgreSQL style.
    pub message: String,
    pub detail: Option<String>,
    /// What the user can do about it.
    pub hint: Option<String>,
    /// 1-based character position in the statement text, as PostgreSQL reports it.
    pub position: Option<usize>,
}

pub type WeirResult<T> = Result<T, WeirError>;

impl WeirError {
    pub fn new(sqlstate: SqlState, message: impl Into<String>) -> Self {
        WeirError {
            sqlstate,
            message: message.into(),
            detail: None,
            hint: None,
            position: None,
        }
    }

    /// A Weir bug: something that must not happen whatever the input.
    pub fn internal(message: impl Into<String>) -> Self {
        WeirError::new(SqlState::INTERNAL_ERROR, message)
            .with_hint("this is a bug in Weir; please report it with the statement that caused it")
    }

    /// Something Weir does not do; `instead` says what to use instead.
    pub fn unsupported(what: impl Into<String>, instead: impl Into<String>) -> Self {
        WeirError::new(SqlState::FEATURE_NOT_SUPPORTED, what).with_hint(instead)
    }

    /// A file or disk operation failed.
    pub fn io(context: impl fmt::Display, err: impl fmt::Display) -> Self {
        WeirError::new(SqlState::IO_ERROR, format!("{context}: {err}"))
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_position(mut self, position: usize) -> Self {
        self.position = Some(position);
        self
    }

    pub fn is_internal(&self) -> bool {
        self.sqlstate == SqlState::INTERNAL_ERROR
    }
}

impl fmt::Display for WeirError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.sqlstate.0, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

impl std::error::Error for WeirError {}
