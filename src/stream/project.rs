//! Stateless operators: [`ProjectOperator`] (expressions per row) and [`FilterOperator`]
//! (keep rows whose predicate is true), both evaluating DataFusion `PhysicalExpr`s on whole
//! batches. Weights pass through untouched, so retractions flow like inserts.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use datafusion::physical_expr::PhysicalExpr;

use super::{Operator, filter_change};
use crate::types::{ChangeBatch, WeirError, WeirResult};

/// Evaluates one expression per output column.
pub struct ProjectOperator {
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
}

impl ProjectOperator {
    pub fn new(exprs: Vec<Arc<dyn PhysicalExpr>>, schema: SchemaRef) -> Self {
        ProjectOperator { exprs, schema }
    }
}

/// A DataFusion evaluation error, as the user's data error it is.
pub(crate) fn eval_error(e: datafusion::error::DataFusionError) -> WeirError {
    let text = e.to_string();
    let state = if text.contains("Divide by zero") {
        crate::types::SqlState::DIVISION_BY_ZERO
    } else if text.contains("Overflow") || text.contains("overflow") {
        crate::types::SqlState::NUMERIC_VALUE_OUT_OF_RANGE
    } else {
        crate::types::SqlState::DATA_EXCEPTION
    };
    WeirError::new(state, format!("evaluating a materialized view: {text}"))
}

impl Operator for ProjectOperator {
    fn describe(&self) -> String {
        let exprs: Vec<String> = self.exprs.iter().map(|e| e.to_string()).collect();
        format!("Project: {}", exprs.join(", "))
    }

    fn on_batch(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        let n = batch.rows.num_rows();
        let columns = super::evaluate(&self.exprs, &batch.rows)?;
        // A projection of no columns (count(*) needs none) still has its rows.
        let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
        let rows = RecordBatch::try_new_with_options(self.schema.clone(), columns, &options)
            .map_err(|e| WeirError::internal(format!("projection: {e}")))?;
        out.push(ChangeBatch {
            rows,
            weights: batch.weights,
        });
        Ok(())
    }
}

/// Keeps the rows whose predicate is true (NULL counts as false, as in SQL).
pub struct FilterOperator {
    predicate: Arc<dyn PhysicalExpr>,
}

impl FilterOperator {
    pub fn new(predicate: Arc<dyn PhysicalExpr>) -> Self {
        FilterOperator { predicate }
    }
}

impl Operator for FilterOperator {
    fn describe(&self) -> String {
        format!("Filter: {}", self.predicate)
    }

    fn on_batch(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        let n = batch.rows.num_rows();
        let mask = self
            .predicate
            .evaluate(&batch.rows)
            .and_then(|v| v.into_array(n))
            .map_err(eval_error)?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| WeirError::internal("filter predicate is not boolean"))?;
        let mask = if mask.null_count() > 0 {
            arrow::compute::prep_null_mask_filter(mask)
        } else {
            mask.clone()
        };
        if mask.true_count() == n {
            out.push(batch);
        } else if mask.true_count() > 0 {
            out.push(filter_change(&batch, &mask)?);
        }
        Ok(())
    }
}
