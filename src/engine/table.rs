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

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::DataFusionError;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use futures::StreamExt;

use super::log_error;
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
    /// Notified after each change is applied; views reading the table wait on it. Never closed.
    changed: Arc<tokio::sync::Notify>,
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
            let records = log.read(next, 1024, 64 << 20).map_err(log_error)?;
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
            changed: Arc::new(tokio::sync::Notify::new()),
        })
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The table's change log (views read their changes from it).
    pub fn log(&self) -> Arc<Log> {
        self.log.clone()
    }

    /// Notified after every applied change.
    pub fn changed(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    pub fn num_rows(&self) -> usize {
        self.lock_state().num_rows()
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, ZSetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts rows (already of the table's column types). Durable on return.
    pub async fn insert(self: &Arc<Self>, rows: RecordBatch) -> WeirResult<u64> {
        let writer = self.lock_writer().await;
        let n = rows.num_rows() as u64;
        self.write(writer, ChangeBatch::inserts(rows)).await?;
        Ok(n)
    }

    /// Deletes every row (TRUNCATE). Durable on return.
    pub async fn truncate(self: &Arc<Self>) -> WeirResult<u64> {
        let writer = self.lock_writer().await;
        let batches = self.lock_state().snapshot();
        let rows = concat_batches(&self.schema, &batches).map_err(internal)?;
        let rows = RecordBatch::try_new(nullable(&self.schema), rows.columns().to_vec())
            .map_err(internal)?;
        let n = rows.num_rows() as u64;
        if n > 0 {
            self.write(writer, ChangeBatch::deletes(rows)).await?;
        }
        Ok(n)
    }

    /// Takes the table's writer lock: hold it from reading the rows a change
    /// is computed from until [`TableStore::write`] returns.
    pub async fn lock_writer(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.writer.clone().lock_owned().await
    }

    /// Check, log durably, apply: all on the blocking pool and under the
    /// writer guard, so memory always equals a prefix of the log even if the
    /// statement is cancelled while the write is in flight.
    pub async fn write(
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
            store.lock_state().apply(&change)?;
            store.changed.notify_waiters();
            Ok(())
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
/// retractions, which are checked against NOT NULL by the state; for view and
/// source rows).
pub(super) fn nullable(schema: &Schema) -> SchemaRef {
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
    let rows =
        RecordBatch::try_new(nullable(schema), change.rows.columns().to_vec()).map_err(|e| {
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

/// A Weir error carried through DataFusion; `plan::from_datafusion` unwraps it.
pub(super) fn to_df(e: WeirError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
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
        let n = state
            .config()
            .target_partitions()
            .max(1)
            .min(batches.len().max(1));
        let mut partitions: Vec<Vec<RecordBatch>> = vec![Vec::new(); n];
        for (i, batch) in batches.into_iter().enumerate() {
            partitions[i % n].push(batch);
        }
        let exec =
            MemorySourceConfig::try_new_exec(&partitions, self.schema(), projection.cloned())?;
        Ok(exec)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        Ok(vec![
            TableProviderFilterPushDown::Unsupported;
            filters.len()
        ])
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
            // DataFusion coerces to the table's types, but parameters and
            // literals may arrive in a sibling encoding (Utf8 vs Utf8View).
            let columns = batch
                .columns()
                .iter()
                .zip(schema.fields())
                .map(|(column, field)| {
                    if column.data_type() == field.data_type() {
                        Ok(column.clone())
                    } else {
                        cast(column, field.data_type())
                    }
                })
                .collect::<Result<Vec<ArrayRef>, _>>()?;
            batches.push(RecordBatch::try_new(schema.clone(), columns)?);
        }
        let rows = concat_batches(&schema, &batches)?;
        self.store.insert(rows).await.map_err(to_df)
    }
}
