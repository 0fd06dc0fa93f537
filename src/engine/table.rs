//! Tables: a change log on disk ([`crate::queue::Log`]) consolidated into
//! memory ([`ZSetState`]), exposed to DataFusion as a [`TableProvider`].
//!
//! Every write is checked (primary key, NOT NULL), appended to the table's log
//! and fsync'd, and only then applied to memory, so what a client was told
//! succeeded is on disk, and what memory holds is always a prefix of the log.
//! On start the log is replayed into memory. Writers of one table are
//! serialised; readers take a snapshot and never wait for a writer's fsync.

use std::fmt;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, UInt64Array};
use arrow::compute::{cast, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{DFSchema, DataFusionError};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::create_physical_expr;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use datafusion::prelude::lit;
use futures::StreamExt;

use super::log_error;
use crate::plan::from_datafusion;
use crate::catalog::Relation;
use crate::format::ipc::{decode_change, encode_change};
use crate::queue::{Log, NewRecord};
use crate::state::ZSetState;
use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

/// One table's storage: its log and its consolidated rows.
pub struct TableStore {
    pub relation: Relation,
    schema: SchemaRef,
    log: Arc<Log>,
    /// Serialises writers of this table: computing a change, checking it,
    /// appending + fsyncing it and applying it must not interleave with another
    /// writer. A tokio mutex because it is held across awaits; the owned guard
    /// moves into the blocking write so a cancelled statement cannot release
    /// it while its record is still being written.
    writer: Arc<tokio::sync::Mutex<()>>,
    /// The consolidated rows. Held only to take a snapshot or apply a change.
    state: Mutex<ZSetState>,
}

impl fmt::Debug for TableStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableStore")
            .field("name", &self.relation.name)
            .finish()
    }
}

impl TableStore {
    /// Opens the table's log and replays it into memory.
    pub fn open(
        relation: Relation,
        schema: SchemaRef,
        primary_key: Vec<usize>,
        log: Arc<Log>,
    ) -> WeirResult<TableStore> {
        let mut state = ZSetState::try_new(schema.clone(), primary_key)?;
        let mut next = log.start_offset();
        loop {
            let records = log
                .read(next, 1024, 64 << 20)
                .map_err(log_error)?;
            let Some(last) = records.last() else { break };
            next = last.offset + 1;
            for record in &records {
                for change in decode_change(&record.payload)? {
                    let change = conform(change, &schema)?;
                    state.apply(&change).map_err(|e| {
                        e.with_detail(format!(
                            "replaying table \"{}\" at log offset {}",
                            relation.name, record.offset
                        ))
                    })?;
                }
            }
        }
        Ok(TableStore {
            relation,
            schema,
            log,
            writer: Arc::new(tokio::sync::Mutex::new(())),
            state: Mutex::new(state),
        })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    pub fn num_rows(&self) -> usize {
        self.lock_state().num_rows()
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, ZSetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts rows (already of the table's column types). Durable on return.
    pub async fn insert(self: &Arc<Self>, rows: RecordBatch) -> WeirResult<u64> {
        let writer = self.writer.clone().lock_owned().await;
        let n = rows.num_rows() as u64;
        self.write_locked(writer, ChangeBatch::inserts(rows)).await?;
        Ok(n)
    }

    /// Deletes the rows matching every filter. Durable on return.
    pub async fn delete_where(
        self: &Arc<Self>,
        session: &dyn Session,
        filters: &[Expr],
    ) -> WeirResult<u64> {
        let writer = self.writer.clone().lock_owned().await;
        let snapshot = self.current_rows()?;
        let mask = self.evaluate_filters(session, filters, &snapshot)?;
        let deleted = filter_record_batch(&snapshot, &mask).map_err(internal)?;
        let n = deleted.num_rows() as u64;
        if n > 0 {
            self.write_locked(writer, ChangeBatch::deletes(deleted))
                .await?;
        }
        Ok(n)
    }

    /// Updates the rows matching every filter. Durable on return.
    pub async fn update_where(
        self: &Arc<Self>,
        session: &dyn Session,
        assignments: &[(String, Expr)],
        filters: &[Expr],
    ) -> WeirResult<u64> {
        let writer = self.writer.clone().lock_owned().await;
        let snapshot = self.current_rows()?;
        let mask = self.evaluate_filters(session, filters, &snapshot)?;
        let old = filter_record_batch(&snapshot, &mask).map_err(internal)?;
        let n = old.num_rows() as u64;
        if n == 0 {
            return Ok(0);
        }
        let df_schema = DFSchema::try_from(self.schema.clone()).map_err(internal_df)?;
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (idx, field) in self.schema.fields().iter().enumerate() {
            let assigned = assignments.iter().find(|(name, _)| name == field.name());
            let column = match assigned {
                None => old.column(idx).clone(),
                Some((_, expr)) => {
                    let physical = create_physical_expr(
                        expr,
                        &df_schema,
                        session.execution_props(),
                        &PhysicalPlanningContext::default(),
                    )
                        .map_err(|e| from_datafusion(e, ""))?;
                    let value = physical
                        .evaluate(&old)
                        .and_then(|v| v.into_array(old.num_rows()))
                        .map_err(|e| from_datafusion(e, ""))?;
                    cast(&value, field.data_type()).map_err(|e| {
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
                    })?
                }
            };
            columns.push(column);
        }
        let new = RecordBatch::try_new(nullable(&self.schema), columns).map_err(internal)?;
        let old = old.with_schema(nullable(&self.schema)).map_err(internal)?;
        let rows = concat_batches(&nullable(&self.schema), [&old, &new]).map_err(internal)?;
        let mut weights = vec![-1i64; old.num_rows()];
        weights.extend(std::iter::repeat_n(1, new.num_rows()));
        let change = ChangeBatch {
            rows,
            weights: Some(Int64Array::from(weights)),
        };
        self.write_locked(writer, change).await?;
        Ok(n)
    }

    /// All current rows in one batch (writers hold the writer lock, so this
    /// is the state the change will apply to).
    fn current_rows(&self) -> WeirResult<RecordBatch> {
        let batches = self.lock_state().snapshot();
        concat_batches(&self.schema, &batches).map_err(internal)
    }

    fn evaluate_filters(
        &self,
        session: &dyn Session,
        filters: &[Expr],
        batch: &RecordBatch,
    ) -> WeirResult<BooleanArray> {
        let predicate = filters
            .iter()
            .cloned()
            .reduce(|a, b| a.and(b))
            .unwrap_or_else(|| lit(true));
        let df_schema = DFSchema::try_from(self.schema.clone()).map_err(internal_df)?;
        let physical = create_physical_expr(
            &predicate,
            &df_schema,
            session.execution_props(),
            &PhysicalPlanningContext::default(),
        )
            .map_err(|e| from_datafusion(e, ""))?;
        let value = physical
            .evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .map_err(|e| from_datafusion(e, ""))?;
        let mask = value
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| {
                WeirError::new(
                    SqlState::DATATYPE_MISMATCH,
                    "argument of WHERE must be type boolean",
                )
            })?;
        // NULL means "not matched".
        Ok(mask.iter().map(|v| Some(v == Some(true))).collect())
    }

    /// Check, log durably, apply: all on the blocking pool and under the
    /// writer guard, so memory always equals a prefix of the log even if the
    /// statement is cancelled while the write is in flight.
    async fn write_locked(
        self: &Arc<Self>,
        writer: tokio::sync::OwnedMutexGuard<()>,
        change: ChangeBatch,
    ) -> WeirResult<()> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let _writer = writer;
            store.lock_state().check(&change)?;
            let record = NewRecord {
                timestamp_ms: chrono::Utc::now().timestamp_millis(),
                key: None,
                headers: Vec::new(),
                payload: Bytes::from(encode_change(&change)?),
            };
            store.log.append_durable(&[record]).map_err(log_error)?;
            store.lock_state().apply(&change)
        })
        .await
        .map_err(|e| WeirError::internal(format!("table writer task failed: {e}")))?
    }

    /// Flushes the log to disk (shutdown).
    pub fn sync(&self) -> WeirResult<()> {
        self.log.sync_all().map_err(log_error)
    }
}

/// The schema with every column nullable (for change batches that carry
/// retractions, which are checked against NOT NULL by the state).
pub(super) fn nullable(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ))
}

/// Gives a replayed change the table's schema (field names and nullability).
fn conform(change: ChangeBatch, schema: &SchemaRef) -> WeirResult<ChangeBatch> {
    let rows = RecordBatch::try_new(nullable(schema), change.rows.columns().to_vec())
        .map_err(|e| {
            WeirError::new(
                SqlState::DATA_CORRUPTED,
                format!("log record does not match the table's columns: {e}"),
            )
        })?;
    Ok(ChangeBatch {
        rows,
        weights: change.weights,
    })
}

fn internal(e: arrow::error::ArrowError) -> WeirError {
    WeirError::internal(format!("table storage: {e}"))
}

fn internal_df(e: DataFusionError) -> WeirError {
    WeirError::internal(format!("table storage: {e}"))
}

fn to_df(e: WeirError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// One-row `count` result that DataFusion expects from a DML plan.
fn count_exec(n: u64) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    let schema = Arc::new(Schema::new(vec![Field::new("count", DataType::UInt64, false)]));
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(UInt64Array::from(vec![n]))])?;
    let exec = MemorySourceConfig::try_new_exec(&[vec![batch]], schema, None)?;
    Ok(exec)
}

/// The [`TableProvider`] DataFusion plans against; cheap to clone.
#[derive(Debug, Clone)]
pub struct WeirTable {
    pub store: Arc<TableStore>,
}

#[async_trait]
impl TableProvider for WeirTable {
    fn schema(&self) -> SchemaRef {
        self.store.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let batches = self.store.lock_state().snapshot();
        // Spread batches over the session's partitions so scans use every core.
        let n = state.config().target_partitions().max(1).min(batches.len().max(1));
        let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
        for (i, batch) in batches.into_iter().enumerate() {
            partitions[i % n].push(batch);
        }
        let exec = MemorySourceConfig::try_new_exec(&partitions, self.schema(), projection.cloned())?;
        Ok(exec)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Unsupported; filters.len()])
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            return Err(to_df(WeirError::unsupported(
                format!("{insert_op} is not supported"),
                "use INSERT, or DELETE then INSERT",
            )));
        }
        let sink = TableSink {
            store: self.store.clone(),
        };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }

    async fn delete_from(
        &self,
        state: &dyn Session,
        filters: Vec<Expr>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        // Applied while the physical plan is built (as DataFusion's MemTable
        // does): the statement's work is done when its plan exists.
        let n = self
            .store
            .delete_where(state, &filters)
            .await
            .map_err(to_df)?;
        count_exec(n)
    }

    async fn update(
        &self,
        state: &dyn Session,
        assignments: Vec<(String, Expr)>,
        filters: Vec<Expr>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let n = self
            .store
            .update_where(state, &assignments, &filters)
            .await
            .map_err(to_df)?;
        count_exec(n)
    }
}

/// Receives the rows of an `INSERT` from DataFusion and writes them.
#[derive(Debug)]
struct TableSink {
    store: Arc<TableStore>,
}

impl DisplayAs for TableSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WeirTableSink: table={}", self.store.relation.name)
    }
}

#[async_trait]
impl DataSink for TableSink {
    fn schema(&self) -> &SchemaRef {
        &self.store.schema
    }

    async fn write_all(
        &self,
        mut data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> datafusion::error::Result<u64> {
        let schema = nullable(&self.store.schema);
        let mut batches = Vec::new();
        while let Some(batch) = data.next().await {
            let batch = batch?;
            batches.push(RecordBatch::try_new(schema.clone(), batch.columns().to_vec())?);
        }
        let rows = concat_batches(&schema, &batches)?;
        self.store.insert(rows).await.map_err(to_df)
    }
}
