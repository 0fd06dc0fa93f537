//! The streaming runtime: a dataflow of [`Operator`]s over [`ChangeBatch`]es (Arrow rows with
//! ±1 weights), fed by connector [`Source`](crate::connector::api::Source)s, with watermarks
//! flowing between batches as control messages.
//!
//! A [`Dataflow`] is a tree: inputs at the leaves, one operator per node, the view's state at
//! the root. The runtime (`runtime.rs`) reads every input, derives the input's watermark from
//! its event times (`source.rs`), and pushes each batch up the tree, then the watermark. It
//! owns no SQL: `plan` builds the operators from a DataFusion `LogicalPlan`. It never touches
//! the catalog and never speaks a wire protocol.
//!
//! Operator files, one each: `project.rs` (projection and filter through DataFusion
//! `PhysicalExpr`s), `window.rs` (TUMBLE / HOP window assignment), `session.rs` (SESSION windows), `aggregate.rs` (keyed
//! incremental aggregation with DataFusion accumulators, retraction, window close),
//! `window_aggregate.rs` (EOWC aggregation with `GroupsAccumulator`s),
//! `union.rs` (UNION ALL), `discard.rs` (a source's monitor), `exchange.rs` (N instances of a keyed operator behind a hash
//! exchange, `streaming_parallelism`).

mod aggregate;
mod discard;
mod exchange;
mod project;
mod runtime;
mod session;
mod source;
pub mod task;
mod union;
mod window;
mod window_aggregate;

pub use aggregate::{AggregateInput, AggregateMode, AggregateOperator, WindowKey};
pub use discard::DiscardOperator;
pub use exchange::ExchangeOperator;
pub use project::{FilterOperator, ProjectOperator};
pub(crate) use runtime::filter_change;
pub use runtime::{
    CHECKPOINT_HISTORY, CheckpointHistory, Checkpointing, Control, Dataflow, DataflowBuilder,
    Endpoint, FlushHandle, NodeId, Output, Progress, RunningDataflow, ViewOutput,
};
pub use session::{SessionOperator, assign_sessions};
pub use source::{DeadLetter, LateRow, SourceStats, WatermarkSpec};
pub use task::TaskHandle;
pub use union::UnionOperator;
pub use window::{WindowKind, WindowOperator};
pub use window_aggregate::WindowAggregateOperator;

use crate::state::{SnapshotReader, SnapshotWriter};
use crate::types::{ChangeBatch, WeirResult};

/// Event time and watermarks are nanoseconds since the Unix epoch (`TIMESTAMP` columns).
pub type EventTime = i64;

/// The watermark before anything arrived: nothing is late yet.
pub const NO_WATERMARK: EventTime = i64::MIN;

/// One step of a dataflow.
///
/// Contract:
/// - `on_batch` receives the changes of input `input` (0 for single-input operators) in the
///   order they happened and appends its output changes to `out`. Weights pass through
///   stateless operators unchanged; stateful ones emit a retraction (−1) of every row they take
///   back before its replacement (+1).
/// - `on_watermark` says no row with event time below `watermark` will arrive on `input` any
///   more. The operator appends what that completes (closed windows) to `out` and returns the
///   watermark to pass downstream (the minimum over its inputs for multi-input operators), or
///   `None` when its output watermark did not move. Watermarks never go back.
/// - `on_start` runs once before any input, for output that exists on empty input (a global
///   aggregate's one row).
/// - Errors are the user's (a division by zero in a projection) or Weir bugs; either stops the
///   view, whose error is then shown in `SHOW MATERIALIZED VIEWS`.
/// - Operators never block, never await and never hold locks across calls: the runtime calls
///   them from one task per dataflow.
pub trait Operator: Send {
    /// One line for `EXPLAIN`: the operator and its keys, expressions and emit mode.
    fn describe(&self) -> String;

    fn on_start(&mut self, _out: &mut Vec<ChangeBatch>) -> WeirResult<()> {
        Ok(())
    }

    fn on_batch(
        &mut self,
        input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()>;

    fn on_watermark(
        &mut self,
        _input: usize,
        watermark: EventTime,
        _out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<Option<EventTime>> {
        Ok(Some(watermark))
    }

    /// Writes the operator's whole state for a checkpoint (nothing for stateless ones).
    fn snapshot(&mut self, _out: &mut SnapshotWriter) -> WeirResult<()> {
        Ok(())
    }

    /// Replaces a fresh operator's state with what [`Operator::snapshot`] wrote (instead of
    /// `on_start`).
    fn restore(&mut self, _from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        Ok(())
    }

    /// For an incremental checkpoint: writes only what changed since the last `snapshot`,
    /// `restore` or `snapshot_changes`, and returns true. Returns false, writing nothing and
    /// changing nothing, when the operator keeps no change set (its state is small, or it has
    /// not been snapshotted yet): the runtime then takes [`Operator::snapshot`].
    fn snapshot_changes(&mut self, _out: &mut SnapshotWriter) -> WeirResult<bool> {
        Ok(false)
    }

    /// Applies what `snapshot_changes` wrote, on top of the state restored so far.
    fn restore_changes(&mut self, _from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        Err(crate::types::WeirError::internal(format!(
            "{} has no incremental checkpoint state",
            self.describe()
        )))
    }
}

/// Evaluates `exprs` over `rows`, one array of the batch's length each (DataFusion errors as
/// the user's data errors).
pub(crate) fn evaluate(
    exprs: &[std::sync::Arc<dyn datafusion::physical_expr::PhysicalExpr>],
    rows: &arrow::array::RecordBatch,
) -> WeirResult<Vec<arrow::array::ArrayRef>> {
    let n = rows.num_rows();
    exprs
        .iter()
        .map(|e| e.evaluate(rows).and_then(|v| v.into_array(n)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(project::eval_error)
}

/// The weights at `indices` (None stays None: all inserts).
pub(crate) fn take_weights(
    weights: Option<&arrow::array::Int64Array>,
    indices: &arrow::array::UInt32Array,
) -> WeirResult<Option<arrow::array::Int64Array>> {
    let Some(w) = weights else { return Ok(None) };
    let taken = arrow::compute::take(w, indices, None)
        .map_err(|e| crate::types::WeirError::internal(format!("taking weights: {e}")))?;
    taken
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .cloned()
        .map(Some)
        .ok_or_else(|| crate::types::WeirError::internal("weights are not bigint"))
}

/// Drops zero-row batches and rebuilds a batch with `schema` (same columns, other names).
pub(crate) fn with_schema(
    batch: ChangeBatch,
    schema: &arrow::datatypes::SchemaRef,
) -> WeirResult<ChangeBatch> {
    let options =
        arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.rows.num_rows()));
    let rows = arrow::array::RecordBatch::try_new_with_options(
        schema.clone(),
        batch.rows.columns().to_vec(),
        &options,
    )
    .map_err(|e| crate::types::WeirError::internal(format!("re-schema batch: {e}")))?;
    Ok(ChangeBatch {
        rows,
        weights: batch.weights,
    })
}
