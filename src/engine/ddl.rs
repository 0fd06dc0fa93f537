//! `CREATE TABLE`, `DROP TABLE`, `TRUNCATE`, and opening a table's storage.
//!
//! DataFusion plans the `CREATE TABLE` text (type names, constraints,
//! defaults); Weir keeps the text in the catalog and re-plans it on start, so
//! a table's definition is whatever the statement meant, not a second copy.

use std::collections::HashSet;
use std::fs;
use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema, SchemaRef};
use datafusion::common::Constraint;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{ObjectName, Statement};

use super::table::{TableStore, WeirTable};
use super::{Weir, log_error};
use crate::catalog::{Relation, RelationKind};
use crate::plan::from_datafusion;
use crate::queue::Log;
use crate::types::{SqlState, WeirError, WeirResult};

/// A planned `CREATE TABLE`.
pub(super) struct TableDefinition {
    name: String,
    pub(super) schema: SchemaRef,
    primary_key: Vec<usize>,
    if_not_exists: bool,
    has_query: bool,
}

pub(super) async fn plan_definition(
    weir: &Weir,
    sql: &str,
    stmt: &Statement,
) -> WeirResult<TableDefinition> {
    let state = weir.inner.ctx.state();
    let plan = state
        .statement_to_plan(df_statement(stmt))
        .await
        .map_err(|e| from_datafusion(e, sql))?;
    let LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(create)) = plan else {
        return Err(WeirError::internal("CREATE TABLE did not plan as a table"));
    };
    let name = table_name(&create.name.to_string())?;
    let mut primary_key = Vec::new();
    for constraint in create.constraints.iter() {
        match constraint {
            Constraint::PrimaryKey(columns) => primary_key = columns.clone(),
            Constraint::Unique(_) => {
                return Err(WeirError::unsupported(
                    "UNIQUE constraints are not supported",
                    "use a PRIMARY KEY for the one unique key a table can have",
                ));
            }
        }
    }
    let input_schema = create.input.schema().as_arrow().clone();
    // PostgreSQL: primary key columns are NOT NULL.
    let fields: Vec<Field> = input_schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let nullable = f.is_nullable() && !primary_key.contains(&i);
            Field::new(f.name(), f.data_type().clone(), nullable)
        })
        .collect();
    if !create.column_defaults.is_empty() {
        return Err(WeirError::unsupported(
            "column DEFAULT values are not supported yet",
            "give every column a value in INSERT, or leave it NULL",
        ));
    }
    let has_query = !matches!(create.input.as_ref(), LogicalPlan::EmptyRelation(_));
    Ok(TableDefinition {
        name,
        schema: Arc::new(Schema::new(fields)),
        primary_key,
        if_not_exists: create.if_not_exists,
        has_query,
    })
}

/// Normalised table name in `public`; other schemas are refused.
fn table_name(raw: &str) -> WeirResult<String> {
    let parts: Vec<&str> = raw.split('.').collect();
    match parts.as_slice() {
        [name] | ["public", name] | [super::DATABASE_NAME, "public", name] => {
            Ok(name.trim_matches('"').to_string())
        }
        _ => Err(WeirError::new(
            SqlState("3F000"),
            format!("schema of \"{raw}\" does not exist"),
        )
        .with_hint("create tables in schema public (the default)")),
    }
}

/// `CREATE TABLE`. Returns false when IF NOT EXISTS skipped it.
pub(super) async fn create_table(weir: &Weir, sql: &str, stmt: &Statement) -> WeirResult<bool> {
    let def = plan_definition(weir, sql, stmt).await?;
    if def.has_query {
        return Err(WeirError::unsupported(
            "CREATE TABLE ... AS SELECT is not supported yet",
            "CREATE TABLE with columns, then INSERT INTO ... SELECT",
        ));
    }
    let _ddl = weir.inner.ddl.lock().await;
    if weir.inner.catalog.get(&def.name).is_some() && def.if_not_exists {
        return Ok(false);
    }
    let relation = weir
        .inner
        .catalog
        .create(&def.name, RelationKind::Table, stmt.to_string())?;
    if let Err(e) = open_table(weir, relation).await {
        // Keep catalog and storage in step: a table we cannot open is not created.
        let _ = weir.inner.catalog.drop_relation(&def.name);
        return Err(e);
    }
    Ok(true)
}

/// Opens (creating if new) a table's log, replays it, registers the table.
pub(super) async fn open_table(weir: &Weir, relation: Relation) -> WeirResult<Arc<TableStore>> {
    let stmts = weir.inner.parser.parse_sql(&relation.sql)?;
    let stmt = stmts
        .first()
        .ok_or_else(|| WeirError::internal(format!("empty definition of {}", relation.name)))?;
    let def = plan_definition(weir, &relation.sql, stmt).await?;
    let dir = weir.table_dir(relation.id);
    let log_config = weir.inner.config.log;
    let name = relation.name.clone();
    let store = tokio::task::spawn_blocking(move || -> WeirResult<TableStore> {
        let log = Log::open(&dir, log_config).map_err(log_error)?;
        TableStore::open(relation, def.schema, def.primary_key, Arc::new(log))
    })
    .await
    .map_err(|e| WeirError::internal(format!("opening table task failed: {e}")))??;
    let store = Arc::new(store);
    let provider = WeirTable {
        store: store.clone(),
    };
    weir.register_relation(name.as_str(), Arc::new(provider))?;
    weir.lock_tables().insert(name, store.clone());
    Ok(store)
}

/// `DROP TABLE [IF EXISTS] a, b`. Returns how many were dropped.
pub(super) async fn drop_tables(
    weir: &Weir,
    names: &[ObjectName],
    if_exists: bool,
) -> WeirResult<usize> {
    let _ddl = weir.inner.ddl.lock().await;
    let names: Vec<String> = names
        .iter()
        .map(|n| table_name(&normalise(n)))
        .collect::<WeirResult<_>>()?;
    // Check all first, so a missing name drops nothing (PostgreSQL does the same).
    for name in &names {
        if weir.inner.catalog.get(name).is_none() && !if_exists {
            return Err(WeirError::new(
                SqlState::UNDEFINED_TABLE,
                format!("table \"{name}\" does not exist"),
            )
            .with_hint("use DROP TABLE IF EXISTS to ignore missing tables"));
        }
    }
    for name in &names {
        super::stream::refuse_if_read(weir, name, "table")?;
    }
    let mut dropped = 0;
    for name in &names {
        let Some(relation) = weir.inner.catalog.drop_relation(name)? else {
            continue;
        };
        weir.deregister_relation(name.as_str());
        weir.lock_tables().remove(name);
        let dir = weir.table_dir(relation.id);
        if let Err(e) = fs::remove_dir_all(&dir) {
            // The catalog no longer names it; start-up removes it next time.
            tracing::warn!(table = %name, dir = %dir.display(), error = %e, "could not remove dropped table's files");
        }
        dropped += 1;
    }
    Ok(dropped)
}

/// Resolves a table named in a statement.
pub(super) fn lookup(weir: &Weir, name: &ObjectName) -> WeirResult<Arc<TableStore>> {
    let name = table_name(&normalise(name))?;
    weir.lock_tables().get(&name).cloned().ok_or_else(|| {
        WeirError::new(
            SqlState::UNDEFINED_TABLE,
            format!("relation \"{name}\" does not exist"),
        )
        .with_hint("check the name; \\dt in psql lists the tables")
    })
}

/// Identifier normalisation as DataFusion does it: unquoted → lowercase.
pub(super) fn normalise(name: &ObjectName) -> String {
    name.0
        .iter()
        .map(|part| match part.as_ident() {
            Some(ident) if ident.quote_style.is_some() => ident.value.clone(),
            Some(ident) => ident.value.to_lowercase(),
            None => part.to_string().to_lowercase(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Deletes table directories the catalog does not name (left by a crash
/// between a catalog change and the file change).
pub(super) fn remove_orphan_storage(weir: &Weir, relations: &[Relation]) -> WeirResult<()> {
    let live: HashSet<String> = relations.iter().map(|r| r.id.to_string()).collect();
    let tables_dir = weir.inner.config.data_dir.join("tables");
    let entries = fs::read_dir(&tables_dir)
        .map_err(|e| WeirError::io(format!("listing {}", tables_dir.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !live.contains(&name) {
            tracing::info!(dir = %entry.path().display(), "removing storage of a dropped table");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    // Checkpoints of views, sinks and sources dropped just before a crash.
    let checkpoints_dir = weir.inner.config.data_dir.join("checkpoints");
    if let Ok(entries) = fs::read_dir(&checkpoints_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !live.contains(&name) {
                tracing::info!(dir = %entry.path().display(), "removing checkpoints of a dropped relation");
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

/// For DataFusion's `Statement` wrapper.
pub(super) fn df_statement(stmt: &Statement) -> DFStatement {
    DFStatement::Statement(Box::new(stmt.clone()))
}
