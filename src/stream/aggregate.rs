//! [`AggregateOperator`]: `GROUP BY` kept up to date incrementally with DataFusion's
//! accumulators, correct under retraction, with windows closed by the watermark.
//!
//! Per group it keeps one accumulator per aggregate, in one of three ways, chosen per
//! aggregate when the operator is built:
//! - *append*: the input never retracts; `update_batch` only (any function);
//! - *retract*: the input may retract and the function is invertible (count, sum, avg, and
//!   count(DISTINCT) through DataFusion's sliding accumulators); `update_batch` and
//!   `retract_batch`;
//! - *recompute*: the input may retract and the function is not invertible (min, max,
//!   string_agg, bool_and, ...), or is one whose `evaluate` may consume its state: the group
//!   keeps the multiset of its argument values and evaluates a fresh accumulator over them
//!   when it changes. So `min`/`max` fall back to the next value when the current one is
//!   deleted.
//!
//! After each input batch an updating aggregate emits, for each group whose result changed,
//! the retraction of its previous row and its new row; a group whose rows are all retracted
//! disappears, except the single group of a global aggregate, which always has a row (count 0,
//! sum NULL), as in batch SQL. When the group key holds a window (`window_end`, or
//! `window_start` + size), a watermark at or past the window's end closes it: with
//! `EMIT ON WINDOW CLOSE` the group's final row is emitted then (and never before); either way
//! its state is freed. Rows for closed windows cannot arrive: windowed inputs drop late rows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, TimestampNanosecondArray, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::logical_expr::Accumulator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::scalar::ScalarValue;

use super::project::eval_error;
use super::{EventTime, NO_WATERMARK, Operator};
use crate::state::{SnapshotReader, SnapshotWriter};
use crate::types::{ChangeBatch, WeirError, WeirResult};

/// An aggregate function with its optional `FILTER (WHERE ...)`.
pub type AggregateInput = (Arc<AggregateFunctionExpr>, Option<Arc<dyn PhysicalExpr>>);

/// When results leave the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregateMode {
    /// After every batch, as retraction + new row.
    Updating,
    /// Once per window, when the watermark passes its end.
    EmitOnWindowClose,
}

/// Which group-by column is a window bound, and how to get the window's end from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowKey {
    /// Index into the group-by expressions.
    pub group_index: usize,
    /// Added to the column's value to get the window's end (0 for `window_end`, the window
    /// size for `window_start`).
    pub end_offset_ns: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AccKind {
    Append,
    Retract,
    Recompute,
}

/// Functions whose `evaluate` leaves the accumulator usable and whose plain accumulator can
/// take further `update_batch` calls after it.
const REUSABLE: &[&str] = &[
    "count", "sum", "avg", "mean", "min", "max", "bool_and", "bool_or", "bit_and", "bit_or",
    "bit_xor",
];
/// Functions whose sliding accumulator retracts any earlier value, in any order.
const INVERTIBLE: &[&str] = &["count", "sum", "avg", "mean"];

struct Agg {
    expr: Arc<AggregateFunctionExpr>,
    filter: Option<Arc<dyn PhysicalExpr>>,
    kind: AccKind,
    /// Encodes argument rows for the recompute multiset.
    converter: Option<RowConverter>,
}

struct Group {
    key: Vec<ScalarValue>,
    /// `key` in the row format: its entry in `AggregateOperator::index`.
    encoded: Box<[u8]>,
    /// Sum of the weights of its input rows.
    count: i64,
    /// Per aggregate; `None` for recompute aggregates.
    accs: Vec<Option<Box<dyn Accumulator>>>,
    /// Per aggregate: argument rows → multiplicity (recompute aggregates only).
    values: Vec<BTreeMap<Vec<u8>, i64>>,
    /// The aggregate values last emitted (None: no row emitted, or retracted).
    emitted: Option<Vec<ScalarValue>>,
    window_end: Option<EventTime>,
    dirty: bool,
}

pub struct AggregateOperator {
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    group_names: Vec<String>,
    aggs: Vec<Agg>,
    schema: SchemaRef,
    mode: AggregateMode,
    window: Option<WindowKey>,
    key_converter: RowConverter,
    /// Group key (row format) → slot in `groups`.
    index: HashMap<Box<[u8]>, usize>,
    groups: Vec<Option<Group>>,
    free: Vec<usize>,
    /// Window end → slots of the groups of that window.
    closing: BTreeMap<EventTime, Vec<usize>>,
    watermark: EventTime,
    /// What changed since the last checkpoint, for an incremental one; `None` until the
    /// first snapshot or restore (nothing is tracked while checkpoints are off).
    changes: Option<ChangeSet>,
}

/// The groups an incremental checkpoint writes.
#[derive(Default)]
struct ChangeSet {
    /// Slots whose group was created or changed (a slot may since hold another group).
    slots: HashSet<usize>,
    /// Keys (row format) of the groups removed, applied before the changed groups.
    removed: Vec<Box<[u8]>>,
}

impl AggregateOperator {
    /// `append_only`: whether the input never retracts. `schema`: the output (group columns,
    /// then aggregates).
    #[allow(clippy::too_many_arguments)]
    pub fn try_new(
        group_exprs: Vec<Arc<dyn PhysicalExpr>>,
        group_names: Vec<String>,
        aggs: Vec<AggregateInput>,
        input_schema: &arrow::datatypes::Schema,
        schema: SchemaRef,
        mode: AggregateMode,
        window: Option<WindowKey>,
        append_only: bool,
    ) -> WeirResult<Self> {
        let key_fields = group_exprs
            .iter()
            .map(|e| {
                e.data_type(input_schema)
                    .map(SortField::new)
                    .map_err(eval_error)
            })
            .collect::<WeirResult<Vec<_>>>()?;
        let key_converter = RowConverter::new(key_fields).map_err(|e| {
            WeirError::unsupported(
                format!("cannot group by these column types: {e}"),
                "group by scalar columns (numbers, text, timestamps)",
            )
        })?;
        let aggs = aggs
            .into_iter()
            .map(|(expr, filter)| {
                let name = expr.fun().name().to_ascii_lowercase();
                let kind = if append_only && REUSABLE.contains(&name.as_str()) {
                    AccKind::Append
                } else if !append_only && INVERTIBLE.contains(&name.as_str()) {
                    AccKind::Retract
                } else {
                    AccKind::Recompute
                };
                let converter = if kind == AccKind::Recompute {
                    let fields = expr
                        .expressions()
                        .iter()
                        .map(|e| e.data_type(input_schema).map(SortField::new))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(eval_error)?;
                    Some(RowConverter::new(fields).map_err(|e| {
                        WeirError::unsupported(
                            format!("cannot keep values of {name}'s argument types: {e}"),
                            "aggregate scalar columns",
                        )
                    })?)
                } else {
                    None
                };
                Ok(Agg {
                    expr,
                    filter,
                    kind,
                    converter,
                })
            })
            .collect::<WeirResult<Vec<_>>>()?;
        Ok(AggregateOperator {
            group_exprs,
            group_names,
            aggs,
            schema,
            mode,
            window,
            key_converter,
            index: HashMap::new(),
            groups: Vec::new(),
            free: Vec::new(),
            closing: BTreeMap::new(),
            watermark: NO_WATERMARK,
            changes: None,
        })
    }

    fn is_global(&self) -> bool {
        self.group_exprs.is_empty()
    }

    fn new_accumulators(&self) -> WeirResult<Vec<Option<Box<dyn Accumulator>>>> {
        self.aggs
            .iter()
            .map(|a| match a.kind {
                AccKind::Append => a.expr.create_accumulator().map(Some),
                AccKind::Retract => a.expr.create_sliding_accumulator().map(Some),
                AccKind::Recompute => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(eval_error)
    }

    /// The slot of the group of row `row`, created if new.
    fn slot(&mut self, keys: &Rows, key_arrays: &[ArrayRef], row: usize) -> WeirResult<usize> {
        let encoded = keys.row(row);
        if let Some(&slot) = self.index.get(encoded.as_ref()) {
            return Ok(slot);
        }
        let key = key_arrays
            .iter()
            .map(|a| ScalarValue::try_from_array(a, row))
            .collect::<Result<Vec<_>, _>>()
            .map_err(eval_error)?;
        let window_end = match self.window {
            Some(w) => {
                let column = key_arrays[w.group_index]
                    .as_any()
                    .downcast_ref::<TimestampNanosecondArray>()
                    .ok_or_else(|| WeirError::internal("window key is not timestamp(ns)"))?;
                Some(column.value(row).saturating_add(w.end_offset_ns))
            }
            None => None,
        };
        let group = Group {
            key,
            encoded: encoded.as_ref().into(),
            count: 0,
            accs: self.new_accumulators()?,
            values: vec![BTreeMap::new(); self.aggs.len()],
            emitted: None,
            window_end,
            dirty: false,
        };
        let slot = self.place(group);
        self.index.insert(encoded.as_ref().into(), slot);
        if let Some(end) = window_end {
            self.closing.entry(end).or_default().push(slot);
        }
        Ok(slot)
    }

    /// Puts `group` in a free slot (or a new one) and returns the slot.
    fn place(&mut self, group: Group) -> usize {
        match self.free.pop() {
            Some(s) => {
                self.groups[s] = Some(group);
                s
            }
            None => {
                self.groups.push(Some(group));
                self.groups.len() - 1
            }
        }
    }

    fn remove(&mut self, slot: usize) -> WeirResult<()> {
        if let Some(group) = self.groups[slot].take() {
            self.index.remove(&group.encoded);
            self.free.push(slot);
            if let Some(changes) = &mut self.changes {
                changes.removed.push(group.encoded);
            }
        }
        Ok(())
    }

    /// The aggregate values of a group now.
    fn evaluate(&self, group: &mut Group) -> WeirResult<Vec<ScalarValue>> {
        let mut values = Vec::with_capacity(self.aggs.len());
        for (a, agg) in self.aggs.iter().enumerate() {
            let value = match &mut group.accs[a] {
                Some(acc) => acc.evaluate().map_err(eval_error)?,
                None => {
                    let mut acc = agg.expr.create_accumulator().map_err(eval_error)?;
                    let converter = agg.converter.as_ref().ok_or_else(|| {
                        WeirError::internal("recompute aggregate without converter")
                    })?;
                    if !group.values[a].is_empty() {
                        let mut rows = converter.empty_rows(group.values[a].len(), 64);
                        let parser = converter.parser();
                        for (bytes, &n) in &group.values[a] {
                            for _ in 0..n {
                                rows.push(parser.parse(bytes));
                            }
                        }
                        let columns = converter
                            .convert_rows(&rows)
                            .map_err(|e| WeirError::internal(format!("aggregate values: {e}")))?;
                        acc.update_batch(&columns).map_err(eval_error)?;
                    }
                    acc.evaluate().map_err(eval_error)?
                }
            };
            values.push(value);
        }
        Ok(values)
    }

    /// Output rows for `(key, values, weight)` triples.
    fn rows(
        &self,
        rows: Vec<(Vec<ScalarValue>, Vec<ScalarValue>, i64)>,
    ) -> WeirResult<ChangeBatch> {
        let n_keys = self.group_exprs.len();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for c in 0..self.schema.fields().len() {
            let values = rows.iter().map(|(k, v, _)| {
                if c < n_keys {
                    k[c].clone()
                } else {
                    v[c - n_keys].clone()
                }
            });
            let array = if rows.is_empty() {
                arrow::array::new_empty_array(self.schema.field(c).data_type())
            } else {
                ScalarValue::iter_to_array(values).map_err(eval_error)?
            };
            let want = self.schema.field(c).data_type();
            let array = if array.data_type() != want {
                arrow::compute::cast(&array, want)
                    .map_err(|e| WeirError::internal(format!("aggregate output type: {e}")))?
            } else {
                array
            };
            columns.push(array);
        }
        let weights: Vec<i64> = rows.iter().map(|(_, _, w)| *w).collect();
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| WeirError::internal(format!("aggregate output: {e}")))?;
        Ok(ChangeBatch {
            rows: batch,
            weights: Some(arrow::array::Int64Array::from(weights)),
        })
    }

    /// Emits what changed in the dirty groups (updating mode) and drops empty groups.
    fn emit_dirty(&mut self, dirty: Vec<usize>, out: &mut Vec<ChangeBatch>) -> WeirResult<()> {
        let mut rows = Vec::new();
        for slot in dirty {
            let Some(mut group) = self.groups[slot].take() else {
                continue;
            };
            group.dirty = false;
            let alive = group.count > 0 || self.is_global();
            if group.count < 0 {
                return Err(WeirError::internal(
                    "aggregate group retracted more rows than it received",
                ));
            }
            if self.mode == AggregateMode::Updating {
                let new = if alive {
                    Some(self.evaluate(&mut group)?)
                } else {
                    None
                };
                if new != group.emitted {
                    if let Some(old) = group.emitted.take() {
                        rows.push((group.key.clone(), old, -1));
                    }
                    if let Some(new) = &new {
                        rows.push((group.key.clone(), new.clone(), 1));
                    }
                    group.emitted = new;
                }
            }
            self.groups[slot] = Some(group);
            if !alive {
                self.remove(slot)?;
            }
        }
        if !rows.is_empty() {
            out.push(self.rows(rows)?);
        }
        Ok(())
    }
}

impl Operator for AggregateOperator {
    fn describe(&self) -> String {
        let aggs: Vec<String> = self
            .aggs
            .iter()
            .map(|a| {
                let kind = match a.kind {
                    AccKind::Append => "append",
                    AccKind::Retract => "retract",
                    AccKind::Recompute => "recompute",
                };
                format!("{} [{kind}]", a.expr.name())
            })
            .collect();
        let mode = match self.mode {
            AggregateMode::Updating => "updating",
            AggregateMode::EmitOnWindowClose => "emit on window close",
        };
        let window = match self.window {
            Some(w) => format!(", window key: {}", self.group_names[w.group_index]),
            None => String::new(),
        };
        format!(
            "Aggregate: keys=[{}], aggregates=[{}], mode={mode}{window}",
            self.group_names.join(", "),
            aggs.join(", ")
        )
    }

    fn on_start(&mut self, out: &mut Vec<ChangeBatch>) -> WeirResult<()> {
        if self.is_global() {
            let group = Group {
                key: Vec::new(),
                encoded: Box::from(&[][..]),
                count: 0,
                accs: self.new_accumulators()?,
                values: vec![BTreeMap::new(); self.aggs.len()],
                emitted: None,
                window_end: None,
                dirty: false,
            };
            self.groups.push(Some(group));
            self.index.insert(Box::from(&[][..]), 0);
            self.emit_dirty(vec![0], out)?;
        }
        Ok(())
    }

    fn on_batch(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        let rows = &batch.rows;
        let n = rows.num_rows();
        if n == 0 {
            return Ok(());
        }
        let key_arrays = super::evaluate(&self.group_exprs, rows)?;
        // Group rows by slot, splitting inserts from retractions.
        let mut per_group: Vec<(usize, Vec<u32>, Vec<u32>)> = Vec::new();
        let mut position: HashMap<usize, usize> = HashMap::new();
        let keys = if key_arrays.is_empty() {
            None
        } else {
            Some(
                self.key_converter
                    .convert_columns(&key_arrays)
                    .map_err(|e| WeirError::internal(format!("group key: {e}")))?,
            )
        };
        for row in 0..n {
            let slot = match &keys {
                Some(keys) => self.slot(keys, &key_arrays, row)?,
                None => 0,
            };
            let at = *position.entry(slot).or_insert_with(|| {
                per_group.push((slot, Vec::new(), Vec::new()));
                per_group.len() - 1
            });
            let weight = batch.weights.as_ref().map_or(1, |w| w.value(row));
            for _ in 0..weight.unsigned_abs() {
                if weight > 0 {
                    per_group[at].1.push(row as u32);
                } else {
                    per_group[at].2.push(row as u32);
                }
            }
        }
        // Arguments of every aggregate, with its FILTER applied as a mask.
        let mut args: Vec<Vec<ArrayRef>> = Vec::with_capacity(self.aggs.len());
        let mut masks: Vec<Option<arrow::array::BooleanArray>> =
            Vec::with_capacity(self.aggs.len());
        for agg in &self.aggs {
            args.push(super::evaluate(&agg.expr.expressions(), rows)?);
            masks.push(match &agg.filter {
                Some(f) => {
                    let m = f
                        .evaluate(rows)
                        .and_then(|v| v.into_array(n))
                        .map_err(eval_error)?;
                    let m = m
                        .as_any()
                        .downcast_ref::<arrow::array::BooleanArray>()
                        .ok_or_else(|| WeirError::internal("aggregate FILTER is not boolean"))?
                        .clone();
                    Some(arrow::compute::prep_null_mask_filter(&m))
                }
                None => None,
            });
        }
        let mut dirty = Vec::with_capacity(per_group.len());
        for (slot, inserts, retracts) in per_group {
            let mut group = self.groups[slot]
                .take()
                .ok_or_else(|| WeirError::internal("aggregate group slot is empty"))?;
            group.count += inserts.len() as i64 - retracts.len() as i64;
            for (a, agg) in self.aggs.iter().enumerate() {
                for (indices, retract) in [(&inserts, false), (&retracts, true)] {
                    let indices: Vec<u32> = match &masks[a] {
                        Some(m) => indices
                            .iter()
                            .copied()
                            .filter(|&i| m.value(i as usize))
                            .collect(),
                        None => indices.clone(),
                    };
                    if indices.is_empty() {
                        continue;
                    }
                    let idx = UInt32Array::from(indices);
                    let values = args[a]
                        .iter()
                        .map(|c| take(c.as_ref(), &idx, None))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| WeirError::internal(format!("aggregate input: {e}")))?;
                    match (&mut group.accs[a], agg.kind) {
                        (Some(acc), AccKind::Append) if !retract => {
                            acc.update_batch(&values).map_err(eval_error)?
                        }
                        (Some(_), AccKind::Append) => {
                            return Err(WeirError::internal(
                                "append-only aggregate input carried a retraction",
                            ));
                        }
                        (Some(acc), _) if !retract => {
                            acc.update_batch(&values).map_err(eval_error)?
                        }
                        (Some(acc), _) => acc.retract_batch(&values).map_err(eval_error)?,
                        (None, _) => {
                            let converter = agg.converter.as_ref().ok_or_else(|| {
                                WeirError::internal("recompute aggregate without converter")
                            })?;
                            let encoded = converter.convert_columns(&values).map_err(|e| {
                                WeirError::internal(format!("aggregate values: {e}"))
                            })?;
                            let map = &mut group.values[a];
                            for r in encoded.iter() {
                                let entry = map.entry(r.as_ref().to_vec()).or_insert(0);
                                *entry += if retract { -1 } else { 1 };
                                if *entry == 0 {
                                    map.remove(r.as_ref());
                                }
                            }
                        }
                    }
                }
            }
            if !group.dirty {
                group.dirty = true;
                dirty.push(slot);
                if let Some(changes) = &mut self.changes {
                    changes.slots.insert(slot);
                }
            }
            self.groups[slot] = Some(group);
        }
        self.emit_dirty(dirty, out)
    }

    fn on_watermark(
        &mut self,
        _input: usize,
        watermark: EventTime,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<Option<EventTime>> {
        if watermark <= self.watermark {
            return Ok(None);
        }
        self.watermark = watermark;
        if self.window.is_some() {
            let still_open = self.closing.split_off(&watermark.saturating_add(1));
            let closed = std::mem::replace(&mut self.closing, still_open);
            let mut rows = Vec::new();
            for (end, slots) in closed {
                for slot in slots {
                    let Some(group) = self.groups[slot].as_mut() else {
                        continue;
                    };
                    if group.window_end != Some(end) {
                        continue; // the slot was reused by a later group
                    }
                    if self.mode == AggregateMode::EmitOnWindowClose && group.count > 0 {
                        let mut group = self.groups[slot]
                            .take()
                            .ok_or_else(|| WeirError::internal("closed group vanished"))?;
                        let values = self.evaluate(&mut group)?;
                        rows.push((group.key.clone(), values, 1));
                        self.groups[slot] = Some(group);
                    }
                    self.remove(slot)?;
                }
            }
            if !rows.is_empty() {
                out.push(self.rows(rows)?);
            }
        }
        Ok(Some(watermark))
    }

    fn snapshot(&mut self, out: &mut SnapshotWriter) -> WeirResult<()> {
        out.i64(self.watermark);
        let slots: Vec<usize> = (0..self.groups.len())
            .filter(|&s| self.groups[s].is_some())
            .collect();
        self.write_groups(&slots, out)?;
        self.changes = Some(ChangeSet::default());
        Ok(())
    }

    fn restore(&mut self, from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        self.groups.clear();
        self.index.clear();
        self.free.clear();
        self.closing.clear();
        self.watermark = from.i64()?;
        self.read_groups(from)?;
        self.changes = Some(ChangeSet::default());
        Ok(())
    }

    /// The removed keys, then the created or changed groups (whole, as in a snapshot).
    fn snapshot_changes(&mut self, out: &mut SnapshotWriter) -> WeirResult<bool> {
        let Some(changes) = self.changes.take() else {
            return Ok(false);
        };
        out.i64(self.watermark);
        out.u64(changes.removed.len() as u64);
        for key in &changes.removed {
            out.bytes(key);
        }
        let mut slots: Vec<usize> = changes
            .slots
            .into_iter()
            .filter(|&s| self.groups.get(s).is_some_and(|g| g.is_some()))
            .collect();
        slots.sort_unstable();
        self.write_groups(&slots, out)?;
        self.changes = Some(ChangeSet::default());
        Ok(true)
    }

    fn restore_changes(&mut self, from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        self.watermark = from.i64()?;
        for _ in 0..from.u64()? {
            let key = from.bytes()?;
            if let Some(&slot) = self.index.get(key) {
                self.remove(slot)?;
            }
        }
        self.read_groups(from)?;
        self.changes = Some(ChangeSet::default());
        Ok(())
    }
}

/// Checkpoint encoding of the groups: one batch with the key columns, the row count, the
/// window end, what was emitted, and each aggregate's state (its accumulator's `state()`
/// fields, or the recompute multiset as bytes).
impl AggregateOperator {
    /// The groups in `slots` (all alive) as a flag and, if any, one batch.
    fn write_groups(&mut self, slots: &[usize], out: &mut SnapshotWriter) -> WeirResult<()> {
        match self.snapshot_groups(slots)? {
            Some(batch) => {
                out.u64(1);
                out.batch(&batch)
            }
            None => {
                out.u64(0);
                Ok(())
            }
        }
    }

    /// Reads what [`Self::write_groups`] wrote, replacing groups with the same key.
    fn read_groups(&mut self, from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        if from.u64()? == 1 {
            let batch = from.batch()?;
            self.restore_groups(&batch)?;
        }
        Ok(())
    }
}

impl AggregateOperator {
    fn snapshot_groups(&mut self, slots: &[usize]) -> WeirResult<Option<RecordBatch>> {
        if slots.is_empty() {
            return Ok(None);
        }
        let internal = |e: arrow::error::ArrowError| WeirError::internal(format!("snapshot: {e}"));
        let n_keys = self.group_exprs.len();
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        let groups: Vec<&Group> = slots
            .iter()
            .filter_map(|&s| self.groups[s].as_ref())
            .collect();
        for k in 0..n_keys {
            let array = ScalarValue::iter_to_array(groups.iter().map(|g| g.key[k].clone()))
                .map_err(eval_error)?;
            add_column(&mut fields, &mut columns, format!("k{k}"), array);
        }
        let counts: ArrayRef = Arc::new(arrow::array::Int64Array::from_iter_values(
            groups.iter().map(|g| g.count),
        ));
        let ends: ArrayRef = Arc::new(arrow::array::Int64Array::from(
            groups.iter().map(|g| g.window_end).collect::<Vec<_>>(),
        ));
        let emitted_flags: ArrayRef = Arc::new(arrow::array::BooleanArray::from(
            groups
                .iter()
                .map(|g| g.emitted.is_some())
                .collect::<Vec<_>>(),
        ));
        for (name, array) in [
            ("count", counts),
            ("window_end", ends),
            ("emitted", emitted_flags),
        ] {
            add_column(&mut fields, &mut columns, name, array);
        }
        for a in 0..self.aggs.len() {
            let data_type = groups
                .iter()
                .find_map(|g| g.emitted.as_ref().map(|e| e[a].data_type()))
                .unwrap_or_else(|| self.schema.field(n_keys + a).data_type().clone());
            let null = ScalarValue::try_from(&data_type).map_err(eval_error)?;
            let array = ScalarValue::iter_to_array(groups.iter().map(|g| {
                g.emitted
                    .as_ref()
                    .map_or_else(|| null.clone(), |e| e[a].clone())
            }))
            .map_err(eval_error)?;
            add_column(&mut fields, &mut columns, format!("e{a}"), array);
        }
        let mut groups: Vec<Group> = slots
            .iter()
            .filter_map(|&s| self.groups[s].take())
            .collect();
        let result = (|| -> WeirResult<()> {
            for a in 0..self.aggs.len() {
                if self.aggs[a].kind == AccKind::Recompute {
                    let mut builder = arrow::array::BinaryBuilder::new();
                    for g in &groups {
                        let mut bytes = Vec::new();
                        for (value, n) in &g.values[a] {
                            bytes.extend_from_slice(&(value.len() as u64).to_le_bytes());
                            bytes.extend_from_slice(value);
                            bytes.extend_from_slice(&n.to_le_bytes());
                        }
                        builder.append_value(&bytes);
                    }
                    let array: ArrayRef = Arc::new(builder.finish());
                    add_column(&mut fields, &mut columns, format!("v{a}"), array);
                    continue;
                }
                let mut states: Vec<Vec<ScalarValue>> = Vec::with_capacity(groups.len());
                for g in &mut groups {
                    let acc = g.accs[a]
                        .as_mut()
                        .ok_or_else(|| WeirError::internal("aggregate without accumulator"))?;
                    let state = acc.state().map_err(eval_error)?;
                    // `state()` may leave some accumulators unusable: continue from a
                    // fresh one merged from the state, as recovery will.
                    let mut fresh = match self.aggs[a].kind {
                        AccKind::Retract => self.aggs[a].expr.create_sliding_accumulator(),
                        _ => self.aggs[a].expr.create_accumulator(),
                    }
                    .map_err(eval_error)?;
                    let arrays = state
                        .iter()
                        .map(|v| v.to_array())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(eval_error)?;
                    fresh.merge_batch(&arrays).map_err(eval_error)?;
                    *acc = fresh;
                    states.push(state);
                }
                let width = states.first().map_or(0, |s| s.len());
                for f in 0..width {
                    let array = ScalarValue::iter_to_array(states.iter().map(|s| s[f].clone()))
                        .map_err(eval_error)?;
                    add_column(&mut fields, &mut columns, format!("s{a}_{f}"), array);
                }
            }
            Ok(())
        })();
        for (slot, g) in slots.iter().zip(groups) {
            self.groups[*slot] = Some(g);
        }
        result?;
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        RecordBatch::try_new(schema, columns)
            .map(Some)
            .map_err(internal)
    }

    fn restore_groups(&mut self, batch: &RecordBatch) -> WeirResult<()> {
        let n_keys = self.group_exprs.len();
        let n = batch.num_rows();
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| WeirError::internal(format!("aggregate snapshot lacks {name}")))
        };
        let key_arrays: Vec<ArrayRef> = (0..n_keys)
            .map(|k| column(&format!("k{k}")))
            .collect::<WeirResult<_>>()?;
        let encoded = if n_keys == 0 {
            None
        } else {
            Some(
                self.key_converter
                    .convert_columns(&key_arrays)
                    .map_err(|e| WeirError::internal(format!("group key: {e}")))?,
            )
        };
        let counts: arrow::array::Int64Array = typed(&column("count")?)?;
        let ends: arrow::array::Int64Array = typed(&column("window_end")?)?;
        let flags: arrow::array::BooleanArray = typed(&column("emitted")?)?;
        let emitted: Vec<ArrayRef> = (0..self.aggs.len())
            .map(|a| column(&format!("e{a}")))
            .collect::<WeirResult<_>>()?;
        let mut state_columns: Vec<Vec<ArrayRef>> = Vec::with_capacity(self.aggs.len());
        for a in 0..self.aggs.len() {
            let prefix = format!("s{a}_");
            state_columns.push(
                batch
                    .schema()
                    .fields()
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.name().starts_with(&prefix))
                    .map(|(i, _)| batch.column(i).clone())
                    .collect(),
            );
        }
        for row in 0..n {
            let key = key_arrays
                .iter()
                .map(|a| ScalarValue::try_from_array(a, row))
                .collect::<Result<Vec<_>, _>>()
                .map_err(eval_error)?;
            let encoded: Box<[u8]> = match &encoded {
                Some(rows) => rows.row(row).as_ref().into(),
                None => Box::from(&[][..]),
            };
            let mut accs = self.new_accumulators()?;
            let mut values = vec![BTreeMap::new(); self.aggs.len()];
            for a in 0..self.aggs.len() {
                match &mut accs[a] {
                    Some(acc) => {
                        let slice: Vec<ArrayRef> =
                            state_columns[a].iter().map(|c| c.slice(row, 1)).collect();
                        acc.merge_batch(&slice).map_err(eval_error)?;
                    }
                    None => {
                        let bytes: arrow::array::BinaryArray = typed(&column(&format!("v{a}"))?)?;
                        values[a] = decode_multiset(bytes.value(row))?;
                    }
                }
            }
            let emitted = if flags.value(row) {
                Some(
                    emitted
                        .iter()
                        .map(|e| ScalarValue::try_from_array(e, row))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(eval_error)?,
                )
            } else {
                None
            };
            let window_end = (!ends.is_null(row)).then(|| ends.value(row));
            let group = Group {
                key,
                encoded: encoded.clone(),
                count: counts.value(row),
                accs,
                values,
                emitted,
                window_end,
                dirty: false,
            };
            // An incremental checkpoint replaces a restored group of the same key (same
            // window, so its `closing` entry stays).
            if let Some(&slot) = self.index.get(&encoded) {
                self.groups[slot] = Some(group);
                continue;
            }
            let slot = self.place(group);
            self.index.insert(encoded, slot);
            if let Some(end) = window_end {
                self.closing.entry(end).or_default().push(slot);
            }
        }
        Ok(())
    }
}

/// Appends a nullable snapshot column named `name`.
fn add_column(
    fields: &mut Vec<arrow::datatypes::Field>,
    columns: &mut Vec<ArrayRef>,
    name: impl Into<String>,
    array: ArrayRef,
) {
    fields.push(arrow::datatypes::Field::new(
        name,
        array.data_type().clone(),
        true,
    ));
    columns.push(array);
}

/// A snapshot column as its concrete array type.
fn typed<A: Array + Clone + 'static>(column: &ArrayRef) -> WeirResult<A> {
    column
        .as_any()
        .downcast_ref::<A>()
        .cloned()
        .ok_or_else(|| WeirError::internal("aggregate snapshot column has another type"))
}

fn decode_multiset(mut bytes: &[u8]) -> WeirResult<BTreeMap<Vec<u8>, i64>> {
    let bad = || WeirError::internal("aggregate snapshot: bad value multiset");
    let mut map = BTreeMap::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_at_checked(8).ok_or_else(bad)?;
        let len = usize::try_from(u64::from_le_bytes(len.try_into().map_err(|_| bad())?))
            .map_err(|_| bad())?;
        let (value, rest) = rest.split_at_checked(len).ok_or_else(bad)?;
        let (n, rest) = rest.split_at_checked(8).ok_or_else(bad)?;
        map.insert(
            value.to_vec(),
            i64::from_le_bytes(n.try_into().map_err(|_| bad())?),
        );
        bytes = rest;
    }
    Ok(map)
}
