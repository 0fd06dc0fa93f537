//! [`WindowAggregateOperator`]: the vectorized form of an `EMIT ON WINDOW CLOSE` aggregate over
//! an append-only input, with DataFusion's `GroupsAccumulator`s.
//!
//! Each open window (by its end) has its own group table: the group keys in Arrow's row
//! format and one `GroupsAccumulator` per aggregate, updated a batch at a time with group
//! indices (no per-group calls). When the watermark reaches a window's end, its accumulators
//! are evaluated in one call each (`EmitTo::All`), its rows are emitted, and its state is
//! dropped, so state is bounded by the open windows. The compiler uses it when every aggregate
//! has a groups accumulator; other EOWC aggregates take [`super::AggregateOperator`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, TimestampNanosecondArray, UInt32Array,
};
use arrow::compute::take;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::PhysicalExpr;

use super::project::eval_error;
use super::{AggregateInput, EventTime, NO_WATERMARK, Operator, WindowKey};
use crate::state::{SnapshotReader, SnapshotWriter};
use crate::types::{ChangeBatch, WeirError, WeirResult};

struct Window {
    /// Group key (row format) → group index.
    index: HashMap<Box<[u8]>, usize>,
    /// The keys in group-index order.
    keys: Rows,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
}

pub struct WindowAggregateOperator {
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    group_names: Vec<String>,
    aggs: Vec<AggregateInput>,
    schema: SchemaRef,
    window: WindowKey,
    converter: RowConverter,
    windows: BTreeMap<EventTime, Window>,
    watermark: EventTime,
}

fn internal(context: &str) -> impl Fn(arrow::error::ArrowError) -> WeirError + '_ {
    move |e| WeirError::internal(format!("{context}: {e}"))
}

impl WindowAggregateOperator {
    /// Whether every aggregate has a groups accumulator (and no DISTINCT).
    pub fn supports(aggs: &[AggregateInput]) -> bool {
        aggs.iter()
            .all(|(a, _)| a.groups_accumulator_supported() && !a.is_distinct())
    }

    pub fn try_new(
        group_exprs: Vec<Arc<dyn PhysicalExpr>>,
        group_names: Vec<String>,
        aggs: Vec<AggregateInput>,
        input_schema: &Schema,
        schema: SchemaRef,
        window: WindowKey,
    ) -> WeirResult<Self> {
        let fields = group_exprs
            .iter()
            .map(|e| e.data_type(input_schema).map(SortField::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(eval_error)?;
        let converter = RowConverter::new(fields).map_err(|e| {
            WeirError::unsupported(
                format!("cannot group by these column types: {e}"),
                "group by scalar columns (numbers, text, timestamps)",
            )
        })?;
        Ok(WindowAggregateOperator {
            group_exprs,
            group_names,
            aggs,
            schema,
            window,
            converter,
            windows: BTreeMap::new(),
            watermark: NO_WATERMARK,
        })
    }

    fn new_window(&self) -> WeirResult<Window> {
        Ok(Window {
            index: HashMap::new(),
            keys: self.converter.empty_rows(64, 1024),
            accumulators: self
                .aggs
                .iter()
                .map(|(a, _)| a.create_groups_accumulator())
                .collect::<Result<Vec<_>, _>>()
                .map_err(eval_error)?,
        })
    }

    /// The final rows of a closed window.
    fn emit(&self, mut window: Window) -> WeirResult<Option<RecordBatch>> {
        if window.index.is_empty() {
            return Ok(None);
        }
        let mut columns = self
            .converter
            .convert_rows(&window.keys)
            .map_err(internal("window keys"))?;
        for acc in &mut window.accumulators {
            columns.push(acc.evaluate(EmitTo::All).map_err(eval_error)?);
        }
        for (c, field) in columns.iter_mut().zip(self.schema.fields()) {
            if c.data_type() != field.data_type() {
                *c = arrow::compute::cast(c, field.data_type())
                    .map_err(internal("window output"))?;
            }
        }
        RecordBatch::try_new(self.schema.clone(), columns)
            .map(Some)
            .map_err(internal("window output"))
    }
}

impl Operator for WindowAggregateOperator {
    fn describe(&self) -> String {
        let aggs: Vec<&str> = self.aggs.iter().map(|(a, _)| a.name()).collect();
        format!(
            "WindowAggregate: keys=[{}], aggregates=[{}], mode=emit on window close, window key: {}, groups accumulators",
            self.group_names.join(", "),
            aggs.join(", "),
            self.group_names[self.window.group_index]
        )
    }

    fn on_batch(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        _out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        if batch
            .weights
            .as_ref()
            .is_some_and(|w| w.values().iter().any(|&x| x != 1))
        {
            return Err(WeirError::internal(
                "append-only window aggregate received a retraction",
            ));
        }
        let rows = &batch.rows;
        let n = rows.num_rows();
        if n == 0 {
            return Ok(());
        }
        let eval = |e: &Arc<dyn PhysicalExpr>| e.evaluate(rows).and_then(|v| v.into_array(n));
        let keys = super::evaluate(&self.group_exprs, rows)?;
        let mut args = Vec::with_capacity(self.aggs.len());
        let mut filters = Vec::with_capacity(self.aggs.len());
        for (agg, filter) in &self.aggs {
            args.push(super::evaluate(&agg.expressions(), rows)?);
            filters.push(match filter {
                Some(f) => {
                    let m = eval(f).map_err(eval_error)?;
                    Some(
                        m.as_any()
                            .downcast_ref::<BooleanArray>()
                            .ok_or_else(|| WeirError::internal("aggregate FILTER is not boolean"))?
                            .clone(),
                    )
                }
                None => None,
            });
        }
        let ends = keys[self.window.group_index]
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .ok_or_else(|| WeirError::internal("window key is not timestamp(ns)"))?;
        // Rows by window: a batch spans few windows.
        let mut parts: Vec<(EventTime, Vec<u32>)> = Vec::new();
        for (row, start) in ends.values().iter().enumerate() {
            let end = start.saturating_add(self.window.end_offset_ns);
            match parts.iter_mut().find(|(e, _)| *e == end) {
                Some((_, rows)) => rows.push(row as u32),
                None => parts.push((end, vec![row as u32])),
            }
        }
        let single = parts.len() == 1;
        for (end, indices) in parts {
            let pick = |arrays: &[ArrayRef]| -> WeirResult<Vec<ArrayRef>> {
                if single {
                    return Ok(arrays.to_vec());
                }
                let idx = UInt32Array::from(indices.clone());
                arrays
                    .iter()
                    .map(|a| take(a.as_ref(), &idx, None))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(internal("window rows"))
            };
            let part_keys = pick(&keys)?;
            let encoded = self
                .converter
                .convert_columns(&part_keys)
                .map_err(internal("window keys"))?;
            if !self.windows.contains_key(&end) {
                let window = self.new_window()?;
                self.windows.insert(end, window);
            }
            let window = self
                .windows
                .get_mut(&end)
                .ok_or_else(|| WeirError::internal("window vanished"))?;
            let mut groups = Vec::with_capacity(encoded.num_rows());
            for row in encoded.iter() {
                let next = window.index.len();
                let g = *window.index.entry(row.as_ref().into()).or_insert_with(|| {
                    window.keys.push(row);
                    next
                });
                groups.push(g);
            }
            let total = window.index.len();
            for (a, acc) in window.accumulators.iter_mut().enumerate() {
                let values = pick(&args[a])?;
                let filter = match &filters[a] {
                    Some(f) => {
                        let f: ArrayRef = Arc::new(f.clone());
                        let f = pick(&[f])?;
                        f[0].as_any().downcast_ref::<BooleanArray>().cloned()
                    }
                    None => None,
                };
                acc.update_batch(&values, &groups, filter.as_ref(), total)
                    .map_err(eval_error)?;
            }
        }
        Ok(())
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
        let open = self.windows.split_off(&watermark.saturating_add(1));
        let closed = std::mem::replace(&mut self.windows, open);
        for (_, window) in closed {
            if let Some(rows) = self.emit(window)? {
                out.push(ChangeBatch::inserts(rows));
            }
        }
        Ok(Some(watermark))
    }

    /// Per open window: its end and one batch of the keys followed by every accumulator's
    /// state (`state(EmitTo::All)`, which drains it; the window continues from accumulators
    /// merged from that state, as recovery does).
    fn snapshot(&mut self, out: &mut SnapshotWriter) -> WeirResult<()> {
        out.i64(self.watermark);
        let ends: Vec<EventTime> = self
            .windows
            .iter()
            .filter(|(_, w)| !w.index.is_empty())
            .map(|(e, _)| *e)
            .collect();
        out.u64(ends.len() as u64);
        for end in ends {
            let mut window = self
                .windows
                .remove(&end)
                .ok_or_else(|| WeirError::internal("window vanished"))?;
            let batch = self.window_state(&mut window)?;
            let restored = self.window_from_state(&batch)?;
            self.windows.insert(end, restored);
            out.i64(end);
            out.batch(&batch)?;
        }
        Ok(())
    }

    fn restore(&mut self, from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        self.watermark = from.i64()?;
        self.windows.clear();
        for _ in 0..from.u64()? {
            let end = from.i64()?;
            let batch = from.batch()?;
            let window = self.window_from_state(&batch)?;
            self.windows.insert(end, window);
        }
        Ok(())
    }
}

impl WindowAggregateOperator {
    fn window_state(&self, window: &mut Window) -> WeirResult<RecordBatch> {
        let mut columns = self
            .converter
            .convert_rows(&window.keys)
            .map_err(internal("window keys"))?;
        let mut fields: Vec<arrow::datatypes::Field> = columns
            .iter()
            .enumerate()
            .map(|(k, c)| {
                arrow::datatypes::Field::new(format!("k{k}"), c.data_type().clone(), true)
            })
            .collect();
        for (a, acc) in window.accumulators.iter_mut().enumerate() {
            for (f, state) in acc
                .state(EmitTo::All)
                .map_err(eval_error)?
                .into_iter()
                .enumerate()
            {
                fields.push(arrow::datatypes::Field::new(
                    format!("s{a}_{f}"),
                    state.data_type().clone(),
                    true,
                ));
                columns.push(state);
            }
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(internal("window snapshot"))
    }

    fn window_from_state(&self, batch: &RecordBatch) -> WeirResult<Window> {
        let mut window = self.new_window()?;
        let n_keys = self.group_exprs.len();
        let keys = batch.columns()[..n_keys.min(batch.num_columns())].to_vec();
        let encoded = self
            .converter
            .convert_columns(&keys)
            .map_err(internal("window keys"))?;
        for (g, row) in encoded.iter().enumerate() {
            window.keys.push(row);
            window.index.insert(row.as_ref().into(), g);
        }
        let groups: Vec<usize> = (0..batch.num_rows()).collect();
        let schema = batch.schema();
        for (a, acc) in window.accumulators.iter_mut().enumerate() {
            let prefix = format!("s{a}_");
            let states: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| f.name().starts_with(&prefix))
                .map(|(i, _)| batch.column(i).clone())
                .collect();
            acc.merge_batch(&states, &groups, groups.len())
                .map_err(eval_error)?;
        }
        Ok(window)
    }
}
