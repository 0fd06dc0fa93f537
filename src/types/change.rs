//! [`ChangeBatch`]: a `RecordBatch` of rows with an optional weight per row
//! (+1 insert, −1 delete), the Z-set unit that logs, state and operators pass on.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};

use super::{SqlState, WeirError};

/// Name of the weight column when a change batch is stored as one Arrow batch.
pub const WEIGHT_COLUMN: &str = "__weir_weight";

/// Rows plus a weight per row. `weights == None` means every row is an insert
/// (+1), the common append-only case that skips the column entirely.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    pub rows: RecordBatch,
    pub weights: Option<Int64Array>,
}

impl ChangeBatch {
    /// All rows inserted.
    pub fn inserts(rows: RecordBatch) -> Self {
        ChangeBatch {
            rows,
            weights: None,
        }
    }

    /// All rows deleted.
    pub fn deletes(rows: RecordBatch) -> Self {
        let weights = Int64Array::from(vec![-1; rows.num_rows()]);
        ChangeBatch {
            rows,
            weights: Some(weights),
        }
    }

    pub fn num_rows(&self) -> usize {
        self.rows.num_rows()
    }

    /// One Arrow batch: the rows, plus [`WEIGHT_COLUMN`] when weights exist.
    pub fn to_batch(&self) -> Result<RecordBatch, WeirError> {
        let Some(weights) = &self.weights else {
            return Ok(self.rows.clone());
        };
        let mut fields: Vec<Arc<Field>> = self.rows.schema().fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(WEIGHT_COLUMN, DataType::Int64, false)));
        let mut columns: Vec<ArrayRef> = self.rows.columns().to_vec();
        columns.push(Arc::new(weights.clone()));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
            .map_err(|e| WeirError::internal(format!("building change batch: {e}")))
    }

    /// Inverse of [`ChangeBatch::to_batch`].
    pub fn from_batch(batch: RecordBatch) -> Result<Self, WeirError> {
        let schema = batch.schema();
        let Some((idx, _)) = schema.column_with_name(WEIGHT_COLUMN) else {
            return Ok(ChangeBatch::inserts(batch));
        };
        let weights = batch
            .column(idx)
            .as_any()
            .downcast_ref::<Int64Array>()
            .ok_or_else(|| WeirError::new(SqlState::DATA_CORRUPTED, "weight column is not bigint"))?
            .clone();
        if weights.null_count() > 0 {
            return Err(WeirError::new(
                SqlState::DATA_CORRUPTED,
                "weight column has nulls",
            ));
        }
        let mut rows = batch;
        rows.remove_column(idx);
        Ok(ChangeBatch {
            rows,
            weights: Some(weights),
        })
    }
}
