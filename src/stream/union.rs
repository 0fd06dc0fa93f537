//! [`UnionOperator`]: `UNION ALL` of several inputs with one schema; its watermark is the
//! minimum of its inputs' watermarks.

use arrow::datatypes::SchemaRef;

use super::{EventTime, NO_WATERMARK, Operator, with_schema};
use crate::state::{SnapshotReader, SnapshotWriter};
use crate::types::{ChangeBatch, WeirResult};

pub struct UnionOperator {
    schema: SchemaRef,
    /// The last watermark of each input.
    watermarks: Vec<EventTime>,
    sent: EventTime,
}

impl UnionOperator {
    pub fn new(schema: SchemaRef, inputs: usize) -> Self {
        UnionOperator {
            schema,
            watermarks: vec![NO_WATERMARK; inputs],
            sent: NO_WATERMARK,
        }
    }
}

impl Operator for UnionOperator {
    fn describe(&self) -> String {
        format!("UnionAll: {} inputs", self.watermarks.len())
    }

    fn on_batch(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        out.push(with_schema(batch, &self.schema)?);
        Ok(())
    }

    fn on_watermark(
        &mut self,
        input: usize,
        watermark: EventTime,
        _out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<Option<EventTime>> {
        if let Some(w) = self.watermarks.get_mut(input) {
            *w = (*w).max(watermark);
        }
        let min = self
            .watermarks
            .iter()
            .copied()
            .min()
            .unwrap_or(NO_WATERMARK);
        if min > self.sent {
            self.sent = min;
            return Ok(Some(min));
        }
        Ok(None)
    }

    fn snapshot(&mut self, out: &mut SnapshotWriter) -> WeirResult<()> {
        out.i64(self.sent);
        for w in &self.watermarks {
            out.i64(*w);
        }
        Ok(())
    }

    fn restore(&mut self, from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        self.sent = from.i64()?;
        for w in &mut self.watermarks {
            *w = from.i64()?;
        }
        Ok(())
    }
}
