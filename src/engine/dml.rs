//! `UPDATE` and `DELETE`: the rows to change are found by a DataFusion
//! `SELECT` over the table (so any WHERE DataFusion can plan works,
//! subqueries included), then written as one change under the table's
//! writer lock.
//!
//! `DELETE FROM t WHERE p` runs `SELECT * FROM t WHERE p` and retracts what it
//! returns. `UPDATE t SET c = e WHERE p` runs `SELECT t.*, e FROM t WHERE p`
//! and writes the old rows at −1 and the new rows at +1 in one log record.
//! The writer lock is held from the SELECT to the write, so the rows found
//! are exactly the rows the change applies to.

use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch};
use arrow::compute::{cast, concat_batches};
use datafusion::common::ParamValues;
use datafusion::sql::sqlparser::ast::{
    AssignmentTarget, Delete, FromTable, TableFactor, TableWithJoins, Update,
};
use futures::TryStreamExt;

use super::Weir;
use super::ddl::{lookup, normalise};
use super::table::{TableStore, nullable};
use crate::plan::from_datafusion;
use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

/// The table a DML statement targets, and how its columns are qualified.
struct Target {
    store: Arc<TableStore>,
    /// `name [AS alias]` as written, for the FROM clause.
    from: String,
    /// The name the statement's expressions use for the table.
    qualifier: String,
}

fn target(weir: &Weir, table: &TableWithJoins, statement: &str) -> WeirResult<Target> {
    if !table.joins.is_empty() {
        return Err(WeirError::unsupported(
            format!("{statement} with joins is not supported"),
            "use a subquery in WHERE, e.g. WHERE id IN (SELECT ...)",
        ));
    }
    let TableFactor::Table { name, alias, .. } = &table.relation else {
        return Err(WeirError::unsupported(
            format!("{statement} of something other than a table is not supported"),
            "name a table",
        ));
    };
    let store = lookup(weir, name)?;
    let qualifier = match alias {
        Some(alias) => alias.name.to_string(),
        None => name.0.last().map(|p| p.to_string()).unwrap_or_default(),
    };
    let from = match alias {
        Some(alias) => format!("{name} AS {}", alias.name),
        None => name.to_string(),
    };
    Ok(Target {
        store,
        from,
        qualifier,
    })
}

/// Plans and runs a SELECT built from the statement's own expressions.
async fn select(
    weir: &Weir,
    sql: &str,
    params: Option<&ParamValues>,
    original: &str,
) -> WeirResult<Vec<RecordBatch>> {
    let mut statements = weir.inner.parser.parse_sql(sql)?;
    let statement = statements
        .pop()
        .ok_or_else(|| WeirError::internal("empty DML selection"))?;
    let state = weir.inner.ctx.state();
    let mut plan = state
        .statement_to_plan(super::ddl::df_statement(&statement))
        .await
        .map_err(|e| from_datafusion(e, original))?;
    if let Some(values) = params {
        plan = plan
            .replace_params_with_values(values)
            .map_err(|e| from_datafusion(e, original))?;
    }
    let frame = weir
        .inner
        .ctx
        .execute_logical_plan(plan)
        .await
        .map_err(|e| from_datafusion(e, original))?;
    frame
        .execute_stream()
        .await
        .map_err(|e| from_datafusion(e, original))?
        .try_collect()
        .await
        .map_err(|e| from_datafusion(e, original))
}

fn where_clause(selection: &Option<datafusion::sql::sqlparser::ast::Expr>) -> String {
    match selection {
        Some(expr) => format!(" WHERE {expr}"),
        None => String::new(),
    }
}

/// `DELETE`; returns the number of rows deleted.
pub(super) async fn delete(
    weir: &Weir,
    delete: &Delete,
    params: Option<&ParamValues>,
    text: &str,
) -> WeirResult<u64> {
    if delete.using.is_some() || delete.returning.is_some() || delete.limit.is_some() {
        return Err(WeirError::unsupported(
            "DELETE with USING, RETURNING or LIMIT is not supported",
            "use a subquery in WHERE, and SELECT the rows before deleting them",
        ));
    }
    let (FromTable::WithFromKeyword(tables) | FromTable::WithoutKeyword(tables)) = &delete.from;
    let [table] = tables.as_slice() else {
        return Err(WeirError::unsupported(
            "DELETE from several tables is not supported",
            "delete from one table per statement",
        ));
    };
    let target = target(weir, table, "DELETE")?;
    let writer = target.store.lock_writer().await;
    let sql = format!(
        "SELECT {}.* FROM {}{}",
        target.qualifier,
        target.from,
        where_clause(&delete.selection)
    );
    let batches = select(weir, &sql, params, text).await?;
    let schema = nullable(&target.store.schema());
    let rows = concat_batches(&schema, &batches).map_err(internal)?;
    let rows = RecordBatch::try_new(schema, rows.columns().to_vec()).map_err(internal)?;
    let n = rows.num_rows() as u64;
    if n > 0 {
        target
            .store
            .write(writer, ChangeBatch::deletes(rows))
            .await?;
    }
    Ok(n)
}

/// `UPDATE`; returns the number of rows updated.
pub(super) async fn update(
    weir: &Weir,
    update: &Update,
    params: Option<&ParamValues>,
    text: &str,
) -> WeirResult<u64> {
    if update.from.is_some() || update.returning.is_some() || update.limit.is_some() {
        return Err(WeirError::unsupported(
            "UPDATE with FROM, RETURNING or LIMIT is not supported",
            "use a subquery in SET or WHERE, e.g. SET x = (SELECT ...)",
        ));
    }
    let target = target(weir, &update.table, "UPDATE")?;
    let schema = target.store.schema();
    let mut assigned: Vec<(usize, String)> = Vec::new();
    for assignment in &update.assignments {
        let AssignmentTarget::ColumnName(column) = &assignment.target else {
            return Err(WeirError::unsupported(
                "assigning to a tuple of columns is not supported",
                "assign each column: SET a = ..., b = ...",
            ));
        };
        let name = normalise(column);
        let name = name.rsplit('.').next().unwrap_or(&name).to_string();
        let index = schema.index_of(&name).map_err(|_| {
            WeirError::new(
                SqlState::UNDEFINED_COLUMN,
                format!(
                    "column \"{name}\" of relation \"{}\" does not exist",
                    target.store.relation.name
                ),
            )
        })?;
        if assigned.iter().any(|(i, _)| *i == index) {
            return Err(WeirError::new(
                SqlState::SYNTAX_ERROR,
                format!("multiple assignments to same column \"{name}\""),
            ));
        }
        assigned.push((index, assignment.value.to_string()));
    }
    let writer = target.store.lock_writer().await;
    let values: String = assigned
        .iter()
        .enumerate()
        .map(|(k, (_, expr))| format!(", ({expr}) AS __weir_set_{k}"))
        .collect();
    let sql = format!(
        "SELECT {}.*{values} FROM {}{}",
        target.qualifier,
        target.from,
        where_clause(&update.selection)
    );
    let batches = select(weir, &sql, params, text).await?;
    let width = schema.fields().len();
    let found_schema = match batches.first() {
        Some(b) => b.schema(),
        None => return Ok(0),
    };
    let found = concat_batches(&found_schema, &batches).map_err(internal)?;
    let n = found.num_rows() as u64;
    if n == 0 {
        return Ok(0);
    }
    let old: Vec<ArrayRef> = found.columns()[..width].to_vec();
    let mut new = old.clone();
    for (k, (index, _)) in assigned.iter().enumerate() {
        let field = schema.field(*index);
        let value = found.column(width + k);
        new[*index] = cast(value, field.data_type()).map_err(|e| {
            WeirError::new(
                SqlState::DATATYPE_MISMATCH,
                format!(
                    "column \"{}\" is of type {} but expression is of type {}",
                    field.name(),
                    field.data_type(),
                    value.data_type()
                ),
            )
            .with_detail(e.to_string())
            .with_hint("rewrite or cast the expression")
        })?;
    }
    let rows_schema = nullable(&schema);
    let old = RecordBatch::try_new(rows_schema.clone(), old).map_err(internal)?;
    let new = RecordBatch::try_new(rows_schema.clone(), new).map_err(internal)?;
    let rows = concat_batches(&rows_schema, [&old, &new]).map_err(internal)?;
    let mut weights = vec![-1i64; old.num_rows()];
    weights.extend(std::iter::repeat_n(1, new.num_rows()));
    let change = ChangeBatch {
        rows,
        weights: Some(Int64Array::from(weights)),
    };
    target.store.write(writer, change).await?;
    Ok(n)
}

fn internal(e: arrow::error::ArrowError) -> WeirError {
    WeirError::internal(format!("building DML change: {e}"))
}
