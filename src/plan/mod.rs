//! Statement → DataFusion `LogicalPlan`: which statements DataFusion plans,
//! what their parameters and result columns are, and how DataFusion's errors
//! read to a PostgreSQL client.
//!
//! `stream.rs` compiles a materialized view's plan into a streaming dataflow;
//! `window.rs` holds the TUMBLE/HOP table functions both batch and streaming
//! plans use. It never executes anything or touches storage.

mod errors;
mod names;
pub mod stream;
pub mod window;

use datafusion::arrow::datatypes::DataType;
use datafusion::error::Result as DFResult;
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::sqlparser::ast::Statement;

pub use errors::from_datafusion;
pub use names::pg_column_names;

use crate::types::{WeirError, WeirResult};

/// What kind of work a statement is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Returns rows; planned and run by DataFusion.
    Query,
    /// DML planned by DataFusion, run against Weir's table providers.
    Insert,
    Update,
    Delete,
    /// Handled by the engine itself (DDL, COPY, SET/SHOW, transactions).
    Utility,
}

/// Classifies a parsed statement.
pub fn classify(statement: &Statement) -> WeirResult<Kind> {
    Ok(match statement {
        Statement::Query(_) => Kind::Query,
        Statement::Insert(_) => Kind::Insert,
        Statement::Update { .. } => Kind::Update,
        Statement::Delete(_) => Kind::Delete,
        Statement::Explain {
            statement: inner, ..
        } => {
            // DataFusion applies UPDATE/DELETE while building their physical
            // plan, so explaining one would run it.
            if matches!(
                inner.as_ref(),
                Statement::Update { .. } | Statement::Delete(_)
            ) {
                return Err(WeirError::unsupported(
                    "EXPLAIN of UPDATE or DELETE is not supported",
                    "EXPLAIN the equivalent SELECT ... WHERE to see how rows are found",
                ));
            }
            Kind::Query
        }
        Statement::ShowTables { .. } | Statement::ShowColumns { .. } => Kind::Query,
        _ => Kind::Utility,
    })
}

/// Types of `$1`, `$2`, ... in order; `None` where DataFusion cannot infer one.
pub fn parameter_types(plan: &LogicalPlan) -> DFResult<Vec<Option<DataType>>> {
    let mut numbered: Vec<(usize, Option<DataType>)> = plan
        .get_parameter_types()?
        .into_iter()
        .filter_map(|(name, ty)| {
            name.trim_start_matches('$')
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .map(|n| (n, ty))
        })
        .collect();
    numbered.sort_by_key(|(n, _)| *n);
    let count = numbered.last().map(|(n, _)| *n).unwrap_or(0);
    let mut types = vec![None; count];
    for (n, ty) in numbered {
        types[n - 1] = ty;
    }
    Ok(types)
}
