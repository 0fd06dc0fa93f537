//! [`WindowOperator`]: assigns each row its event-time windows and appends `window_start` and
//! `window_end` (TUMBLE: one window; HOP: `size / slide` windows, the row repeated for each).
//!
//! Windows are half-open, `[start, end)`, and aligned to the Unix epoch: a row at exactly a
//! boundary belongs to the window that starts there. A NULL event time belongs to no window
//! (only tables can hold one; sources dead-letter such rows). The same function serves batch
//! queries over `TUMBLE(...)`/`HOP(...)`, so batch and streaming assign identical windows.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, TimestampNanosecondArray, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::SchemaRef;

use super::Operator;
use crate::types::{ChangeBatch, WeirError, WeirResult};

/// A window function and its sizes, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    Tumble { size_ns: i64 },
    Hop { slide_ns: i64, size_ns: i64 },
}

impl WindowKind {
    pub fn size_ns(&self) -> i64 {
        match self {
            WindowKind::Tumble { size_ns } | WindowKind::Hop { size_ns, .. } => *size_ns,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            WindowKind::Tumble { size_ns } => format!("TUMBLE(size={})", ms(*size_ns)),
            WindowKind::Hop { slide_ns, size_ns } => {
                format!("HOP(slide={}, size={})", ms(*slide_ns), ms(*size_ns))
            }
        }
    }

    /// `rows` with `window_start`, `window_end` appended (`schema` is the result's schema),
    /// and for each output row the input row it came from.
    pub fn assign(
        &self,
        rows: &RecordBatch,
        time_column: usize,
        schema: &SchemaRef,
    ) -> WeirResult<(RecordBatch, UInt32Array)> {
        let times = rows
            .column(time_column)
            .as_any()
            .downcast_ref::<TimestampNanosecondArray>()
            .ok_or_else(|| WeirError::internal("window time column is not timestamp(ns)"))?;
        let (slide, size) = match *self {
            WindowKind::Tumble { size_ns } => (size_ns, size_ns),
            WindowKind::Hop { slide_ns, size_ns } => (slide_ns, size_ns),
        };
        let mut indices: Vec<u32> = Vec::with_capacity(rows.num_rows());
        let mut starts: Vec<i64> = Vec::with_capacity(rows.num_rows());
        for row in 0..times.len() {
            if times.is_null(row) {
                continue;
            }
            let t = times.value(row);
            // Every aligned start s with s <= t < s + size; a time so near the ends of the
            // range that its window bounds do not fit belongs to no window.
            let Some(mut start) = t.div_euclid(slide).checked_mul(slide) else {
                continue;
            };
            let lowest = t.saturating_sub(size);
            while start > lowest {
                indices.push(row as u32);
                starts.push(start);
                match start.checked_sub(slide) {
                    Some(s) => start = s,
                    None => break,
                }
            }
        }
        let indices = UInt32Array::from(indices);
        let mut columns: Vec<ArrayRef> = rows
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &indices, None))
            .collect::<Result<_, _>>()
            .map_err(|e| WeirError::internal(format!("window assignment: {e}")))?;
        let ends: Vec<i64> = starts.iter().map(|s| s.saturating_add(size)).collect();
        columns.push(Arc::new(TimestampNanosecondArray::from(starts)));
        columns.push(Arc::new(TimestampNanosecondArray::from(ends)));
        let batch = RecordBatch::try_new(schema.clone(), columns)
            .map_err(|e| WeirError::internal(format!("window assignment: {e}")))?;
        Ok((batch, indices))
    }
}

fn ms(ns: i64) -> String {
    if ns % 1_000_000_000 == 0 {
        format!("{}s", ns / 1_000_000_000)
    } else {
        format!("{}ms", ns / 1_000_000)
    }
}

pub struct WindowOperator {
    kind: WindowKind,
    time_column: usize,
    schema: SchemaRef,
}

impl WindowOperator {
    pub fn new(kind: WindowKind, time_column: usize, schema: SchemaRef) -> Self {
        WindowOperator {
            kind,
            time_column,
            schema,
        }
    }
}

impl Operator for WindowOperator {
    fn describe(&self) -> String {
        format!(
            "Window: {} on column {}",
            self.kind.describe(),
            self.schema.field(self.time_column).name()
        )
    }

    fn on_batch(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        let (rows, indices) = self
            .kind
            .assign(&batch.rows, self.time_column, &self.schema)?;
        let weights = super::take_weights(batch.weights.as_ref(), &indices)?;
        out.push(ChangeBatch { rows, weights });
        Ok(())
    }
}
