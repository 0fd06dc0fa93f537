//! [`DiscardOperator`]: drops every row. A source's monitor dataflow (input → discard) reads
//! the source even when no view does, so its counts, dead letters and late rows stay current.

use super::Operator;
use crate::types::{ChangeBatch, WeirResult};

pub struct DiscardOperator;

impl Operator for DiscardOperator {
    fn describe(&self) -> String {
        "Discard".to_string()
    }

    fn on_batch(
        &mut self,
        _input: usize,
        _batch: ChangeBatch,
        _out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        Ok(())
    }

    fn on_watermark(
        &mut self,
        _input: usize,
        _watermark: super::EventTime,
        _out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<Option<super::EventTime>> {
        Ok(None)
    }
}
